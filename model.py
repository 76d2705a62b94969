"""Grok-1 as Haiku modules.

The module and parameter names are those of the released checkpoint, so that
`hk.transform` of `LanguageModelConfig.make()` yields a parameter tree whose
flattened leaves (dict keys sorted as strings) are the checkpoint's files in
order:

    language_model/in_out_embed/embeddings          float32 [vocab, emb]
    language_model/rms_norm/scale                   float32 [emb]   (final norm)
    transformer/decoder_layer_<i>/moe/linear/w      int8 [experts, emb, ffn]  (gate, GELU side)
    transformer/decoder_layer_<i>/moe/linear_1/w    int8 [experts, ffn, emb]  (down)
    transformer/decoder_layer_<i>/moe/linear_v/w    int8 [experts, emb, ffn]  (up)
    transformer/decoder_layer_<i>/multi_head_attention/{key,linear,query,value}/w   int8
    transformer/decoder_layer_<i>/rms_norm{,_1,_2,_3}/scale                       float32 [emb]
    transformer/decoder_layer_<i>/router/w          float32 [emb, experts]

Every linear weight is a `QuantizedWeight8bit`: int8 values and bfloat16
scales. The weights stay int8 in memory and are dequantized layer by layer
where they are used.

Numerics follow xAI's reference: activations in `fprop_dtype` (bfloat16),
RMSNorm, RoPE, attention logits, softmax and the router in float32, and
matrix products accumulated in float32.
"""

import dataclasses
import functools
import math
from typing import NamedTuple, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

# The released checkpoint stores row-parallel weights (attention output and
# expert down projection) with this many row blocks of scales.
ROW_BLOCKS = 8

ATTENTION_SOFT_CAP = 30.0
RMS_NORM_EPS = 1e-5
ROPE_BASE = 10000
MASK_VALUE = -1e30

# "dense": xAI's reference, every expert on every token. "sparse": only the
# chosen experts, on int8 weights; the default.
MOE_IMPLS = ("sparse", "dense")

# Rows per grouped-matmul tile of the sparse MoE (see `grouped_experts`), and
# the number of (token, expert) assignments up to which each one runs alone
# on its expert's weights instead (see `sparse_moe`).
MOE_TILE_ROWS = 64
MOE_GATHER_MAX_ROWS = 4

# Size of the widened weight chunk that `expert_matmul` multiplies at a time.
# On XLA:CPU, widening a whole expert matrix at once made batch-1 decoding
# about 7 times slower than 4 MB chunks (bench/moe.py, 2-core x86 VM).
# NOTE: not measured on GPU or TPU, where one fused product may be faster.
EXPERT_CHUNK_BYTES = 4 << 20


def ffn_size(emb_size: int, widening_factor: float) -> int:
    """Return the expert hidden size: 2/3 of `widening_factor * emb_size`, rounded up to 8."""
    size = int(widening_factor * emb_size) * 2 // 3
    return size + (8 - size) % 8


@dataclasses.dataclass
class QuantizedWeight8bit:
    """A linear weight stored as int8 values and bfloat16 scales.

    `weight` is int8 `[..., in, out]` and `scales` is bfloat16
    `[..., row_blocks, out]`. The real weight is
    `weight[..., i, j] * scales[..., i // (in / row_blocks), j]`:
    `row_blocks` is 1 for column-parallel weights and 8 for row-parallel ones
    in the released checkpoint.
    """

    weight: jax.Array
    scales: jax.Array

    @property
    def shape(self):
        return self.weight.shape

    @property
    def dtype(self):
        return self.weight.dtype


jax.tree_util.register_pytree_node(
    QuantizedWeight8bit,
    lambda q: ((q.weight, q.scales), None),
    lambda _, children: QuantizedWeight8bit(*children),
)


def dequantize(w, dtype=jnp.bfloat16) -> jax.Array:
    """Return the weight as `dtype`, computing `bfloat16(int8 * scale)` per row block.

    Plain arrays (unquantized weights) are only cast.
    """
    if not isinstance(w, QuantizedWeight8bit):
        return w.astype(dtype)

    *batch, rows, cols = w.weight.shape
    row_blocks = w.scales.shape[-2]
    if rows % row_blocks:
        raise ValueError(
            f"weight has {rows} rows, not divisible by its {row_blocks} row blocks of scales"
        )

    # [..., row_blocks, rows / row_blocks, cols] * [..., row_blocks, 1, cols]
    blocks = w.weight.reshape(*batch, row_blocks, rows // row_blocks, cols)
    scales = w.scales.astype(jnp.bfloat16)[..., :, None, :]
    values = blocks.astype(jnp.bfloat16) * scales
    return values.reshape(*batch, rows, cols).astype(dtype)


def einsum(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum` of two operands with float32 accumulation and a float32 result.

    XLA:CPU has no kernel for a bfloat16 x bfloat16 -> float32 product (as of
    jaxlib 0.10.2), so on CPU the operands are widened to float32 first. The
    values are the same: bfloat16 inputs are exact in float32.
    """
    if jax.default_backend() == "cpu":
        return jnp.einsum(subscripts, a.astype(jnp.float32), b.astype(jnp.float32))
    return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32)


@dataclasses.dataclass
class TransformerConfig:
    """Hyperparameters of the decoder stack, with the field names of xAI's reference."""

    emb_size: int
    key_size: int
    num_q_heads: int
    num_kv_heads: int
    num_layers: int
    vocab_size: int = 128 * 1024
    widening_factor: float = 4.0
    attn_output_multiplier: float = 1.0
    name: Optional[str] = None
    num_experts: int = -1
    capacity_factor: float = 1.0
    num_selected_experts: int = 1
    init_scale: float = 1.0
    shard_activations: bool = False
    data_axis: str | tuple[str, ...] = "data"
    model_axis: str | tuple[str, ...] = "model"
    # Not in the reference: which MoE implementation runs, see `MOE_IMPLS`.
    moe_impl: str = "sparse"
    # Not in the reference: attention runs over blocks of this many queries,
    # so its float32 logits are [batch, heads, block, keys] rather than
    # [batch, heads, seq, keys]; 0 computes all queries at once. The result
    # does not depend on it (each query's softmax sees only its own row).
    attn_query_block: int = 512

    def __post_init__(self):
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads={self.num_q_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if not 1 <= self.num_selected_experts <= self.num_experts:
            raise ValueError(
                f"num_selected_experts={self.num_selected_experts} must be between 1 and "
                f"num_experts={self.num_experts}"
            )
        if self.moe_impl not in MOE_IMPLS:
            raise ValueError(f"moe_impl={self.moe_impl!r} is not one of {MOE_IMPLS}")
        if not (isinstance(self.attn_query_block, int) and self.attn_query_block >= 0):
            raise ValueError(
                f"attn_query_block={self.attn_query_block!r} is invalid: use a positive "
                "number of queries, or 0 for no blocking"
            )

    @property
    def ffn_size(self) -> int:
        return ffn_size(self.emb_size, self.widening_factor)

    def make(self) -> "Transformer":
        return Transformer(self, name="transformer")


@dataclasses.dataclass
class LanguageModelConfig:
    """Hyperparameters of the whole model, with the field names of xAI's reference."""

    model: Optional[TransformerConfig]
    vocab_size: int
    pad_token: int
    eos_token: int
    sequence_len: int
    model_size: int = 0
    embedding_init_scale: float = 1.0
    embedding_multiplier_scale: float = 1.0
    output_multiplier_scale: float = 1.0
    name: Optional[str] = None
    fprop_dtype: object = jnp.bfloat16
    model_type: Optional[str] = None
    init_scale_override: Optional[float] = None
    shard_embeddings: bool = True

    def __post_init__(self):
        self.fprop_dtype = jnp.dtype(self.fprop_dtype)
        if self.model is not None:
            self.initialize()

    def initialize(self) -> "LanguageModelConfig":
        """Copy the shared sizes into the transformer config, as the reference does."""
        self.model_size = self.model.emb_size
        self.model.vocab_size = self.vocab_size
        return self

    def make(self) -> "LanguageModel":
        """Build the model; call inside `hk.transform`."""
        return LanguageModel(self, self.model.make(), name="language_model")


def grok_1_config() -> LanguageModelConfig:
    """Return the configuration of the released 314B Grok-1 model."""
    return LanguageModelConfig(
        vocab_size=128 * 1024,
        pad_token=0,
        eos_token=2,
        sequence_len=8192,
        embedding_init_scale=1.0,
        output_multiplier_scale=0.5773502691896257,
        embedding_multiplier_scale=78.38367176906169,
        model=TransformerConfig(
            emb_size=48 * 128,
            widening_factor=8,
            key_size=128,
            num_q_heads=48,
            num_kv_heads=8,
            num_layers=64,
            attn_output_multiplier=0.08838834764831845,
            shard_activations=True,
            num_experts=8,
            num_selected_experts=2,
            data_axis="data",
            model_axis="model",
        ),
    )


# Partition rules: (parameter path suffix, spec of the weight, spec of its
# scales). The weight specs are Megatron-style tensor parallelism over the
# model axis: column-parallel projections split their output columns,
# row-parallel ones (attention output, expert down) their input rows. The
# runner drops any axis that does not divide the dimension it would split, so
# the rules hold on every device count.
PARTITION_RULES: Sequence[tuple[str, P, Optional[P]]] = (
    ("in_out_embed/embeddings", P(None, "model"), None),
    ("multi_head_attention/query/w", P(None, "model"), P(None, "model")),
    ("multi_head_attention/key/w", P(None, "model"), P(None, "model")),
    ("multi_head_attention/value/w", P(None, "model"), P(None, "model")),
    ("multi_head_attention/linear/w", P("model", None), P(None, None)),
    ("moe/linear/w", P(None, None, "model"), P(None, None, "model")),
    ("moe/linear_v/w", P(None, None, "model"), P(None, None, "model")),
    ("moe/linear_1/w", P(None, "model", None), P(None, None, None)),
    ("router/w", P(None, None), None),
    ("scale", P(None), None),
)


def partition_spec_for(path: str, weight: bool = True) -> P:
    """Return the partition spec of the parameter at `path` (its weight, or its scales)."""
    for suffix, weight_spec, scales_spec in PARTITION_RULES:
        if path.endswith(suffix):
            return weight_spec if weight else scales_spec
    raise KeyError(f"no partition rule matches parameter {path!r}")


class KVMemory(NamedTuple):
    """One layer's KV cache: keys and values `[batch, cache_len, kv_heads, key_size]`."""

    k: jax.Array
    v: jax.Array


class Memory(NamedTuple):
    """The KV cache of all layers.

    `key_mask` `[batch, cache_len]` bool is False at cache slots that hold a
    padding token; slots not yet written are excluded by the causal mask.
    """

    layers: tuple[KVMemory, ...]
    key_mask: jax.Array


def init_memory(
    config: LanguageModelConfig, batch_size: int, cache_len: int, dtype=jnp.bfloat16
) -> Memory:
    """Return an empty KV cache for `batch_size` sequences of up to `cache_len` tokens."""
    model = config.model
    shape = (batch_size, cache_len, model.num_kv_heads, model.key_size)
    layers = tuple(
        KVMemory(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
        for _ in range(model.num_layers)
    )
    return Memory(layers=layers, key_mask=jnp.ones((batch_size, cache_len), jnp.bool_))


class LanguageModelOutput(NamedTuple):
    logits: jax.Array  # float32 [batch, seq, vocab], or [batch, vocab] with `readout`
    memory: Optional[Memory]


def quantize(weight: jax.Array, row_blocks: int) -> QuantizedWeight8bit:
    """Return `weight` `[..., in, out]` as int8 values with bfloat16 scales per row block.

    Each scale is the block's largest magnitude in its column divided by 127,
    so every value rounds to an int8 in [-127, 127].
    """
    *batch, rows, cols = weight.shape
    if rows % row_blocks:
        raise ValueError(f"weight has {rows} rows, not divisible by {row_blocks} row blocks")
    blocks = jnp.asarray(weight, jnp.float32).reshape(*batch, row_blocks, rows // row_blocks, cols)
    max_abs = jnp.max(jnp.abs(blocks), axis=-2, keepdims=True)
    scales = jnp.maximum(max_abs / 127.0, 1e-12).astype(jnp.bfloat16)
    values = jnp.clip(jnp.round(blocks / scales.astype(jnp.float32)), -127, 127)
    return QuantizedWeight8bit(
        weight=values.astype(jnp.int8).reshape(weight.shape),
        scales=scales.reshape(*batch, row_blocks, cols),
    )


def _quantized_init(shape, row_blocks: int, stddev: float):
    """Return an initializer for a `QuantizedWeight8bit` of `shape` with `row_blocks` scale rows."""

    def init(_, dtype):
        del dtype
        weight = hk.initializers.RandomNormal(stddev=stddev)(shape, jnp.float32)
        return quantize(weight, row_blocks)

    return init


def get_linear_weight(shape: Sequence[int], row_blocks: int, init_scale: float = 1.0):
    """Return the module's `w` parameter, a `QuantizedWeight8bit` when initialized here."""
    fan_in = shape[-2]
    init = _quantized_init(tuple(shape), row_blocks, init_scale / math.sqrt(fan_in))
    return hk.get_parameter("w", shape, jnp.float32, init=init)


class Linear(hk.Module):
    """`x @ w` without bias, `w` int8 with bfloat16 scales, accumulated in float32."""

    def __init__(self, output_size: int, row_blocks: int = 1, name: Optional[str] = None):
        super().__init__(name=name)
        self.output_size = output_size
        self.row_blocks = row_blocks

    def __call__(self, x: jax.Array) -> jax.Array:
        # x: [..., in]; w: [in, out]
        w = get_linear_weight((x.shape[-1], self.output_size), self.row_blocks)
        w = dequantize(w, x.dtype)
        return einsum("...i,io->...o", x, w).astype(x.dtype)


class RMSNorm(hk.Module):
    """`scale * x / sqrt(mean(x^2) + eps)` in float32, returned in the input dtype."""

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = hk.get_parameter("scale", [x.shape[-1]], jnp.float32, init=jnp.ones)
        x32 = x.astype(jnp.float32)
        mean_square = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = x32 * jax.lax.rsqrt(mean_square + RMS_NORM_EPS)
        return (scale * normed).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array) -> jax.Array:
    """Rotate `x` `[batch, seq, heads, head_dim]` by RoPE at `positions` `[batch, seq]`.

    "Rotate half" convention over the whole head, base 10000, in float32.
    """
    head_dim = x.shape[-1]
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (ROPE_BASE**exponents)  # [head_dim / 2]

    phase = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim / 2]
    phase = jnp.concatenate([phase, phase], axis=-1)[:, :, None, :]  # [batch, seq, 1, head_dim]

    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x * jnp.cos(phase) + rotated * jnp.sin(phase)).astype(x.dtype)


def attend(q, k, v, mask, multiplier: float, dtype) -> jax.Array:
    """Attend from `q` over `k` and `v`: soft-capped, masked softmax in float32.

    q: [batch, seq, kv_heads, group, key_size]; k, v: [batch, keys, kv_heads, key_size];
    mask: [batch, seq, keys], True where a query may attend to a key.
    Returns [batch, seq, kv_heads, group, key_size] in `dtype`.
    """
    # [batch, kv_heads, group, seq, keys], float32
    logits = einsum("btngd,bsnd->bngts", q, k)
    logits = logits * multiplier
    logits = ATTENTION_SOFT_CAP * jnp.tanh(logits / ATTENTION_SOFT_CAP)
    logits = jnp.where(mask[:, None, None, :, :], logits, MASK_VALUE)
    weights = jax.nn.softmax(logits, axis=-1).astype(dtype)
    return einsum("bngts,bsnd->btngd", weights, v).astype(dtype)


def blocked_attend(q, k, v, mask, multiplier: float, dtype, block: int) -> jax.Array:
    """`attend` over blocks of `block` queries, one block after another; same arguments and result.

    Only one block's float32 logits `[batch, kv_heads, group, block, keys]`
    are live at a time. The queries are padded to a multiple of `block` with
    rows that attend to nothing, and those rows are dropped from the result.
    """
    batch, seq = q.shape[:2]
    if block <= 0 or seq <= block:
        return attend(q, k, v, mask, multiplier, dtype)

    num_blocks = -(-seq // block)
    pad = num_blocks * block - seq
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))

    # [num_blocks, batch, block, ...]
    q_blocks = jnp.moveaxis(q.reshape(batch, num_blocks, block, *q.shape[2:]), 1, 0)
    mask_blocks = jnp.moveaxis(mask.reshape(batch, num_blocks, block, mask.shape[-1]), 1, 0)
    out = jax.lax.map(
        lambda blocks: attend(blocks[0], k, v, blocks[1], multiplier, dtype), (q_blocks, mask_blocks)
    )
    out = jnp.moveaxis(out, 0, 1).reshape(batch, num_blocks * block, *out.shape[3:])
    return out[:, :seq]


class MultiHeadAttention(hk.Module):
    """Grouped-query attention with RoPE, soft-capped logits and an optional KV cache."""

    def __init__(self, config: TransformerConfig, name: str = "multi_head_attention"):
        super().__init__(name=name)
        self.config = config

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        kv_memory: Optional[KVMemory],
    ) -> tuple[jax.Array, Optional[KVMemory]]:
        """Attend from `x` `[batch, seq, emb]` at `positions` `[batch, seq]`.

        `mask` `[batch, seq, keys]` is True where a query may attend to a key.
        The keys are this call's tokens, or all cache slots when `kv_memory`
        is given, in which case this call's keys and values are written into
        it at `positions`.
        """
        config = self.config
        batch, seq, _ = x.shape
        num_kv, key_size = config.num_kv_heads, config.key_size
        group = config.num_q_heads // num_kv

        q = Linear(config.num_q_heads * key_size, name="query")(x)
        k = Linear(num_kv * key_size, name="key")(x)
        v = Linear(num_kv * key_size, name="value")(x)
        q = q.reshape(batch, seq, num_kv, group, key_size)  # query head h uses KV head h // group
        k = k.reshape(batch, seq, num_kv, key_size)
        v = v.reshape(batch, seq, num_kv, key_size)

        q = apply_rope(q.reshape(batch, seq, num_kv * group, key_size), positions)
        q = q.reshape(batch, seq, num_kv, group, key_size)
        k = apply_rope(k, positions)

        if kv_memory is not None:
            rows = jnp.arange(batch)[:, None]
            k = kv_memory.k.at[rows, positions].set(k.astype(kv_memory.k.dtype))
            v = kv_memory.v.at[rows, positions].set(v.astype(kv_memory.v.dtype))
            kv_memory = KVMemory(k=k, v=v)
            k, v = k.astype(x.dtype), v.astype(x.dtype)

        out = blocked_attend(
            q, k, v, mask, config.attn_output_multiplier, x.dtype, config.attn_query_block
        )
        out = out.reshape(batch, seq, config.num_q_heads * key_size)
        out = Linear(config.emb_size, row_blocks=ROW_BLOCKS, name="linear")(out)
        return out, kv_memory


class Router(hk.Module):
    """Softmax router over the experts, in float32."""

    def __init__(self, config: TransformerConfig, name: str = "router"):
        super().__init__(name=name)
        self.config = config

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Return `(router_logits, gates, expert_index)` for `x` `[tokens, emb]`.

        `router_logits` is float32 `[tokens, experts]`; `gates` and
        `expert_index` `[tokens, top_k]` are the `top_k` softmax probabilities
        (not renormalized over the chosen experts) and their experts, highest first.
        """
        config = self.config
        w = hk.get_parameter(
            "w",
            [x.shape[-1], config.num_experts],
            jnp.float32,
            init=hk.initializers.RandomNormal(stddev=1.0 / math.sqrt(x.shape[-1])),
        )
        router_logits = jnp.dot(x.astype(jnp.float32), w, precision=jax.lax.Precision.HIGHEST)
        probs = jax.nn.softmax(router_logits, axis=-1)
        gates, expert_index = jax.lax.top_k(probs, config.num_selected_experts)
        return router_logits, gates, expert_index


class _ExpertWeight(hk.Module):
    """Holds one expert matrix `w` `[experts, in, out]` under its checkpoint name."""

    def __call__(self, shape: Sequence[int], row_blocks: int):
        return get_linear_weight(shape, row_blocks)


class MoELayer(hk.Module):
    """Mixture of gated-GELU experts: `gelu(x @ linear) * (x @ linear_v) @ linear_1`."""

    def __init__(self, config: TransformerConfig, name: str = "moe"):
        super().__init__(name=name)
        self.config = config

    @hk.name_like("__call__")  # parameter names as if created in __call__, as in the checkpoint
    def expert_weights(self):
        """Return `(w_gate, w_up, w_down)`: `[experts, emb, ffn]`, `[experts, emb, ffn]`, `[experts, ffn, emb]`."""
        config = self.config
        experts, emb, ffn = config.num_experts, config.emb_size, config.ffn_size
        w_gate = _ExpertWeight(name="linear")((experts, emb, ffn), 1)
        w_down = _ExpertWeight(name="linear_1")((experts, ffn, emb), ROW_BLOCKS)
        w_up = _ExpertWeight(name="linear_v")((experts, emb, ffn), 1)
        return w_gate, w_up, w_down

    def __call__(self, x: jax.Array, gates: jax.Array, expert_index: jax.Array) -> jax.Array:
        """Return the gate-weighted sum of the chosen experts' outputs for `x` `[tokens, emb]`."""
        config = self.config
        experts = config.num_experts
        w_gate, w_up, w_down = self.expert_weights()
        if config.moe_impl == "dense":
            return dense_moe(x, gates, expert_index, w_gate, w_up, w_down, experts)
        return sharded_sparse_moe(
            x, gates, expert_index, w_gate, w_up, w_down, experts, config.data_axis, config.model_axis
        )


def dense_moe(x, gates, expert_index, w_gate, w_up, w_down, num_experts: int) -> jax.Array:
    """Run every expert on every token, then select the chosen ones: the reference MoE.

    x: [tokens, emb]; gates, expert_index: [tokens, top_k];
    w_gate, w_up: [experts, emb, ffn]; w_down: [experts, ffn, emb].
    Costs num_experts / top_k times the FLOPs needed; kept as the reference
    that faster paths are checked against.
    """
    dtype = x.dtype
    w_gate, w_up, w_down = (dequantize(w, dtype) for w in (w_gate, w_up, w_down))

    # Every expert on every token: [tokens, experts, ffn]
    h_gate = einsum("td,edf->tef", x, w_gate)
    h_up = einsum("td,edf->tef", x, w_up)
    h = (jax.nn.gelu(h_gate) * h_up).astype(dtype)
    y = einsum("tef,efd->ted", h, w_down).astype(dtype)

    # Select each token's top_k experts: [tokens, top_k, emb]
    one_hot = jax.nn.one_hot(expert_index, num_experts, dtype=dtype)  # [tokens, top_k, experts]
    selected = einsum("tke,ted->tkd", one_hot, y)

    weighted = selected.astype(dtype) * gates[..., None].astype(dtype)
    return jnp.sum(weighted, axis=1, dtype=dtype)


def expert_matmul(x: jax.Array, w, expert: jax.Array) -> jax.Array:
    """Return `x @ w[expert]` in float32 without dequantizing the expert's matrix.

    x: [rows, in]; w: QuantizedWeight8bit with weight int8 [experts, in, out]
    and scales [experts, row_blocks, out], or a plain [experts, in, out] array.

    The product runs block by block: each row block of the weight (one per
    scale row) is split into column chunks of about `EXPERT_CHUNK_BYTES` once
    widened to `x.dtype`. Each chunk's int8 values are widened, multiplied
    and the partial product scaled by the chunk's scales. Only one chunk is
    widened at a time, so the widened weights stay small and in cache, and
    the result equals `x @ (weight * scale)` up to float32 rounding.
    """
    weight = w.weight if isinstance(w, QuantizedWeight8bit) else w
    _, size_in, size_out = weight.shape
    row_blocks = w.scales.shape[-2] if isinstance(w, QuantizedWeight8bit) else 1
    block_rows = size_in // row_blocks
    chunk_cols = _chunk_columns(block_rows, size_out, jnp.dtype(x.dtype).itemsize)
    num_chunks = size_out // chunk_cols
    rows = x.shape[0]

    def accumulate(i, out):
        block, chunk = i // num_chunks, i % num_chunks
        row, col = block * block_rows, chunk * chunk_cols
        w_chunk = jax.lax.dynamic_slice(weight, (expert, row, col), (1, block_rows, chunk_cols))[0]
        x_block = jax.lax.dynamic_slice_in_dim(x, row, block_rows, axis=1)  # [rows, block_rows]

        partial = einsum("ti,io->to", x_block, w_chunk.astype(x.dtype))  # [rows, chunk_cols]
        if isinstance(w, QuantizedWeight8bit):
            scales = jax.lax.dynamic_slice(w.scales, (expert, block, col), (1, 1, chunk_cols))[0]
            partial = partial * scales.astype(jnp.float32)

        current = jax.lax.dynamic_slice_in_dim(out, col, chunk_cols, axis=1)
        return jax.lax.dynamic_update_slice_in_dim(out, current + partial, col, axis=1)

    out = jnp.zeros((rows, size_out), jnp.float32)
    return jax.lax.fori_loop(0, row_blocks * num_chunks, accumulate, out)


def _chunk_columns(rows: int, cols: int, itemsize: int) -> int:
    """Return the largest divisor of `cols` whose `[rows, chunk]` block fits `EXPERT_CHUNK_BYTES`."""
    best = 1
    for chunk in range(1, cols + 1):
        if cols % chunk == 0 and rows * chunk * itemsize <= EXPERT_CHUNK_BYTES:
            best = chunk
    return best


def expert_ffn(x: jax.Array, expert: jax.Array, w_gate, w_up, w_down) -> jax.Array:
    """Return expert `expert`'s `(gelu(x @ gate) * (x @ up)) @ down` for `x` `[rows, emb]`, float32."""
    h = jax.nn.gelu(expert_matmul(x, w_gate, expert)) * expert_matmul(x, w_up, expert)
    return expert_matmul(h.astype(x.dtype), w_down, expert)


def sparse_moe(
    x,
    gates,
    expert_index,
    w_gate,
    w_up,
    w_down,
    num_experts: int,
    tile_rows: int = MOE_TILE_ROWS,
    gather_max_rows: int = MOE_GATHER_MAX_ROWS,
) -> jax.Array:
    """Run each token through its `top_k` chosen experts only; same result as `dense_moe`.

    x: [tokens, emb]; gates, expert_index: [tokens, top_k].

    Up to `gather_max_rows` (token, expert) assignments, as in decoding at a
    small batch, each assignment runs on its own expert's weights. Beyond
    that, `grouped_experts` runs them as a grouped matrix product.
    """
    dtype = x.dtype
    tokens, top_k = expert_index.shape
    num_rows = tokens * top_k

    if num_rows <= gather_max_rows:
        out = jnp.stack([
            expert_ffn(x[t][None], expert_index[t, k], w_gate, w_up, w_down)[0]
            for t in range(tokens)
            for k in range(top_k)
        ]).astype(dtype)  # [rows, emb]
    else:
        out = grouped_experts(x, expert_index, w_gate, w_up, w_down, num_experts, tile_rows)

    weighted = out.reshape(tokens, top_k, -1) * gates[..., None].astype(dtype)
    return jnp.sum(weighted, axis=1, dtype=dtype)


def sharded_sparse_moe(
    x, gates, expert_index, w_gate, w_up, w_down, num_experts: int, data_axis: str, model_axis: str
) -> jax.Array:
    """Run `sparse_moe` on each device's shard of the experts' hidden dimension.

    Under a mesh whose `model_axis` splits the hidden dimension `ffn`, gate
    and up `[experts, emb, ffn]` are split by columns and down
    `[experts, ffn, emb]` by rows. Each device runs the chosen experts on its
    `ffn / model` slice, and the partial down projections are summed over
    `model_axis`, so no device gathers another's weights. Tokens stay split
    over `data_axis`. Without such a mesh, or where the sizes do not divide,
    this is plain `sparse_moe` and XLA partitions it.
    """
    mesh = jax.sharding.get_abstract_mesh()
    plain = functools.partial(sparse_moe, num_experts=num_experts)
    if mesh.empty or model_axis not in mesh.axis_names:
        return plain(x, gates, expert_index, w_gate, w_up, w_down)

    shards = mesh.shape[model_axis]
    ffn = w_down.shape[-2]
    quantized = all(isinstance(w, QuantizedWeight8bit) for w in (w_gate, w_up, w_down))
    row_blocks = w_down.scales.shape[-2] if quantized else 1
    blocks_divide = row_blocks % shards == 0 or shards % row_blocks == 0
    if shards == 1 or not quantized or ffn % shards or not blocks_divide:
        return plain(x, gates, expert_index, w_gate, w_up, w_down)

    def local_moe(x, gates, expert_index, w_gate, w_up, down_weight, down_scales):
        # down_weight: this shard's rows [experts, ffn / shards, emb]; its
        # scale rows are the row blocks those rows fall in.
        shard = jax.lax.axis_index(model_axis)
        if shards <= row_blocks:
            local_blocks = row_blocks // shards
            scales = jax.lax.dynamic_slice_in_dim(down_scales, shard * local_blocks, local_blocks, axis=1)
        else:
            scales = jax.lax.dynamic_slice_in_dim(down_scales, shard // (shards // row_blocks), 1, axis=1)
        w_down = QuantizedWeight8bit(down_weight, scales)
        partial = plain(x, gates, expert_index, w_gate, w_up, w_down)
        return jax.lax.psum(partial, model_axis)

    data_shards = mesh.shape.get(data_axis, 1)
    token_spec = P(data_axis) if data_shards > 1 and x.shape[0] % data_shards == 0 else P()
    columns = QuantizedWeight8bit(P(None, None, model_axis), P(None, None, model_axis))
    run = jax.shard_map(
        local_moe,
        in_specs=(token_spec, token_spec, token_spec, columns, columns, P(None, model_axis, None), P()),
        out_specs=token_spec,
        check_vma=False,
    )
    return run(x, gates, expert_index, w_gate, w_up, w_down.weight, w_down.scales)


def grouped_experts(x, expert_index, w_gate, w_up, w_down, num_experts: int, tile_rows: int) -> jax.Array:
    """Return every (token, expert) assignment's expert output `[tokens * top_k, emb]`.

    The assignments are sorted by expert, so each expert's rows are
    contiguous. They are processed in tiles of up to `tile_rows` rows that
    each belong to one expert. This grouped matrix product reads each used
    expert's weights once per tile and skips unused experts. The loop runs
    only as many tiles as the routing needs. A tile's rows past its expert's
    group are computed but not written.
    """
    dtype = x.dtype
    tokens, top_k = expert_index.shape
    emb = x.shape[-1]
    num_rows = tokens * top_k
    tile = min(tile_rows, num_rows)

    # Sort the assignments by expert: [rows]
    flat_expert = expert_index.reshape(num_rows)
    order = jnp.argsort(flat_expert, stable=True)
    group_sizes = jnp.bincount(flat_expert, length=num_experts)  # [experts]
    group_starts = jnp.cumsum(group_sizes) - group_sizes

    # Tile table: tile i covers sorted rows tile_starts[i] ... + tile of expert tile_experts[i].
    tiles_per_expert = -(-group_sizes // tile)
    tile_ends = jnp.cumsum(tiles_per_expert)
    num_tiles = tile_ends[-1]
    max_tiles = -(-num_rows // tile) + num_experts
    tile_ids = jnp.arange(max_tiles)
    tile_experts = jnp.minimum(jnp.searchsorted(tile_ends, tile_ids, side="right"), num_experts - 1)
    first_tile = tile_ends - tiles_per_expert
    tile_starts = group_starts[tile_experts] + (tile_ids - first_tile[tile_experts]) * tile

    # Rows in expert order, padded so that every tile slice stays in bounds: [rows + tile, emb]
    x_sorted = jnp.pad(x[order // top_k], ((0, tile), (0, 0)))

    def run_tile(i, out):
        expert, start = tile_experts[i], tile_starts[i]
        rows = jax.lax.dynamic_slice_in_dim(x_sorted, start, tile)  # [tile, emb]
        y = expert_ffn(rows, expert, w_gate, w_up, w_down).astype(out.dtype)  # [tile, emb]

        in_group = start + jnp.arange(tile) < group_starts[expert] + group_sizes[expert]
        current = jax.lax.dynamic_slice_in_dim(out, start, tile)
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(in_group[:, None], y, current), start, 0)

    out_sorted = jax.lax.fori_loop(0, num_tiles, run_tile, jnp.zeros((num_rows + tile, emb), dtype))

    # Back to (token, expert) order.
    return jnp.zeros((num_rows, emb), dtype).at[order].set(out_sorted[:num_rows])


class DecoderLayer(hk.Module):
    """Attention and MoE blocks, each with a norm before and after."""

    def __init__(self, config: TransformerConfig, layer_index: int):
        super().__init__(name=f"decoder_layer_{layer_index}")
        self.config = config

    def __call__(self, x, positions, mask, kv_memory):
        """x: [batch, seq, emb] -> ([batch, seq, emb], updated kv_memory)."""
        config = self.config

        attn, kv_memory = MultiHeadAttention(config)(
            RMSNorm(name="rms_norm")(x), positions, mask, kv_memory
        )
        x = x + RMSNorm(name="rms_norm_1")(attn)

        h = RMSNorm(name="rms_norm_2")(x)
        batch, seq, emb = h.shape
        tokens = h.reshape(batch * seq, emb)
        _, gates, expert_index = Router(config)(tokens)
        moe = MoELayer(config)(tokens, gates, expert_index).reshape(batch, seq, emb)
        x = x + RMSNorm(name="rms_norm_3")(moe)
        return x, kv_memory


class Transformer(hk.Module):
    """The stack of `num_layers` decoder layers."""

    def __init__(self, config: TransformerConfig, name: str = "transformer"):
        super().__init__(name=name)
        self.config = config

    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        token_mask: jax.Array,
        memory: Optional[Memory],
    ) -> tuple[jax.Array, Optional[Memory]]:
        """Run `x` `[batch, seq, emb]`; `token_mask` `[batch, seq]` is False at padding."""
        if memory is None:
            # Keys are this call's tokens.
            key_positions = positions
            key_mask = token_mask
        else:
            # Keys are all cache slots; this call's tokens are written at `positions`.
            batch, cache_len = memory.key_mask.shape
            rows = jnp.arange(batch)[:, None]
            key_mask = memory.key_mask.at[rows, positions].set(token_mask)
            key_positions = jnp.broadcast_to(jnp.arange(cache_len), (batch, cache_len))

        # [batch, seq, keys]: causal, and never a padding key.
        mask = (key_positions[:, None, :] <= positions[:, :, None]) & key_mask[:, None, :]

        layers = []
        for i in range(self.config.num_layers):
            kv_memory = None if memory is None else memory.layers[i]
            x, kv_memory = DecoderLayer(self.config, i)(x, positions, mask, kv_memory)
            layers.append(kv_memory)

        new_memory = None if memory is None else Memory(layers=tuple(layers), key_mask=key_mask)
        return x, new_memory


class LanguageModel(hk.Module):
    """Token embedding, the transformer and the tied output projection."""

    def __init__(self, config: LanguageModelConfig, transformer: Transformer, name=None):
        super().__init__(name=name)
        self.config = config
        self.transformer = transformer

    def __call__(
        self,
        tokens: jax.Array,
        positions: Optional[jax.Array] = None,
        memory: Optional[Memory] = None,
        readout: Optional[jax.Array] = None,
    ) -> LanguageModelOutput:
        """Compute logits for `tokens` `[batch, seq]` int32.

        positions: [batch, seq] int32, the tokens' positions in their
            sequences (default 0, 1, ...); also their KV-cache slots.
        memory: the KV cache to attend over and update, or None to attend
            over `tokens` alone.
        readout: [batch] int32; if given, only the logits at these sequence
            indices are computed, `[batch, vocab]`.
        """
        config = self.config
        dtype = config.fprop_dtype
        batch, seq = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))

        embeddings = InOutEmbed(config)()  # float32 [vocab, emb], used in `dtype`

        x = embeddings[tokens].astype(dtype)  # [batch, seq, emb]
        x = x * config.embedding_multiplier_scale  # in `dtype`, as the reference multiplies

        token_mask = tokens > config.pad_token
        x, memory = self.transformer(x, positions, token_mask, memory)
        x = RMSNorm(name="rms_norm")(x)

        if readout is not None:
            x = x[jnp.arange(batch), readout]  # [batch, emb]

        logits = einsum("...d,vd->...v", x, embeddings.astype(dtype))
        # The reference multiplies bfloat16 logits, so by the multiplier rounded to bfloat16.
        output_multiplier = jnp.asarray(config.output_multiplier_scale, dtype).astype(jnp.float32)
        logits = logits * output_multiplier
        return LanguageModelOutput(logits=logits, memory=memory)


class InOutEmbed(hk.Module):
    """Holds the tied input/output embedding table `embeddings` float32 `[vocab, emb]`."""

    def __init__(self, config: LanguageModelConfig, name: str = "in_out_embed"):
        super().__init__(name=name)
        self.config = config

    def __call__(self) -> jax.Array:
        config = self.config
        return hk.get_parameter(
            "embeddings",
            [config.vocab_size, config.model.emb_size],
            jnp.float32,
            init=hk.initializers.RandomNormal(stddev=config.embedding_init_scale),
        )


def config_from_dict(data: dict) -> LanguageModelConfig:
    """Build a config from a dict with `LanguageModelConfig` and `TransformerConfig` objects.

    The field names are those of xAI's reference; unknown keys are ignored,
    so a fixture's or a checkpoint's `config.json` can be passed as loaded.
    """
    missing = [key for key in ("LanguageModelConfig", "TransformerConfig") if key not in data]
    if missing:
        raise ValueError(f"config is missing the {' and '.join(missing)} object(s)")
    for key in ("LanguageModelConfig", "TransformerConfig"):
        if not isinstance(data[key], dict):
            raise ValueError(f"{key} is {data[key]!r}, not a JSON object of fields")

    def known_fields(cls, values: dict, skip=()):
        names = {field.name for field in dataclasses.fields(cls)} - set(skip)
        return {key: value for key, value in values.items() if key in names}

    transformer_fields = known_fields(TransformerConfig, data["TransformerConfig"])
    fields = known_fields(LanguageModelConfig, data["LanguageModelConfig"], skip=("model",))
    _check_config_values("TransformerConfig", TransformerConfig, transformer_fields)
    _check_config_values("LanguageModelConfig", LanguageModelConfig, fields)
    transformer = TransformerConfig(**transformer_fields)
    try:
        return LanguageModelConfig(model=transformer, **fields)
    except TypeError as error:
        raise ValueError(f"invalid LanguageModelConfig: {error}") from None


# Config fields that count something, so must be at least 1.
_POSITIVE_CONFIG_FIELDS = (
    "emb_size", "key_size", "num_q_heads", "num_kv_heads", "num_layers", "vocab_size",
    "num_experts", "sequence_len",
)


def _check_config_values(section: str, cls, values: dict) -> None:
    """Raise ValueError naming the field if a number or flag in `values` has the wrong type or range."""
    kinds = {int: "an integer", float: "a number", bool: "true or false"}
    types = {field.name: field.type for field in dataclasses.fields(cls)}
    for name, value in values.items():
        expected = types[name]
        if expected not in kinds:
            continue
        if isinstance(value, bool):
            valid = expected is bool
        else:
            valid = isinstance(value, (int, float) if expected is float else expected)
        if not valid:
            raise ValueError(f"{section}.{name} is {value!r}, not {kinds[expected]}")
        if name in _POSITIVE_CONFIG_FIELDS and value < 1:
            raise ValueError(f"{section}.{name} is {value!r}: it must be at least 1")
