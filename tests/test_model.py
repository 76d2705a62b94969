"""The forward pass against logits and routing computed by xAI's reference code."""

import re

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import (
    LanguageModelConfig,
    QuantizedWeight8bit,
    Router,
    TransformerConfig,
    config_from_dict,
    dequantize,
    ffn_size,
    grok_1_config,
)
from reference_data import check_logits, reference
from runner_cache import fixture_runner


def test_ffn_size_of_grok_1():
    assert ffn_size(6144, 8) == 32768
    assert ffn_size(64, 8) == 344


def test_grok_1_config_parameter_count():
    config = grok_1_config()
    transformed = hk.transform(lambda tokens: config.make()(tokens))
    shapes = jax.eval_shape(transformed.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    leaves = jax.tree_util.tree_leaves(shapes, is_leaf=lambda x: isinstance(x, QuantizedWeight8bit))
    assert len(leaves) == 770
    count = sum(np.prod(leaf.shape) for leaf in leaves)
    # The released model: about 315.7e9 parameters (quoted as 314B).
    assert 315.5e9 < count < 315.9e9


def test_dequantize_row_blocks():
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, size=(2, 16, 3), dtype=np.int8)
    scales = rng.uniform(0.5, 2.0, size=(2, 8, 3)).astype(jnp.bfloat16)
    expected = weight.astype(np.float32) * np.repeat(scales.astype(np.float32), 2, axis=1)
    got = dequantize(QuantizedWeight8bit(jnp.asarray(weight), jnp.asarray(scales)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(got), expected.astype(jnp.bfloat16).astype(np.float32))


def test_config_rejects_bad_heads():
    with pytest.raises(ValueError, match="num_kv_heads"):
        TransformerConfig(emb_size=64, key_size=16, num_q_heads=6, num_kv_heads=4, num_layers=1,
                          num_experts=8, num_selected_experts=2)


@pytest.mark.parametrize("name", ["grok1-tiny", "grok1-tiny-kv8"])
def test_full_logits_match_reference(name):
    runner = fixture_runner(name)
    ref = reference(name)
    logits = runner.runner.logits(ref["full_tokens"])
    for row in range(len(logits)):
        check_logits(logits[row], ref["full_logits"][row], ref["full_routing_min_gap"][row])


@pytest.mark.parametrize("name", ["grok1-tiny", "grok1-tiny-kv8"])
def test_padded_batch_matches_reference(name):
    runner = fixture_runner(name)
    ref = reference(name)
    logits = runner.runner.logits(ref["padded_tokens"])
    for row, length in enumerate(ref["padded_lengths"]):
        check_logits(
            logits[row, :length],
            ref["padded_logits"][row, :length],
            ref["padded_routing_min_gap"][row, :length],
        )


def router_logits(runner, tokens: np.ndarray) -> np.ndarray:
    """Return every layer's router logits `[layer, batch, seq, experts]` for `tokens`."""
    model_runner = runner.runner
    config: LanguageModelConfig = model_runner.config

    def forward(tokens):
        records = []

        def record_router(next_fn, args, kwargs, context):
            out = next_fn(*args, **kwargs)
            if isinstance(context.module, Router) and context.method_name == "__call__":
                records.append(out[0])
            return out

        with hk.intercept_methods(record_router):
            config.make()(tokens)
        return jnp.stack(records)

    apply = jax.jit(hk.transform(forward).apply)
    batch, seq = tokens.shape
    logits = apply(model_runner.params, None, jnp.asarray(tokens))
    return np.asarray(logits).reshape(config.model.num_layers, batch, seq, -1)


@pytest.mark.parametrize("name", ["grok1-tiny", "grok1-tiny-kv8"])
def test_routing_matches_reference(name):
    runner = fixture_runner(name)
    ref = reference(name)
    ours = router_logits(runner, ref["full_tokens"]).transpose(1, 0, 2, 3)  # [seq, layer, pos, expert]
    expected = ref["routing_logits"]

    # Router logits are float32 products of the bfloat16 residual stream, so
    # they agree to the stream's rounding noise.
    assert np.abs(ours - expected).mean() < 0.02

    # The chosen experts agree wherever the 2nd and 3rd logits are not a near tie.
    top3 = np.sort(expected, axis=-1)[..., -3:]
    clear = top3[..., 1] - top3[..., 0] >= 0.05
    chosen = np.sort(np.argsort(-ours, axis=-1)[..., :2], axis=-1)
    expected_chosen = np.sort(ref["routing_expert_index"], axis=-1)
    agree = np.all(chosen == expected_chosen, axis=-1)
    assert agree[clear].all(), f"{(~agree[clear]).sum()} clear routing decisions differ"
    np.testing.assert_array_equal(
        np.sort(chosen[0, 0], axis=-1)[clear[0, 0]],
        np.sort(ref["layer0_seq1_expert_index"], axis=-1)[clear[0, 0]],
    )


def test_real_vocab_top16_match_reference():
    name = "grok1-tiny-vocab"
    runner = fixture_runner(name)
    ref = reference(name)
    logits = runner.runner.logits(ref["full_tokens"][None])[0]  # [seq, vocab]
    logprobs = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), axis=-1))

    for position in range(len(ref["full_tokens"])):
        ids = ref["top16_ids"][position]
        # Log-probabilities within 0.1: the float32 NumPy implementation is within 0.066.
        np.testing.assert_allclose(logprobs[position, ids], ref["top16_logprobs"][position], atol=0.1)

        # Rank order agrees where neighbouring reference logits are 0.1 apart or more.
        order = np.argsort(-logits[position], kind="stable")[:16]
        ref_logits = ref["top16_logits"][position]
        for rank in range(15):
            gap_above = ref_logits[rank - 1] - ref_logits[rank] if rank else np.inf
            gap_below = ref_logits[rank] - ref_logits[rank + 1]
            if min(gap_above, gap_below) >= 0.1:
                assert order[rank] == ids[rank], f"position {position}, rank {rank}"


def minimal_config_dict() -> dict:
    return {
        "LanguageModelConfig": {"vocab_size": 64, "pad_token": 0, "eos_token": 2, "sequence_len": 16},
        "TransformerConfig": {
            "emb_size": 16, "key_size": 8, "num_q_heads": 2, "num_kv_heads": 1, "num_layers": 2,
            "num_experts": 8, "num_selected_experts": 2, "shard_activations": True,
        },
    }


def test_config_from_dict_builds_config():
    config = config_from_dict(minimal_config_dict())
    assert config.model.num_layers == 2
    assert config.model.vocab_size == 64


@pytest.mark.parametrize(
    "section, field, value, message",
    [
        ("TransformerConfig", "num_layers", "6", "TransformerConfig.num_layers is '6', not an integer"),
        ("TransformerConfig", "emb_size", 16.0, "TransformerConfig.emb_size is 16.0, not an integer"),
        ("TransformerConfig", "num_layers", 0, "TransformerConfig.num_layers is 0: it must be at least 1"),
        ("TransformerConfig", "shard_activations", 1, "shard_activations is 1, not true or false"),
        ("LanguageModelConfig", "sequence_len", True, "sequence_len is True, not an integer"),
        ("LanguageModelConfig", "embedding_multiplier_scale", "8", "embedding_multiplier_scale is '8', not a number"),
    ],
)
def test_config_from_dict_rejects_invalid_field(section, field, value, message):
    data = minimal_config_dict()
    data[section][field] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        config_from_dict(data)


@pytest.mark.parametrize("section", ["LanguageModelConfig", "TransformerConfig"])
@pytest.mark.parametrize("value", [None, [1, 2], "fields"])
def test_config_from_dict_rejects_non_object_section(section, value):
    data = minimal_config_dict()
    data[section] = value
    with pytest.raises(ValueError, match=f"{section} is .*, not a JSON object of fields"):
        config_from_dict(data)
