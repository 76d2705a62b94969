"""`run.py` as two processes joined by `jax.distributed`, against one process.

Each process has 4 CPU devices, and together they form one (data 1, model 8)
mesh whose model axis spans both processes. In that layout each process
stores only part of every sharded parameter. Everything listens on 127.0.0.1
only: the coordinator through JAX_COORDINATOR_BIND_ADDRESS, and gloo (JAX's
CPU collectives) on the address that the host name resolves to, so the test
skips where that is not a loopback address.
"""

import ipaddress
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import checkpoint
from reference_data import REPO, first_fragile_step, fixture_config, fixture_dir, greedy_prompts, reference
from runner_cache import mesh_of
from runners import ModelRunner

FIXTURE = "grok1-tiny-kv8"
MAX_LEN = 10
TIMEOUT_S = 300

# Runs run.py's main() and reports on stderr, as `BYTES_READ n`, how many
# payload bytes this process read from the tensor files.
WORKER = """
import sys
import threading

sys.path.insert(0, sys.argv[1])
import checkpoint
import run

lock = threading.Lock()
total = 0
pread_into = checkpoint._pread_into
copy_from_mmap = checkpoint._PayloadReader._copy_from_mmap


def counting_pread_into(fd, buffer, offset, path):
    global total
    with lock:
        total += len(buffer)
    return pread_into(fd, buffer, offset, path)


def counting_copy_from_mmap(self, info, key):
    global total
    region = copy_from_mmap(self, info, key)
    with lock:
        total += region.nbytes
    return region


checkpoint._pread_into = counting_pread_into
checkpoint._PayloadReader._copy_from_mmap = counting_copy_from_mmap
run.main(sys.argv[2:])
print(f"BYTES_READ {total}", file=sys.stderr, flush=True)
"""


def hostname_is_loopback() -> bool:
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None)
    except OSError:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_args(prompts) -> list[str]:
    args = ["--checkpoint", str(fixture_dir(FIXTURE)), "--temperature", "0",
            "--max-len", str(MAX_LEN), "--json", "--log-level", "WARNING"]
    for prompt in prompts:
        args += ["--prompt-ids", ",".join(map(str, prompt))]
    return args


def run_workers(arg_lists: list[list[str]], env: dict, directory) -> list[tuple[str, str]]:
    """Run one worker per argument list at the same time; return each one's (stdout, stderr).

    Every worker is killed if any of them fails or the time runs out, so a
    process that waits for a dead peer does not outlive the test. Output goes
    to files, so that no worker blocks on a full pipe while another is awaited.
    """
    workers = []
    try:
        for index, args in enumerate(arg_lists):
            stdout = open(directory / f"worker{index}.out", "w+")
            stderr = open(directory / f"worker{index}.err", "w+")
            process = subprocess.Popen(
                [sys.executable, "-c", WORKER, str(REPO), *args],
                cwd=REPO, env=env, stdout=stdout, stderr=stderr, text=True,
            )
            workers.append((process, stdout, stderr))

        outputs = []
        for process, stdout, stderr in workers:
            process.wait(timeout=TIMEOUT_S)
            stdout.seek(0)
            stderr.seek(0)
            outputs.append((stdout.read(), stderr.read()))
            assert process.returncode == 0, (
                f"process failed with exit code {process.returncode}:\n{outputs[-1][1][-3000:]}"
            )
        return outputs
    finally:
        for process, stdout, stderr in workers:
            if process.poll() is None:
                process.kill()
                process.wait()
            stdout.close()
            stderr.close()


def completions(stdout: str) -> list[dict]:
    # gloo writes its own lines to stdout; the completions are the JSON ones.
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def bytes_read(stderr: str) -> int:
    lines = [line for line in stderr.splitlines() if line.startswith("BYTES_READ ")]
    assert len(lines) == 1, stderr[-3000:]
    return int(lines[0].split()[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process with 8 devices, and two processes with 4 each, on the same prompts."""
    if not hostname_is_loopback():
        pytest.skip(f"host name {socket.gethostname()!r} does not resolve to loopback only; "
                    "gloo would listen on another address")
    prompts = greedy_prompts(reference(FIXTURE))
    args = run_args(prompts)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("JAX_COORDINATOR_ADDRESS", None)

    (single,) = run_workers([[*args, "--devices", "8", "--model", "8"]], env, tmp_path_factory.mktemp("one"))

    port = free_port()
    env["JAX_COORDINATOR_BIND_ADDRESS"] = f"127.0.0.1:{port}"
    multi = run_workers(
        [
            [*args, "--devices", "4", "--model", "4", "--between-hosts", "1,2",
             "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]
            for i in range(2)
        ],
        env,
        tmp_path_factory.mktemp("two"),
    )
    return prompts, single, multi


def test_two_processes_match_one_process(runs):
    prompts, single, multi = runs
    ref = reference(FIXTURE)
    expected = completions(single[0])
    assert [record["prompt_ids"] for record in expected] == prompts

    for process, (stdout, _) in enumerate(multi):
        records = completions(stdout)
        assert len(records) == len(prompts), f"process {process} printed {len(records)} completions"
        for row, (got, want) in enumerate(zip(records, expected)):
            assert got["token_ids"] == want["token_ids"], f"process {process}, prompt {row}"
            # Cross-process all-reduces sum in another order: logprobs agree to rounding.
            np.testing.assert_allclose(got["logprobs"], want["logprobs"], atol=0.02)

    for row, record in enumerate(expected):
        checked = first_fragile_step(ref["greedy_top2_margin"][row])
        assert record["token_ids"][:checked] == ref["greedy_tokens"][row][:checked].tolist()


def shard_and_row_bytes(process: int) -> tuple[int, int, int]:
    """Return (all payload bytes, bytes of `process`'s shards, bytes of the rows those shards touch).

    The model axis of the two-process mesh is process 0's 4 devices followed
    by process 1's, so process p stores what devices 4p to 4p + 3 of a
    one-process (1, 8) mesh hold. A row is a line along the last axis. Of
    each row its shards touch, the loader reads the columns from their first
    to their last, which here are exactly the shards.
    """
    mesh = mesh_of((1, 8))
    runner = ModelRunner(fixture_config(FIXTURE))
    runner.initialize(mesh)
    process_devices = set(mesh.devices[0, 4 * process: 4 * process + 4])

    total = shards = rows = 0
    leaves = zip(jax.tree_util.tree_leaves(runner.params_shape), jax.tree_util.tree_leaves(runner.params_sharding))
    for leaf, sharding in leaves:
        itemsize = np.dtype(leaf.dtype).itemsize
        total += int(np.prod(leaf.shape)) * itemsize
        regions = {
            checkpoint.region_key(leaf.shape, index)
            for device, index in sharding.devices_indices_map(leaf.shape).items()
            if device in process_devices
        }
        shards += sum(np.prod([stop - start for start, stop, _ in region]) * itemsize for region in regions)
        touched = np.zeros(leaf.shape[:-1], bool)
        for region in regions:
            touched[tuple(slice(start, stop) for start, stop, _ in region[:-1])] = True
        rows += int(touched.sum()) * leaf.shape[-1] * itemsize
    return total, int(shards), rows


def test_each_process_reads_only_its_shards(runs):
    _, single, multi = runs
    total, _, _ = shard_and_row_bytes(0)
    assert bytes_read(single[1]) == total

    for process, (_, stderr) in enumerate(multi):
        _, shards, rows = shard_and_row_bytes(process)
        read = bytes_read(stderr)
        assert read < rows < total, f"process {process} read {read} bytes, its rows are {rows} of {total}"
        assert read == shards, f"process {process} read {read} bytes; its shards are {shards}"
