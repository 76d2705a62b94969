"""Runners over the reference fixtures, built once per (fixture, mesh shape) and reused."""

import dataclasses
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
def fixture_runner(name: str, mesh_shape=(1, 8), tokenizer=None, moe_impl=None) -> InferenceRunner:
    """Return a runner of fixture `name` on a `mesh_shape` mesh; `moe_impl` None keeps the default."""
    config = fixture_config(name)
    if moe_impl is not None:
        config.model = dataclasses.replace(config.model, moe_impl=moe_impl)
    runner = InferenceRunner(
        runner=ModelRunner(config),
        load=str(fixture_dir(name)),
        tokenizer_path=tokenizer,
    )
    runner.initialize(mesh_of(mesh_shape))
    return runner
