"""The model, the optimizer and the jitted steps (issue: the pure-functional core of training)."""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxlm import model as model_lib
from jaxlm import train as train_lib

from conftest import load_config

VOCAB = 64


def small_config(**model_overrides):
  config = load_config("tiny")
  config.data.seq_length = 16
  for key, value in model_overrides.items():
    config.model[key] = value
  return config


def make_state(config, num_steps=1000, dtype=jnp.float32, vocab=VOCAB):
  """(model, schedule, fresh state) as a run makes them (train.setup, train.init_state), computing in
  `dtype`."""
  config = config.copy_and_resolve_references()
  config.model.dtype = jnp.dtype(dtype).name
  s = train_lib.setup(config, vocab, num_steps)
  return s.model, s.schedule, train_lib.init_state(s)


def random_tokens(shape, seed=0, vocab=VOCAB):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def assert_same_loss_and_gradients(model, reference_model, params, tokens_BL):
  """`model`'s mean next-token loss on `tokens_BL` and its gradients are `reference_model`'s (to 1e-6
  and 1e-4): the two compute the same function another way. Returns the gradients."""
  def loss(m, params):
    return model_lib.next_token_losses(m.apply({"params": params}, tokens_BL), tokens_BL).mean()

  (ours, grads), (reference, expected) = (jax.jit(jax.value_and_grad(functools.partial(loss, m)))(params)
                                           for m in (model, reference_model))
  np.testing.assert_allclose(ours, reference, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads, expected)
  return grads


def test_logits_shape_and_dtype():
  config = small_config()
  model, _, state = make_state(config)
  apply = jax.jit(model.apply)
  logits = apply({"params": state.params}, random_tokens((3, 16)))
  assert logits.shape == (3, 16, VOCAB) and logits.dtype == jnp.float32
  shorter = apply({"params": state.params}, random_tokens((2, 5)))  # fewer positions is fine
  assert shorter.shape == (2, 5, VOCAB)
  with pytest.raises(ValueError, match="17 tokens per row: the model has 16 positions"):
    apply({"params": state.params}, random_tokens((1, 17)))
  bf16_model, _, _ = make_state(config, dtype=jnp.bfloat16)  # mixed precision: logits in the compute dtype
  assert jax.jit(bf16_model.apply)({"params": state.params}, random_tokens((1, 4))).dtype == jnp.bfloat16


def test_scan_layers_computes_the_unrolled_model_with_stacked_parameters():
  config = small_config(num_layers=3, dropout=0.0)
  model, _, state = make_state(config)
  config.model.scan_layers = True
  scanned, _, scanned_state = make_state(config)
  qkv = scanned_state.params["blocks"]["qkv"]["kernel"]
  assert qkv.shape == (3, 32, 96) and not np.array_equal(qkv[0], qkv[1])  # each layer its own init
  assert model_lib.count_params(scanned_state.params) == model_lib.count_params(state.params)
  stacked = model_lib.stack_layers(state.params)
  assert jax.tree.structure(stacked) == jax.tree.structure(scanned_state.params)
  assert_same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)  # noqa: E731
  assert_same(model_lib.unstack_layers(stacked), state.params)
  tokens = random_tokens((2, 16))
  np.testing.assert_allclose(jax.jit(scanned.apply)({"params": stacked}, tokens),
                             jax.jit(model.apply)({"params": state.params}, tokens), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cross_entropy_matches_optax_in_value_and_gradient(dtype):
  """The hand-written loss and gradient are those of a float32 log-softmax of the same logits."""
  logits = (3 * jax.random.normal(jax.random.PRNGKey(0), (3, 7, 50))).astype(dtype)
  tokens = random_tokens((3, 7), vocab=50)
  ours = lambda x: model_lib.next_token_losses(x, tokens)  # noqa: E731
  reference = lambda x: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
      x[:, :-1].astype(jnp.float32), tokens[:, 1:])
  np.testing.assert_allclose(ours(logits), reference(logits), rtol=1e-6)
  assert ours(logits).dtype == jnp.float32
  weights = jax.random.uniform(jax.random.PRNGKey(1), (3, 6))  # any cotangent, not just the mean's
  grad = jax.grad(lambda x: jnp.sum(weights * ours(x)))(logits)
  expected = jax.grad(lambda x: jnp.sum(weights * reference(x)))(logits)
  assert grad.dtype == dtype
  np.testing.assert_allclose(np.float32(grad), np.float32(expected), atol=1e-6 if dtype == jnp.float32 else 4e-3)
  assert not np.any(np.float32(grad)[:, -1])  # the last position predicts nothing


@pytest.mark.parametrize("chunk, tie_embeddings, dtype", [
    (12, True, jnp.float32), (12, False, jnp.float32),  # 4 positions of the 3 rows per chunk
    (40, True, jnp.float32), (40, True, jnp.bfloat16),  # 13 positions: not a divisor of 16, so 8
    (1, True, jnp.float32), (10_000, True, jnp.float32)])  # 1 position; all 16 at once
def test_chunked_loss_is_the_mean_next_token_loss_in_value_and_gradient(chunk, tie_embeddings, dtype):
  """model.chunked_next_token_loss (the projection and loss by chunks of positions, gradients made in
  the forward pass) against the logits at once, through the whole model and any upstream scale."""
  model, _, state = make_state(small_config(tie_embeddings=tie_embeddings), dtype=dtype)
  tokens = random_tokens((3, 16))

  def loss(params, chunked):
    if chunked:
      return model_lib.chunked_next_token_loss(*model.apply({"params": params}, tokens, project=False), tokens, chunk)
    return model_lib.next_token_losses(model.apply({"params": params}, tokens), tokens).mean()

  # -2.5: the backward pass scales the gradients the forward pass made by the upstream cotangent.
  (ours, grads), (reference, expected) = (jax.jit(jax.value_and_grad(lambda p, c=c: -2.5 * loss(p, c)))(state.params)
                                           for c in (True, False))
  assert ours.dtype == jnp.float32
  np.testing.assert_allclose(ours, reference, rtol=1e-6 if dtype == jnp.float32 else 2e-3)

  def close(a, b):  # bfloat16: the two summation orders round differently (within 2% of the largest entry)
    a, b = np.float32(a), np.float32(b)
    tolerance = dict(rtol=1e-4, atol=1e-7) if dtype == jnp.float32 else dict(rtol=0, atol=0.02 * np.abs(b).max())
    np.testing.assert_allclose(a, b, **tolerance)

  jax.tree.map(close, grads, expected)
  assert float(optax.tree.norm(grads["tok_emb"])) > 1e-3  # the projection's gradient (tied: into the embedding)


def test_exact_gelu_is_jax_nn_gelu_with_its_gradient():
  """model.gelu's exact form (x/2 (1 + erf(x/sqrt 2)), PyTorch's) is jax.nn.gelu's (through erfc),
  gradient included, to 1e-6: float32's 1 + erf(x / sqrt 2) loses its digits below x = -5, where
  GELU is under 1e-6 in size (6.3e-7 apart at most, measured). In bfloat16 either form is the
  float32 value rounded once: 1 + erf (or 1 + tanh) in bfloat16 would be 45% (61%) off at x = -3
  and 0 below -3.5."""
  x = jnp.linspace(-12.0, 12.0, 24001, dtype=jnp.float32)
  grad = lambda f, x: jax.vmap(jax.grad(f))(x)  # noqa: E731
  exact = model_lib.gelu(x, False)
  np.testing.assert_allclose(exact, jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(grad(lambda v: model_lib.gelu(v, False), x),
                             grad(lambda v: jax.nn.gelu(v, approximate=False), x), rtol=1e-6, atol=1e-6)
  x16 = x.astype(jnp.bfloat16)
  tail = (x16 > -4.5) & (x16 < -2)  # below, float32's own 1 + tanh nears 0 too
  for approximate in (False, True):
    ours16 = model_lib.gelu(x16, approximate)
    assert ours16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(ours16, model_lib.gelu(x16.astype(jnp.float32), approximate).astype(jnp.bfloat16))
    assert bool(jnp.all(ours16[tail] < 0))  # the negative tail survives in bfloat16
  np.testing.assert_allclose(model_lib.gelu(x, True), jax.nn.gelu(x, approximate=True), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("overrides", [dict(), dict(tie_embeddings=False), dict(scan_layers=True)])
def test_cpu_matmuls_compute_the_same_logits_and_gradients(overrides):
  """model.cpu_dot_general (a CPU's Dense: weight gradients from a transposed copy of the input, or
  lax's where the input is wider than the output) against lax.dot_general, through the whole model:
  both kinds of layer, the untied head and scanned layers included."""
  config = small_config(dropout=0.0, **overrides)
  assert config.model.d_ff > config.model.d_model  # fc2 is wider in than out, the other Dense layers are not
  plain, cpu = (model_lib.build(config, VOCAB, platform=p) for p in ("", "cpu"))
  assert cpu.dot_general is model_lib.cpu_dot_general and plain.dot_general is None
  params = plain.init(jax.random.PRNGKey(0), random_tokens((1, 16)))["params"]
  grads = assert_same_loss_and_gradients(cpu, plain, params, random_tokens((3, 16)))
  kernels = [v for path, v in jax.tree_util.tree_leaves_with_path(grads) if path[-1].key == "kernel"]
  assert kernels and all(float(jnp.abs(k).max()) > 0 for k in kernels)
  # The transposed copy is kept for the narrower input only (fc2's [tokens, d_ff] is transposed slowly).
  matmul = lambda i, o: str(jax.make_jaxpr(  # noqa: E731
      lambda x, w: model_lib.cpu_dot_general(x, w, (((1,), (0,)), ((), ()))))(jnp.ones((4, i)), jnp.ones((i, o))))
  assert "_matmul_saving_transposed_input" in matmul(2, 8) and "_matmul_saving_transposed_input" not in matmul(8, 2)


@pytest.mark.parametrize("length, block, dtype", [(128, 64, jnp.float32), (50, 16, jnp.float32),
                                                  (5, 16, jnp.float32), (1, 16, jnp.float32),
                                                  (40, 16, jnp.bfloat16)])
def test_attention_by_blocks_is_xla_attention_in_value_and_gradient(length, block, dtype):
  """model.causal_attention_by_blocks (a CPU's attention) against jax.nn.dot_product_attention's XLA
  implementation (in float32): whole blocks, a last partial one (50 = 3 x 16 + 2), fewer tokens than a
  block, and bfloat16 inputs, whose scores and softmax stay float32 (here 0.010 off the float32
  result at most; with bfloat16 scores, 0.034)."""
  q, k, v, g = (jax.random.normal(key, (3, length, 4, 8), dtype)
                for key in jax.random.split(jax.random.PRNGKey(0), 4))

  def value_and_grads(attention, *inputs):
    out, vjp = jax.vjp(attention, *inputs)
    return out, vjp(g.astype(out.dtype))

  blocked = functools.partial(model_lib.causal_attention_by_blocks, block=block)
  xla = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="xla")
  ours, ours_grads = value_and_grads(blocked, q, k, v)
  reference, reference_grads = value_and_grads(xla, *(a.astype(jnp.float32) for a in (q, k, v)))
  assert ours.dtype == dtype and ours.shape == q.shape
  tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=0, atol=0.02)
  for a, b in zip((ours, *ours_grads), (reference, *reference_grads)):
    np.testing.assert_allclose(np.asarray(a, np.float32), b, **tol)
  np.testing.assert_array_equal(ours[:, 0], v[:, 0])  # the first query sees the first key alone


def test_a_model_with_attention_by_blocks_computes_xla_attention_s_logits_and_gradients():
  """Through the whole model, at 80 tokens (a block of 64 queries and one of 16)."""
  config = small_config(dropout=0.0)
  config.data.seq_length = 80
  blocked, xla = (model_lib.build(config, VOCAB, attention=a) for a in ("blocked", "xla"))
  tokens = random_tokens((2, 80))
  assert_same_loss_and_gradients(blocked, xla, xla.init(jax.random.PRNGKey(0), tokens)["params"], tokens)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_attention_dropout_drops_attention_probabilities_in_training_only(scan_layers):
  """model.attention_dropout: training computes attention unfused with dropout on its probabilities
  (at a rate that drops nothing it is the fused attention's result, causality included); evaluation
  and rate 0 keep the fused kernel; and the masks differ between layers and steps."""
  config = small_config(dropout=0.0, scan_layers=scan_layers)
  fused = model_lib.build(config, VOCAB)
  params = fused.init(jax.random.PRNGKey(0), random_tokens((1, 16)))["params"]
  tokens = random_tokens((3, 16))

  def train_logits(model, seed=0):
    return jax.jit(lambda p: model.apply({"params": p}, tokens, deterministic=False,
                                         rngs={"dropout": jax.random.PRNGKey(seed)}))(params)

  reference = train_logits(fused)
  config.model.attention_dropout = 1e-9  # keeps every probability (scaled by 1 + 1e-9)
  np.testing.assert_allclose(train_logits(model_lib.build(config, VOCAB)), reference, rtol=1e-5, atol=1e-5)
  config.model.attention_dropout = 0.5
  dropping = model_lib.build(config, VOCAB)
  first, second = train_logits(dropping, 0), train_logits(dropping, 1)
  assert not np.allclose(first, reference, atol=1e-3) and not np.allclose(first, second, atol=1e-3)
  np.testing.assert_array_equal(jax.jit(dropping.apply)({"params": params}, tokens),  # evaluation: no dropout
                                jax.jit(fused.apply)({"params": params}, tokens))
  changed = tokens.at[:, 9].set((tokens[:, 9] + 1) % VOCAB)  # still causal
  later = jax.jit(lambda p: dropping.apply({"params": p}, changed, deterministic=False,
                                           rngs={"dropout": jax.random.PRNGKey(0)}))(params)
  np.testing.assert_allclose(later[:, :9], first[:, :9], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rate", [0.02, 0.1, 0.5])
def test_dropout_masks_keep_each_element_with_probability_one_minus_rate_independently(rate):
  """model.dropout_keep's hashed masks against what Bernoulli(1 - rate) draws give, within 5 standard
  deviations: the kept fraction; the kept count per row of 256 (its variance exposes masks correlated
  along an axis); the correlation of each element with its neighbour along every axis and with the
  same element under another key (each dropout of a model draws its own key from flax's rngs)."""
  shape = (16, 128, 512)  # 1M elements; rows along each axis
  keep = np.asarray(model_lib.dropout_keep(jax.random.PRNGKey(0), shape, rate), np.float64)
  n, p = keep.size, 1 - rate
  assert abs(keep.mean() - p) < 5 * math.sqrt(p * (1 - p) / n)
  rows = keep.reshape(-1, 256).sum(axis=1)  # 4,096 binomial(256, p) counts if the bits are independent
  var, sd_of_var = 256 * p * (1 - p), 256 * p * (1 - p) * math.sqrt(2 / rows.size)  # normal approximation
  assert abs(rows.var() - var) < 5 * sd_of_var

  def corr(a, b):
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return (a * b).mean() / math.sqrt((a * a).mean() * (b * b).mean())

  bound = 5 / math.sqrt(n / 2)
  for axis in range(3):
    head, tail = np.split(keep, [1], axis=axis)[1], np.split(keep, [keep.shape[axis] - 1], axis=axis)[0]
    assert abs(corr(head, tail)) < bound, axis
  other_key = np.asarray(model_lib.dropout_keep(jax.random.PRNGKey(1), shape, rate), np.float64)
  assert abs(corr(keep, other_key)) < bound and (keep != other_key).any()


def test_dropout_zeroes_and_scales_in_training_and_is_the_identity_otherwise():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 64, 32)), jnp.float32)
  drop = model_lib.Dropout(0.25)
  rngs = {"dropout": jax.random.PRNGKey(3)}
  y = drop.apply({}, x, deterministic=False, rngs=rngs)
  keep = np.asarray(y) != 0
  np.testing.assert_allclose(np.asarray(y)[keep], np.asarray(x)[keep] / 0.75, rtol=1e-6)
  assert 0.7 < keep.mean() < 0.8
  np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
  grad = jax.grad(lambda x: drop.apply({}, x, deterministic=False, rngs=rngs).sum())(x)
  np.testing.assert_allclose(grad, keep / 0.75, rtol=1e-6)  # the same mask in the backward pass
  y16 = drop.apply({}, x.astype(jnp.bfloat16), deterministic=False, rngs=rngs)
  assert y16.dtype == jnp.bfloat16 and ((np.asarray(y16, np.float32) != 0) == keep).all()


def test_token_dropout_zeroes_whole_input_token_embeddings_in_training_only():
  """model.token_dropout: in training each input token's embedding is kept whole (scaled by 1 / (1 -
  rate)) or zeroed, with the position's embedding added either way; evaluation and rate 0 leave the
  model as it was, and the other dropouts draw the masks they drew before."""
  config = small_config(dropout=0.1)
  plain = model_lib.build(config, VOCAB)
  config.model.token_dropout = 0.5
  dropping = model_lib.build(config, VOCAB)
  tokens = random_tokens((4, 16))
  params = plain.init(jax.random.PRNGKey(0), tokens)["params"]
  rngs = {"dropout": jax.random.PRNGKey(1)}
  _, captured = dropping.apply({"params": params}, tokens, deterministic=False, rngs=rngs, mutable=["intermediates"],
                               capture_intermediates=lambda module, _: module.name == "token_dropout")
  out_BLD = np.asarray(captured["intermediates"]["token_dropout"]["__call__"][0])
  embedded_BLD = np.asarray(params["tok_emb"])[np.asarray(tokens)]
  zeroed_BL = (out_BLD == 0).all(axis=-1)
  np.testing.assert_allclose(out_BLD[~zeroed_BL], embedded_BLD[~zeroed_BL] / 0.5, rtol=1e-6)
  assert 0.3 < zeroed_BL.mean() < 0.7 and len({tuple(row) for row in zeroed_BL}) > 1
  evaluate = lambda model: model.apply({"params": params}, tokens)  # noqa: E731
  np.testing.assert_array_equal(evaluate(dropping), evaluate(plain))
  config.model.token_dropout = 0.0
  train = lambda model: model.apply({"params": params}, tokens, deterministic=False, rngs=rngs)  # noqa: E731
  np.testing.assert_array_equal(train(model_lib.build(config, VOCAB)), train(plain))
  assert not np.allclose(train(dropping), train(plain), atol=1e-3)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_the_moving_average_of_the_weights_is_bias_corrected_and_leaves_training_alone(param_dtype):
  """training.ema_decay: after t updates ema_params = sum_i decay^(t-i) (1 - decay) params_i / (1 -
  decay^t) over the parameters after each update i, in float32 whatever the parameters' dtype; the
  updates themselves are those of a run without it, and the model's weights (model_params) are the
  average."""
  config = small_config(param_dtype=param_dtype)
  config.training.ema_decay = 0.8
  _, schedule, state = make_state(config, num_steps=100)
  config.training.ema_decay = 0.0
  _, _, plain = make_state(config, num_steps=100)
  assert plain.ema_params is None and plain.model_params is plain.params
  step = jax.jit(functools.partial(train_lib.train_step, learning_rate_fn=schedule))
  history = []
  for i in range(4):
    tokens = random_tokens((2, 16), seed=i)
    (state, _), (plain, _) = step(state, tokens), step(plain, tokens)
    jax.tree.map(np.testing.assert_array_equal, state.params, plain.params)
    history.append(jax.device_get(state.params))
  t, d = len(history), 0.8
  weights = [d ** (t - i) * (1 - d) / (1 - d ** t) for i in range(1, t + 1)]
  expected = jax.tree.map(lambda *ps: sum(w * np.float64(p) for w, p in zip(weights, ps)), *history)
  # bfloat16 parameters: to their rounding, which XLA may skip where it fuses the average with the
  # update that makes them (its default xla_allow_excess_precision).
  close = ((lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)) if param_dtype == "float32" else
           (lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2**-8 * np.abs(b).max())))
  jax.tree.map(close, state.ema_params, expected)
  assert {a.dtype for a in jax.tree.leaves(state.ema_params)} == {np.dtype(np.float32)}
  assert state.model_params is state.ema_params
  assert not np.allclose(state.ema_params["tok_emb"], np.float32(state.params["tok_emb"]), rtol=1e-5, atol=1e-7)


def test_train_step_with_a_chunked_loss_makes_the_same_update():
  config = small_config()
  _, schedule, state = make_state(config, num_steps=100)
  tokens = random_tokens((4, 16))
  (s0, m0), (s1, m1) = (jax.jit(functools.partial(train_lib.train_step, learning_rate_fn=schedule, loss_chunk=c))(
      state, tokens) for c in (0, 16))
  for key in ("loss", "grad_norm"):
    np.testing.assert_allclose(m1[key], m0[key], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s1.params, s0.params)


def test_compiling_for_cublas_matmuls_makes_the_same_updates():
  """training.gpu_matmuls=cublas compiles the steps with XLA's xla_gpu_enable_triton_gemm=false. A
  CPU accepts that option and ignores it, so this runs the compile path a GPU takes."""
  s = train_lib.setup(small_config(), VOCAB, 100)
  seqs, order = random_tokens((4 * s.config.training.batch_size, 16)), jnp.arange(4 * s.config.training.batch_size)
  updates = []
  for matmuls, options in (("xla", {}), ("cublas", {"xla_gpu_enable_triton_gemm": False})):
    variant = dataclasses.replace(s, gpu_matmuls=matmuls)
    assert variant.compiler_options == options
    program, _ = train_lib.compile_train_steps(variant, variant.abstract_state, seqs, order, 2)
    updates.append(program(train_lib.init_state(variant), seqs, order, jnp.int32(0)))
  jax.tree.map(np.testing.assert_array_equal, updates[0], updates[1])


def test_parameter_count_of_the_base_config():
  config = load_config()
  model = model_lib.build(config, 8192)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 128), jnp.int32))["params"]
  d, f, n, v, L = 256, 1024, 4, 8192, 128
  per_block = (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
  assert model_lib.count_params(params) == v * d + L * d + n * per_block + 2 * d == 5_289_472
  assert "head" not in params  # tied output projection
  untied = model_lib.build(small_config(tie_embeddings=False), VOCAB)
  p = jax.eval_shape(untied.init, jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"]
  assert p["head"]["kernel"].shape == (32, VOCAB)


def test_rotary_positions_make_attention_scores_depend_on_distance_only():
  """model.rotate: shifting every position by the same amount leaves each query-key product as it
  was; a rotation keeps each vector's norm; position 0 is the identity. A rope model has no position
  embedding parameters, and its logits depend on the order of the tokens (a model without
  positions would give the same last logits for any permutation of the tokens before)."""
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.normal(size=(2, 16, 4, 8)), jnp.float32) for _ in range(2))
  at = jnp.broadcast_to(jnp.arange(16), (2, 16))
  scores = lambda shift: jnp.einsum("blhk,bmhk->bhlm", model_lib.rotate(q, at + shift),  # noqa: E731
                                    model_lib.rotate(k, at + shift))
  np.testing.assert_allclose(scores(37), scores(0), rtol=1e-4, atol=1e-4)
  assert not np.allclose(scores(0), jnp.einsum("blhk,bmhk->bhlm", q, k), atol=1e-2)
  np.testing.assert_allclose(jnp.linalg.norm(model_lib.rotate(q, at + 5), axis=-1), jnp.linalg.norm(q, axis=-1),
                             rtol=1e-5)
  np.testing.assert_array_equal(model_lib.rotate(q, jnp.zeros((2, 16), jnp.int32)), q)

  model, _, state = make_state(small_config(positions="rope"))
  assert "pos_emb" not in state.params
  tokens = random_tokens((1, 16))
  swapped = tokens.at[0, 3].set(tokens[0, 9]).at[0, 9].set(tokens[0, 3])
  last = lambda t: jax.jit(model.apply)({"params": state.params}, t)[0, -1]  # noqa: E731
  assert not np.allclose(last(tokens), last(swapped), atol=1e-4)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_causality_changing_token_t_never_changes_earlier_logits(positions):
  config = small_config(positions=positions)
  model, _, state = make_state(config)
  tokens = random_tokens((1, 16))
  apply = jax.jit(model.apply)
  base = apply({"params": state.params}, tokens)
  for t in (0, 7, 15):
    changed = tokens.at[0, t].set((tokens[0, t] + 1) % VOCAB)
    out = apply({"params": state.params}, changed)
    np.testing.assert_array_equal(out[0, :t], base[0, :t])
    assert not np.allclose(out[0, t], base[0, t])


def test_learned_position_embedding_gradient_is_the_input_gradient_summed_over_the_batch():
  # With every token of the batch distinct and an untied head, the token embedding's gradient row of a
  # token is the input's gradient at its place: the position embedding's row l must be their sum over
  # the rows at position l, and the positions past the sequence must get none.
  config = small_config(tie_embeddings=False)
  model, _, state = make_state(config)
  B, L = 3, 12
  tokens = jnp.asarray(np.random.default_rng(0).permutation(VOCAB)[:B * L].reshape(B, L), jnp.int32)
  weights = jax.random.normal(jax.random.key(1), (B, L, VOCAB))
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, tokens) * weights)))(state.params)
  pos, tok = np.asarray(grads["pos_emb"]), np.asarray(grads["tok_emb"])
  assert pos.shape[0] > L and np.abs(pos[:L]).min() > 0
  np.testing.assert_allclose(pos[:L], tok[np.asarray(tokens)].sum(axis=0), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(pos[L:], 0)


def test_initialization_matches_the_baseline():
  config = small_config()
  _, _, state = make_state(config, vocab=4096)
  p = state.params
  assert abs(float(jnp.std(p["tok_emb"])) - 0.02) < 0.001
  assert abs(float(jnp.std(p["block_0"]["fc1"]["kernel"])) - 0.02) < 0.002
  assert float(jnp.abs(p["block_0"]["qkv"]["bias"]).max()) == 0.0
  assert float(jnp.abs(p["block_1"]["ln1"]["scale"] - 1).max()) == 0.0
  scaled = small_config(scaled_residual_init=True)
  _, _, s = make_state(scaled, vocab=4096)
  expected = 0.02 / math.sqrt(2 * scaled.model.num_layers)
  assert abs(float(jnp.std(s.params["block_0"]["fc2"]["kernel"])) - expected) < 0.1 * expected
  assert abs(float(jnp.std(s.params["block_0"]["fc1"]["kernel"])) - 0.02) < 0.002


def test_loss_at_init_is_close_to_ln_vocab():
  config = small_config()
  vocab = 512
  model, _, state = make_state(config, vocab=vocab)
  tokens = random_tokens((8, 16), vocab=vocab)
  loss = model_lib.next_token_losses(jax.jit(model.apply)({"params": state.params}, tokens), tokens).mean()
  assert abs(float(loss) - math.log(vocab)) < 0.1


def test_overfits_a_tiny_repetitive_corpus():
  config = small_config(dropout=0.0)
  config.training.learning_rate = 3e-3
  config.training.warmup_steps = 20
  _, schedule, state = make_state(config, num_steps=300)
  pattern = np.random.default_rng(0).integers(0, VOCAB, 7)
  stream = np.tile(pattern, 200)
  step = jax.jit(functools.partial(train_lib.train_step, learning_rate_fn=schedule), donate_argnums=0)
  losses = []
  for i in range(300):
    starts = (np.arange(8) * 5 + i) % (len(stream) - 16)
    batch = jnp.asarray(np.stack([stream[s:s + 16] for s in starts]), jnp.int32)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[0] > 3.5 and losses[-1] < 0.1, (losses[0], losses[-1])


def test_schedule_values():
  config = load_config()
  config.training.min_learning_rate = 3e-5
  schedule = train_lib.make_schedule(config, 3000)
  lr, warm = config.training.learning_rate, config.training.warmup_steps
  assert float(schedule(0)) == 0.0  # the first update uses rate 0, as the baseline's LambdaLR
  assert float(schedule(warm // 2)) == pytest.approx(lr / 2, rel=1e-5)
  assert float(schedule(warm)) == pytest.approx(lr, rel=1e-5)
  mid = warm + (3000 - warm) // 2
  assert float(schedule(mid)) == pytest.approx((lr + 3e-5) / 2, rel=1e-4)
  assert float(schedule(3000)) == pytest.approx(3e-5, rel=1e-5)
  assert float(schedule(5000)) == pytest.approx(3e-5, rel=1e-5)  # stays at the floor


def test_schedule_length_is_derived_or_warns(capsys):
  config = load_config()
  assert train_lib.schedule_length(config, 5571) == 5571
  config.training.num_steps = 3000
  assert train_lib.schedule_length(config, 5571) == 3000
  assert "shorter than the run's 5,571 steps" in capsys.readouterr().out
  config.training.num_steps = -1
  with pytest.raises(train_lib.config_lib.ConfigError, match="warmup_steps"):
    train_lib.schedule_length(config, 200)


def test_gradient_clipping_clips():
  config = small_config()
  config.training.clip_norm = 0.5
  config.training.weight_decay = 0.0
  config.training.eps = 1e3  # Adam's step then scales with the gradient: clipping shows in the update
  params = {"w": jnp.zeros(4)}
  big = {"w": jnp.array([30.0, 40.0, 0.0, 0.0])}  # norm 50
  clipped = {"w": big["w"] * 0.5 / 50}
  tx = train_lib.make_optimizer(config, lambda _: 1.0)
  updates, _ = tx.update(big, tx.init(params), params)

  def adam_update(grads):
    adam = optax.adam(1.0, b1=config.training.b1, b2=config.training.b2, eps=config.training.eps)
    return adam.update(grads, adam.init(params), params)[0]["w"]

  np.testing.assert_allclose(updates["w"], adam_update(clipped), rtol=1e-6)
  assert not np.allclose(updates["w"], adam_update(big), rtol=1e-2)
  small = {"w": jnp.array([0.03, 0.04, 0.0, 0.0])}  # norm 0.05: below the threshold, untouched
  np.testing.assert_allclose(tx.update(small, tx.init(params), params)[0]["w"], adam_update(small), rtol=1e-6)


def test_train_step_reports_unclipped_grad_norm_and_rate():
  config = small_config(dropout=0.0)
  config.training.clip_norm = 1e-6  # clipping on: the reported norm is still the raw one
  model, schedule, state = make_state(config, num_steps=100)
  step = jax.jit(functools.partial(train_lib.train_step, learning_rate_fn=schedule))
  tokens = random_tokens((4, 16))
  raw = jax.jit(jax.grad(lambda p: model_lib.next_token_losses(model.apply({"params": p}, tokens), tokens).mean()))
  expected_norm = float(optax.tree.norm(raw(state.params)))
  state, metrics = step(state, tokens)
  assert float(metrics["learning_rate"]) == 0.0 and int(state.step) == 1
  assert float(metrics["grad_norm"]) == pytest.approx(expected_norm, rel=1e-4) and expected_norm > 1e-3
  state, metrics = step(state, random_tokens((4, 16), seed=1))
  assert float(metrics["learning_rate"]) == pytest.approx(float(schedule(1)))


def test_weight_decay_mask():
  config = small_config(tie_embeddings=False)
  _, _, state = make_state(config)
  mask = train_lib.decay_mask(state.params)
  flat = {"/".join(k.key for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert flat["block_0/qkv/kernel"] and flat["block_1/fc2/kernel"] and flat["head/kernel"]
  for name in ("tok_emb", "pos_emb", "block_0/qkv/bias", "block_0/ln1/scale", "block_0/ln1/bias", "ln_f/scale"):
    assert not flat[name], name
  # With zero gradients, AdamW changes exactly the decayed parameters.
  config.training.weight_decay = 0.5
  zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)

  def first_update(decay_all_params):
    config.training.decay_all_params = decay_all_params
    tx = train_lib.make_optimizer(config, lambda _: 0.1)
    return jax.jit(lambda params: tx.update(zeros, tx.init(params), params)[0])(state.params)

  moved = jax.tree_util.tree_map(lambda u: bool(jnp.any(u != 0)), first_update(False))
  assert moved == jax.tree_util.tree_map(lambda m, p: bool(m) and bool(jnp.any(p != 0)), mask, state.params)
  updates = first_update(True)  # the baseline's default: every parameter decays
  assert bool(jnp.any(updates["ln_f"]["scale"] != 0)) and bool(jnp.any(updates["tok_emb"] != 0))


def test_bfloat16_mixed_precision_runs_close_to_float32():
  config = small_config(dropout=0.0)
  tokens = random_tokens((4, 16))
  results = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model, schedule, state = make_state(config, num_steps=100, dtype=dtype)
    assert jax.tree_util.tree_leaves(state.params)[0].dtype == jnp.float32  # float32 parameters
    step = jax.jit(functools.partial(train_lib.train_step, learning_rate_fn=schedule))
    losses = []
    for i in range(20):
      state, metrics = step(state, random_tokens((4, 16), seed=i % 2))
      losses.append(float(metrics["loss"]))
    logits = jax.jit(model.apply)({"params": state.params}, tokens)
    assert logits.dtype == dtype and metrics["loss"].dtype == jnp.float32  # the loss in float32 regardless
    results[dtype] = losses
  np.testing.assert_allclose(results[jnp.bfloat16], results[jnp.float32], atol=0.05)


def test_train_step_is_pure_and_compiles_once():
  config = small_config()
  _, schedule, state = make_state(config)
  step = jax.jit(functools.partial(train_lib.train_step, learning_rate_fn=schedule))
  batches = [random_tokens((4, 16), seed=i) for i in range(5)]
  s1, m1 = step(state, batches[0])
  s2, m2 = step(state, batches[0])  # same inputs, same outputs (dropout keyed by the step)
  np.testing.assert_array_equal(m1["loss"], m2["loss"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, s1.params, s2.params)
  for b in batches:
    s1, _ = step(s1, b)
  assert step._cache_size() == 1
  assert int(s1.step) == 6
  # Dropout is keyed by the step: the same params and batch at another step give another loss.
  _, m3 = step(state.replace(step=state.step + 1), batches[0])
  assert float(m3["loss"]) != float(m1["loss"])
