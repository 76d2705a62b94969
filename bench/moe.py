"""Benchmark the sparse MoE against the dense reference path, and batch-1 decode against ceilings.

Writes (once, then reuses) a random-weight checkpoint in the released format
for a small Grok-1-shaped configuration (vocab 32768, emb 1024, 16 query and
8 KV heads of 64, 8 layers, 8 experts with top-2, widening factor 8,
context 2048; about 1.2 GB), loads it, and measures in one run, for
`moe_impl="dense"` and `"sparse"` on the same weights:

  prefill:      one 512-token prompt, tokens/s;
  decode b1/b8: one token per step at batch 1 and 8, tokens/s.

Batch-1 decode is also compared with two ceilings measured in the same run:

  memory roofline:  the machine's memory read bandwidth divided by the bytes
                    one decode step must read (the weights it uses: attention,
                    router, norms, the 2 chosen experts of every layer and the
                    output embedding);
  XLA int8 matvec:  the best rate XLA reaches for a bare `lax.scan` of int8
                    matrix-vector products over that many weight bytes, over a
                    few formulations (convert to float32 or bfloat16 before the
                    dot, scale before or after it, and the chunked product of
                    `model.expert_matmul`).

    python bench/moe.py            # human-readable lines, then one JSON object
    python bench/moe.py --json     # the JSON object alone on the last line
"""

import argparse
import concurrent.futures
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import checkpoint  # noqa: E402
from common import abstract_params, ensure_checkpoint  # noqa: E402
from model import LanguageModelConfig, QuantizedWeight8bit, TransformerConfig, expert_matmul  # noqa: E402
from runners import ModelRunner, make_mesh, param_shardings  # noqa: E402

DEFAULT_DIR = Path(__file__).resolve().parent / "data" / "moe-bench"
PROMPT_LEN = 512
DECODE_STEPS = 8


def bench_config(moe_impl: str = "sparse") -> LanguageModelConfig:
    return LanguageModelConfig(
        vocab_size=32768,
        pad_token=0,
        eos_token=2,
        sequence_len=2048,
        embedding_multiplier_scale=78.38367176906169,
        output_multiplier_scale=0.5773502691896257,
        model=TransformerConfig(
            emb_size=1024,
            key_size=64,
            num_q_heads=16,
            num_kv_heads=8,
            num_layers=8,
            widening_factor=8,
            attn_output_multiplier=0.125,
            num_experts=8,
            num_selected_experts=2,
            moe_impl=moe_impl,
        ),
    )


def best_time(fn, repeats: int) -> float:
    """Return the fastest of `repeats` timed calls of `fn` (which must block until done)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# ----------------------------------------------------------------------------
# Model throughput
# ----------------------------------------------------------------------------


def sampling_settings(batch: int):
    """Greedy sampling settings for `batch` rows: (temperature, top_p, top_k, seeds)."""
    return (
        jnp.zeros((batch,), jnp.float32),
        jnp.ones((batch,), jnp.float32),
        jnp.zeros((batch,), jnp.int32),
        jnp.zeros((batch,), jnp.uint32),
    )


def prefill_tokens_per_second(runner: ModelRunner, repeats: int) -> float:
    """Time one prefill of a `PROMPT_LEN`-token prompt at batch 1."""
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, runner.config.vocab_size, (1, PROMPT_LEN)), jnp.int32)
    lengths = jnp.asarray([PROMPT_LEN], jnp.int32)
    sampling = sampling_settings(1)
    cache_len = PROMPT_LEN + 128

    def run():
        memory = runner.new_memory(1, cache_len)
        next_tokens, _, memory = runner._prefill(runner.params, tokens, memory, lengths, sampling)
        next_tokens.block_until_ready()

    run()  # compile
    return PROMPT_LEN / best_time(run, repeats)


def decode_tokens_per_second(runner: ModelRunner, batch: int, repeats: int) -> float:
    """Time `DECODE_STEPS` decode steps at `batch` rows, after a `PROMPT_LEN`-token context."""
    cache_len = PROMPT_LEN + 128
    sampling = sampling_settings(batch)
    tokens = jnp.full((batch,), 7, jnp.int32)

    def run(steps):
        memory = runner.new_memory(batch, cache_len)
        next_tokens = tokens
        for step in range(steps):
            positions = jnp.full((batch,), PROMPT_LEN + step, jnp.int32)
            next_tokens, _, memory = runner._decode(
                runner.params, next_tokens, memory, positions, sampling, jnp.int32(step)
            )
        next_tokens.block_until_ready()

    run(1)  # compile
    return batch * DECODE_STEPS / best_time(lambda: run(DECODE_STEPS), repeats)


def make_runner(config: LanguageModelConfig, mesh, params) -> ModelRunner:
    runner = ModelRunner(config)
    runner.initialize(mesh)
    runner.params = params
    return runner


# ----------------------------------------------------------------------------
# Ceilings
# ----------------------------------------------------------------------------


def decode_bytes_per_token(shapes, config: LanguageModelConfig) -> int:
    """Return the parameter bytes a batch-1 decode step reads: all but the unchosen experts."""
    model = config.model
    total = 0
    for path, leaf in checkpoint.flatten_parameters(shapes)[0]:
        arrays = (leaf.weight, leaf.scales) if isinstance(leaf, QuantizedWeight8bit) else (leaf,)
        nbytes = sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays)
        if "/moe/" in path:
            nbytes = nbytes * model.num_selected_experts // model.num_experts
        total += nbytes
    return total


def memory_read_bandwidth(repeats: int = 5, size: int = 1 << 30) -> float:
    """Return the best bytes/s of summing a `size`-byte float64 array, one slice per CPU core."""
    data = np.ones(size // 8, np.float64)
    workers = len(os.sched_getaffinity(0))
    slices = np.array_split(data, workers)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        seconds = best_time(lambda: list(pool.map(np.sum, slices)), repeats)
    return size / seconds


def xla_int8_matvec_rate(total_bytes: int, repeats: int = 5) -> tuple[float, str]:
    """Return the best bytes/s XLA reaches for a scan of int8 matvecs over `total_bytes`, and its formulation.

    The weights are `[n, 1024, 5464]` int8 with per-column scales, the shape
    of this config's expert gate projection.
    """
    rows, cols = 1024, 5464
    count = max(1, total_bytes // (rows * cols))
    rng = np.random.default_rng(0)
    weights = jnp.asarray(np.frombuffer(rng.bytes(count * rows * cols), np.int8).reshape(count, rows, cols))
    scales = jnp.asarray(rng.uniform(0.5, 1.5, (count, 1, cols)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((1, rows)), jnp.float32)

    formulations = {
        "f32 in 4 MB chunks, scale after (model.expert_matmul)": lambda w, s: expert_matmul(
            x, QuantizedWeight8bit(w[None], s[None]), jnp.int32(0)
        ),
        "f32, scale after": lambda w, s: (x @ w.astype(jnp.float32)) * s.astype(jnp.float32),
        "f32, scale before": lambda w, s: x @ (w.astype(jnp.float32) * s.astype(jnp.float32)),
        "bf16, scale after": lambda w, s: jnp.dot(
            x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
        ).astype(jnp.float32) * s.astype(jnp.float32),
        "bf16, scale before": lambda w, s: jnp.dot(
            x.astype(jnp.bfloat16), w.astype(jnp.bfloat16) * s
        ).astype(jnp.float32),
    }
    results = {}
    for name, matvec in formulations.items():

        @jax.jit
        def scan(weights, scales, matvec=matvec):
            def step(carry, ws):
                return carry + jnp.sum(matvec(*ws)), None

            return jax.lax.scan(step, jnp.float32(0), (weights, scales))[0]

        scan(weights, scales).block_until_ready()
        seconds = best_time(lambda: scan(weights, scales).block_until_ready(), repeats)
        results[name] = weights.nbytes / seconds
    best = max(results, key=results.get)
    return results[best], best


# ----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the benchmark checkpoint is written")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the fastest counts")
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    args = parser.parse_args()
    say = (lambda *a, **k: None) if args.json else (lambda *a, **k: print(*a, **k, flush=True))

    sparse_config, dense_config = bench_config("sparse"), bench_config("dense")
    shapes = abstract_params(sparse_config)
    ensure_checkpoint(args.dir / "ckpt-0", shapes)

    mesh = make_mesh()
    params = checkpoint.load_checkpoint(args.dir, shapes, param_shardings(shapes, mesh))
    runners = {
        "dense": make_runner(dense_config, mesh, params),
        "sparse": make_runner(sparse_config, mesh, params),
    }
    say(f"{mesh.size} {jax.devices()[0].platform} device(s); config: emb 1024, 8 layers, 8 experts, top-2")

    results = {}
    for impl, runner in runners.items():
        # The dense path is several times slower: one timed run keeps the benchmark short.
        repeats = 1 if impl == "dense" else args.repeats
        results[impl] = {
            "prefill_tokens_per_s": prefill_tokens_per_second(runner, repeats),
            "decode_b1_tokens_per_s": decode_tokens_per_second(runner, 1, repeats),
            "decode_b8_tokens_per_s": decode_tokens_per_second(runner, 8, repeats),
        }
        say(
            f"{impl:>6}: prefill {results[impl]['prefill_tokens_per_s']:8.1f} tok/s, "
            f"decode b1 {results[impl]['decode_b1_tokens_per_s']:6.2f} tok/s, "
            f"b8 {results[impl]['decode_b8_tokens_per_s']:6.2f} tok/s"
        )

    bytes_per_token = decode_bytes_per_token(shapes, sparse_config)
    bandwidth = memory_read_bandwidth()
    xla_rate, xla_formulation = xla_int8_matvec_rate(bytes_per_token)
    roofline_tokens = bandwidth / bytes_per_token
    xla_tokens = xla_rate / bytes_per_token
    sparse_b1 = results["sparse"]["decode_b1_tokens_per_s"]

    summary = {
        "prefill_ratio": results["sparse"]["prefill_tokens_per_s"] / results["dense"]["prefill_tokens_per_s"],
        "decode_ratio_b1": sparse_b1 / results["dense"]["decode_b1_tokens_per_s"],
        "decode_ratio_b8": results["sparse"]["decode_b8_tokens_per_s"] / results["dense"]["decode_b8_tokens_per_s"],
        "roofline_fraction_b1": sparse_b1 / roofline_tokens,
        "xla_ceiling_fraction_b1": sparse_b1 / xla_tokens,
        "decode_bytes_per_token": bytes_per_token,
        "memory_bandwidth_gb_s": bandwidth / 1e9,
        "xla_int8_matvec_gb_s": xla_rate / 1e9,
        "xla_int8_matvec_formulation": xla_formulation,
        "roofline_tokens_per_s_b1": roofline_tokens,
        "xla_ceiling_tokens_per_s_b1": xla_tokens,
        "devices": mesh.size,
        "platform": jax.devices()[0].platform,
        "results": results,
    }
    say(f"decode step reads {bytes_per_token / 1e6:.0f} MB at batch 1")
    say(f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s -> roofline {roofline_tokens:.1f} tok/s")
    say(f"XLA int8 matvec ({xla_formulation}) {xla_rate / 1e9:.1f} GB/s -> ceiling {xla_tokens:.1f} tok/s")
    say(
        f"sparse/dense: prefill {summary['prefill_ratio']:.2f}x, decode b1 {summary['decode_ratio_b1']:.2f}x, "
        f"b8 {summary['decode_ratio_b8']:.2f}x; batch-1 decode at {summary['roofline_fraction_b1']:.0%} "
        f"of the memory roofline and {summary['xla_ceiling_fraction_b1']:.0%} of the XLA int8 matvec ceiling"
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
