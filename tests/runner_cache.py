"""Runners over the reference fixtures, built once per (fixture, mesh shape) and reused."""

import functools
import math

import jax
import numpy as np
from jax.sharding import Mesh

from reference_data import fixture_config, fixture_dir
from runners import MESH_AXES, InferenceRunner, ModelRunner


def mesh_of(shape: tuple[int, int]) -> Mesh:
    """Return a (data, model) mesh of `shape` over the first devices."""
    devices = jax.devices()[: math.prod(shape)]
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


@functools.lru_cache(maxsize=None)
def fixture_runner(name: str, mesh_shape=(1, 8), tokenizer=None, **runner_options) -> InferenceRunner:
    runner = InferenceRunner(
        runner=ModelRunner(fixture_config(name), **runner_options),
        load=str(fixture_dir(name)),
        tokenizer_path=tokenizer,
    )
    runner.initialize(mesh_of(mesh_shape))
    return runner
