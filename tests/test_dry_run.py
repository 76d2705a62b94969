"""The dry run (compile for a mesh without weights) and blocked prefill attention.

Expected byte counts are computed here from the config's sizes and the
Megatron layout in `model.PARTITION_RULES`, not taken from the code under test.
"""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

from model import LanguageModelConfig, TransformerConfig, grok_1_config
from reference_data import (
    REPO,
    first_fragile_step,
    fixture_config,
    fixture_dir,
    greedy_prompts,
    reference,
)
from runner_cache import mesh_of
from runners import InferenceRunner, ModelRunner, Request, bytes_per_device, dry_run

ROW_BLOCKS = 8  # scale row blocks of the row-parallel weights in the released format


def small_config(sequence_len=512, attn_query_block=512) -> LanguageModelConfig:
    """A 2-layer Grok-1 shape whose sharded sizes all divide by 8."""
    return LanguageModelConfig(
        vocab_size=1024,
        pad_token=0,
        eos_token=2,
        sequence_len=sequence_len,
        model=TransformerConfig(
            emb_size=128,
            key_size=16,
            num_q_heads=8,
            num_kv_heads=8,
            num_layers=2,
            widening_factor=8,
            num_experts=8,
            num_selected_experts=2,
            attn_query_block=attn_query_block,
        ),
    )


def expected_parameters(config: LanguageModelConfig, model_size: int) -> tuple[int, int, int]:
    """Return (parameter count, bytes in all, bytes per device) for a model axis of `model_size`.

    Int8 weights have bfloat16 scales: one row per output column for
    column-parallel weights, `ROW_BLOCKS` rows for row-parallel ones.
    Split over the model axis: the embedding's columns, the q/k/v and expert
    gate/up weights and their scales (columns), the attention output and
    expert down weights (rows). Replicated: norms, router, and the scales of
    the row-parallel weights.
    """
    t = config.model
    vocab, emb, ffn, experts = config.vocab_size, t.emb_size, t.ffn_size, t.num_experts
    q_size, kv_size = t.num_q_heads * t.key_size, t.num_kv_heads * t.key_size

    count = vocab * emb + emb + t.num_layers * (
        4 * emb + emb * experts + emb * q_size + 2 * emb * kv_size + q_size * emb + 3 * experts * emb * ffn
    )

    split = 4 * vocab * emb  # embedding, float32
    replicated = 4 * emb  # final norm, float32
    for _ in range(t.num_layers):
        replicated += 4 * 4 * emb + 4 * emb * experts  # 4 norms and the router, float32
        split += emb * q_size + 2 * q_size  # query: int8 and one scale row
        split += 2 * (emb * kv_size + 2 * kv_size)  # key and value
        split += q_size * emb  # attention output, int8 ...
        replicated += 2 * ROW_BLOCKS * emb  # ... and its scales
        split += 2 * (experts * emb * ffn + 2 * experts * ffn)  # expert gate and up
        split += experts * ffn * emb  # expert down, int8 ...
        replicated += 2 * experts * ROW_BLOCKS * emb  # ... and its scales
    return count, split + replicated, split // model_size + replicated


def expected_kv_cache_bytes(config, batch, context, data_size, model_size) -> int:
    """bfloat16 keys and values of every layer, split by batch (data) and KV head (model),
    and the bool key mask `[batch, context]`, split by batch."""
    t = config.model
    keys_and_values = t.num_layers * 2 * batch * context * t.num_kv_heads * t.key_size * 2
    return keys_and_values // (data_size * model_size) + batch * context // data_size


@pytest.fixture(scope="module")
def report_1x8():
    return dry_run(small_config(), mesh_of((1, 8)), batch_size=2, context=256)


def test_parameter_bytes_match_config(report_1x8):
    count, total, per_device = expected_parameters(small_config(), model_size=8)
    assert report_1x8.param_count == count
    assert report_1x8.param_bytes == total
    assert report_1x8.param_bytes_per_device == per_device


def test_kv_cache_bytes_match_config(report_1x8):
    assert report_1x8.kv_cache_bytes_per_device == expected_kv_cache_bytes(small_config(), 2, 256, 1, 8)


def test_report_sizes(report_1x8):
    assert report_1x8.mesh_shape == {"data": 1, "model": 8}
    assert report_1x8.batch_size == 2
    assert report_1x8.context == 256
    assert report_1x8.prefill_len == 256
    assert report_1x8.activation_dtype == "bfloat16"
    assert report_1x8.prefill.temp_bytes > 0
    assert report_1x8.compile_seconds > 0
    # The parameters and the KV cache are arguments of both steps.
    for step in (report_1x8.prefill, report_1x8.decode):
        assert step.argument_bytes >= report_1x8.param_bytes_per_device + report_1x8.kv_cache_bytes_per_device
        # The new KV cache reuses the donated one.
        assert step.alias_bytes == report_1x8.kv_cache_bytes_per_device


def test_fits_compares_peak_with_device_memory(report_1x8):
    peak = report_1x8.peak_bytes_per_device
    assert report_1x8.fits is None
    assert dataclasses.replace(report_1x8, device_memory=peak).fits is True
    assert dataclasses.replace(report_1x8, device_memory=peak - 1).fits is False


def test_data_axis_pads_batch_and_splits_cache():
    config = small_config()
    report = dry_run(config, mesh_of((2, 4)), batch_size=3, context=128)
    assert report.batch_size == 4
    assert report.param_bytes_per_device == expected_parameters(config, model_size=4)[2]
    assert report.kv_cache_bytes_per_device == expected_kv_cache_bytes(config, 4, 128, 2, 4)


def test_dry_run_rejects_context_beyond_model():
    with pytest.raises(ValueError, match="sequence_len=512"):
        dry_run(small_config(), mesh_of((1, 8)), batch_size=1, context=1024)


def test_grok_1_parameter_bytes_per_device():
    """Full Grok-1 on 8 devices: each stores close to an eighth of the parameters."""
    config = grok_1_config()
    runner = ModelRunner(config)
    runner.initialize(mesh_of((1, 8)))
    count, total, per_device = expected_parameters(config, model_size=8)
    assert bytes_per_device(runner.params_shape, runner.params_sharding) == per_device
    assert 315.5e9 < count < 315.9e9
    assert abs(per_device - total / 8) <= 0.05 * total / 8


def test_blocked_attention_lowers_prefill_temporaries():
    context, block, batch = 2048, 256, 2
    unblocked = dry_run(small_config(context, attn_query_block=0), mesh_of((1, 8)), batch)
    blocked = dry_run(small_config(context, attn_query_block=block), mesh_of((1, 8)), batch)

    # float32 logits [batch, heads per device, queries, keys]; 8 query heads over 8 devices.
    full_logits = batch * 1 * context * context * 4
    block_logits = batch * 1 * block * context * 4
    saved = unblocked.prefill.temp_bytes - blocked.prefill.temp_bytes
    assert saved >= full_logits - block_logits


@pytest.mark.parametrize("block", [7, 8])
def test_blocked_attention_keeps_logits(block):
    name = "grok1-tiny-kv8"
    tokens = reference(name)["full_tokens"]
    logits = {}
    for size in (0, block):
        config = fixture_config(name)
        config.model.attn_query_block = size
        runner = InferenceRunner(runner=ModelRunner(config), load=str(fixture_dir(name)))
        runner.initialize(mesh_of((1, 8)))
        logits[size] = runner.runner.logits(tokens)
    # Same per-query computation; only the shapes of the matrix products differ.
    np.testing.assert_allclose(logits[block], logits[0], atol=1e-4, rtol=0)


def test_blocked_attention_prefill_matches_reference():
    """Prefill pads the prompts to 32 tokens, so blocks of 8 run 4 blocks through the KV cache."""
    name = "grok1-tiny-kv8"
    ref = reference(name)
    config = fixture_config(name)
    config.model.attn_query_block = 8
    runner = InferenceRunner(runner=ModelRunner(config), load=str(fixture_dir(name)))
    runner.initialize(mesh_of((1, 8)))
    requests = [Request(prompt_ids=p, temperature=0.0, max_len=20) for p in greedy_prompts(ref)]

    for row, completion in enumerate(runner.generate(requests)):
        checked = first_fragile_step(ref["greedy_top2_margin"][row])
        assert completion.token_ids[:checked] == ref["greedy_tokens"][row][:checked].tolist()


def run_py(*args, cwd):
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=cwd, capture_output=True, text=True, timeout=600,
    )


def write_config(path, config: LanguageModelConfig):
    language_model = {
        key: value for key, value in dataclasses.asdict(config).items() if key not in ("model", "fprop_dtype")
    }
    path.write_text(json.dumps({
        "LanguageModelConfig": language_model,
        "TransformerConfig": dataclasses.asdict(config.model),
    }))


def test_cli_dry_run_json(tmp_path):
    config = small_config()
    write_config(tmp_path / "config.json", config)
    result = run_py(
        "--dry-run", "--devices", "8", "--config", str(tmp_path / "config.json"),
        "--checkpoint", str(tmp_path / "no-checkpoint"), "--tokenizer", str(tmp_path / "no-tokenizer"),
        "--batch", "2", "--context", "256", "--device-memory", "1GB", "--json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1
    record = json.loads(lines[0])

    assert record["num_devices"] == 8
    assert record["batch_size"] == 2
    assert record["context"] == 256
    assert record["param_bytes_per_device"] == expected_parameters(config, model_size=8)[2]
    assert record["kv_cache_bytes_per_device"] == expected_kv_cache_bytes(config, 2, 256, 1, 8)
    assert record["temp_bytes_per_device"] == max(record["prefill"]["temp_bytes"], record["decode"]["temp_bytes"])
    assert record["compile_seconds"] > 0
    assert record["device_memory"] == 10**9
    assert record["fits"] is True


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--device-memory", "80XB"], "--device-memory"),
        (["--devices", "8", "--data", "3"], "--data 3"),
        (["--context", "1000000"], "context=1000000"),
        (["--num-processes", "2"], "one process"),
    ],
)
def test_cli_dry_run_rejects_invalid_settings(tmp_path, flags, message):
    write_config(tmp_path / "config.json", small_config())
    result = run_py("--dry-run", "--config", str(tmp_path / "config.json"), *flags, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
