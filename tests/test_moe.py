"""The sparse MoE against the dense reference path and the fixtures."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from model import QuantizedWeight8bit, dense_moe, sharded_sparse_moe, sparse_moe
from reference_data import check_logits, first_fragile_step, greedy_prompts, reference
from runner_cache import fixture_runner, mesh_of
from runners import Request

EXPERTS, EMB, FFN = 8, 64, 96


def random_experts(seed: int, down_row_blocks: int = 8):
    """Return int8 expert weights with Grok-1's scale layout: gate, up [E, emb, ffn]; down [E, ffn, emb]."""
    rng = np.random.default_rng(seed)

    def quantized(shape, row_blocks):
        weight = rng.integers(-127, 128, size=shape, dtype=np.int8)
        scales_shape = shape[:-2] + (row_blocks, shape[-1])
        scales = rng.uniform(0.5, 1.5, size=scales_shape) / (127 * np.sqrt(shape[-2]))
        return QuantizedWeight8bit(jnp.asarray(weight), jnp.asarray(scales, jnp.bfloat16))

    return (
        quantized((EXPERTS, EMB, FFN), 1),
        quantized((EXPERTS, EMB, FFN), 1),
        quantized((EXPERTS, FFN, EMB), down_row_blocks),
    )


def exact_moe(x, gates, expert_index, w_gate, w_up, w_down):
    """The MoE in float64 NumPy on exactly dequantized weights, one token at a time."""

    def dequantized(w):
        weight = np.asarray(w.weight, np.float64)
        scales = np.asarray(w.scales.astype(jnp.float32), np.float64)
        return weight * np.repeat(scales, weight.shape[-2] // scales.shape[-2], axis=-2)

    gate, up, down = (dequantized(w) for w in (w_gate, w_up, w_down))
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(expert_index.shape[1]):
            e = int(expert_index[t, k])
            h = np.asarray(jax.nn.gelu(x[t] @ gate[e])) * (x[t] @ up[e])
            out[t] += float(gates[t, k]) * (h @ down[e])
    return out


ROUTINGS = {
    # Every token picks two random distinct experts.
    "random": lambda rng, tokens: np.stack([rng.permutation(EXPERTS)[:2] for _ in range(tokens)]),
    # Only experts 2 and 5 get tokens; the other six are empty.
    "two_experts_used": lambda rng, tokens: np.tile([[2, 5]], (tokens, 1)),
    # Both experts of each token are neighbours, so with experts split over
    # shards they sit in the same shard.
    "neighbours": lambda rng, tokens: np.stack([[e, e + 1] for e in rng.integers(0, EXPERTS - 1, tokens)]),
    # One token: the decode case at batch 1.
    "single_token": lambda rng, tokens: np.asarray([[7, 0]]),
}


PATHS = {
    "grouped, tiles of 3": dict(tile_rows=3, gather_max_rows=0),
    "grouped, tiles of 64": dict(tile_rows=64, gather_max_rows=0),
    "gather": dict(gather_max_rows=10**6),
}


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("path", sorted(PATHS))
def test_sparse_moe_equals_exact(routing, path):
    rng = np.random.default_rng(1)
    tokens = 1 if routing == "single_token" else 13
    expert_index = ROUTINGS[routing](rng, tokens).astype(np.int32)
    gates = rng.uniform(0.1, 0.6, size=expert_index.shape).astype(np.float32)
    x = rng.normal(size=(tokens, EMB)).astype(np.float32)
    weights = random_experts(2)

    sparse = jax.jit(functools.partial(sparse_moe, num_experts=EXPERTS, **PATHS[path]))
    got = np.asarray(sparse(jnp.asarray(x), jnp.asarray(gates), jnp.asarray(expert_index), *weights))
    expected = exact_moe(x, gates, expert_index, *weights)

    # float32 products of int8 values with float32 scales: only float32 rounding remains.
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, atol=1e-5 * scale)


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
def test_sparse_moe_matches_dense(routing):
    rng = np.random.default_rng(3)
    tokens = 1 if routing == "single_token" else 29
    expert_index = jnp.asarray(ROUTINGS[routing](rng, tokens), jnp.int32)
    gates = jnp.asarray(rng.uniform(0.1, 0.6, size=expert_index.shape), jnp.float32)
    x = jnp.asarray(rng.normal(size=(tokens, EMB)), jnp.float32)
    weights = random_experts(4)

    dense = jax.jit(functools.partial(dense_moe, num_experts=EXPERTS))(x, gates, expert_index, *weights)
    sparse = jax.jit(functools.partial(sparse_moe, num_experts=EXPERTS))(x, gates, expert_index, *weights)

    # The dense path rounds each dequantized weight to bfloat16 (relative
    # error up to 2^-9); the sparse path scales after the product in float32.
    scale = float(jnp.abs(dense).max())
    np.testing.assert_allclose(np.asarray(sparse), np.asarray(dense), atol=1e-2 * scale)


@pytest.mark.parametrize(
    "mesh_shape, down_row_blocks",
    [((1, 8), 8), ((2, 4), 8), ((1, 8), 4), ((1, 2), 8)],
)
def test_sharded_sparse_moe_matches_unsharded(mesh_shape, down_row_blocks):
    """Each device runs its slice of the hidden dimension; the result is the same.

    With 4 row blocks on 8 shards, each shard's rows are half of one block.
    """
    rng = np.random.default_rng(5)
    expert_index = jnp.asarray(ROUTINGS["random"](rng, 40), jnp.int32)
    gates = jnp.asarray(rng.uniform(0.1, 0.6, size=expert_index.shape), jnp.float32)
    x = jnp.asarray(rng.normal(size=(40, EMB)), jnp.float32)
    w_gate, w_up, w_down = random_experts(6, down_row_blocks)

    mesh = mesh_of(mesh_shape)
    columns = NamedSharding(mesh, P(None, None, "model"))
    rows = QuantizedWeight8bit(NamedSharding(mesh, P(None, "model", None)), NamedSharding(mesh, P()))
    sharded = [
        jax.device_put(w_gate, QuantizedWeight8bit(columns, columns)),
        jax.device_put(w_up, QuantizedWeight8bit(columns, columns)),
        jax.device_put(w_down, rows),
    ]
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data", None)))

    run = jax.jit(functools.partial(
        sharded_sparse_moe, num_experts=EXPERTS, data_axis="data", model_axis="model"
    ))
    with jax.set_mesh(mesh):
        got = run(x_sharded, gates, expert_index, *sharded)
        hlo = run.lower(x_sharded, gates, expert_index, *sharded).compile().as_text()
    expected = sparse_moe(x, gates, expert_index, w_gate, w_up, w_down, num_experts=EXPERTS)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)

    # No device gathers the weights of another: only the output is summed.
    assert "all-gather" not in hlo
    assert "all-reduce" in hlo


@pytest.mark.parametrize(
    "name, mesh_shape",
    [
        ("grok1-tiny", (1, 8)),
        ("grok1-tiny-kv8", (1, 1)),
        ("grok1-tiny-kv8", (1, 8)),
        ("grok1-tiny-vocab", (1, 8)),
    ],
)
def test_sparse_and_dense_agree_on_fixture(name, mesh_shape):
    ref = reference(name)
    sparse = fixture_runner(name, mesh_shape)
    dense = fixture_runner(name, mesh_shape, moe_impl="dense")
    assert sparse.config.model.moe_impl == "sparse"
    assert dense.config.model.moe_impl == "dense"

    # Prefill: logits over whole sequences, both within the reference's tolerance.
    if "full_logits" in ref:
        for runner in (sparse, dense):
            logits = runner.runner.logits(ref["full_tokens"])
            for row in range(len(logits)):
                check_logits(logits[row], ref["full_logits"][row], ref["full_routing_min_gap"][row])

    # Decode through the KV cache: the same greedy tokens up to the first near tie.
    requests = [Request(prompt_ids=p, temperature=0.0, max_len=12) for p in greedy_prompts(ref)]
    for row, (a, b) in enumerate(zip(sparse.generate(requests), dense.generate(requests))):
        checked = first_fragile_step(ref["greedy_top2_margin"][row][:12])
        assert a.token_ids[:checked] == b.token_ids[:checked]
        assert a.token_ids[:checked] == ref["greedy_tokens"][row][:checked].tolist()
