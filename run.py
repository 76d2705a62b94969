"""Sample a continuation of a prompt from Grok-1.

    python run.py

loads `./checkpoints/ckpt-0` with the Grok-1 configuration and
`./tokenizer.model`, and prints a continuation of `PROMPT`. Edit the
settings below, or override them with flags (`python run.py --help`).
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

# Settings of the default run; each has a flag of the same meaning.
PROMPT = "The answer to life the universe and everything is of course"
CKPT_PATH = "./checkpoints/"
TOKENIZER_PATH = "./tokenizer.model"
MAX_LEN = 100
TEMPERATURE = 0.01
TOP_P = 1.0
TOP_K = 0
SEED = 42

logger = logging.getLogger("run")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Sample continuations of prompts from Grok-1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--checkpoint", default=CKPT_PATH,
                        help="directory holding ckpt-0 (or ckpt-0 itself)")
    parser.add_argument("--tokenizer", default=TOKENIZER_PATH,
                        help="SentencePiece tokenizer.model; not needed with --prompt-ids")
    parser.add_argument("--config", default=None,
                        help="JSON file with LanguageModelConfig and TransformerConfig objects; "
                             "default: config.json beside the checkpoint, else Grok-1's")
    parser.add_argument("--prompt", action="append", default=None,
                        help="prompt text; repeat for several prompts (default: PROMPT in run.py)")
    parser.add_argument("--prompt-ids", action="append", default=None, metavar="1,2,3",
                        help="prompt as comma-separated token ids, bypassing the tokenizer; repeatable")
    parser.add_argument("--max-len", type=int, default=MAX_LEN, help="maximum number of new tokens")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE,
                        help="sampling temperature; 0 is greedy argmax")
    parser.add_argument("--top-p", type=float, default=TOP_P, help="nucleus sampling threshold in (0, 1]")
    parser.add_argument("--top-k", type=int, default=TOP_K, help="sample among the k most likely tokens; 0 keeps all")
    parser.add_argument("--seed", type=int, default=SEED, help="random seed of the first prompt; prompt i uses seed + i")
    parser.add_argument("--no-stop-at-eos", action="store_true", help="keep generating after the EOS token")
    parser.add_argument("--data", type=int, default=None,
                        help="data-parallel mesh size per process (default 1)")
    parser.add_argument("--model", type=int, default=None,
                        help="model-parallel mesh size per process (default: the remaining local devices)")
    parser.add_argument("--moe-impl", default=None,
                        help="MoE implementation: 'sparse' runs only the chosen experts, 'dense' (the "
                             "reference) every expert on every token; default: the config's")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per prompt (prompt_ids, token_ids, logprobs, text), "
                             "running all prompts as one batch")
    parser.add_argument("--log-level", default="INFO", help="logging level: DEBUG, INFO, WARNING or ERROR")
    return parser.parse_args(argv)


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


def check_inputs(args: argparse.Namespace) -> None:
    """Report a missing checkpoint or tokenizer before anything heavy starts."""
    import checkpoint

    try:
        checkpoint.resolve_checkpoint_dir(args.checkpoint)
    except checkpoint.CheckpointError as error:
        raise SystemExit(f"error: {error}") from None

    if args.prompt_ids is None and not os.path.isfile(args.tokenizer):
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


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = load_config(args)
    if args.moe_impl is not None:
        try:
            config.model = dataclasses.replace(config.model, moe_impl=args.moe_impl)
        except ValueError as error:
            raise SystemExit(f"error: --moe-impl: {error}") from None
    requests = build_requests(args)
    check_inputs(args)

    from runners import InferenceRunner, ModelRunner, validate_sampling

    try:
        for request in requests:
            validate_sampling(request)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None

    local_mesh_config = None
    if args.data is not None or args.model is not None:
        import jax

        data = args.data or 1
        model = args.model or max(1, jax.local_device_count() // data)
        local_mesh_config = (data, model)

    inference_runner = InferenceRunner(
        runner=ModelRunner(model=config, checkpoint_path=args.checkpoint),
        name="local",
        load=args.checkpoint,
        tokenizer_path=args.tokenizer if os.path.isfile(args.tokenizer) else None,
        local_mesh_config=local_mesh_config,
    )
    inference_runner.initialize()

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
