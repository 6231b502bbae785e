"""A decoder-only transformer LM (GPT-style, pre-LayerNorm) in Flax linen.

Matches the PyTorch baseline's choices so that the two are the same model: every Dense/Embed
weight ~ N(0, init_std), biases 0, LayerNorm eps 1e-5, exact GELU, dropout on the embeddings and on
each residual branch's output (on attention probabilities only with `attention_dropout`, and of
whole input tokens only with `token_dropout`, which the baseline does not have), output tied to the
token embedding.
That is GPT-2's architecture with the default learned positions (with `activation="gelu_tanh"`,
GPT-2's exact weights: see export.py); `positions="rope"` rotates queries and keys instead.

Decoding (`decode=True`, as in Flax's lm1b): each block keeps the keys and values of the tokens seen
so far in a `cache` collection of [B, H, S, K] buffers, and the model a per-row `index`; a
call on T new tokens writes them at that index and attends to everything up to it, so a prompt is
prefilled in one call and then one token is fed per call. Rows may stand at different positions
(prompts of different lengths). `init_cache` makes the empty buffers.
Shapes: B batch, L sequence, T new tokens, S cache length, D d_model, H heads, K head size (D / H),
F d_ff, V vocab.
"""
import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxlm import config as config_lib


@jax.custom_vjp
def _matmul_saving_transposed_input(x_NI: jax.Array, w_IO: jax.Array) -> jax.Array:
  return jnp.einsum("...i,io->...o", x_NI, w_IO)


def _matmul_fwd(x_NI, w_IO):
  # [I, tokens], laid out so: the weight gradient below is then a row-major matmul, which XLA:CPU's
  # YNNPACK matmuls need (without it XLA transposes the output's gradient in the backward pass, in a
  # slow copy fused with its producer). The barrier keeps XLA from folding the transpose back.
  xt_IN = jax.lax.optimization_barrier(x_NI.reshape(-1, x_NI.shape[-1]).T)
  return _matmul_saving_transposed_input(x_NI, w_IO), (xt_IN, w_IO)


def _matmul_bwd(residuals, g_NO):
  xt_IN, w_IO = residuals
  g_TO = g_NO.reshape(-1, g_NO.shape[-1])
  return (g_NO @ w_IO.T).astype(g_NO.dtype), (xt_IN @ g_TO).astype(w_IO.dtype)


_matmul_saving_transposed_input.defvjp(_matmul_fwd, _matmul_bwd)


def cpu_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None):
  """nn.Dense's matmul on a CPU: the same product, with the weight gradient laid out for XLA:CPU.
  That gradient, x^T g ([I, tokens] x [tokens, O]), needs one operand transposed first (YNNPACK's
  matmuls take row-major operands), and XLA transposes it in a copy fused with the operand's
  producer, several times slower than a plain transpose. So the narrower one is transposed: where
  I <= O (qkv, proj, fc1, an untied head) a transposed copy of the input is kept, where I > O (fc2)
  lax's gradient, which transposes g. Against lax.dot_general the base config's batch-2 step takes 6%
  less time and its batch-32 step 10%; against a transposed input everywhere (fc2's [tokens, d_ff]
  input, fused with its GELU, took 47-62 ms per layer) batch 32 takes 11% less (experiments/README.md,
  "The narrower operand transposed"). Elsewhere Dense keeps lax.dot_general, whose GPU matmuls read
  transposed operands in place."""
  assert dimension_numbers == (((x.ndim - 1,), (0,)), ((), ())) and precision is preferred_element_type is None
  if x.shape[-1] > w.shape[-1]:
    return jax.lax.dot_general(x, w, dimension_numbers)
  return _matmul_saving_transposed_input(x, w)


def gelu(x: jax.Array, approximate: bool) -> jax.Array:
  """GELU: exact as x/2 (1 + erf(x / sqrt(2))), PyTorch's formula, or its tanh approximation. XLA's
  erf is one polynomial, where the erfc of jax.nn.gelu's exact form adds an exp and two selects per
  element: the base config's batch-32 step takes 3.7% less time on a CPU (experiments/README.md,
  "The narrower operand transposed"). Either form is computed in float32 whatever x's dtype, as
  PyTorch does: in bfloat16, 1 + erf and 1 + tanh cancel to 0 below x = -3.5. The exact form agrees
  with jax.nn.gelu's to 1e-6 (test_model.py)."""
  x32 = x.astype(jnp.float32)
  if approximate:
    return nn.gelu(x32, approximate=True).astype(x.dtype)
  return (x32 * 0.5 * (1.0 + jax.lax.erf(x32 * math.sqrt(0.5)))).astype(x.dtype)


def _mix32(x_u32: jax.Array) -> jax.Array:
  """lowbias32, from C. Wellons' hash-prospector: a bijection of uint32 in which flipping any input
  bit flips each output bit with probability close to 1/2."""
  x_u32 = (x_u32 ^ (x_u32 >> 16)) * jnp.uint32(0x7FEB352D)
  x_u32 = (x_u32 ^ (x_u32 >> 15)) * jnp.uint32(0x846CA68B)
  return x_u32 ^ (x_u32 >> 16)


def dropout_keep(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
  """bool mask, each element True with probability 1 - rate (to 2^-32): a hash of the element's
  row-major index (mod 2^32) and of two 32-bit seeds drawn from `key`. Why not jax.random.bernoulli:
  threefry spends about 100 integer ops per element (20 rounds), this hash 12, all elementwise on
  iotas, which XLA fuses into the dropout's consumers and partitions like any elementwise op (a
  sharded mesh draws the same masks as one device). Training steps 2.5-6.5% faster on an H200, 4.5%
  on a 2-core CPU (experiments/README.md, "Dropout's masks")."""
  seeds = jax.random.bits(key, (2,), jnp.uint32)
  index = sum(jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(math.prod(shape[d + 1:]) % 2**32)
              for d in range(len(shape)))
  bits = _mix32(_mix32(index ^ seeds[0]) ^ seeds[1])
  return bits >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))


class Dropout(nn.Module):
  """Inverted dropout (as flax's nn.Dropout: zero with probability `rate`, scale the rest by
  1 / (1 - rate)) with `dropout_keep`'s masks, from the "dropout" rng collection. One mask element
  per index of the axes not in `broadcast_dims` (e.g. (-1,): whole vectors are kept or zeroed)."""
  rate: float
  broadcast_dims: tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    if deterministic or self.rate == 0.0:
      return x
    if self.rate >= 1.0:
      return jnp.zeros_like(x)
    dims = {d % x.ndim for d in self.broadcast_dims}
    keep = dropout_keep(self.make_rng("dropout"), tuple(1 if d in dims else n for d, n in enumerate(x.shape)),
                        self.rate)
    return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))


class Block(nn.Module):
  d_model: int
  num_heads: int
  d_ff: int
  dropout: float
  init_std: float
  residual_std: float  # init std of the two projections that write into the residual stream
  layer_norm_eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  attention: str  # "blocked" (causal_attention_by_blocks) or jax.nn.dot_product_attention's: xla or cudnn
  approximate_gelu: bool  # tanh approximation (GPT-2's "gelu_new") instead of the exact erf
  deterministic: bool  # no dropout
  dot_general: Callable | None = None  # Dense's matmul: cpu_dot_general on a CPU, else lax's
  attention_dropout: float = 0.0  # on the attention probabilities, in training
  rope: bool = False  # rotary position embedding of queries and keys
  scanned: bool = False  # the body of nn.scan over layers: returns (x, None)

  @nn.compact
  def __call__(self, x_BLD: jax.Array, positions_BL: jax.Array | None = None):
    """positions_BL: decode mode, the position of each new token (see the module's docstring)."""
    deterministic = self.deterministic
    dense = lambda features, std, name: nn.Dense(  # noqa: E731
        features, kernel_init=nn.initializers.normal(std), dtype=self.dtype,
        param_dtype=self.param_dtype, dot_general=self.dot_general, name=name)
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,  # noqa: E731
                                     param_dtype=self.param_dtype, name=name)
    B, L, D = x_BLD.shape
    K = D // self.num_heads

    qkv_BL3HK = dense(3 * D, self.init_std, "qkv")(norm("ln1")(x_BLD)).reshape(B, L, 3, self.num_heads, K)
    q, k, v = (qkv_BL3HK[:, :, i] for i in range(3))
    if self.rope:
      at_BL = jnp.broadcast_to(jnp.arange(L), (B, L)) if positions_BL is None else positions_BL
      q, k = rotate(q, at_BL), rotate(k, at_BL)
    if positions_BL is not None:
      attn_BLHK = self._cached_attention(q, k, v, positions_BL)
    elif self.attention_dropout and not deterministic:
      attn_BLHK = self._attention_with_dropout(q, k, v)
    elif self.attention == "blocked":
      attn_BLHK = causal_attention_by_blocks(q, k, v)
    else:
      # Fused causal attention (cuDNN's flash attention or XLA's, see config.attention_kernel); the
      # softmax runs in float32 whatever the dtype.
      attn_BLHK = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.attention)
    y = dense(D, self.residual_std, "proj")(attn_BLHK.reshape(B, L, D))
    x_BLD = x_BLD + Dropout(self.dropout)(y, deterministic=deterministic)

    h_BLF = gelu(dense(self.d_ff, self.init_std, "fc1")(norm("ln2")(x_BLD)), approximate=self.approximate_gelu)
    y = dense(D, self.residual_std, "fc2")(h_BLF)
    x_BLD = x_BLD + Dropout(self.dropout)(y, deterministic=deterministic)
    return (x_BLD, None) if self.scanned else x_BLD

  def _attention_with_dropout(self, q_BLHK, k_BLHK, v_BLHK):
    """Causal attention with dropout on its probabilities, which the fused kernels do not offer: the
    [B, H, L, L] probabilities are materialized."""
    drop = Dropout(self.attention_dropout)
    return causal_attention_by_blocks(q_BLHK, k_BLHK, v_BLHK, block=q_BLHK.shape[1],  # one block
                                      drop=lambda probs: drop(probs, deterministic=False))

  def _cached_attention(self, q_BTHK, k_BTHK, v_BTHK, positions_BT):
    """Writes the new keys and values into the cache at their positions, then attends from each
    new token to every cached one at or before it. The cache is heads-major, [B, H, S, K], so that
    both products read it in place (a [B, S, H, K] cache is transposed whole at every step: 3.4x
    slower decoding on a CPU at batch 32). Scores and softmax in float32, as the full pass."""
    B, T, H, K = k_BTHK.shape
    cached_k = self.variable("cache", "key", jnp.zeros, (B, H, T, K), k_BTHK.dtype)
    cached_v = self.variable("cache", "value", jnp.zeros, (B, H, T, K), v_BTHK.dtype)
    write = jax.vmap(lambda cache_HSK, new_THK, start: jax.lax.dynamic_update_slice(
        cache_HSK, new_THK.transpose(1, 0, 2), (0, start, 0)))
    cached_k.value = write(cached_k.value, k_BTHK, positions_BT[:, 0])
    cached_v.value = write(cached_v.value, v_BTHK, positions_BT[:, 0])
    S = cached_k.value.shape[2]
    visible_B1TS = (jnp.arange(S)[None, None, :] <= positions_BT[:, :, None])[:, None]
    return _attend(q_BTHK.transpose(0, 2, 1, 3), cached_k.value, cached_v.value, visible_B1TS).transpose(0, 2, 1, 3)


def rotate(x_BLHK: jax.Array, positions_BL: jax.Array) -> jax.Array:
  """Rotary position embedding (RoFormer, as in LLaMA's "rotate half" layout): the pair (x[i],
  x[i + K/2]) of each head is rotated by the angle position x 10000^(-2i/K), in float32, so that the
  product of a query and a key depends on their positions only through their distance."""
  K = x_BLHK.shape[-1]
  inv_freq_h = 10000.0 ** (-jnp.arange(K // 2, dtype=jnp.float32) / (K // 2))
  angles_BL1h = (positions_BL.astype(jnp.float32)[..., None] * inv_freq_h)[:, :, None, :]
  cos, sin = jnp.cos(angles_BL1h), jnp.sin(angles_BL1h)
  x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BLHK.dtype)


def _attend(q_BHTK, k_BHSK, v_BHSK, visible, drop=None):
  """[B, H, T, K]: attention of each query to the keys `visible` to it (a mask broadcasting to [B, H,
  T, S]), with scores and softmax in float32 as in the fused kernels; `drop` transforms the
  probabilities. Heads-major: both products then read their operands in place."""
  K = q_BHTK.shape[-1]
  scores_BHTS = jnp.einsum("bhtk,bhsk->bhts", q_BHTK, k_BHSK,
                           preferred_element_type=jnp.float32) / jnp.sqrt(K).astype(jnp.float32)
  probs_BHTS = jax.nn.softmax(jnp.where(visible, scores_BHTS, -jnp.inf), axis=-1)
  if drop is not None:
    probs_BHTS = drop(probs_BHTS)
  return jnp.einsum("bhts,bhsk->bhtk", probs_BHTS.astype(v_BHSK.dtype), v_BHSK)


# Queries per block of causal_attention_by_blocks: two blocks at the guide's 128 tokens.
ATTENTION_BLOCK = 64


def causal_attention_by_blocks(q_BLHK: jax.Array, k_BLHK: jax.Array, v_BLHK: jax.Array,
                               block: int = ATTENTION_BLOCK, drop: Callable | None = None) -> jax.Array:
  """[B, L, H, K]: causal attention (model.attention="blocked"), each block of `block` queries
  attending only to the keys up to its last one, so that the scores above the diagonal's blocks are
  never computed: a quarter of them at L = 2 x block, about half for long sequences. The same
  function as XLA's fused attention (float32 scores and softmax). On a 2-core CPU, whose batched
  per-head products run at a third of its matmul rate, the base config's step takes 7% less
  time at batch 2 and 11% at batch 32 than with jax.nn.dot_product_attention's XLA implementation; on
  an H200, 5-9% more (experiments/README.md, "Attention by blocks of queries"). `drop` transforms
  each block's probabilities (as in _attend)."""
  q_BHLK, k_BHLK, v_BHLK = (a.transpose(0, 2, 1, 3) for a in (q_BLHK, k_BLHK, v_BLHK))
  L = q_BHLK.shape[2]
  out = []
  for start in range(0, L, block):
    end = min(L, start + block)  # queries start..end-1 see keys 0..end-1, each up to its own position
    visible_TS = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
    out.append(_attend(q_BHLK[:, :, start:end], k_BHLK[:, :, :end], v_BHLK[:, :, :end], visible_TS, drop))
  return jnp.concatenate(out, axis=2).transpose(0, 2, 1, 3)


class Transformer(nn.Module):
  vocab_size: int
  max_seq_length: int
  d_model: int
  num_layers: int
  num_heads: int
  d_ff: int
  dropout: float
  tie_embeddings: bool
  init_std: float
  scaled_residual_init: bool
  layer_norm_eps: float
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  attention: str = "xla"
  approximate_gelu: bool = False
  scan_layers: bool = False  # one Block traced and compiled, scanned over stacked [num_layers, ...] params
  dot_general: Callable | None = None  # Dense's matmul: cpu_dot_general on a CPU, else lax's
  attention_dropout: float = 0.0  # on the attention probabilities, in training
  token_dropout: float = 0.0  # of whole input-token embeddings, in training
  positions: str = "learned"  # "learned": an embedding per position (GPT-2) | "rope": rotary, in attention

  @nn.compact
  def __call__(self, tokens_BL: jax.Array, deterministic: bool = True, decode: bool = False,
               project: bool = True):
    """int [B, L] token ids -> [B, L, V] logits of the next token at every position, in the compute
    dtype (bfloat16 under mixed precision: the losses and samplers take them to float32 themselves,
    fused into their first pass, instead of a float32 copy of [B, L, V] here).
    decode: the tokens follow those already in the cache (apply with mutable=["cache"]).
    project=False: (the final LayerNorm's output [B, L, D], the output projection [D, V]) instead of
    the logits, for `chunked_next_token_loss`."""
    B, L = tokens_BL.shape
    init = nn.initializers.normal(self.init_std)
    embedding_VD = self.param("tok_emb", init, (self.vocab_size, self.d_model), self.param_dtype)
    if self.positions not in ("learned", "rope"):
      raise ValueError(f"positions={self.positions!r}: learned or rope")
    learned = self.positions == "learned"
    pos_emb_PD = self.param("pos_emb", init, (self.max_seq_length, self.d_model), self.param_dtype) if learned else None
    positions_BL = None
    if decode:
      index = self.variable("cache", "index", jnp.zeros, (B,), jnp.int32)
      positions_BL = index.value[:, None] + jnp.arange(L)
      index.value = index.value + L
    # The residual stream stays float32 (as under torch autocast); the blocks compute in self.dtype.
    tok_BLD = jnp.take(embedding_VD, tokens_BL, axis=0).astype(jnp.float32)
    x_BLD = Dropout(self.token_dropout, broadcast_dims=(-1,), name="token_dropout")(tok_BLD, deterministic)
    if learned:
      # A lookup of [B, L] positions even in training, not pos_emb_PD[:L] broadcast over the batch: the
      # broadcast's gradient is a sum over the batch alone, for which XLA:GPU lays the whole residual
      # stream out [L, D, B] and transposes it in every block (8% of the guide's GPU-config step).
      if positions_BL is None and L > self.max_seq_length:  # the lookup would fill the missing rows with NaN
        raise ValueError(f"{L} tokens per row: the model has {self.max_seq_length} positions")
      at_BL = jnp.broadcast_to(jnp.arange(L), (B, L)) if positions_BL is None else positions_BL
      x_BLD = x_BLD + jnp.take(pos_emb_PD, at_BL, axis=0).astype(jnp.float32)
    x_BLD = Dropout(self.dropout)(x_BLD, deterministic=deterministic)

    residual_std = self.init_std / (math.sqrt(2 * self.num_layers) if self.scaled_residual_init else 1)
    block = (self.d_model, self.num_heads, self.d_ff, self.dropout, self.init_std, residual_std, self.layer_norm_eps,
             self.dtype, self.param_dtype, self.attention, self.approximate_gelu, deterministic, self.dot_general,
             self.attention_dropout, not learned)
    if self.scan_layers:  # params (and a decode cache) stacked on a leading layer axis, under "blocks"
      blocks = nn.scan(Block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                       in_axes=nn.broadcast, length=self.num_layers)
      x_BLD, _ = blocks(*block, scanned=True, name="blocks")(x_BLD, positions_BL)
    else:
      for i in range(self.num_layers):
        x_BLD = Block(*block, name=f"block_{i}")(x_BLD, positions_BL)
    x_BLD = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="ln_f")(x_BLD)
    if self.tie_embeddings:
      if not project:
        return x_BLD, embedding_VD.astype(self.dtype).T
      return jnp.einsum("bld,vd->blv", x_BLD, embedding_VD.astype(self.dtype))
    head = nn.Dense(self.vocab_size, use_bias=False, kernel_init=init, dtype=self.dtype,
                    param_dtype=self.param_dtype, dot_general=self.dot_general, name="head")
    if not project:  # its kernel, read without applying it (the params exist: init projects)
      return x_BLD, head.variables["params"]["kernel"].astype(self.dtype)
    return head(x_BLD)


def build(config: ml_collections.ConfigDict, vocab_size: int, dtype=jnp.float32, attention: str = "xla",
          platform: str = "") -> Transformer:
  """The model `config.model` describes, computing in `dtype` with the `attention` kernel (see
  config.compute_dtype and config.attention_kernel), and the matmuls that train fastest on
  `platform` (a jax.Device's: cpu_dot_general on "cpu")."""
  m = config.model
  return Transformer(
      vocab_size=vocab_size, max_seq_length=config_lib.max_seq_length(config), d_model=m.d_model,
      num_layers=m.num_layers, num_heads=m.num_heads, d_ff=m.d_ff, dropout=m.dropout,
      tie_embeddings=m.tie_embeddings, init_std=m.init_std, scaled_residual_init=m.scaled_residual_init,
      layer_norm_eps=m.layer_norm_eps, dtype=dtype, param_dtype=jnp.dtype(m.param_dtype),
      attention=attention, approximate_gelu=m.activation == "gelu_tanh", scan_layers=m.scan_layers,
      dot_general=cpu_dot_general if platform == "cpu" else None, attention_dropout=m.attention_dropout,
      token_dropout=m.token_dropout, positions=m.positions)


def init_cache(model: Transformer, batch_size: int, length: int):
  """Empty decode buffers for `batch_size` rows of up to `length` (<= max_seq_length) tokens."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((batch_size, length), jnp.int32),
                                             decode=True)["cache"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def next_token_losses(logits_BLV: jax.Array, tokens_BL: jax.Array) -> jax.Array:
  """float32 [B, L-1]: cross-entropy of each token given those before it."""
  targets_BL = jnp.roll(tokens_BL, -1, axis=1)  # the last position's target is unused: no [B, L-1, V] slice
  return cross_entropy(logits_BLV, targets_BL)[:, :-1]


@jax.custom_vjp
def cross_entropy(logits_NV: jax.Array, labels_N: jax.Array) -> jax.Array:
  """float32 [...]: -log softmax(logits)[label] over the last axis, computed in float32 from logits of
  any float dtype. Written out (forward and gradient) so that bfloat16 logits are read, and their
  gradient written, once each in bfloat16: autodiff of a float32 log-softmax keeps float32 [N, V]
  copies (2 GB for GPT-2-small's batch: a tenth of its step on an H200)."""
  return _cross_entropy_fwd(logits_NV, labels_N)[0]


def _cross_entropy_fwd(logits_NV, labels_N):
  logits_f32 = logits_NV.astype(jnp.float32)
  lse_N = jax.nn.logsumexp(logits_f32, axis=-1)
  label_logit_N = jnp.take_along_axis(logits_f32, labels_N[..., None], axis=-1)[..., 0]
  return lse_N - label_logit_N, (logits_NV, labels_N, lse_N)


def _cross_entropy_bwd(residuals, g_N):
  logits_NV, labels_N, lse_N = residuals
  probs_NV = jnp.exp(logits_NV.astype(jnp.float32) - lse_N[..., None])
  onehot_NV = labels_N[..., None] == jnp.arange(logits_NV.shape[-1])
  return ((probs_NV - onehot_NV) * g_N[..., None]).astype(logits_NV.dtype), None


cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_next_token_loss(x_BLD: jax.Array, head_DV: jax.Array, tokens_BL: jax.Array, chunk: int) -> jax.Array:
  """float32 []: next_token_losses(x_BLD @ head_DV, tokens_BL).mean(), the logits made `chunk` tokens
  at a time (P whole positions of every row: the rows stay where a mesh put them) and never all at
  once. Each chunk's gradients are made with its loss, in the forward pass, since the loss is a sum
  over chunks and the only thing downstream is a scalar: the backward pass scales them, and nothing
  is recomputed. [P*B, V] logits at a time stay in a CPU's cache: the base config's batch-32 step
  is 12-15% faster on a CPU than with [B, L, V] logits at once (see config.loss_chunk)."""
  return _chunked_loss_fwd(x_BLD, head_DV, tokens_BL, chunk)[0]


def _chunked_loss_fwd(x_BLD, head_DV, tokens_BL, chunk):
  B, L, D = x_BLD.shape
  P = max(1, min(L, chunk // B))
  while L % P:  # the largest divisor of L up to chunk // B
    P -= 1
  # Each position's share of the mean over B x (L - 1) predictions; the last position has no target.
  weight_L = (jnp.arange(L) < L - 1) / (B * (L - 1))
  by_chunk = lambda a_BL: a_BL.reshape(B, L // P, P, *a_BL.shape[2:]).swapaxes(0, 1)  # noqa: E731  [C, B, P, ...]

  def one_chunk(dhead_DV, inputs):
    x_BPD, targets_BP, weight_P = inputs
    weight_BP = jnp.broadcast_to(weight_P, targets_BP.shape)
    losses_BP, residuals = _cross_entropy_fwd(x_BPD @ head_DV, targets_BP)
    dlogits_BPV, _ = _cross_entropy_bwd(residuals, weight_BP)  # in the compute dtype
    dhead_DV = dhead_DV + jnp.einsum("bpd,bpv->dv", x_BPD, dlogits_BPV, preferred_element_type=jnp.float32)
    return dhead_DV, ((losses_BP * weight_BP).sum(), dlogits_BPV @ head_DV.T)

  targets_BL = jnp.roll(tokens_BL, -1, axis=1)
  chunks = (by_chunk(x_BLD), by_chunk(targets_BL), weight_L.reshape(L // P, P))
  dhead_DV, (loss_C, dx_CBPD) = jax.lax.scan(one_chunk, jnp.zeros(head_DV.shape, jnp.float32), chunks)
  dx_BLD = dx_CBPD.swapaxes(0, 1).reshape(B, L, D)
  return loss_C.sum(), (dx_BLD, dhead_DV.astype(head_DV.dtype))


def _chunked_loss_bwd(chunk, residuals, g):
  dx_BLD, dhead_DV = residuals
  return (g * dx_BLD).astype(dx_BLD.dtype), (g * dhead_DV).astype(dhead_DV.dtype), None


chunked_next_token_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)


def unstack_layers(params) -> dict:
  """Params of a `scan_layers` model in the layout of an unrolled one (block_0, block_1, ...)."""
  if "blocks" not in params:
    return params
  rest = {k: v for k, v in params.items() if k != "blocks"}
  num_layers = jax.tree_util.tree_leaves(params["blocks"])[0].shape[0]
  return {**rest, **{f"block_{i}": jax.tree.map(lambda a, i=i: a[i], params["blocks"]) for i in range(num_layers)}}


def stack_layers(params) -> dict:
  """The inverse of unstack_layers: block_0, block_1, ... as one "blocks" tree of [num_layers, ...] arrays."""
  names = sorted((k for k in params if k.startswith("block_")), key=lambda k: int(k.split("_")[1]))
  rest = {k: v for k, v in params.items() if k not in names}
  return {**rest, "blocks": jax.tree.map(lambda *layers: jnp.stack(layers), *(params[k] for k in names))}


def count_params(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


def flops_per_token(config: ml_collections.ConfigDict, vocab_size: int) -> float:
  """Training FLOPs per token (forward + backward = 3 x forward), matmuls only, as in the PaLM
  paper's MFU: 6 x (matmul weights, output projection included) + 12 x layers x L x D (attention)."""
  m, L = config.model, config.data.seq_length
  per_layer = 4 * m.d_model * m.d_model + 2 * m.d_model * m.d_ff
  matmul_params = m.num_layers * per_layer + vocab_size * m.d_model  # + output projection
  return 6 * matmul_params + 12 * m.num_layers * L * m.d_model
