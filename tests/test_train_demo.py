"""The demo model's training recipe (tools/train_demo.py): data, MoE, loss and export."""

import json
import math
import stat
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("optax", reason="training needs requirements-train.txt")

import model as grok  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import train_demo  # noqa: E402


def random_moe_inputs(tokens=32, emb=16, ffn=24, experts=8, top_k=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (tokens, emb))
    w_gate = jax.random.normal(keys[1], (experts, emb, ffn)) / math.sqrt(emb)
    w_up = jax.random.normal(keys[2], (experts, emb, ffn)) / math.sqrt(emb)
    w_down = jax.random.normal(keys[3], (experts, ffn, emb)) / math.sqrt(ffn)
    probs = jax.nn.softmax(jax.random.normal(keys[4], (tokens, experts)))
    gates, expert_index = jax.lax.top_k(probs, top_k)
    return x, gates, expert_index, w_gate, w_up, w_down


def test_capacity_moe_matches_dense_moe():
    x, gates, expert_index, w_gate, w_up, w_down = random_moe_inputs()
    # Capacity factor 4 gives every expert room for all 32 * 2 / 8 * 4 = 32 tokens.
    out = train_demo.capacity_moe(x, gates, expert_index, w_gate, w_up, w_down, capacity_factor=4.0)
    expected = grok.dense_moe(x, gates, expert_index, w_gate, w_up, w_down, num_experts=8)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_capacity_moe_drops_overflow_in_order():
    x, gates, _, w_gate, w_up, w_down = random_moe_inputs(tokens=8)
    # Every token chooses experts 0 and 1; capacity 8 * 2 / 8 * 1 = 2 per expert.
    expert_index = jnp.tile(jnp.array([[0, 1]]), (8, 1))

    out = train_demo.capacity_moe(x, gates, expert_index, w_gate, w_up, w_down, capacity_factor=1.0)

    expected = grok.dense_moe(x, gates, expert_index, w_gate, w_up, w_down, num_experts=8)
    np.testing.assert_allclose(out[:2], expected[:2], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[2:], 0.0)


def test_capacity_moe_gradients_match_dense_reference():
    x, gates, expert_index, w_gate, w_up, w_down = random_moe_inputs()

    def loss(moe, gates, w_gate):
        return jnp.sum(jnp.sin(moe(x, gates, expert_index, w_gate, w_up, w_down)))

    capacity = lambda *a: train_demo.capacity_moe(*a, capacity_factor=4.0)  # noqa: E731
    dense = lambda *a: grok.dense_moe(*a, num_experts=8)  # noqa: E731
    got = jax.grad(loss, argnums=(1, 2))(capacity, gates, w_gate)
    expected = jax.grad(loss, argnums=(1, 2))(dense, gates, w_gate)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_load_balance_term_is_one_for_uniform_routing():
    config = train_demo.training_config(tiny_config())
    loss = train_demo.make_loss(config, load_balance_weight=1.0, capacity_factor=2.0)
    params = train_demo.init_float_params(config, seed=0)
    # A zero router gives uniform probabilities: the term is exactly 1.
    params = {path: ({"w": jnp.zeros_like(leaf["w"])} if path.endswith("router") else leaf)
              for path, leaf in params.items()}
    tokens = jnp.arange(2 * 9, dtype=jnp.int32).reshape(2, 9) % 60 + 4

    total, (cross_entropy, balance) = loss(params, tokens)

    assert float(balance) == pytest.approx(1.0, abs=1e-6)
    assert float(total) == pytest.approx(float(cross_entropy) + 1.0, abs=1e-5)
    assert 0 < float(cross_entropy) < 2 * math.log(64)


def tiny_config():
    return grok.LanguageModelConfig(
        vocab_size=64, pad_token=0, eos_token=2, sequence_len=16,
        embedding_multiplier_scale=4.0, output_multiplier_scale=1 / math.sqrt(3),
        model=grok.TransformerConfig(
            emb_size=16, key_size=8, num_q_heads=2, num_kv_heads=1, num_layers=2,
            widening_factor=2, num_experts=8, num_selected_experts=2,
        ),
    )


def test_quantize_params_grok1_layout():
    config = tiny_config()
    float_params = train_demo.init_float_params(train_demo.training_config(config), seed=1)

    quantized = train_demo.quantize_params(config, float_params)

    layer = "transformer/decoder_layer_0"
    assert quantized[f"{layer}/multi_head_attention/query"]["w"].scales.shape == (1, 16)
    assert quantized[f"{layer}/multi_head_attention/linear"]["w"].scales.shape == (8, 16)
    assert quantized[f"{layer}/moe/linear"]["w"].scales.shape == (8, 1, config.model.ffn_size)
    assert quantized[f"{layer}/moe/linear_1"]["w"].scales.shape == (8, 8, 16)
    assert quantized["language_model/in_out_embed"]["embeddings"].dtype == jnp.float32
    for path in (f"{layer}/moe/linear", f"{layer}/moe/linear_1", f"{layer}/multi_head_attention/key"):
        w, q = float_params[path]["w"], quantized[path]["w"]
        assert q.weight.dtype == jnp.int8
        assert q.scales.dtype == jnp.bfloat16
        # Round to nearest: within half a step (plus the bfloat16 rounding of the product).
        error = jnp.abs(grok.dequantize(q, jnp.float32) - w)
        step = jnp.repeat(q.scales.astype(jnp.float32), w.shape[-2] // q.scales.shape[-2], axis=-2)
        assert bool(jnp.all(error <= 0.5 * step + jnp.abs(w) * 2**-8))


def test_config_json_round_trips_through_config_from_dict():
    config = train_demo.demo_config()
    data = json.loads(json.dumps(train_demo.config_to_dict(config)))
    loaded = grok.config_from_dict(data)
    assert loaded.model == config.model
    assert (loaded.vocab_size, loaded.sequence_len, loaded.embedding_multiplier_scale) == (
        config.vocab_size, config.sequence_len, config.embedding_multiplier_scale)


def fake_bible(tmp_path: Path, lines: list[str]) -> str:
    """Write an executable that prints `lines`, as `bible -f` would."""
    script = tmp_path / "bible"
    script.write_text("#!/bin/sh\ncat <<'EOF'\n" + "\n".join(lines) + "\nEOF\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_read_kjv_groups_verses_into_chapters(tmp_path):
    bible = fake_bible(tmp_path, [
        "Ge1:1 In the beginning God created the heaven and the earth.",
        "Ge1:2 And the earth was without form, and void.",
        "Ge2:1 Thus the heavens and the earth were finished.",
        "1Jo1:1 That which was from the beginning.",
    ])
    assert train_demo.read_kjv(bible) == [
        ("Ge 1", "In the beginning God created the heaven and the earth. And the earth was without form, and void."),
        ("Ge 2", "Thus the heavens and the earth were finished."),
        ("1Jo 1", "That which was from the beginning."),
    ]


def test_read_kjv_rejects_unexpected_output(tmp_path):
    bible = fake_bible(tmp_path, ["Ge1:1 In the beginning.", "Genesis 1"])
    with pytest.raises(SystemExit, match="line 2 .* is not a verse: 'Genesis 1'"):
        train_demo.read_kjv(bible)


def test_split_holds_out_every_twentieth_chapter():
    chapters = [(f"c{i}", "text") for i in range(45)]
    train, heldout = train_demo.split_chapters(chapters)
    assert [name for name, _ in heldout] == ["c19", "c39"]
    assert len(train) == 43
    assert not set(train) & set(heldout)
