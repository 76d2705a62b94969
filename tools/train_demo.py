"""Train the small built-in demo model and write it in the released checkpoint format.

    apt-get install bible-kjv          # Debian: the King James Bible and its `bible` reader
    pip install -r requirements-train.txt
    python tools/train_demo.py         # about an hour on 2 CPU cores

The model has Grok-1's architecture (model.py: 8 experts with 2 active per
token, four RMS norms per layer, soft-capped attention logits, the same
embedding, attention and output multipliers), about 15M parameters in 6
layers. The text is the King James Version of the Bible (public domain), as
Debian's `bible-kjv-text` package stores it, read with the `bible` program
of `bible-kjv`. Every 20th chapter is held out for evaluation and never
trained on; the tokenizer is a 4096-piece SentencePiece BPE model trained on
the other chapters.

It writes into --out (default `demo/`):
- `ckpt-0/`: int8 linear weights with Grok-1's scale layout, and float32
  embeddings, norms and router;
- `config.json` and `tokenizer.model`;
- `heldout.txt`: a held-out sample for the tests;
- `training-report.json`: the recipe, the loss curve, and the held-out
  perplexity of the bfloat16 and of the int8 weights.
--work-dir keeps the float32 weights, so `--skip-training` exports them
again without training.
"""

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece

try:
    import optax
except ImportError:
    raise SystemExit("error: training needs optax: pip install -r requirements-train.txt") from None

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import checkpoint  # noqa: E402
import model as grok  # noqa: E402
import runners  # noqa: E402

logger = logging.getLogger("train_demo")

SEED = 20261204
VOCAB_SIZE = 4096
SEQ_LEN = 256
HELDOUT_EVERY = 20  # chapter i (0-based, in book order) is held out if i % 20 == 19
KJV_RANGE = "gen1:1-rev22:21"

# One "Ge1:1 In the beginning ..." line per verse, as `bible -f` prints them.
VERSE_LINE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.+)$")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained weights, recorded in the report."""

    seed: int = SEED
    steps: int = 1800
    batch_size: int = 16
    seq_len: int = SEQ_LEN
    peak_learning_rate: float = 2e-3
    warmup_steps: int = 150
    final_learning_rate_fraction: float = 0.1
    weight_decay: float = 0.1
    grad_clip_norm: float = 1.0
    load_balance_weight: float = 0.01
    capacity_factor: float = 1.5
    eval_every: int = 150
    eval_windows: int = 64


def demo_config() -> grok.LanguageModelConfig:
    """Return the demo model's configuration: Grok-1's architecture at about 15M parameters."""
    emb_size, key_size = 256, 64
    return grok.LanguageModelConfig(
        vocab_size=VOCAB_SIZE,
        pad_token=0,
        eos_token=2,
        sequence_len=SEQ_LEN,
        # Grok-1's multipliers, as functions of the sizes: sqrt(emb_size) on the
        # embeddings, 1/sqrt(3) on the logits and 1/sqrt(key_size) on attention.
        embedding_init_scale=1.0 / math.sqrt(emb_size),
        embedding_multiplier_scale=math.sqrt(emb_size),
        output_multiplier_scale=1.0 / math.sqrt(3.0),
        name="grok-1-demo",
        model=grok.TransformerConfig(
            emb_size=emb_size,
            key_size=key_size,
            num_q_heads=4,
            num_kv_heads=2,
            num_layers=6,
            widening_factor=2,
            attn_output_multiplier=1.0 / math.sqrt(key_size),
            num_experts=8,
            num_selected_experts=2,
            shard_activations=True,
        ),
    )


def config_to_dict(config: grok.LanguageModelConfig) -> dict:
    """Return `config` as the `config.json` objects that `model.config_from_dict` reads."""
    language = {
        field.name: getattr(config, field.name)
        for field in dataclasses.fields(config)
        if field.name != "model"
    }
    language["fprop_dtype"] = "bfloat16"
    transformer = {
        field.name: getattr(config.model, field.name)
        for field in dataclasses.fields(config.model)
        if field.name not in ("moe_impl", "attn_query_block")
    }
    return {"LanguageModelConfig": language, "TransformerConfig": transformer}


# ----------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------


def read_kjv(bible_command: str) -> list[tuple[str, str]]:
    """Return the KJV's chapters in book order as `(reference, text)`, verses joined by spaces."""
    try:
        output = subprocess.run(
            [bible_command, "-f", KJV_RANGE], check=True, capture_output=True, text=True
        ).stdout
    except FileNotFoundError:
        raise SystemExit(
            f"error: {bible_command!r} not found: install Debian's bible-kjv package "
            "(apt-get install bible-kjv) or pass --bible"
        ) from None

    chapters: dict[str, list[str]] = {}
    for number, line in enumerate(output.splitlines(), 1):
        match = VERSE_LINE.match(line)
        if not match:
            raise SystemExit(f"error: line {number} of `bible -f {KJV_RANGE}` is not a verse: {line!r}")
        book, chapter, _, text = match.groups()
        chapters.setdefault(f"{book} {chapter}", []).append(text.strip())
    return [(reference, " ".join(verses)) for reference, verses in chapters.items()]


def split_chapters(chapters):
    """Return `(train, heldout)`: every HELDOUT_EVERY-th chapter is held out."""
    train = [c for i, c in enumerate(chapters) if i % HELDOUT_EVERY != HELDOUT_EVERY - 1]
    heldout = [c for i, c in enumerate(chapters) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    return train, heldout


def train_tokenizer(chapters) -> bytes:
    """Train a SentencePiece BPE model on the chapters' verses and return it serialized.

    The special ids are Grok-1's: 0 [PAD], 1 [BOS], 2 [EOS], 3 [UNK]. Byte
    fallback spells any character outside the pieces as UTF-8 bytes.
    """
    verses = [verse for _, text in chapters for verse in re.split(r"(?<=[.;:?!]) ", text)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(verses),
        model_writer=model,
        model_type="bpe",
        vocab_size=VOCAB_SIZE,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        pad_id=0, bos_id=1, eos_id=2, unk_id=3,
        pad_piece="[PAD]", bos_piece="[BOS]", eos_piece="[EOS]", unk_piece="[UNK]",
        input_sentence_size=0,
        shuffle_input_sentence=False,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def encode_chapters(tokenizer, chapters) -> np.ndarray:
    """Return the chapters as one int32 token stream, each chapter followed by [EOS]."""
    ids = []
    for _, text in chapters:
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id())
    return np.asarray(ids, np.int32)


# ----------------------------------------------------------------------------
# Model and loss
# ----------------------------------------------------------------------------


def training_config(config: grok.LanguageModelConfig) -> grok.LanguageModelConfig:
    """Return `config` with float32 activations, the dense MoE and unblocked attention."""
    transformer = dataclasses.replace(config.model, moe_impl="dense", attn_query_block=0)
    return dataclasses.replace(config, model=transformer, fprop_dtype=jnp.float32)


def init_float_params(config: grok.LanguageModelConfig, seed: int):
    """Return float32 initial parameters, with linear weights drawn from N(0, 1/fan_in) and not quantized."""
    transformed = hk.transform(lambda tokens: config.make()(tokens))
    params = transformed.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))
    leaves, treedef = jax.tree_util.tree_flatten(params, is_leaf=_is_quantized)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    floats = []
    for key, leaf in zip(keys, leaves):
        if _is_quantized(leaf):
            fan_in = leaf.weight.shape[-2]
            leaf = jax.random.normal(key, leaf.weight.shape, jnp.float32) / math.sqrt(fan_in)
        floats.append(leaf)
    return jax.tree_util.tree_unflatten(treedef, floats)


def _is_quantized(leaf) -> bool:
    return isinstance(leaf, grok.QuantizedWeight8bit)


def capacity_moe(x, gates, expert_index, w_gate, w_up, w_down, capacity_factor: float) -> jax.Array:
    """Differentiable top_k MoE for training: each expert runs on at most `capacity` tokens.

    x: float32 [tokens, emb]; gates, expert_index: [tokens, top_k];
    w_gate, w_up: [experts, emb, ffn]; w_down: [experts, ffn, emb].
    Each expert takes its first `capacity = tokens * top_k / experts *
    capacity_factor` assignments in token order and drops the rest (their
    contribution is 0), so the products cost `capacity_factor` times the
    top_k FLOPs rather than `experts / top_k` times as in `model.dense_moe`.
    """
    tokens, top_k = expert_index.shape
    experts, emb, _ = w_gate.shape
    capacity = math.ceil(tokens * top_k / experts * capacity_factor)

    # Assignments sorted by expert, and each one's slot within its expert.
    flat_expert = expert_index.reshape(-1)  # [tokens * top_k]
    flat_token = jnp.repeat(jnp.arange(tokens), top_k)
    order = jnp.argsort(flat_expert, stable=True)
    sorted_expert = flat_expert[order]
    counts = jnp.bincount(flat_expert, length=experts)
    slot = jnp.arange(tokens * top_k) - (jnp.cumsum(counts) - counts)[sorted_expert]
    slot = jnp.where(slot < capacity, slot, capacity)  # slot `capacity` is out of range: dropped

    # [experts, capacity] token ids (`tokens` marks an empty slot) and gates.
    table = jnp.full((experts, capacity), tokens).at[sorted_expert, slot].set(
        flat_token[order], mode="drop")
    gate_table = jnp.zeros((experts, capacity), x.dtype).at[sorted_expert, slot].set(
        gates.reshape(-1)[order].astype(x.dtype), mode="drop")

    x_padded = jnp.concatenate([x, jnp.zeros((1, emb), x.dtype)])
    expert_inputs = x_padded[table]  # [experts, capacity, emb]
    h = jax.nn.gelu(jnp.einsum("ecd,edf->ecf", expert_inputs, w_gate))
    h = h * jnp.einsum("ecd,edf->ecf", expert_inputs, w_up)
    expert_outputs = jnp.einsum("ecf,efd->ecd", h, w_down) * gate_table[..., None]

    out = jnp.zeros((tokens + 1, emb), x.dtype).at[table].add(expert_outputs)
    return out[:tokens]


def make_loss(config: grok.LanguageModelConfig, load_balance_weight: float, capacity_factor: float):
    """Return `loss(params, tokens)`: next-token cross-entropy plus the router load-balance term.

    tokens: int32 [batch, seq + 1]. The load-balance term is the Switch
    Transformer's `experts * sum_e(f_e * p_e)`, averaged over layers. Here
    `f_e` is the fraction of top_k choices that went to expert e and `p_e`
    is its mean router probability, so the term is 1 when routing is uniform.
    """
    experts, top_k = config.model.num_experts, config.model.num_selected_experts

    def forward(tokens):
        router_logits = []

        def intercept(next_fn, args, kwargs, context):
            if context.method_name != "__call__":
                return next_fn(*args, **kwargs)
            if isinstance(context.module, grok.MoELayer):
                # The model's MoE layer, run with capacity dispatch.
                x, gates, expert_index = args
                return capacity_moe(x, gates, expert_index, *context.module.expert_weights(),
                                    capacity_factor=capacity_factor)
            out = next_fn(*args, **kwargs)
            if isinstance(context.module, grok.Router):
                router_logits.append(out[0])
            return out

        with hk.intercept_methods(intercept):
            logits = config.make()(tokens).logits
        return logits, router_logits

    transformed = hk.without_apply_rng(hk.transform(forward))

    def loss(params, tokens):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits, router_logits = transformed.apply(params, inputs)  # [batch, seq, vocab]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        cross_entropy = jnp.mean(nll)

        balance = []
        for layer_logits in router_logits:  # [tokens, experts]
            probs = jax.nn.softmax(layer_logits, axis=-1)
            _, chosen = jax.lax.top_k(probs, top_k)
            fraction = jnp.mean(jax.nn.one_hot(chosen, experts), axis=(0, 1))
            balance.append(experts * jnp.sum(fraction * jnp.mean(probs, axis=0)))
        load_balance = jnp.mean(jnp.stack(balance))
        return cross_entropy + load_balance_weight * load_balance, (cross_entropy, load_balance)

    return loss


def make_optimizer(recipe: Recipe) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=recipe.peak_learning_rate,
        warmup_steps=recipe.warmup_steps,
        decay_steps=recipe.steps,
        end_value=recipe.peak_learning_rate * recipe.final_learning_rate_fraction,
    )
    # Decay matrices only, not norm scales.
    decay_mask = lambda params: jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(recipe.grad_clip_norm),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=recipe.weight_decay, mask=decay_mask),
    )


def windows(stream: np.ndarray, length: int, count: int) -> np.ndarray:
    """Return `count` evenly spaced windows of `length` tokens from `stream`: int32 `[count, length]`."""
    starts = np.linspace(0, len(stream) - length, count).astype(np.int64)
    return np.stack([stream[s:s + length] for s in starts])


def train(config, recipe: Recipe, train_stream, heldout_stream):
    """Train from a fixed seed; return the float32 parameters with the lowest held-out loss."""
    train_config = training_config(config)
    params = init_float_params(train_config, recipe.seed)
    optimizer = make_optimizer(recipe)
    opt_state = optimizer.init(params)
    loss_fn = make_loss(train_config, recipe.load_balance_weight, recipe.capacity_factor)

    @jax.jit
    def train_step(params, opt_state, tokens):
        (loss, (cross_entropy, balance)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, cross_entropy, balance

    eval_loss = jax.jit(lambda params, tokens: loss_fn(params, tokens)[1][0])
    eval_batches = windows(heldout_stream, recipe.seq_len + 1, recipe.eval_windows).reshape(
        -1, recipe.batch_size, recipe.seq_len + 1
    )

    def heldout_loss(params) -> float:
        return float(np.mean([eval_loss(params, batch) for batch in eval_batches]))

    rng = np.random.default_rng(recipe.seed)
    history, best = [], (math.inf, params, 0)
    start = time.time()
    for step in range(1, recipe.steps + 1):
        starts = rng.integers(0, len(train_stream) - recipe.seq_len - 1, recipe.batch_size)
        batch = np.stack([train_stream[s:s + recipe.seq_len + 1] for s in starts])
        params, opt_state, cross_entropy, balance = train_step(params, opt_state, batch)

        if step % recipe.eval_every == 0 or step == recipe.steps:
            heldout = heldout_loss(params)
            elapsed = time.time() - start
            history.append({
                "step": step,
                "train_loss": round(float(cross_entropy), 4),
                "load_balance": round(float(balance), 4),
                "heldout_loss": round(heldout, 4),
                "seconds": round(elapsed, 1),
            })
            logger.info(
                "step %d/%d: train loss %.3f, held-out loss %.3f (perplexity %.2f), "
                "load balance %.3f, %.0f tokens/s",
                step, recipe.steps, float(cross_entropy), heldout, math.exp(heldout), float(balance),
                step * recipe.batch_size * recipe.seq_len / elapsed,
            )
            if heldout < best[0]:
                best = (heldout, params, step)
    logger.info("best held-out loss %.3f at step %d", best[0], best[2])
    return best[1], history, best[2]


# ----------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------


def quantize_params(config: grok.LanguageModelConfig, float_params):
    """Convert float32 parameters to the checkpoint's format.

    Linear weights become int8 `QuantizedWeight8bit` with as many row blocks
    of scales as Grok-1's: 1 for column-parallel weights, 8 for row-parallel
    ones. Embeddings, norm scales and the router stay float32.
    """
    def convert(shape, value):
        if _is_quantized(shape):
            return grok.quantize(value, row_blocks=shape.scales.shape[-2])
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map(convert, checkpoint_layout(config), float_params, is_leaf=_is_quantized)


def bfloat16_params(config, float_params):
    """Return the parameters with linear weights rounded to bfloat16 and not quantized."""

    def convert(shape, value):
        return jnp.asarray(value, jnp.bfloat16 if _is_quantized(shape) else jnp.float32)

    return jax.tree_util.tree_map(convert, checkpoint_layout(config), float_params, is_leaf=_is_quantized)


def checkpoint_layout(config: grok.LanguageModelConfig):
    """Return the checkpoint's parameter tree as `jax.ShapeDtypeStruct`s, linear weights as `QuantizedWeight8bit`."""
    transformed = hk.transform(lambda tokens: config.make()(tokens))
    return jax.eval_shape(transformed.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))


def score_params(config, params, tokenizer, text: str) -> "runners.Score":
    """Score `text` with `params` through the inference runner's scoring path."""
    runner = runners.ModelRunner(model=config)
    runner.initialize(runners.make_mesh((1, 1), (1, 1)))
    runner.params = jax.device_put(params)
    return runners.score_text(runner, tokenizer, text)


def save_float_params(path: Path, params) -> None:
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    arrays = {jax.tree_util.keystr(key): np.asarray(value) for key, value in leaves}
    np.savez(path, **arrays)


def load_float_params(path: Path, like):
    with np.load(path) as arrays:
        return jax.tree_util.tree_map_with_path(
            lambda key, _: jnp.asarray(arrays[jax.tree_util.keystr(key)]), like
        )


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description="Train the demo model (about an hour on 2 CPU cores) and write it to --out.")
    parser.add_argument("--out", default=str(REPO / "demo"),
                        help="where the model is written; files there are replaced (default: the "
                             "repository's demo/, the shipped model)")
    parser.add_argument("--work-dir", default="build/train_demo",
                        help="where the float32 weights are kept (default: %(default)s)")
    parser.add_argument("--bible", default="bible", help="the bible-kjv reader (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=Recipe.steps, help="training steps (default: %(default)s)")
    parser.add_argument("--skip-training", action="store_true",
                        help="export the float32 weights already in --work-dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    recipe = Recipe(steps=args.steps)
    if recipe.steps <= recipe.warmup_steps:
        parser.error(f"--steps {recipe.steps} is invalid: use more than the {recipe.warmup_steps} warmup steps")
    config = demo_config()
    out, work = Path(args.out), Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    chapters = read_kjv(args.bible)
    corpus_hash = sha256("\n".join(text for _, text in chapters).encode())
    train_chapters, heldout_chapters = split_chapters(chapters)
    logger.info("%d chapters: %d for training, %d held out", len(chapters), len(train_chapters),
                len(heldout_chapters))

    tokenizer_bytes = train_tokenizer(train_chapters)
    tokenizer = sentencepiece.SentencePieceProcessor(model_proto=tokenizer_bytes)
    train_stream = encode_chapters(tokenizer, train_chapters)
    heldout_stream = encode_chapters(tokenizer, heldout_chapters)
    logger.info("tokens: %d training, %d held out", len(train_stream), len(heldout_stream))

    params_path = work / "params.npz"
    if args.skip_training:
        like = init_float_params(training_config(config), recipe.seed)
        float_params = load_float_params(params_path, like)
        training = json.loads((work / "training.json").read_text())
        history, best_step = training["history"], training["best_step"]
    else:
        float_params, history, best_step = train(config, recipe, train_stream, heldout_stream)
        save_float_params(params_path, float_params)
        (work / "training.json").write_text(json.dumps({"history": history, "best_step": best_step}))

    heldout_text = "\n".join(text for _, text in heldout_chapters)
    bf16_score = score_params(config, bfloat16_params(config, float_params), tokenizer, heldout_text)
    quantized = quantize_params(config, float_params)
    int8_score = score_params(config, quantized, tokenizer, heldout_text)
    logger.info("held-out perplexity: bfloat16 %.3f, int8 %.3f (%+.2f%%)", bf16_score.perplexity,
                int8_score.perplexity, 100 * (int8_score.perplexity / bf16_score.perplexity - 1))

    checkpoint.save_checkpoint(out / "ckpt-0", quantized)
    (out / "config.json").write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
    (out / "tokenizer.model").write_bytes(tokenizer_bytes)
    # The first held-out chapters, at least 8 KB, for the tests.
    sample, size = [], 0
    for reference, text in heldout_chapters:
        if size > 8000:
            break
        sample.append(text)
        size += len(text)
    (out / "heldout.txt").write_text("\n".join(sample) + "\n")

    counts = parameter_counts(config, quantized)
    report = {
        "source": {
            "text": "King James Version of the Bible (1611), public domain",
            "debian_package": "bible-kjv-text (read with the bible program of bible-kjv)",
            "command": f"bible -f {KJV_RANGE}",
            "sha256_of_chapters": corpus_hash,
            "chapters": len(chapters),
            "heldout_chapters": [reference for reference, _ in heldout_chapters],
        },
        "recipe": dataclasses.asdict(recipe),
        "parameters": counts,
        "tokens": {"train": int(len(train_stream)), "heldout": int(len(heldout_stream))},
        "tokenizer_sha256": sha256(tokenizer_bytes),
        "best_step": best_step,
        "history": history,
        "heldout_perplexity": {
            "tokens": bf16_score.tokens,
            "bfloat16": round(bf16_score.perplexity, 4),
            "int8": round(int8_score.perplexity, 4),
            "int8_vs_bfloat16": round(int8_score.perplexity / bf16_score.perplexity - 1, 5),
        },
        "versions": {"jax": jax.__version__, "dm_haiku": hk.__version__, "optax": optax.__version__,
                     "sentencepiece": sentencepiece.__version__, "numpy": np.__version__},
    }
    (out / "training-report.json").write_text(json.dumps(report, indent=2) + "\n")
    logger.info("wrote %s", out)


def parameter_counts(config, params) -> dict:
    """Return the total and the per-token active parameter counts."""
    total = sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda q: q.weight if _is_quantized(q) else q, params, is_leaf=_is_quantized)))
    model = config.model
    expert = 3 * model.emb_size * model.ffn_size
    inactive = model.num_layers * (model.num_experts - model.num_selected_experts) * expert
    return {"total": total, "active_per_token": total - inactive}


if __name__ == "__main__":
    main()
