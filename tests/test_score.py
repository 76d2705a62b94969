"""Per-token scoring (`ModelRunner.score`, `run.py --score`) against the reference fixtures."""

import numpy as np
import pytest

from reference_data import reference
from runner_cache import fixture_runner


def reference_nll(logits: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Return the NLL of `tokens[1:]` under the reference's `logits[:-1]` `[seq, vocab]`."""
    logits = logits[:-1].astype(np.float64)
    log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    return log_z - logits[np.arange(len(tokens) - 1), tokens[1:]]


@pytest.mark.parametrize("mesh_shape", [(1, 1), (1, 8)])
def test_score_matches_reference_log_likelihood(mesh_shape):
    ref = reference("grok1-tiny")
    runner = fixture_runner("grok1-tiny", mesh_shape).runner
    for tokens, logits in zip(ref["full_tokens"], ref["full_logits"]):
        expected = reference_nll(logits, tokens)
        score = runner.score(tokens.tolist())

        assert score.tokens == len(tokens) - 1
        # The logits agree with the reference's to a mean |diff| of 0.005-0.009
        # (check_logits allows 0.05); the NLL moves by about as much.
        assert abs(score.mean_nll - expected.mean()) < 0.02, (score.mean_nll, expected.mean())
        assert score.perplexity == pytest.approx(np.exp(expected.mean()), rel=0.02)


def test_score_windows_predict_from_their_own_tokens_only():
    runner = fixture_runner("grok1-tiny", (1, 1)).runner
    tokens = reference("grok1-tiny")["full_tokens"][0].tolist()  # 24 tokens
    window = 7

    score = runner.score(tokens, window=window)

    # Windows [0..7], [7..14], [14..21], [21..23]: each a separate forward.
    expected_nll, expected_count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = np.asarray(tokens[start:start + window + 1])
        logits = runner.logits(chunk[None, :-1])[0]
        expected_nll += reference_nll(np.concatenate([logits, logits[-1:]]), chunk).sum()
        expected_count += len(chunk) - 1
    assert score.tokens == expected_count == len(tokens) - 1
    assert score.nll == pytest.approx(expected_nll, rel=1e-4)
    assert score.window == window


@pytest.mark.parametrize(
    "ids, window, message",
    [
        ([5], None, "at least 2"),
        ([5, 0, 7], None, "outside 1..1023"),
        ([5, 1024], None, "outside 1..1023"),
        ([5, 6, 7], 257, "between 1 and the context, 256"),
    ],
)
def test_score_rejects_bad_input(ids, window, message):
    runner = fixture_runner("grok1-tiny", (1, 1)).runner
    with pytest.raises(ValueError, match=message):
        runner.score(ids, window)
