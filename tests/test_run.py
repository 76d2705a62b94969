"""`run.py` end to end, as users call it."""

import json
import os
import subprocess
import sys

import pytest

from reference_data import REPO, first_fragile_step, fixture_dir, greedy_prompts, reference, tokenizer_path


def run_py(*args, cwd=REPO, timeout=600):
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_prompt_ids_reproduce_greedy_reference():
    ref = reference("grok1-tiny")
    args = ["--checkpoint", str(fixture_dir("grok1-tiny")), "--temperature", "0", "--max-len", "20", "--json"]
    for prompt in greedy_prompts(ref):
        args += ["--prompt-ids", ",".join(map(str, prompt))]
    result = run_py(*args)
    assert result.returncode == 0, result.stderr

    records = json_lines(result.stdout)
    assert len(records) == 3
    for row, record in enumerate(records):
        assert record["prompt_ids"] == greedy_prompts(ref)[row]
        checked = first_fragile_step(ref["greedy_top2_margin"][row])
        assert record["token_ids"][:checked] == ref["greedy_tokens"][row][:checked].tolist()
        assert len(record["logprobs"]) == len(record["token_ids"])
        assert all(logprob <= 0 for logprob in record["logprobs"])


def test_text_prompts_reproduce_reference(tmp_path):
    ref = reference("grok1-tiny-vocab")
    args = [
        "--checkpoint", str(fixture_dir("grok1-tiny-vocab")),
        "--tokenizer", str(tokenizer_path()),
        "--temperature", "0", "--max-len", "20", "--json",
    ]
    for text in ref["prompts"]:
        args += ["--prompt", str(text)]
    result = run_py(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    records = json_lines(result.stdout)
    assert [r["prompt"] for r in records] == [str(t) for t in ref["prompts"]]
    for row, record in enumerate(records):
        checked = first_fragile_step(ref["greedy_top2_margin"][row])
        assert record["token_ids"][:checked] == ref["greedy_tokens"][row][:checked].tolist()
        if checked == 20:
            assert record["text"] == str(ref["greedy_text"][row])


def test_text_output_streams_continuation(tmp_path):
    ref = reference("grok1-tiny-vocab")
    result = run_py(
        "--checkpoint", str(fixture_dir("grok1-tiny-vocab")),
        "--tokenizer", str(tokenizer_path()),
        "--temperature", "0", "--max-len", "20",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    # The default prompt is the one of xAI's run.py, prompt (a) of the fixture.
    assert f"Output for prompt: {ref['prompts'][0]}" in result.stdout
    assert str(ref["greedy_text"][0]) in result.stdout


def test_missing_checkpoint_says_how_to_get_it(tmp_path):
    result = run_py("--checkpoint", str(tmp_path / "checkpoints"), "--prompt-ids", "5,6", cwd=tmp_path)
    assert result.returncode != 0
    assert "ckpt-0" in result.stderr
    assert "Traceback" not in result.stderr


def test_truncated_checkpoint_is_reported_without_traceback(tmp_path):
    broken = tmp_path / "ckpt-0"
    broken.mkdir()
    for source in (fixture_dir("grok1-tiny") / "ckpt-0").iterdir():
        (broken / source.name).write_bytes(source.read_bytes())
    (broken / "tensor00005_000").write_bytes((broken / "tensor00005_000").read_bytes()[:100])
    config = fixture_dir("grok1-tiny") / "config.json"

    result = run_py("--checkpoint", str(broken), "--config", str(config), "--prompt-ids", "5,6", cwd=tmp_path)
    assert result.returncode != 0
    assert "tensor00005_000" in result.stderr
    assert "truncated" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_tokenizer_says_how_to_get_it(tmp_path):
    result = run_py("--checkpoint", str(fixture_dir("grok1-tiny-vocab")), cwd=tmp_path)
    assert result.returncode != 0
    assert "xai-org/grok-1" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "-1"], "temperature"),
        (["--top-p", "0"], "top-p"),
        (["--max-len", "0"], "max-len (max_len)=0 is invalid"),
        (["--top-k", "-1"], "top-k (top_k)=-1 is invalid"),
        (["--prompt-ids", "5,x"], "--prompt-ids"),
        (["--prompt-ids", ",".join(["5"] * 300)], "300 tokens"),
        (["--seed", "-1"], "seed (rng_seed)=-1 is invalid"),
    ],
)
def test_invalid_settings_fail_before_loading(tmp_path, flags, message):
    args = ["--checkpoint", str(fixture_dir("grok1-tiny")), *flags]
    if "--prompt-ids" not in flags:
        args += ["--prompt-ids", "5,6"]
    result = run_py(*args, cwd=tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Loading" not in result.stderr
    assert "Traceback" not in result.stderr


def test_invalid_config_file_is_reported(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"LanguageModelConfig": {"vocab_size": 1024}}))
    result = run_py("--checkpoint", str(fixture_dir("grok1-tiny")), "--config", str(config),
                    "--prompt-ids", "5,6", cwd=tmp_path)
    assert result.returncode != 0
    assert "TransformerConfig" in result.stderr
    assert "Traceback" not in result.stderr
