"""Device mesh, model and inference runners, and sampling for Grok-1.

`ModelRunner` owns the model's parameters on a device mesh: it builds the
mesh from the devices present, shards the parameters by the partition rules
in `model.py`, and compiles prefill and decode. `InferenceRunner` turns
requests into completions: it tokenizes, batches, prefills the KV cache,
samples token by token and stops at EOS or the length limit.
`sample_from_model` keeps the call of xAI's `run.py`.
"""

import dataclasses
import functools
import logging
import math
import time
from typing import Callable, Generator, Iterable, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import checkpoint
from model import (
    LanguageModelConfig,
    LanguageModelOutput,
    Memory,
    QuantizedWeight8bit,
    init_memory,
    partition_spec_for,
)

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "model")

# Tokens per scoring batch: the float32 logits of Grok-1's 131072-token
# vocabulary take 4.3 GB for 8192 tokens.
SCORE_TOKENS_PER_BATCH = 8192

# Prompt lengths are padded up to one of these sizes (capped at the model's
# context), so that prefill compiles once per bucket, not once per length.
DEFAULT_PAD_SIZES = tuple(2**i for i in range(5, 14))  # 32 ... 8192

# KV-cache slot and cache-length granularity for the decode compile.
CACHE_LEN_MULTIPLE = 128

# The per-row sampling inputs of prefill and decode, in the order the steps
# take them: (`Request` field, value of a padding row, dtype).
SAMPLING_FIELDS = (
    ("temperature", 0.0, np.float32),
    ("nucleus_p", 1.0, np.float32),
    ("top_k", 0, np.int32),
    ("rng_seed", 0, np.uint32),
)


# ----------------------------------------------------------------------------
# Requests and sampling settings
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Request:
    """One prompt to complete, with its sampling settings.

    prompt: the text; ignored when `prompt_ids` is given.
    temperature: divides the logits before sampling; 0 means greedy argmax.
    nucleus_p: top-p; sample from the smallest set of tokens whose
        probability adds up to at least this (1.0 keeps all).
    rng_seed: seed of this request's random draws, independent of the
        other requests in the batch.
    max_len: maximum number of new tokens.
    top_k: sample from the `top_k` most likely tokens only (0 keeps all).
    stop_at_eos: end the completion at the EOS token (which is included).
    """

    prompt: str = ""
    temperature: float = 1.0
    nucleus_p: float = 1.0
    rng_seed: int = 0
    max_len: int = 100
    top_k: int = 0
    prompt_ids: Optional[Sequence[int]] = None
    stop_at_eos: bool = True


@dataclasses.dataclass
class Completion:
    """The result of one request.

    token_ids: the new tokens, EOS included when it ended the completion.
    logprobs: log-probability of each new token under the model, before
        temperature, top-k and top-p.
    stop_reason: "eos", "max_len" or "context" (the context was full).
    """

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    text: Optional[str]
    stop_reason: str


@dataclasses.dataclass
class Score:
    """The model's log-likelihood of a text, token by token.

    tokens: the number of tokens predicted (all but the first).
    nll: their summed negative log-likelihood, in nats.
    num_bytes: UTF-8 bytes of the scored text; 0 where not known.
    window: the maximum number of tokens in one forward pass (see `ModelRunner.score`).
    """

    tokens: int
    nll: float
    num_bytes: int = 0
    window: int = 0

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per predicted token, in nats."""
        return self.nll / self.tokens

    @property
    def perplexity(self) -> float:
        """`exp(mean_nll)`: the per-token perplexity."""
        return math.exp(self.mean_nll)

    @property
    def bits_per_byte(self) -> Optional[float]:
        """Bits per UTF-8 byte of text, comparable across tokenizers; None without `num_bytes`."""
        return self.nll / math.log(2) / self.num_bytes if self.num_bytes else None

    def to_dict(self) -> dict:
        return {
            "tokens": self.tokens,
            "nll": self.nll,
            "mean_nll": self.mean_nll,
            "perplexity": self.perplexity,
            "bytes": self.num_bytes,
            "bits_per_byte": self.bits_per_byte,
            "window": self.window,
        }


def validate_sampling(request: Request) -> None:
    """Raise ValueError naming the first invalid sampling setting of `request`."""
    if not (math.isfinite(request.temperature) and request.temperature >= 0):
        raise ValueError(
            f"temperature={request.temperature} is invalid: use 0 for greedy decoding "
            "or a positive number"
        )
    if not (0.0 < request.nucleus_p <= 1.0):
        raise ValueError(f"top-p (nucleus_p)={request.nucleus_p} is invalid: use a value in (0, 1]")
    if not (isinstance(request.top_k, (int, np.integer)) and request.top_k >= 0):
        raise ValueError(f"top-k (top_k)={request.top_k} is invalid: use 0 (no limit) or a positive integer")
    if not (isinstance(request.max_len, (int, np.integer)) and request.max_len >= 1):
        raise ValueError(f"max-len (max_len)={request.max_len} is invalid: use a positive number of tokens")
    if not isinstance(request.rng_seed, (int, np.integer)) or not 0 <= request.rng_seed < 2**32:
        raise ValueError(f"seed (rng_seed)={request.rng_seed!r} is invalid: use an integer from 0 to 2**32 - 1")


def sample_tokens(
    logits: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    top_k: jax.Array,
    keys: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row of `logits` float32 `[batch, vocab]`.

    temperature, top_p: float32 [batch]; top_k: int32 [batch] (0 = no limit);
    keys: [batch] PRNG keys. Rows with temperature 0 take the argmax.
    Returns the tokens int32 `[batch]` and their log-probabilities float32
    `[batch]` under the unmodified logits.
    """
    vocab = logits.shape[-1]
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    safe_temperature = jnp.where(temperature > 0, temperature, 1.0)
    scaled = logits / safe_temperature[:, None]

    # Sort once, best first: [batch, vocab]
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]

    # Top-k: keep the first k ranks.
    k = jnp.where(top_k > 0, top_k, vocab)
    keep = rank < k[:, None]

    # Top-p: keep a token while the probability mass before it is below top_p,
    # measured after top-k, so the best token is always kept.
    probs = jax.nn.softmax(jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep &= mass_before < top_p[:, None]

    choice = jax.vmap(jax.random.categorical)(keys, jnp.where(keep, sorted_logits, -jnp.inf))
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)

    tokens = jnp.where(temperature > 0, sampled, greedy)
    token_logprobs = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens, token_logprobs


def _step_keys(seeds: jax.Array, step: jax.Array) -> jax.Array:
    """Return one PRNG key per row, from the row's seed `[batch]` and the step number."""
    return jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), step))(seeds)


# ----------------------------------------------------------------------------
# Mesh and parameter sharding
# ----------------------------------------------------------------------------


def make_mesh(
    local_mesh_config: Optional[tuple[int, int]] = None,
    between_hosts_config: Optional[tuple[int, int]] = None,
) -> Mesh:
    """Build a `('data', 'model')` mesh over all devices of all processes.

    local_mesh_config: (data, model) sizes within one process; default
        (1, local device count): tensor parallelism over the local devices.
    between_hosts_config: (data, model) sizes across processes; default
        (process count, 1): one data-parallel row per process.
    """
    num_local = jax.local_device_count()
    num_processes = jax.process_count()
    if local_mesh_config is None:
        local_mesh_config = (1, num_local)
    if between_hosts_config is None:
        between_hosts_config = (num_processes, 1)
    local_mesh_config = tuple(int(n) for n in local_mesh_config)
    between_hosts_config = tuple(int(n) for n in between_hosts_config)

    if math.prod(local_mesh_config) != num_local:
        raise ValueError(
            f"local_mesh_config={local_mesh_config} needs {math.prod(local_mesh_config)} "
            f"devices per process, but this process has {num_local} "
            f"({jax.local_devices()[0].platform}); pass sizes whose product is {num_local}, "
            "or None to use all local devices for the model axis"
        )
    if math.prod(between_hosts_config) != num_processes:
        raise ValueError(
            f"between_hosts_config={between_hosts_config} needs "
            f"{math.prod(between_hosts_config)} processes, but {num_processes} are running"
        )

    if num_processes == 1:
        devices = mesh_utils.create_device_mesh(local_mesh_config, jax.devices())
    else:
        devices = mesh_utils.create_hybrid_device_mesh(
            local_mesh_config, between_hosts_config, jax.devices(), process_is_granule=True
        )
    mesh = Mesh(devices, MESH_AXES)
    logger.info("Device mesh %s over %d %s devices", dict(mesh.shape), mesh.size, mesh.devices.flat[0].platform)
    return mesh


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drop the mesh axes of `spec` that do not evenly divide the dimension they split."""
    fitted = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = (axis,) if isinstance(axis, str) else (axis or ())
        size = math.prod(mesh.shape[a] for a in axes)
        fitted.append(axis if axes and dim % size == 0 else None)
    return P(*fitted)


def _path_string(path) -> str:
    return "/".join(str(getattr(key, "key", key)) for key in path)


def param_shardings(params_shape, mesh: Mesh):
    """Return a tree of `NamedSharding`s matching `params_shape` (QuantizedWeight8bit leaves kept)."""

    def sharding_for(path, leaf):
        name = _path_string(path)
        if isinstance(leaf, QuantizedWeight8bit):
            weight_spec = fit_spec(partition_spec_for(name), leaf.weight.shape, mesh)
            scales_spec = fit_spec(partition_spec_for(name, weight=False), leaf.scales.shape, mesh)
            return QuantizedWeight8bit(
                weight=NamedSharding(mesh, weight_spec), scales=NamedSharding(mesh, scales_spec)
            )
        return NamedSharding(mesh, fit_spec(partition_spec_for(name), leaf.shape, mesh))

    return jax.tree_util.tree_map_with_path(
        sharding_for, params_shape, is_leaf=lambda x: isinstance(x, QuantizedWeight8bit)
    )


def memory_shardings(memory_shape: Memory, mesh: Mesh) -> Memory:
    """Shard the KV cache `[batch, cache_len, kv_heads, key_size]` by batch and KV head."""

    def sharding_for(leaf):
        spec = P("data", None, "model", None) if leaf.ndim == 4 else P("data", None)
        return NamedSharding(mesh, fit_spec(spec, leaf.shape, mesh))

    return jax.tree_util.tree_map(sharding_for, memory_shape)


def _put_global(host_array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Place a host array, present in full on every process, onto `sharding`."""
    return jax.make_array_from_callback(host_array.shape, sharding, lambda index: host_array[index])


# ----------------------------------------------------------------------------
# Model runner
# ----------------------------------------------------------------------------


def default_activation_dtype(config: LanguageModelConfig) -> jnp.dtype:
    """Return float32 on CPU and the config's `fprop_dtype` elsewhere.

    XLA:CPU keeps most of the reference's nominally bfloat16 intermediates in
    float32 and runs bfloat16 matrix products slowly, so on CPU float32
    activations are both closer to the reference's outputs and faster.
    Weights are bfloat16 values either way.
    """
    return jnp.dtype(jnp.float32) if jax.default_backend() == "cpu" else config.fprop_dtype


@dataclasses.dataclass
class ModelRunner:
    """The model's parameters on a mesh, and its compiled prefill and decode steps.

    model: the model's configuration.
    bs_per_device: batch size per device, as in xAI's runner; it caps the
        batch at `ceil(bs_per_device * devices)`. None: no cap.
    checkpoint_path: the checkpoint to load; see `checkpoint.resolve_checkpoint_dir`.
    activation_dtype: dtype of the activations; None picks
        `default_activation_dtype`.
    """

    model: LanguageModelConfig
    bs_per_device: Optional[float] = None
    checkpoint_path: Optional[str] = None
    activation_dtype: Optional[object] = None
    kv_cache_dtype: object = jnp.bfloat16

    def __post_init__(self):
        self.mesh: Optional[Mesh] = None
        self.params = None

    def initialize(self, mesh: Mesh) -> None:
        """Compile-ready state for `mesh`: shapes and shardings of the parameters."""
        self.mesh = mesh
        dtype = self.activation_dtype or default_activation_dtype(self.model)
        self.config = dataclasses.replace(self.model, fprop_dtype=dtype)
        self.transformed = hk.transform(lambda *args, **kw: self.config.make()(*args, **kw))
        self.params_shape = jax.eval_shape(
            self.transformed.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32)
        )
        self.params_sharding = param_shardings(self.params_shape, mesh)
        self._prefill = jax.jit(self._prefill_fn, donate_argnums=(2,))
        self._decode = jax.jit(self._decode_fn, donate_argnums=(2,))
        self._score_step = jax.jit(self._score_fn, out_shardings=NamedSharding(mesh, P()))

    @property
    def max_batch_size(self) -> Optional[int]:
        if self.bs_per_device is None:
            return None
        return max(1, math.ceil(self.bs_per_device * self.mesh.size))

    def load_or_init(self, rng_seed: int = 0, load: Optional[str] = None):
        """Load the parameters from `load` (or `checkpoint_path`), or initialize random ones."""
        path = load or self.checkpoint_path
        if path:
            self.params = checkpoint.load_checkpoint(
                path, self.params_shape, self.params_sharding
            )
        else:
            logger.warning("No checkpoint given: initializing random weights")
            init = jax.jit(self.transformed.init, out_shardings=self.params_sharding)
            self.params = init(jax.random.key(rng_seed), jnp.zeros((1, 1), jnp.int32))
        return self.params

    # The functions below are traced under jit.

    def _forward(self, params, tokens, positions, memory, readout):
        # The model reads the mesh from this context (see `model.sharded_sparse_moe`).
        with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
            return self.transformed.apply(params, None, tokens, positions, memory, readout)

    def _prefill_fn(self, params, tokens, memory, lengths, sampling):
        """Run the padded prompts `tokens` `[batch, seq]` into `memory`, sample the first tokens."""
        batch, seq = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        out: LanguageModelOutput = self._forward(params, tokens, positions, memory, lengths - 1)
        next_tokens, logprobs = self._sample(out.logits, sampling, jnp.int32(0))
        return *self._replicate((next_tokens, logprobs)), out.memory

    def _decode_fn(self, params, tokens, memory, positions, sampling, step):
        """Append `tokens` `[batch]` at `positions` `[batch]` and sample the next tokens."""
        out = self._forward(params, tokens[:, None], positions[:, None], memory, None)
        next_tokens, logprobs = self._sample(out.logits[:, 0], sampling, step)
        return *self._replicate((next_tokens, logprobs)), out.memory

    def _sample(self, logits, sampling, step):
        temperature, top_p, top_k, seeds = sampling
        return sample_tokens(logits, temperature, top_p, top_k, _step_keys(seeds, step))

    def _replicate(self, values):
        """Constrain `values` to a full copy on every device.

        The host loop reads the sampled tokens on every process; with
        several processes a row-sharded array is not fully addressable.
        """
        replicated = NamedSharding(self.mesh, P())
        return tuple(jax.lax.with_sharding_constraint(value, replicated) for value in values)

    # Host-side entry points.

    def batch_sharding(self, shape: Sequence[int]) -> NamedSharding:
        """Return the sharding of a per-row input `[batch, ...]`: rows split over the data axis."""
        spec = P("data", *(None,) * (len(shape) - 1))
        return NamedSharding(self.mesh, fit_spec(spec, shape, self.mesh))

    def memory_shape(self, batch_size: int, cache_len: int) -> Memory:
        """Return the KV cache's `jax.ShapeDtypeStruct`s, each with its sharding."""
        shape = jax.eval_shape(
            lambda: init_memory(self.config, batch_size, cache_len, self.kv_cache_dtype)
        )
        return jax.tree_util.tree_map(
            lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            shape,
            memory_shardings(shape, self.mesh),
        )

    def new_memory(self, batch_size: int, cache_len: int) -> Memory:
        """Return an empty, sharded KV cache."""
        shardings = jax.tree_util.tree_map(
            lambda leaf: leaf.sharding, self.memory_shape(batch_size, cache_len)
        )
        make = jax.jit(
            lambda: init_memory(self.config, batch_size, cache_len, self.kv_cache_dtype),
            out_shardings=shardings,
        )
        return make()

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        """Return the float32 logits `[batch, seq, vocab]` of one forward over `tokens` (no cache)."""
        tokens = np.asarray(tokens, np.int32)
        batch_sharding = NamedSharding(self.mesh, fit_spec(P("data", None), tokens.shape, self.mesh))
        forward = jax.jit(
            lambda params, tokens: self._forward(params, tokens, None, None, None).logits,
            out_shardings=NamedSharding(self.mesh, P()),
        )
        return np.asarray(forward(self.params, _put_global(tokens, batch_sharding)))

    def _score_fn(self, params, inputs, targets):
        """Return the summed NLL and the count of `targets` `[batch, seq]` that are not padding."""
        logits = self._forward(params, inputs, None, None, None).logits  # float32 [batch, seq, vocab]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        scored = targets != self.config.pad_token
        return jnp.sum(jnp.where(scored, nll, 0.0)), jnp.sum(scored)

    def score(self, ids: Sequence[int], window: Optional[int] = None) -> Score:
        """Return the log-likelihood of `ids` with each token predicted from the ones before it.

        The ids are cut into windows of `window + 1` tokens (default: the
        context, `sequence_len`) that overlap by one token. Each window is one
        forward pass that predicts its last `window` tokens. So a token is
        predicted from at most `window` tokens of context, and from fewer at
        the start of a window.
        """
        config = self.config
        window = window or config.sequence_len
        check_score_window(window, config)
        ids = np.asarray(ids, np.int32)
        if ids.size < 2:
            raise ValueError(
                f"the text has {ids.size} token(s): scoring needs at least 2, because the first "
                "token is only context for the next"
            )
        check_token_ids(ids, config)

        # [windows, window + 1], padded at the end of the last window.
        num_windows = math.ceil((ids.size - 1) / window)
        padded = np.full(num_windows * window + 1, config.pad_token, np.int32)
        padded[: ids.size] = ids
        starts = np.arange(num_windows) * window
        rows = padded[starts[:, None] + np.arange(window + 1)]

        # Fixed-size batches of windows, so one compiled program serves the whole text.
        batch = max(1, SCORE_TOKENS_PER_BATCH // window)
        batch = min(batch, num_windows)
        total_nll, total_tokens = 0.0, 0
        for first in range(0, num_windows, batch):
            chunk = np.full((batch, window + 1), config.pad_token, np.int32)
            part = rows[first:first + batch]
            chunk[: len(part)] = part
            sharding = self.batch_sharding((batch, window))
            nll, count = self._score_step(
                self.params,
                _put_global(chunk[:, :-1], sharding),
                _put_global(chunk[:, 1:], sharding),
            )
            total_nll += float(nll)
            total_tokens += int(count)
            logger.debug("scored %d of %d windows", min(first + batch, num_windows), num_windows)
        return Score(tokens=total_tokens, nll=total_nll, window=window)


# ----------------------------------------------------------------------------
# Inference runner
# ----------------------------------------------------------------------------


def bucket_size(length: int, pad_sizes: Iterable[int], limit: int) -> int:
    """Return the smallest of `pad_sizes` (then powers of two) that holds `length`, capped at `limit`."""
    for size in sorted(set(pad_sizes) | set(DEFAULT_PAD_SIZES)):
        if size >= length:
            return min(size, limit)
    return limit


TokenCallback = Callable[[int, int], None]


@dataclasses.dataclass
class InferenceRunner:
    """Serves requests from a `ModelRunner`: tokenizes, batches and generates.

    The constructor arguments are those of xAI's runner. `load` is the
    checkpoint directory; `tokenizer_path` may be None when requests carry
    `prompt_ids`. `local_mesh_config` and `between_hosts_config` are the
    (data, model) sizes of the mesh within and across processes; None uses
    every device for the model axis.
    """

    runner: ModelRunner
    name: str = "local"
    load: Optional[str] = None
    tokenizer_path: Optional[str] = None
    local_mesh_config: Optional[tuple[int, int]] = None
    between_hosts_config: Optional[tuple[int, int]] = None
    pad_sizes: tuple[int, ...] = DEFAULT_PAD_SIZES

    def initialize(self, mesh: Optional[Mesh] = None) -> None:
        """Load the tokenizer, build the mesh (unless given) and load the parameters."""
        self.tokenizer = load_tokenizer(self.tokenizer_path) if self.tokenizer_path else None
        self.mesh = mesh or make_mesh(self.local_mesh_config, self.between_hosts_config)
        self.runner.initialize(self.mesh)
        start = time.perf_counter()
        self.runner.load_or_init(load=self.load)
        logger.info("Parameters ready in %.1f s", time.perf_counter() - start)

    @property
    def config(self) -> LanguageModelConfig:
        return self.runner.config

    def encode(self, request: Request) -> list[int]:
        """Return the prompt's token ids, validated against the model."""
        config = self.config
        if request.prompt_ids is not None:
            ids = [int(i) for i in request.prompt_ids]
        elif self.tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer: pass tokenizer_path, or give prompt_ids")
        else:
            ids = self.tokenizer.encode(request.prompt)

        check_prompt_ids(ids, config)
        return ids

    def decode_text(self, ids: Sequence[int]) -> Optional[str]:
        return None if self.tokenizer is None else self.tokenizer.decode(list(ids))

    def generate(
        self, requests: Sequence[Request], on_token: Optional[TokenCallback] = None
    ) -> list[Completion]:
        """Complete every request; `on_token(request_index, token_id)` sees each new token.

        All requests are checked before any compute. They run in batches of
        at most `runner.max_batch_size`, each request with its own sampling
        settings and random stream.
        """
        for request in requests:
            validate_sampling(request)
        prompts = [self.encode(request) for request in requests]

        completions: list[Completion] = []
        batch_size = self.runner.max_batch_size or len(requests)
        for start in range(0, len(requests), batch_size):
            chunk = range(start, min(start + batch_size, len(requests)))
            callback = None
            if on_token is not None:
                callback = functools.partial(_offset_callback, on_token, start)
            completions += self._generate_batch(
                [requests[i] for i in chunk], [prompts[i] for i in chunk], callback
            )
        return completions

    def _generate_batch(
        self,
        requests: Sequence[Request],
        prompts: Sequence[list[int]],
        on_token: Optional[TokenCallback],
    ) -> list[Completion]:
        config = self.config
        runner = self.runner
        mesh = self.mesh
        num_real = len(requests)

        # Pad the batch to a multiple of the data axis with 1-token dummy rows.
        data_size = mesh.shape["data"]
        batch = -(-num_real // data_size) * data_size
        lengths = [len(p) for p in prompts] + [1] * (batch - num_real)
        max_new = [r.max_len for r in requests] + [1] * (batch - num_real)

        context = config.sequence_len
        seq = bucket_size(max(lengths), self.pad_sizes, context)
        needed = max(length + new for length, new in zip(lengths, max_new))
        cache_len = min(context, -(-max(needed, seq) // CACHE_LEN_MULTIPLE) * CACHE_LEN_MULTIPLE)
        cache_len = max(cache_len, seq)
        for request, length in zip(requests, lengths):
            if length + request.max_len > context:
                logger.warning(
                    "prompt of %d tokens + max_len %d exceeds the context of %d tokens: "
                    "generating at most %d tokens",
                    length, request.max_len, context, context - length,
                )

        tokens = np.zeros((batch, seq), np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = prompt
        tokens[num_real:, 0] = config.eos_token

        def settings(field, default, dtype):
            values = [getattr(r, field) for r in requests] + [default] * (batch - num_real)
            return np.asarray(values, dtype)

        put_rows = functools.partial(_put_global, sharding=runner.batch_sharding((batch,)))
        sampling = tuple(
            put_rows(settings(field, default, dtype)) for field, default, dtype in SAMPLING_FIELDS
        )

        logger.info(
            "Prefill: %d prompt(s), longest %d tokens, padded to %d; KV cache of %d slots",
            num_real, max(lengths[:num_real]), seq, cache_len,
        )
        memory = runner.new_memory(batch, cache_len)
        next_tokens, logprobs, memory = runner._prefill(
            runner.params,
            _put_global(tokens, runner.batch_sharding(tokens.shape)),
            memory,
            put_rows(np.asarray(lengths, np.int32)),
            sampling,
        )

        generated = [[] for _ in range(num_real)]
        token_logprobs = [[] for _ in range(num_real)]
        stop_reason: list[Optional[str]] = [None] * num_real
        positions = np.asarray(lengths, np.int32)
        for step in range(1, max(max_new) + 1):
            host_tokens = np.asarray(jax.device_get(next_tokens))
            host_logprobs = np.asarray(jax.device_get(logprobs))
            for row in range(num_real):
                if stop_reason[row] is not None:
                    continue
                token = int(host_tokens[row])
                generated[row].append(token)
                token_logprobs[row].append(float(host_logprobs[row]))
                if on_token is not None:
                    on_token(row, token)
                stop_reason[row] = self._stop_reason(requests[row], token, generated[row], positions[row])
            if all(reason is not None for reason in stop_reason):
                break

            next_tokens, logprobs, memory = runner._decode(
                runner.params,
                put_rows(host_tokens.astype(np.int32)),
                memory,
                put_rows(positions),
                sampling,
                jnp.int32(step),
            )
            positions = np.minimum(positions + 1, cache_len - 1)

        return [
            Completion(
                prompt_ids=list(prompts[row]),
                token_ids=generated[row],
                logprobs=token_logprobs[row],
                text=self.decode_text(generated[row]),
                stop_reason=stop_reason[row],
            )
            for row in range(num_real)
        ]

    def _stop_reason(self, request: Request, token: int, generated: list[int], position: int):
        """Return why the completion ends after `token` at cache slot `position`, or None."""
        if request.stop_at_eos and token == self.config.eos_token:
            return "eos"
        if len(generated) >= request.max_len:
            return "max_len"
        if position + 1 >= self.config.sequence_len:
            return "context"
        return None

    def run(self) -> Generator[Optional[str], Request, None]:
        """A generator that takes `Request`s and returns their text, as in xAI's runner.

        Prime it with `next()`, then `send(request)` returns the completion's text.
        """
        text: Optional[str] = None
        while True:
            request = yield text
            if request is None:
                continue
            completion = self.generate([request])[0]
            text = completion.text if completion.text is not None else str(completion.token_ids)


def _offset_callback(on_token: TokenCallback, offset: int, row: int, token: int) -> None:
    on_token(offset + row, token)


def check_token_ids(ids: Sequence[int], config: LanguageModelConfig, name: str = "token ids") -> None:
    """Raise ValueError if any of `ids` is padding or outside the vocabulary."""
    bad = [int(i) for i in ids if not config.pad_token < i < config.vocab_size]
    if bad:
        raise ValueError(
            f"{name} {bad[:8]} are outside {config.pad_token + 1}.."
            f"{config.vocab_size - 1} (id {config.pad_token} is padding)"
        )


def check_score_window(window: int, config: LanguageModelConfig) -> None:
    """Raise ValueError if `window` tokens do not fit the model's context."""
    if not 1 <= window <= config.sequence_len:
        raise ValueError(f"the scoring window {window} must be between 1 and the context, {config.sequence_len}")


def check_prompt_ids(ids: Sequence[int], config: LanguageModelConfig) -> None:
    """Raise ValueError if the prompt `ids` is empty, has invalid ids or does not fit the context."""
    if not ids:
        raise ValueError("the prompt is empty: give at least one token")
    check_token_ids(ids, config, "prompt token ids")
    if len(ids) >= config.sequence_len:
        raise ValueError(
            f"the prompt has {len(ids)} tokens, but the context has room for {config.sequence_len} "
            f"tokens including at least one new token: shorten it to at most "
            f"{config.sequence_len - 1} tokens"
        )


def score_text(runner: ModelRunner, tokenizer, text: str, window: Optional[int] = None) -> Score:
    """Return `runner.score` of `text` tokenized with `tokenizer`, with the bytes it predicted.

    The first token is context only, so its bytes are not counted in
    `num_bytes`: bits per byte cover the predicted text.
    """
    ids = tokenizer.encode(text)
    score = runner.score(ids, window)
    first_bytes = len(tokenizer.decode(ids[:1]).encode("utf-8"))
    return dataclasses.replace(score, num_bytes=len(text.encode("utf-8")) - first_bytes)


def load_tokenizer(path: str):
    """Load a SentencePiece model, with a clear error where the file is missing."""
    import os

    import sentencepiece

    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"tokenizer not found at {path!r}: download tokenizer.model from xAI's GitHub "
            "repository xai-org/grok-1 (it is not in the Hugging Face weights repository) "
            "and pass its path"
        )
    try:
        return sentencepiece.SentencePieceProcessor(model_file=path)
    except RuntimeError as error:
        raise ValueError(
            f"tokenizer {path!r} is not a SentencePiece model ({error}): download tokenizer.model "
            "again from xAI's GitHub repository xai-org/grok-1"
        ) from None


def sample_from_model(server, prompt: str, max_len: int, temperature: float) -> str:
    """Return the completion of `prompt` from `InferenceRunner.run()`, as xAI's helper does."""
    next(server)
    request = Request(
        prompt=prompt, temperature=temperature, nucleus_p=1.0, rng_seed=42, max_len=max_len
    )
    return server.send(request)


# ----------------------------------------------------------------------------
# Dry run: compile for a mesh without weights
# ----------------------------------------------------------------------------

# XLA:CPU's default scheduler orders operations for concurrency and keeps
# many layers' activations live at once. Grok-1's prefill at batch 8 on 8
# devices needs 330 GB of temporaries per device with it and 13.8 GB with
# the memory-optimized one (jaxlib 0.10.2). Accelerator compilers also keep
# memory bounded, so the dry run compiles with the memory-optimized
# scheduler where the mesh is on CPU.
CPU_DRY_RUN_COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


@dataclasses.dataclass
class StepMemory:
    """XLA's memory analysis of one compiled step, in bytes per device.

    alias_bytes: the outputs that reuse donated argument buffers (the KV cache).
    """

    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    compile_seconds: float

    @property
    def peak_bytes(self) -> int:
        """Arguments, outputs that need their own buffers, and temporaries, live together."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclasses.dataclass
class DryRunReport:
    """Memory per device and compile time of prefill and decode for one mesh and size.

    batch_size: the compiled batch, a multiple of the data axis.
    context: KV-cache slots per sequence; prefill runs `prefill_len` tokens.
    param_bytes: all parameters, counted once; `param_count` their elements
        (int8 weights count once, their scales not at all).
    """

    mesh_shape: dict[str, int]
    platform: str
    batch_size: int
    context: int
    prefill_len: int
    activation_dtype: str
    param_count: int
    param_bytes: int
    param_bytes_per_device: int
    kv_cache_bytes_per_device: int
    prefill: StepMemory
    decode: StepMemory
    device_memory: Optional[int] = None

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh_shape.values())

    @property
    def temp_bytes_per_device(self) -> int:
        return max(self.prefill.temp_bytes, self.decode.temp_bytes)

    @property
    def peak_bytes_per_device(self) -> int:
        return max(self.prefill.peak_bytes, self.decode.peak_bytes)

    @property
    def compile_seconds(self) -> float:
        return self.prefill.compile_seconds + self.decode.compile_seconds

    @property
    def fits(self) -> Optional[bool]:
        """Whether the peak fits in `device_memory`; None when no device memory is given."""
        if self.device_memory is None:
            return None
        return self.peak_bytes_per_device <= self.device_memory

    def to_dict(self) -> dict:
        """Return the report as a JSON-ready dict, the derived figures included."""
        record = dataclasses.asdict(self)
        for name in ("num_devices", "temp_bytes_per_device", "peak_bytes_per_device", "compile_seconds", "fits"):
            record[name] = getattr(self, name)
        for step in ("prefill", "decode"):
            record[step]["peak_bytes"] = getattr(self, step).peak_bytes
        return record


def bytes_per_device(shapes, shardings) -> int:
    """Return the bytes that one device stores of arrays `shapes` placed by `shardings`.

    Every split that `fit_spec` keeps is even, so all devices store the same amount.
    """
    total = 0
    for shape, sharding in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings)):
        total += math.prod(sharding.shard_shape(shape.shape)) * np.dtype(shape.dtype).itemsize
    return total


def _abstract(shapes, shardings):
    """Return `shapes` as `jax.ShapeDtypeStruct`s that carry `shardings`."""
    return jax.tree_util.tree_map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
        shapes,
        shardings,
    )


def _compile_step(step, args, compiler_options) -> StepMemory:
    """Lower and compile the jitted `step` for abstract `args`; return its memory analysis."""
    start = time.perf_counter()
    compiled = step.lower(*args).compile(compiler_options)
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    return StepMemory(
        argument_bytes=int(stats.argument_size_in_bytes),
        output_bytes=int(stats.output_size_in_bytes),
        alias_bytes=int(stats.alias_size_in_bytes),
        temp_bytes=int(stats.temp_size_in_bytes),
        compile_seconds=seconds,
    )


def dry_run(
    config: LanguageModelConfig,
    mesh: Mesh,
    batch_size: int,
    context: Optional[int] = None,
    device_memory: Optional[int] = None,
    activation_dtype=None,
) -> DryRunReport:
    """Compile prefill and decode for `mesh` without weights and report memory per device.

    The steps are `ModelRunner`'s own jitted prefill and decode, lowered
    with abstract parameters and KV cache that carry the runner's shardings:
    no weights are read or allocated. `batch_size` is rounded up to a
    multiple of the data axis, as the runner pads batches. `context` (default
    the model's `sequence_len`) is the KV-cache length; prefill runs the
    longest prompt that fits it. `activation_dtype` defaults to the config's
    `fprop_dtype` (bfloat16 for Grok-1), which accelerators use, even where
    the mesh is on CPU.
    """
    context = config.sequence_len if context is None else context
    if not 2 <= context <= config.sequence_len:
        raise ValueError(
            f"context={context} is invalid: use 2 to the model's sequence_len={config.sequence_len}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: use a positive number of sequences")
    data_size = mesh.shape["data"]
    padded_batch = -(-batch_size // data_size) * data_size
    if padded_batch != batch_size:
        logger.info("Batch %d padded to %d, a multiple of the data axis", batch_size, padded_batch)
    prefill_len = bucket_size(context - 1, DEFAULT_PAD_SIZES, context)

    runner = ModelRunner(model=config, activation_dtype=activation_dtype or config.fprop_dtype)
    runner.initialize(mesh)
    params = _abstract(runner.params_shape, runner.params_sharding)
    memory = runner.memory_shape(padded_batch, context)

    def rows(dtype, length=None):
        shape = (padded_batch,) if length is None else (padded_batch, length)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=runner.batch_sharding(shape))

    sampling = tuple(rows(dtype) for _, _, dtype in SAMPLING_FIELDS)
    step = jax.ShapeDtypeStruct((), jnp.int32)
    options = CPU_DRY_RUN_COMPILER_OPTIONS if mesh.devices.flat[0].platform == "cpu" else None

    logger.info(
        "Compiling prefill (%d x %d tokens) and decode (KV cache of %d slots) for mesh %s",
        padded_batch, prefill_len, context, dict(mesh.shape),
    )
    prefill = _compile_step(
        runner._prefill, (params, rows(jnp.int32, prefill_len), memory, rows(jnp.int32), sampling), options
    )
    decode = _compile_step(
        runner._decode, (params, rows(jnp.int32), memory, rows(jnp.int32), sampling, step), options
    )

    param_leaves = jax.tree_util.tree_leaves(
        runner.params_shape, is_leaf=lambda leaf: isinstance(leaf, QuantizedWeight8bit)
    )
    return DryRunReport(
        mesh_shape={name: int(size) for name, size in mesh.shape.items()},
        platform=mesh.devices.flat[0].platform,
        batch_size=padded_batch,
        context=context,
        prefill_len=prefill_len,
        activation_dtype=jnp.dtype(runner.config.fprop_dtype).name,
        param_count=sum(math.prod(leaf.shape) for leaf in param_leaves),
        param_bytes=sum(
            math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
            for leaf in jax.tree_util.tree_leaves(runner.params_shape)
        ),
        param_bytes_per_device=bytes_per_device(runner.params_shape, runner.params_sharding),
        kv_cache_bytes_per_device=bytes_per_device(
            memory, jax.tree_util.tree_map(lambda leaf: leaf.sharding, memory)
        ),
        prefill=prefill,
        decode=decode,
        device_memory=device_memory,
    )
