"""The built-in demo model in demo/: its files, its quality, and `python run.py` without Grok-1."""

import collections
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import checkpoint
from model import QuantizedWeight8bit, config_from_dict
from reference_data import fixture_dir
from runner_cache import mesh_of
from runners import InferenceRunner, ModelRunner, score_text

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo"

# Held-out perplexity bound of demo/heldout.txt (chapters never trained on).
# The shipped int8 model scores 24.0 there (demo/README.md). The bound leaves
# room for other CPUs' rounding, yet fails a broken model by far: a unigram
# model fitted to the sample itself scores 189, and an untrained one about 4096.
HELDOUT_PERPLEXITY_BOUND = 30.0


@pytest.fixture(scope="module")
def demo_runner() -> InferenceRunner:
    config = config_from_dict(json.loads((DEMO / "config.json").read_text()))
    runner = InferenceRunner(
        runner=ModelRunner(config), load=str(DEMO), tokenizer_path=str(DEMO / "tokenizer.model")
    )
    runner.initialize(mesh_of((1, 1)))
    return runner


def test_demo_files_fit_the_size_limit():
    total = sum(path.stat().st_size for path in DEMO.rglob("*") if path.is_file())
    assert total <= 25e6, f"demo/ holds {total / 1e6:.1f} MB"


def test_demo_checkpoint_has_grok1_layout(demo_runner):
    params = demo_runner.runner.params
    named, _ = checkpoint.flatten_parameters(params)
    assert len(list((DEMO / "ckpt-0").glob("tensor*_000"))) == len(named)

    # Row blocks of scales per weight, as xAI's code writes them.
    row_blocks = json.loads((fixture_dir("grok1-tiny") / "config.json").read_text())["quant_row_blocks"]
    seen = collections.Counter()
    for path, leaf in named:
        if isinstance(leaf, QuantizedWeight8bit):
            suffix = next(s for s in row_blocks if path.endswith(s))
            assert leaf.weight.dtype == np.int8, path
            assert leaf.scales.dtype == jax.numpy.bfloat16, path
            assert leaf.scales.shape[-2] == row_blocks[suffix], path
            seen[suffix] += 1
        else:
            assert leaf.dtype == np.float32, path
            seen["float32"] += 1
    config = demo_runner.config
    assert all(seen[suffix] == config.model.num_layers for suffix in row_blocks)
    # Per layer 4 norm scales and the router; the embeddings and the final norm.
    assert seen["float32"] == 5 * config.model.num_layers + 2


def test_demo_architecture_is_grok1s():
    config = config_from_dict(json.loads((DEMO / "config.json").read_text()))
    model = config.model
    assert (model.num_experts, model.num_selected_experts) == (8, 2)
    assert model.num_q_heads % model.num_kv_heads == 0
    assert model.num_kv_heads < model.num_q_heads
    assert config.embedding_multiplier_scale == pytest.approx(math.sqrt(model.emb_size))
    assert config.output_multiplier_scale == pytest.approx(1 / math.sqrt(3))
    assert model.attn_output_multiplier == pytest.approx(1 / math.sqrt(model.key_size))
    assert (config.pad_token, config.eos_token) == (0, 2)


def test_demo_tokenizer_uses_grok1_special_ids(demo_runner):
    tokenizer = demo_runner.tokenizer
    assert tokenizer.vocab_size() == demo_runner.config.vocab_size
    assert [tokenizer.pad_id(), tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.unk_id()] == [0, 1, 2, 3]
    # Byte fallback: characters outside the training text still encode and decode.
    assert tokenizer.decode(tokenizer.encode("Grüße, 東京 ✓")) == "Grüße, 東京 ✓"


def unigram_perplexity(ids: list[int]) -> float:
    """Perplexity of the unigram distribution fitted to `ids` themselves (an optimistic baseline)."""
    counts = np.bincount(ids).astype(np.float64)
    probs = counts[ids] / len(ids)
    return float(np.exp(-np.mean(np.log(probs))))


def test_demo_heldout_perplexity_is_below_bound(demo_runner):
    text = (DEMO / "heldout.txt").read_text()
    ids = demo_runner.tokenizer.encode(text)

    score = score_text(demo_runner.runner, demo_runner.tokenizer, text)

    assert score.tokens == len(ids) - 1 > 1000
    assert score.perplexity < HELDOUT_PERPLEXITY_BOUND
    assert unigram_perplexity(ids) > 6 * HELDOUT_PERPLEXITY_BOUND


def run_py(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run run.py from `cwd`, a directory without checkpoints/ or tokenizer.model."""
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )


def test_run_py_without_checkpoint_runs_the_demo_model(tmp_path):
    result = run_py("--max-len", "24", "--temperature", "0", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "built-in demo model" in result.stderr
    assert "xai-org/grok-1" in result.stderr
    assert "--checkpoint" in result.stderr
    prompt_line, continuation = result.stdout.split("\n", 1)
    assert prompt_line.startswith("Output for prompt: The answer to life")
    words = [word for word in continuation.split() if word.strip(",.;:!?").isalpha()]
    assert len(words) >= 8, result.stdout


def test_run_py_score_prints_perplexity(tmp_path):
    result = run_py("--score", str(DEMO / "heldout.txt"), "--json", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["perplexity"] < HELDOUT_PERPLEXITY_BOUND
    assert report["perplexity"] == pytest.approx(math.exp(report["nll"] / report["tokens"]))
    assert 0 < report["bits_per_byte"] < 8
    assert report["window"] == 256


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b"  \n", "is empty"),
        (b"caf\xe9", "is not UTF-8 text"),
    ],
)
def test_run_py_score_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "text.txt"
    if content is not None:
        path.write_bytes(content)
    result = run_py("--score", str(path), cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "text.txt" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["ckpt-0", "ckpt"])
def test_run_py_uses_checkpoints_dir_when_present(tmp_path, name):
    (tmp_path / "checkpoints" / name).mkdir(parents=True)
    result = run_py("--max-len", "4", cwd=tmp_path)

    assert result.returncode != 0
    assert "demo model" not in result.stderr
    assert "Model configuration: Grok-1" in result.stderr
    assert "tokenizer not found at './tokenizer.model'" in result.stderr


def test_run_py_checkpoint_demo_uses_its_tokenizer(tmp_path):
    result = run_py("--checkpoint", str(DEMO), "--max-len", "8", "--temperature", "0", cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    assert "demo model" not in result.stderr
    assert result.stdout.startswith("Output for prompt: The answer to life")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--score-window", "5"], "--score-window applies only with --score FILE"),
        (["--score", "x.txt", "--prompt", "hello"], "--score scores a file and takes no --prompt"),
        (["--score", "x.txt", "--dry-run"], "takes no --dry-run"),
    ],
)
def test_run_py_rejects_ignored_flags(tmp_path, flags, message):
    result = run_py(*flags, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr


def test_score_text_counts_predicted_bytes(demo_runner):
    tokenizer = demo_runner.tokenizer
    text = "And God said, Let there be light: and there was light."
    ids = tokenizer.encode(text)

    score = score_text(demo_runner.runner, tokenizer, text)

    first = tokenizer.decode(ids[:1])
    assert text.startswith(first)
    assert score.tokens == len(ids) - 1
    assert score.num_bytes == len(text.encode()) - len(first.encode())
