"""A decoder-only transformer LM (GPT-style, pre-LayerNorm) in Flax linen.

Matches the PyTorch baseline's choices so that the two are the same model: every Dense/Embed
weight ~ N(0, init_std), biases 0, LayerNorm eps 1e-5, exact GELU, dropout on the embeddings and on
each residual branch's output (none on attention probabilities), output tied to the token embedding.
Shapes: B batch, L sequence, D d_model, H heads, K head size (D / H), F d_ff, V vocab.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxlm import config as config_lib


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
  attention: str | None  # jax.nn.dot_product_attention's implementation; None lets JAX pick

  @nn.compact
  def __call__(self, x_BLD: jax.Array, deterministic: bool) -> jax.Array:
    dense = lambda features, std, name: nn.Dense(  # noqa: E731
        features, kernel_init=nn.initializers.normal(std), dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    norm = lambda name: nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype,  # noqa: E731
                                     param_dtype=self.param_dtype, name=name)
    B, L, D = x_BLD.shape
    K = D // self.num_heads

    qkv_BL3HK = dense(3 * D, self.init_std, "qkv")(norm("ln1")(x_BLD)).reshape(B, L, 3, self.num_heads, K)
    q, k, v = (qkv_BL3HK[:, :, i] for i in range(3))
    # Fused causal attention (cuDNN flash attention on GPU when asked; XLA otherwise); the softmax
    # runs in float32 whatever the dtype.
    attn_BLHK = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=self.attention)
    y = dense(D, self.residual_std, "proj")(attn_BLHK.reshape(B, L, D))
    x_BLD = x_BLD + nn.Dropout(self.dropout)(y, deterministic=deterministic)

    h_BLF = nn.gelu(dense(self.d_ff, self.init_std, "fc1")(norm("ln2")(x_BLD)), approximate=False)
    y = dense(D, self.residual_std, "fc2")(h_BLF)
    return x_BLD + nn.Dropout(self.dropout)(y, deterministic=deterministic)


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
  attention: str | None = None

  @nn.compact
  def __call__(self, tokens_BL: jax.Array, deterministic: bool = True) -> jax.Array:
    """int [B, L] token ids -> float32 [B, L, V] logits of the next token at every position."""
    L = tokens_BL.shape[1]
    init = nn.initializers.normal(self.init_std)
    embedding_VD = self.param("tok_emb", init, (self.vocab_size, self.d_model), self.param_dtype)
    pos_LD = self.param("pos_emb", init, (self.max_seq_length, self.d_model), self.param_dtype)[:L]
    # The residual stream stays float32 (as under torch autocast); the blocks compute in self.dtype.
    x_BLD = jnp.take(embedding_VD, tokens_BL, axis=0).astype(jnp.float32) + pos_LD.astype(jnp.float32)
    x_BLD = nn.Dropout(self.dropout)(x_BLD, deterministic=deterministic)

    residual_std = self.init_std / (math.sqrt(2 * self.num_layers) if self.scaled_residual_init else 1)
    for i in range(self.num_layers):
      x_BLD = Block(self.d_model, self.num_heads, self.d_ff, self.dropout, self.init_std, residual_std,
                    self.layer_norm_eps, self.dtype, self.param_dtype, self.attention,
                    name=f"block_{i}")(x_BLD, deterministic)
    x_BLD = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="ln_f")(x_BLD)
    if self.tie_embeddings:
      logits_BLV = jnp.einsum("bld,vd->blv", x_BLD, embedding_VD.astype(self.dtype))
    else:
      logits_BLV = nn.Dense(self.vocab_size, use_bias=False, kernel_init=init, dtype=self.dtype,
                            param_dtype=self.param_dtype, name="head")(x_BLD)
    return logits_BLV.astype(jnp.float32)  # the loss and its softmax in float32


def build(config: ml_collections.ConfigDict, vocab_size: int, dtype=jnp.float32) -> Transformer:
  """The model `config.model` describes, computing in `dtype` (see config.compute_dtype)."""
  m = config.model
  return Transformer(
      vocab_size=vocab_size, max_seq_length=config_lib.max_seq_length(config), d_model=m.d_model,
      num_layers=m.num_layers, num_heads=m.num_heads, d_ff=m.d_ff, dropout=m.dropout,
      tie_embeddings=m.tie_embeddings, init_std=m.init_std, scaled_residual_init=m.scaled_residual_init,
      layer_norm_eps=m.layer_norm_eps, dtype=dtype, param_dtype=jnp.dtype(m.param_dtype),
      attention=None if m.attention == "auto" else m.attention)


def count_params(params) -> int:
  return sum(x.size for x in jax.tree_util.tree_leaves(params))


def flops_per_token(config: ml_collections.ConfigDict, vocab_size: int) -> float:
  """Training FLOPs per token (forward + backward = 3 x forward), matmuls only, as in the PaLM
  paper's MFU: 6 x (matmul weights, output projection included) + 12 x layers x L x D (attention)."""
  m, L = config.model, config.data.seq_length
  per_layer = 4 * m.d_model * m.d_model + 2 * m.d_model * m.d_ff
  matmul_params = m.num_layers * per_layer + vocab_size * m.d_model  # + output projection
  return 6 * matmul_params + 12 * m.num_layers * L * m.d_model
