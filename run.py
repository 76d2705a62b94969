"""Sample a continuation of a prompt from Grok-1.

    python run.py

loads `./checkpoints/ckpt-0` with the Grok-1 configuration and
`./tokenizer.model`, and prints a continuation of `PROMPT`. Where
`./checkpoints/ckpt-0` does not exist, it runs the small demo model in
`demo/` instead (Grok-1's architecture at 15M parameters; see
demo/README.md). Edit the settings below, or override them with flags
(`python run.py --help`); `python run.py --score FILE` reports the model's
per-token perplexity on a text file.
"""

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from pathlib import Path

# Settings of the default run; each has a flag of the same meaning.
PROMPT = "The answer to life the universe and everything is of course"
CKPT_PATH = "./checkpoints/"
TOKENIZER_PATH = "./tokenizer.model"
# Run where CKPT_PATH has no ckpt-0 and no --checkpoint is given.
DEMO_DIR = Path(__file__).resolve().parent / "demo"
MAX_LEN = 100
TEMPERATURE = 0.01
TOP_P = 1.0
TOP_K = 0
SEED = 42

logger = logging.getLogger("run")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Sample continuations of prompts from Grok-1.",
        formatter_class=argparse.HelpFormatter,
    )
    parser.add_argument("--checkpoint", default=None,
                        help=f"directory holding ckpt-0 (or ckpt-0 itself) (default: {CKPT_PATH}, or the demo "
                             "model in demo/ where it has no ckpt-0)")
    parser.add_argument("--tokenizer", default=None,
                        help=f"SentencePiece tokenizer.model; not needed with --prompt-ids (default: "
                             f"{TOKENIZER_PATH}, or the demo model's)")
    parser.add_argument("--config", default=None,
                        help="JSON file with LanguageModelConfig and TransformerConfig objects; "
                             "default: config.json beside the checkpoint, else Grok-1's")
    parser.add_argument("--prompt", action="append", default=None,
                        help="prompt text; repeat for several prompts (default: PROMPT in run.py)")
    parser.add_argument("--prompt-ids", action="append", default=None, metavar="1,2,3",
                        help="prompt as comma-separated token ids, bypassing the tokenizer; repeatable. "
                             "These prompts run before the --prompt ones")
    parser.add_argument("--max-len", type=int, default=MAX_LEN, help="maximum number of new tokens (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE,
                        help="sampling temperature; 0 is greedy argmax (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=TOP_P, help="nucleus sampling threshold in (0, 1] (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=TOP_K, help="sample among the k most likely tokens; 0 keeps all (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed of the first prompt; prompt i uses seed + i (default: %(default)s)")
    parser.add_argument("--no-stop-at-eos", action="store_true", help="keep generating after the EOS token")
    parser.add_argument("--score", default=None, metavar="FILE",
                        help="instead of sampling, print the model's per-token perplexity on the UTF-8 text FILE")
    parser.add_argument("--score-window", type=int, default=None, metavar="TOKENS",
                        help="with --score: the most tokens of context per prediction; the text is scored in "
                             "windows of this many tokens (default: the model's context)")
    parser.add_argument("--data", type=int, default=None,
                        help="data-parallel mesh size per process (default 1)")
    parser.add_argument("--model", type=int, default=None,
                        help="model-parallel mesh size per process (default: the remaining local devices)")
    parser.add_argument("--moe-impl", default=None,
                        choices=["sparse", "dense"],
                        help="MoE implementation: 'sparse' runs only the chosen experts, 'dense' (the "
                             "reference) every expert on every token; default: the config's")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per prompt (prompt_ids, token_ids, logprobs, stop_reason; "
                             "prompt and text when a tokenizer is loaded), "
                             "running all prompts as one batch; with --dry-run, one JSON object of the report")
    parser.add_argument("--devices", type=int, default=None,
                        help="split the CPU into this many devices (sets XLA_FLAGS="
                             "--xla_force_host_platform_device_count), per process; the dry run compiles "
                             "for this many devices, CPU ones where fewer accelerators are present")
    parser.add_argument("--between-hosts", default=None, metavar="DATA,MODEL",
                        help="mesh sizes across processes (default: PROCESS_COUNT,1, data parallel "
                             "between processes)")

    distributed = parser.add_argument_group(
        "multi-process runs (jax.distributed); JAX_COORDINATOR_ADDRESS and the cluster variables that "
        "jax.distributed.initialize reads (Slurm, Open MPI) work as well")
    distributed.add_argument("--coordinator-address", default=None, metavar="HOST:PORT",
                             help="address of process 0, where the coordinator service listens")
    distributed.add_argument("--num-processes", type=int, default=None, help="number of processes")
    distributed.add_argument("--process-id", type=int, default=None,
                             help="this process's index, 0 to num-processes - 1")

    dry_run = parser.add_argument_group(
        "dry run: compile for a mesh without weights, checkpoint or tokenizer, and report memory per device")
    dry_run.add_argument("--dry-run", action="store_true",
                         help="compile prefill and decode with abstract parameters and report parameter, "
                              "KV-cache and temporary bytes per device and compile time")
    dry_run.add_argument("--batch", type=int, default=1, help="batch size to compile for")
    dry_run.add_argument("--context", type=int, default=None,
                         help="context length (KV-cache slots) to compile for; default: the model's")
    dry_run.add_argument("--device-memory", default=None, metavar="SIZE",
                         help="memory of one device, e.g. 80GB or 141GB (1 GB = 1e9 bytes; GiB = 2**30); "
                              "the report says whether the peak fits")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level (default: %(default)s)")
    return parser.parse_args(argv)


# Units of --device-memory: decimal (GB = 1e9 bytes, as GPU makers count) and binary.
SIZE_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str) -> int:
    """Return the bytes in a size such as `80GB`, `141 GB` or `80GiB`."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise SystemExit(
            f"error: --device-memory {text!r} is invalid: give a number and a unit, e.g. 80GB or 80GiB"
        )
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def parse_mesh_pair(text: str, flag: str) -> tuple[int, int]:
    """Return the (data, model) sizes in `text`, written `DATA,MODEL`."""
    try:
        data, model = (int(part) for part in text.split(","))
    except ValueError:
        raise SystemExit(f"error: {flag} {text!r} is invalid: give two integers DATA,MODEL, e.g. 1,2") from None
    if data < 1 or model < 1:
        raise SystemExit(f"error: {flag} {text!r} is invalid: both sizes must be at least 1")
    return data, model


def set_cpu_device_count(count: int) -> None:
    """Make JAX's CPU backend present `count` devices.

    XLA reads `XLA_FLAGS` when JAX initializes its backends, so this must run
    before the first JAX computation or device query; importing jax is fine.
    Other flags in `XLA_FLAGS` are kept.
    """
    if count < 1:
        raise SystemExit(f"error: --devices {count} is invalid: use at least 1 device")
    flags = [
        flag for flag in os.environ.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={count}")
    os.environ["XLA_FLAGS"] = " ".join(flags)


def initialize_distributed(args: argparse.Namespace) -> None:
    """Join a multi-process run when the flags or JAX_COORDINATOR_ADDRESS ask for one.

    Under Slurm, Open MPI or Cloud TPU, `jax.distributed.initialize` fills
    in the arguments left unset. Across processes on CPU,
    collectives go through gloo, JAX's default (jax 0.10.2).
    """
    address = args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address is None and args.num_processes is None and args.process_id is None:
        return

    import jax

    try:
        jax.distributed.initialize(
            coordinator_address=args.coordinator_address,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    except (ValueError, TypeError) as error:
        raise SystemExit(
            f"error: multi-process setup failed: {error}. Pass --coordinator-address, "
            "--num-processes and --process-id (or run under Slurm or Open MPI)"
        ) from None
    logger.info(
        "Process %d of %d: %d local devices, %d in all",
        jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count(),
    )


def parse_prompt_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"error: --prompt-ids {text!r} is invalid: give comma-separated integers") from None


def find_config_file(args: argparse.Namespace):
    """Return the config file to use: --config, else a config.json beside the checkpoint, else None."""
    if args.config:
        if not os.path.isfile(args.config):
            raise SystemExit(f"error: config file {args.config!r} not found")
        return args.config
    checkpoint_dir = Path(args.checkpoint)
    for candidate in (checkpoint_dir / "config.json", checkpoint_dir.parent / "config.json"):
        if candidate.is_file():
            return str(candidate)
    return None


def load_config(args: argparse.Namespace):
    from model import config_from_dict, grok_1_config

    path = find_config_file(args)
    if path is None:
        logger.info("Model configuration: Grok-1 (314B)")
        return grok_1_config()
    logger.info("Model configuration: %s", path)
    try:
        with open(path) as file:
            return config_from_dict(json.load(file))
    except (ValueError, TypeError) as error:
        raise SystemExit(f"error: config file {path!r} is invalid: {error}") from None


def choose_model(args: argparse.Namespace) -> None:
    """Fill in --checkpoint and --tokenizer: Grok-1's paths, or the demo model where ckpt-0 is absent.

    CKPT_PATH is relative to the working directory, as in xAI's run.py. A
    checkpoint directory with a tokenizer.model in it or beside it (as
    demo/ has) brings its own tokenizer.
    """
    grok_dir = Path(CKPT_PATH)
    use_demo = args.checkpoint is None and not any(
        (grok_dir / name).exists() for name in ("ckpt-0", "ckpt")
    )
    if use_demo:
        args.checkpoint = str(DEMO_DIR)
        logger.warning(
            "No Grok-1 checkpoint at %s: running the built-in demo model in %s, a 15M-parameter "
            "model of Grok-1's architecture trained on the King James Bible (demo/README.md). It "
            "writes Bible-like English, nothing like Grok-1. To run Grok-1, download its weights "
            "into %s (README.md, 'Getting the weights') and tokenizer.model from "
            "github.com/xai-org/grok-1, or pass --checkpoint.",
            (grok_dir / "ckpt-0").resolve(), DEMO_DIR, grok_dir.resolve(),
        )
    args.checkpoint = args.checkpoint or CKPT_PATH
    if args.tokenizer is None:
        checkpoint_dir = Path(args.checkpoint)
        beside = [checkpoint_dir / "tokenizer.model", checkpoint_dir.parent / "tokenizer.model"]
        args.tokenizer = next((str(path) for path in beside if path.is_file()), TOKENIZER_PATH)


def check_inputs(args: argparse.Namespace, needs_tokenizer: bool) -> None:
    """Report a missing checkpoint, or a missing tokenizer where `needs_tokenizer`, before anything heavy starts."""
    import checkpoint

    try:
        checkpoint.resolve_checkpoint_dir(args.checkpoint)
    except checkpoint.CheckpointError as error:
        raise SystemExit(f"error: {error}") from None

    if needs_tokenizer and not os.path.isfile(args.tokenizer):
        raise SystemExit(
            f"error: tokenizer not found at {args.tokenizer!r}. Download tokenizer.model from "
            "xAI's GitHub repository xai-org/grok-1 (it is not in the Hugging Face weights "
            "repository) into this directory, pass --tokenizer PATH, or give --prompt-ids."
        )


def build_requests(args: argparse.Namespace):
    from runners import Request

    settings = dict(
        temperature=args.temperature,
        nucleus_p=args.top_p,
        top_k=args.top_k,
        max_len=args.max_len,
        stop_at_eos=not args.no_stop_at_eos,
    )
    prompts = []
    if args.prompt_ids:
        prompts += [dict(prompt_ids=parse_prompt_ids(ids)) for ids in args.prompt_ids]
    if args.prompt or not prompts:
        prompts += [dict(prompt=text) for text in (args.prompt or [PROMPT])]
    return [Request(rng_seed=args.seed + i, **prompt, **settings) for i, prompt in enumerate(prompts)]


class TextStream:
    """Prints a completion's text as its tokens arrive."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""

    def __call__(self, _row: int, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids) if self.tokenizer else " ".join(map(str, self.ids))
        # Hold back an incomplete UTF-8 sequence, which decodes as U+FFFD.
        text = text.rstrip("\ufffd")
        if text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed):])
            sys.stdout.flush()
            self.printed = text


def select_devices(count):
    """Return `count` devices for the dry run: accelerators if enough are present, else CPU ones."""
    import jax

    devices = jax.devices()
    if count is None:
        return devices
    if len(devices) >= count:
        return devices[:count]
    cpu_devices = jax.devices("cpu")
    if len(cpu_devices) < count:
        raise SystemExit(
            f"error: --devices {count}: JAX presents only {len(cpu_devices)} CPU devices. Unset "
            "JAX_NUM_CPU_DEVICES, which takes precedence over XLA_FLAGS"
        )
    logger.info(
        "%d %s device(s) present: compiling for %d CPU devices", len(devices), devices[0].platform, count
    )
    return cpu_devices[:count]


def format_bytes(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{int(nbytes)} B"


def format_report(report) -> str:
    """Return the dry-run report as lines of text."""
    mesh = " x ".join(f"{name} {size}" for name, size in report.mesh_shape.items())
    lines = [
        f"Dry run: mesh {mesh} ({report.num_devices} {report.platform} devices), "
        f"batch {report.batch_size}, context {report.context} (prefill of {report.prefill_len} tokens), "
        f"{report.activation_dtype} activations",
        "Per device:",
        f"  parameters   {format_bytes(report.param_bytes_per_device):>10}   "
        f"({format_bytes(report.param_bytes)} in all, {report.param_count:,} parameters)",
        f"  KV cache     {format_bytes(report.kv_cache_bytes_per_device):>10}",
        f"  temporaries  {format_bytes(report.temp_bytes_per_device):>10}   "
        f"(prefill {format_bytes(report.prefill.temp_bytes)}, decode {format_bytes(report.decode.temp_bytes)})",
        f"  peak         {format_bytes(report.peak_bytes_per_device):>10}   "
        f"(prefill {format_bytes(report.prefill.peak_bytes)}, decode {format_bytes(report.decode.peak_bytes)})",
        f"Compile time: {report.compile_seconds:.1f} s (prefill {report.prefill.compile_seconds:.1f} s, "
        f"decode {report.decode.compile_seconds:.1f} s)",
    ]
    if report.platform == "cpu":
        lines.append(
            "Temporaries are XLA:CPU's figures for the CPU program; an accelerator's compiler "
            "fuses and schedules differently."
        )
    if report.fits is not None:
        spare = report.device_memory - report.peak_bytes_per_device
        verdict = f"yes, {format_bytes(spare)} to spare" if report.fits else f"no, {format_bytes(-spare)} short"
        lines.append(f"Fits in {format_bytes(report.device_memory)} per device: {verdict}")
    return "\n".join(lines)


def run_dry_run(args: argparse.Namespace, config, device_memory) -> None:
    """Compile prefill and decode for the mesh of `--devices`, `--data` and `--model`, and print the report."""
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    from runners import MESH_AXES, dry_run

    if args.coordinator_address or args.num_processes or args.process_id is not None or args.between_hosts:
        raise SystemExit(
            "error: --dry-run compiles in one process: drop the multi-process flags and pass the "
            "total device count as --devices, with --data and --model for the global mesh"
        )
    devices = select_devices(args.devices)
    data = args.data or 1
    model = args.model or max(1, len(devices) // data)
    if data * model != len(devices):
        raise SystemExit(
            f"error: --data {data} x --model {model} is {data * model} devices, but the dry run "
            f"has {len(devices)}: pass sizes whose product is {len(devices)}, or --devices {data * model}"
        )
    mesh = Mesh(mesh_utils.create_device_mesh((data, model), devices), MESH_AXES)
    try:
        report = dry_run(config, mesh, args.batch, args.context, device_memory)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None

    if args.json:
        print(json.dumps(report.to_dict()), flush=True)
    else:
        print(format_report(report), flush=True)


def read_text_file(path: str) -> str:
    """Return the UTF-8 text of `path`, or exit with an error naming the file."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise SystemExit(f"error: --score file {path!r} not found") from None
    except IsADirectoryError:
        raise SystemExit(f"error: --score {path!r} is a directory: give a text file") from None
    except UnicodeDecodeError as error:
        raise SystemExit(
            f"error: --score file {path!r} is not UTF-8 text (byte {error.start}): convert it to UTF-8"
        ) from None
    if not text.strip():
        raise SystemExit(f"error: --score file {path!r} is empty")
    return text


def build_inference_runner(args: argparse.Namespace, config, between_hosts, tokenizer_path):
    """Return an `InferenceRunner` for --checkpoint on the mesh of --data, --model and --between-hosts."""
    from runners import InferenceRunner, ModelRunner

    local_mesh_config = None
    if args.data is not None or args.model is not None:
        import jax

        data = args.data or 1
        local_mesh_config = (data, args.model or max(1, jax.local_device_count() // data))

    return InferenceRunner(
        runner=ModelRunner(model=config, checkpoint_path=args.checkpoint),
        name="local",
        load=args.checkpoint,
        tokenizer_path=tokenizer_path,
        local_mesh_config=local_mesh_config,
        between_hosts_config=between_hosts,
    )


def check_flag_combinations(args: argparse.Namespace) -> None:
    """Reject flags that the chosen mode would ignore."""
    if args.score_window is not None and args.score is None:
        raise SystemExit("error: --score-window applies only with --score FILE")
    if args.score is None:
        return
    ignored = [
        flag for flag, given in (
            ("--prompt", args.prompt), ("--prompt-ids", args.prompt_ids), ("--dry-run", args.dry_run),
        ) if given
    ]
    if ignored:
        raise SystemExit(f"error: --score scores a file and takes no {' or '.join(ignored)}: drop one of them")


def run_score(args: argparse.Namespace, config, between_hosts) -> None:
    """Print the model's per-token perplexity on the text file --score."""
    from checkpoint import CheckpointError
    from runners import check_score_window, load_tokenizer, score_text

    text = read_text_file(args.score)
    check_inputs(args, needs_tokenizer=True)
    if args.score_window is not None:
        try:
            check_score_window(args.score_window, config)
        except ValueError as error:
            raise SystemExit(f"error: --score-window: {error}") from None
    initialize_distributed(args)

    try:
        tokenizer = load_tokenizer(args.tokenizer)
        inference_runner = build_inference_runner(args, config, between_hosts, tokenizer_path=None)
        inference_runner.initialize()
        score = score_text(inference_runner.runner, tokenizer, text, args.score_window)
    except (CheckpointError, ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from None

    if args.json:
        print(json.dumps({"file": args.score, **score.to_dict()}), flush=True)
        return
    print(
        f"{args.score}: perplexity {score.perplexity:.3f} per token over {score.tokens} tokens "
        f"({score.mean_nll:.4f} nats/token, {score.bits_per_byte:.4f} bits/byte, "
        f"context window {score.window} tokens)",
        flush=True,
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # JAX logs each accelerator backend it does not find at INFO; that is expected on CPU.
    logging.getLogger("jax._src.xla_bridge").setLevel(max(logging.WARNING, logging.getLogger().level))

    if args.devices is not None:
        set_cpu_device_count(args.devices)
    device_memory = parse_size(args.device_memory) if args.device_memory is not None else None
    between_hosts = parse_mesh_pair(args.between_hosts, "--between-hosts") if args.between_hosts else None

    check_flag_combinations(args)
    if args.dry_run:
        args.checkpoint = args.checkpoint or CKPT_PATH
    else:
        choose_model(args)
    config = load_config(args)
    if args.moe_impl is not None:
        try:
            config.model = dataclasses.replace(config.model, moe_impl=args.moe_impl)
        except ValueError as error:
            raise SystemExit(f"error: --moe-impl: {error}") from None
    if args.dry_run:
        run_dry_run(args, config, device_memory)
        return

    if args.score is not None:
        run_score(args, config, between_hosts)
        return

    requests = build_requests(args)
    check_inputs(args, needs_tokenizer=args.prompt_ids is None)
    initialize_distributed(args)

    from checkpoint import CheckpointError
    from runners import check_prompt_ids, load_tokenizer, validate_sampling

    # Check every request before the weights load, which takes minutes for Grok-1.
    try:
        needs_tokenizer = any(request.prompt_ids is None for request in requests)
        tokenizer = load_tokenizer(args.tokenizer) if needs_tokenizer else None
        for request in requests:
            validate_sampling(request)
            ids = request.prompt_ids if request.prompt_ids is not None else tokenizer.encode(request.prompt)
            check_prompt_ids(ids, config)
    except (ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from None

    tokenizer_path = args.tokenizer if os.path.isfile(args.tokenizer) else None
    inference_runner = build_inference_runner(args, config, between_hosts, tokenizer_path)
    try:
        inference_runner.initialize()
    except (CheckpointError, ValueError, OSError) as error:
        raise SystemExit(f"error: {error}") from None

    try:
        if args.json:
            for request, completion in zip(requests, inference_runner.generate(requests)):
                record = {
                    "prompt_ids": completion.prompt_ids,
                    "token_ids": completion.token_ids,
                    "logprobs": completion.logprobs,
                    "stop_reason": completion.stop_reason,
                }
                if completion.text is not None:
                    record["prompt"] = request.prompt if request.prompt_ids is None else None
                    record["text"] = completion.text
                print(json.dumps(record, ensure_ascii=False), flush=True)
            return

        for request in requests:
            shown = request.prompt if request.prompt_ids is None else list(request.prompt_ids)
            print(f"Output for prompt: {shown}", flush=True)
            inference_runner.generate([request], on_token=TextStream(inference_runner.tokenizer))
            print(flush=True)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
