"""Random-weight checkpoints in the released format, shared by the benchmarks."""

import math
import time
from pathlib import Path

import haiku as hk
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

import checkpoint
from model import LanguageModelConfig, QuantizedWeight8bit


def abstract_params(config: LanguageModelConfig):
    """Return the model's parameter tree of `jax.ShapeDtypeStruct`s."""
    init = hk.transform(lambda tokens: config.make()(tokens)).init
    return jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))


def random_leaf(leaf, rng: np.random.Generator):
    """Return random values for one parameter, scaled like a trained layer's.

    int8 values come from raw random bytes (fast); scales are about
    1 / (127 * sqrt(fan_in)), so each linear layer keeps the activations'
    magnitude. float32 leaves (embedding, norms, router) are standard normal.
    """
    if isinstance(leaf, QuantizedWeight8bit):
        size = math.prod(leaf.weight.shape)
        weight = np.frombuffer(rng.bytes(size), np.int8).reshape(leaf.weight.shape)
        fan_in = leaf.weight.shape[-2]
        scales = rng.uniform(0.5, 1.5, leaf.scales.shape) / (127 * math.sqrt(fan_in))
        return QuantizedWeight8bit(weight=weight, scales=scales.astype(ml_dtypes.bfloat16))
    return rng.standard_normal(leaf.shape, np.float32)


def ensure_checkpoint(directory: Path, shapes, seed: int = 0) -> None:
    """Write a random checkpoint of `shapes` to `directory` unless a valid one is there."""
    try:
        checkpoint.validate_checkpoint(directory, shapes)
        print(f"Reusing the checkpoint in {directory}")
        return
    except checkpoint.CheckpointError:
        pass

    if directory.exists():
        for entry in directory.iterdir():
            if checkpoint.TENSOR_FILE_PATTERN.match(entry.name):
                entry.unlink()
    print(f"Writing a benchmark checkpoint to {directory} ...", flush=True)
    start = time.monotonic()
    rng = np.random.default_rng(seed)
    params = jax.tree_util.tree_map(
        lambda leaf: random_leaf(leaf, rng), shapes, is_leaf=lambda x: isinstance(x, QuantizedWeight8bit)
    )
    checkpoint.save_checkpoint(directory, params)
    print(f"  written in {time.monotonic() - start:.1f} s", flush=True)
