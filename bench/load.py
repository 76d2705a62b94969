"""Benchmark `checkpoint.load_checkpoint` against a plain sequential read of the same files.

Writes (once, then reuses) a checkpoint in the released format with random
int8 weights for a small Grok-1-shaped configuration (about 1.2 GB with the
defaults), then times, alternating, for `--repeats` rounds:

  plain:      read every byte of every file in order with `readinto` into one
              reused buffer;
  plain-new:  the same, but into a new buffer per file, all kept until the end
              of the run (the loader, too, has to fill new memory with every
              byte, so this isolates the loader's own overhead);
  loader:     `load_checkpoint` onto the local devices (validation included).

Both read from the page cache ("warm") after one untimed warm-up read. With
`--cold`, the page cache is dropped before every timed run (needs root and a
writable /proc/sys/vm/drop_caches).

    python bench/load.py                      # default: bench/data/ckpt-bench
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/load.py --mesh

NOTE: some virtual machines return freed guest memory to the host
(virtio-balloon free page reporting). There, filling new memory costs far more
after a pause than right after other memory was freed. So `plain-new` and
`loader` vary more from round to round than `plain` does.
"""

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

import checkpoint  # noqa: E402
from common import abstract_params, ensure_checkpoint  # noqa: E402
from model import LanguageModelConfig, TransformerConfig  # noqa: E402
from runners import make_mesh, param_shardings  # noqa: E402

DEFAULT_DIR = Path(__file__).resolve().parent / "data" / "ckpt-bench"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def make_config(args) -> LanguageModelConfig:
    return LanguageModelConfig(
        vocab_size=args.vocab,
        pad_token=0,
        eos_token=2,
        sequence_len=256,
        model=TransformerConfig(
            emb_size=args.emb,
            key_size=128,
            num_q_heads=args.emb // 128,
            num_kv_heads=args.emb // 128,
            num_layers=args.layers,
            widening_factor=8,
            num_experts=args.experts,
            num_selected_experts=2,
        ),
    )


def plain_read(paths: list[Path]) -> int:
    """Read every byte of `paths` in order with `readinto` into one buffer; return the bytes read."""
    buffer = memoryview(bytearray(max(p.stat().st_size for p in paths)))
    total = 0
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while True:
                count = file.readinto(buffer)
                if not count:
                    break
                total += count
    return total


def plain_read_new_buffers(paths: list[Path]) -> int:
    """Read each file with `readinto` into its own new buffer, keeping all buffers; return the bytes read."""
    buffers = []
    total = 0
    for path in paths:
        buffer = np.empty(path.stat().st_size, np.uint8)
        view = memoryview(buffer)
        with open(path, "rb", buffering=0) as file:
            done = 0
            while done < len(view):
                count = file.readinto(view[done:])
                if not count:
                    break
                done += count
        buffers.append(buffer)
        total += done
    return total


def make_shardings(shapes, use_mesh: bool):
    """Return one device's sharding, or the model's shardings over all local devices."""
    if not use_mesh:
        return SingleDeviceSharding(jax.local_devices()[0])
    return param_shardings(shapes, make_mesh())


def drop_page_cache() -> None:
    os.sync()
    DROP_CACHES.write_text("3\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="checkpoint directory to write or reuse")
    parser.add_argument("--emb", type=int, default=1024, help="model width (multiple of 128)")
    parser.add_argument("--layers", type=int, default=8, help="number of decoder layers")
    parser.add_argument("--vocab", type=int, default=32768, help="vocabulary size")
    parser.add_argument("--experts", type=int, default=8, help="number of experts")
    parser.add_argument("--workers", type=int, default=4, help="load_checkpoint threads")
    parser.add_argument("--repeats", type=int, default=6, help="timed rounds of each method")
    parser.add_argument("--mesh", action="store_true", help="shard over all local devices (default: one device)")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every timed run (root)")
    parser.add_argument("-v", "--verbose", action="store_true", help="show the loader's progress log")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")

    if args.cold and not os.access(DROP_CACHES, os.W_OK):
        parser.error(f"--cold needs write access to {DROP_CACHES} (run as root, outside a read-only container)")

    shapes = abstract_params(make_config(args))
    ensure_checkpoint(args.dir, shapes)
    paths = [args.dir / checkpoint.tensor_file_name(i) for i in range(len(checkpoint.flatten_parameters(shapes)[0]))]
    total = sum(p.stat().st_size for p in paths)
    shardings = make_shardings(shapes, args.mesh)

    mode = "cold (page cache dropped before each run)" if args.cold else "warm (files in the page cache)"
    print(f"{len(paths)} files, {total / 1e9:.3f} GB, {mode}")
    print(f"devices: {len(jax.local_devices()) if args.mesh else 1} x {jax.local_devices()[0].platform}, "
          f"loader threads: {args.workers}")
    if not args.cold:
        plain_read(paths)  # warm-up, untimed

    def run_loader(paths) -> int:
        params = checkpoint.load_checkpoint(args.dir, shapes, shardings, num_workers=args.workers)
        jax.block_until_ready(params)
        return total

    methods = [("plain", plain_read), ("plain-new", plain_read_new_buffers), ("loader", run_loader)]
    rates: dict[str, list[float]] = {name: [] for name, _ in methods}
    for round_index in range(args.repeats):
        # Rotate the order: a method that runs right after another one freed
        # its memory gets recycled pages, which are cheaper to fill (see NOTE).
        shift = round_index % len(methods)
        for name, method in methods[shift:] + methods[:shift]:
            if args.cold:
                drop_page_cache()
            start = time.perf_counter()
            count = method(paths)
            rates[name].append(count / (time.perf_counter() - start) / 1e9)

        print(f"round {round_index + 1}: " + ", ".join(f"{name} {rates[name][-1]:.2f} GB/s" for name, _ in methods))

    median = {name: statistics.median(values) for name, values in rates.items()}
    print("median: " + ", ".join(f"{name} {value:.2f} GB/s" for name, value in median.items()))
    print(f"loader/plain = {median['loader'] / median['plain']:.2f}, "
          f"loader/plain-new = {median['loader'] / median['plain-new']:.2f}")


if __name__ == "__main__":
    main()
