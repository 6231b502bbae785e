"""Decoding with a KV cache, sampling, and `python -m jaxlm.generate`."""
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import generate as generate_lib
from jaxlm import model as model_lib
from jaxlm import run as run_lib

from conftest import load_config, subprocess_env

VOCAB = 64


def small_model(context=16, **model_overrides):
  config = load_config("tiny")
  config.data.seq_length = context
  for key, value in model_overrides.items():
    config.model[key] = value
  model = model_lib.build(config, VOCAB)
  params = model.init(jax.random.PRNGKey(2), jnp.zeros((1, context), jnp.int32))["params"]
  return model, params


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "activation": "gelu_tanh"},
                                       {"scan_layers": True}, {"positions": "rope"},
                                       {"positions": "rope", "scan_layers": True}])
def test_kv_cache_decoding_gives_the_full_forward_pass_logits_at_every_position(overrides):
  with jax.default_matmul_precision("highest"):  # float32 products on a GPU too (not TF32)
    check_kv_cache_decoding(overrides)


def check_kv_cache_decoding(overrides):
  model, params = small_model(**overrides)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (3, 16)), jnp.int32)
  full = jax.jit(model.apply)({"params": params}, tokens)
  decode = jax.jit(lambda p, c, t: model.apply({"params": p, "cache": c}, t, decode=True, mutable=["cache"]))
  # Rows at different positions: each prefills its own prompt length, then one token per call.
  prompt = np.array([1, 5, 9])
  padded = jnp.where(jnp.arange(9)[None] < prompt[:, None], tokens[:, :9], 0)
  logits, variables = decode(params, model_lib.init_cache(model, 3, 16), padded)
  cache = {**variables["cache"], "index": jnp.asarray(prompt, jnp.int32)}
  for b in range(3):
    np.testing.assert_allclose(logits[b, :prompt[b]], full[b, :prompt[b]], atol=2e-5, rtol=0)
  for t in range(16 - 1):
    positions = prompt + t
    go = positions < 16
    step_tokens = tokens[jnp.arange(3), np.minimum(positions, 15)][:, None]
    logits, variables = decode(params, cache, step_tokens)
    cache = variables["cache"]
    for b in np.flatnonzero(go):
      np.testing.assert_allclose(logits[b, 0], full[b, positions[b]], atol=2e-5, rtol=0)


def greedy_by_recomputing(model, params, prompt, n):
  """nanoGPT's loop: the whole (cropped) sequence through the model for every new token. (Each
  window padded to the context: one compiled shape, and causal attention leaves its logits alone.)"""
  seq, context = list(prompt), model.max_seq_length
  logits = jax.jit(model.apply)
  for _ in range(n):
    window = seq[-context:]
    padded = jnp.asarray([window + [0] * (context - len(window))], jnp.int32)
    seq.append(int(jnp.argmax(logits({"params": params}, padded)[0, len(window) - 1])))
  return seq[len(prompt):]


def test_greedy_generation_is_deterministic_batched_and_slides_past_the_context():
  model, params = small_model()
  prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [7]]
  sampler = generate_lib.make_sampler(model, 25, temperature=0.0)  # 3 + 25 > context 16: slides
  tokens, lengths = sampler(params, *generate_lib.pad_prompts(prompts), 0)
  again = sampler(params, *generate_lib.pad_prompts(prompts), 123)  # the seed does not matter
  np.testing.assert_array_equal(tokens, again[0])
  new = generate_lib.completions(tokens, lengths, [len(p) for p in prompts], None)
  for prompt, row in zip(prompts, new):
    assert row == greedy_by_recomputing(model, params, prompt, 25)


def test_generation_stops_at_the_end_token_row_by_row():
  model, params = small_model()
  prompts = [[3, 1, 4], [2, 7], [9, 9, 9, 9]]
  free = generate_lib.completions(*generate_lib.make_sampler(model, 20, temperature=0.0)(
      params, *generate_lib.pad_prompts(prompts), 0), [len(p) for p in prompts], None)
  end = free[0][4]  # a token the first row makes: rows end at different steps, or not at all
  sampler = generate_lib.make_sampler(model, 20, temperature=0.0, end_id=end)
  tokens, lengths = sampler(params, *generate_lib.pad_prompts(prompts), 0)
  expected = [row[:row.index(end)] if end in row else row for row in free]
  assert generate_lib.completions(tokens, lengths, [len(p) for p in prompts], end) == expected
  for prompt, row, length in zip(prompts, free, lengths):
    assert length == len(prompt) + (row.index(end) + 1 if end in row else 20)  # the end token is the last
  assert len({len(row) for row in expected}) > 1


def test_sampling_is_seeded():
  model, params = small_model()
  sampler = generate_lib.make_sampler(model, 10, temperature=1.0)
  a, _ = sampler(params, *generate_lib.pad_prompts([[1, 2]] * 4), 0)
  b, _ = sampler(params, *generate_lib.pad_prompts([[1, 2]] * 4), 0)
  c, _ = sampler(params, *generate_lib.pad_prompts([[1, 2]] * 4), 1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert len({tuple(row) for row in np.asarray(a)}) > 1  # rows of one batch draw differently


def test_top_k_and_top_p_never_sample_outside_their_sets():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)) * 2, jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  draw = jax.jit(jax.vmap(lambda key, k, p: generate_lib.sample_token(key, logits, 1.0, k, p),
                          in_axes=(0, None, None)), static_argnums=(1, 2))
  probs = np.asarray(jax.nn.softmax(logits, -1))
  order = np.argsort(-probs, axis=-1)
  for top_k, top_p in ((5, 1.0), (1, 1.0), (0, 0.5), (0, 0.9), (10, 0.6)):
    samples = np.asarray(draw(keys, top_k, top_p))  # [draws, rows]
    for row in range(4):
      # Top-k first; then, of those renormalised, the smallest set whose probability reaches top_p.
      kept = order[row, :top_k or 50]
      renormalised = probs[row, kept] / probs[row, kept].sum()
      allowed = set(kept[np.cumsum(renormalised) - renormalised < top_p])
      assert set(samples[:, row]) <= allowed, (top_k, top_p, row)
      if len(allowed) > 1:
        assert len(set(samples[:, row])) > 1  # it still samples
  assert (np.asarray(generate_lib.sample_token(keys[0], logits, 0.0, 0, 1.0)) == order[:, 0]).all()
  # A temperature near 0 is near greedy (logits / 1e-40 would overflow to inf and draw anything).
  assert (np.asarray(generate_lib.sample_token(keys[0], logits * 100, 1e-40, 0, 1.0)) == order[:, 0]).all()


def test_top_k_and_top_p_keep_exactly_their_sets_when_logits_tie():
  # Tokens tied at the cut (bfloat16 logits tie often) are kept by rank, lower ids first.
  kept = lambda logits, k, p: np.isfinite(np.asarray(generate_lib.filter_logits(jnp.asarray(logits), k, p)))
  three = np.log(np.array([[0.4, 0.3, 0.3]], np.float32))
  np.testing.assert_array_equal(kept(three, 2, 1.0), [[True, True, False]])
  np.testing.assert_array_equal(kept(three, 0, 0.5), [[True, True, False]])  # 0.4 + 0.3 reaches 0.5
  np.testing.assert_array_equal(kept(three, 0, 0.35), [[True, False, False]])
  np.testing.assert_array_equal(kept(three, 0, 0.45), [[True, True, False]])
  np.testing.assert_array_equal(kept(three, 0, 1.0), [[True, True, True]])
  coarse = np.round(np.random.default_rng(0).normal(size=(8, 1000)), 1).astype(np.float32)  # many ties
  for k in (1, 10, 50, 200):
    assert (kept(coarse, k, 1.0).sum(-1) == k).all(), k
  probs = np.exp(coarse) / np.exp(coarse).sum(-1, keepdims=True)
  for p in (0.1, 0.5, 0.9):
    smallest = [int(np.searchsorted(np.cumsum(np.sort(row)[::-1]), p) + 1) for row in probs]
    np.testing.assert_array_equal(kept(coarse, 0, p).sum(-1), smallest)


def test_text_stream_prints_whole_characters_as_tokens_come():
  from tokenizers import ByteLevelBPETokenizer
  tokenizer = ByteLevelBPETokenizer()
  tokenizer.train_from_iterator(["a b c"], vocab_size=260, show_progress=False)  # no merge covers é
  ids = tokenizer.encode("a é b").ids  # é: two byte tokens
  out = io.StringIO()
  stream = generate_lib.TextStream(tokenizer, out)
  seen = []
  for i in ids:
    stream(np.array([i]))
    seen.append(out.getvalue())
  assert seen[-1] == "a é b" == tokenizer.decode(ids)
  assert not any("\ufffd" in text for text in seen)  # never half a character
  assert len(set(seen)) < len(seen)  # the first byte of é printed nothing

  # A long stream decodes a few tokens per token, not the whole text: the same text, far faster.
  rng = np.random.default_rng(0)
  ids = [int(i) for i in rng.integers(0, tokenizer.get_vocab_size(), 20_000)]
  out = io.StringIO()
  stream = generate_lib.TextStream(tokenizer, out)
  for i in ids:
    stream(np.array([i]))
  stream.close()  # prints a last unfinished character too
  assert out.getvalue() == tokenizer.decode(ids)


def test_text_stream_keeps_a_failed_write_for_close():
  from tokenizers import ByteLevelBPETokenizer
  tokenizer = ByteLevelBPETokenizer()
  tokenizer.train_from_iterator(["a b c"], vocab_size=260, show_progress=False)

  class ClosedPipe(io.StringIO):
    def write(self, text):
      raise BrokenPipeError(32, "Broken pipe")

  stream = generate_lib.TextStream(tokenizer, ClosedPipe())
  for i in tokenizer.encode("a b c").ids:
    stream(np.array([i]))  # on the device's callback thread: raising there becomes XLA's error
  assert isinstance(stream.error, BrokenPipeError)
  with pytest.raises(BrokenPipeError):
    stream.close()


def test_a_stop_request_ends_every_row_within_a_chunk_of_tokens():
  model, params = small_model()
  asked = []
  sampler = generate_lib.make_sampler(model, 200, temperature=1.0, stop=lambda: asked.append(1) or len(asked) >= 2)
  _, lengths = sampler(params, *generate_lib.pad_prompts([[1, 2], [3]]), 0)
  # Asked after each chunk of 64 tokens (the 14 up to the context are less than one): no after the
  # first, yes after the second.
  assert len(asked) == 2 and (np.asarray(lengths) == np.array([2, 1]) + 14 + 2 * 64).all()
  _, lengths = generate_lib.make_sampler(model, 200, temperature=1.0, stop=lambda: False)(
      params, *generate_lib.pad_prompts([[1, 2], [3]]), 0)
  assert (np.asarray(lengths) == np.array([202, 201])).all()


def test_a_prompt_longer_than_the_context_is_refused_by_the_sampler():
  model, params = small_model()
  with pytest.raises(generate_lib.GenerateError, match="prompts of 17 tokens do not fit the model's context of 16"):
    generate_lib.make_sampler(model, 4)(params, *generate_lib.pad_prompts([list(range(17))]), 0)


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-0.5), "temperature=-0.5 must be >= 0"),
    (dict(temperature=float("nan")), "temperature=nan must be >= 0 and finite"),
    (dict(top_p=0.0), "top_p=0.0 must be in (0, 1]"),
    (dict(top_p=1.5), "top_p=1.5 must be in (0, 1]"),
    (dict(top_k=-1), "top_k=-1 must be >= 0")])
def test_bad_settings_are_errors(bad, message):
  model, _ = small_model()
  with pytest.raises(generate_lib.GenerateError, match=message.replace("(", r"\(").replace(")", r"\)")):
    generate_lib.make_sampler(model, 5, **{"temperature": 1.0, **bad})


def run_generate(*args, cwd):
  return subprocess.run([sys.executable, "-m", "jaxlm.generate", *args], cwd=cwd, env=subprocess_env(),
                        capture_output=True, text=True, timeout=180)


def test_generate_command_works_from_the_workdir_alone(tiny_config, tmp_path):
  tiny_config.training.epochs = 1
  run_lib.train_and_evaluate(tiny_config)
  shutil.rmtree(tiny_config.data.data_dir)  # neither the corpus nor its cache is needed any more
  shutil.rmtree(tiny_config.data.processed_dir)
  workdir = f"--workdir={tiny_config.workdir}"
  greedy = run_generate(workdir, "--prompt= The album", "--max_new_tokens=20", "--temperature=0", cwd=tmp_path)
  assert greedy.returncode == 0, greedy.stderr
  assert greedy.stdout.startswith(" The album") and len(greedy.stdout) > len(" The album") + 5
  again = run_generate(workdir, "--prompt= The album", "--max_new_tokens=20", "--temperature=0", cwd=tmp_path)
  assert again.stdout == greedy.stdout  # streamed, and deterministic

  prompts = tmp_path / "prompts.txt"
  prompts.write_text(" The river\n\n The king was\n", encoding="utf-8")
  batch = run_generate(workdir, f"--prompt_file={prompts}", "--num_samples=2", "--max_new_tokens=8",
                       "--top_k=20", "--top_p=0.9", "--seed=3", cwd=tmp_path)
  assert batch.returncode == 0, batch.stderr
  headers = [line for line in batch.stdout.splitlines() if line.startswith("--- ")]
  assert headers == ["--- prompt 1, sample 1 ---", "--- prompt 1, sample 2 ---", "--- prompt 2, sample 1 ---",
                     "--- prompt 2, sample 2 ---"]
  assert batch.stdout.count(" The river") == 2 and batch.stdout.count(" The king was") == 2

  long_prompt = " the" * 40  # longer than the context of 32: the last 32 tokens are kept
  long = run_generate(workdir, f"--prompt={long_prompt}", "--max_new_tokens=40", cwd=tmp_path)
  assert long.returncode == 0, long.stderr
  assert "more than the model's context of 32: only its last 32 are used" in long.stderr

  # More rows than memory holds: refused before they are made (XLA aborted the process on a CPU).
  huge = run_generate(workdir, "--prompt= The", "--num_samples=100000000", "--max_new_tokens=100", cwd=tmp_path)
  assert huge.returncode == 1 and "Traceback" not in huge.stderr, huge.stderr
  assert re.fullmatch(r"error: 100,000,000 rows of up to 10[0-9] tokens need [0-9,.]+ GiB, more than the [0-9,.]+ GiB "
                      r"of this machine's memory: ask for fewer prompts or --num_samples, or a smaller "
                      r"--max_new_tokens", huge.stderr.strip().splitlines()[-1]), huge.stderr

  # The decode loop runs on the device, yet a Ctrl-C ends it within a few tokens (status 130), and a
  # reader that goes away (`| head`) ends it quietly.
  for stop in ("ctrl-c", "closed pipe"):
    endless = subprocess.Popen([sys.executable, "-m", "jaxlm.generate", workdir, "--prompt= The",
                                "--max_new_tokens=1000000", "--temperature=0"], cwd=tmp_path, env=subprocess_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    text = b""
    while len(text) < 100:  # tokens are coming
      text += os.read(endless.stdout.fileno(), 100)
    if stop == "ctrl-c":
      endless.send_signal(signal.SIGINT)
    else:
      endless.stdout.close()
    start = time.monotonic()
    _, err = endless.communicate(timeout=60) if stop == "ctrl-c" else (None, endless.stderr.read())
    endless.wait(timeout=60)
    assert time.monotonic() - start < 30, stop
    err = err.decode()
    assert endless.returncode == (130 if stop == "ctrl-c" else 1) and "Traceback" not in err, (stop, err)
    if stop == "ctrl-c":
      assert err.strip().splitlines()[-1] == "interrupted; what was already saved is intact"


@pytest.mark.parametrize("args, message", [
    (["--prompt=  "], "error: the prompt is empty: give some text with --prompt (or --prompt_file)"),
    ([], "error: no prompt: give --prompt=TEXT (repeatable) or --prompt_file=FILE"),
    (["--prompt=a", "--temperature=-1"], "error: --temperature=-1.0 must be >= 0 and finite (0 is greedy)"),
    (["--prompt=a", "--max_new_tokens=3000000000"], "error: --max_new_tokens=3000000000 must be in [0, 1,073,741,824]"),
    (["--prompt=a", "--seed=3000000000"], "error: --seed=3000000000 must be in [0, 2**31)"),
    (["--prompt=a", "--top_p=0"], "error: --top_p=0.0 must be in (0, 1] (1 turns it off)"),
    (["--prompt=a", "--top_p=2"], "error: --top_p=2.0 must be in (0, 1] (1 turns it off)"),
    (["--prompt=a", "--num_samples=0"], "error: --num_samples=0 must be >= 1"),
])
def test_generate_command_bad_input_is_one_error_line(tiny_config, tmp_path, args, message):
  workdir = str(tmp_path / "run")
  os.makedirs(os.path.join(workdir, "checkpoints"))
  with open(os.path.join(workdir, "tokenizer.json"), "w") as f:
    f.write("{}")  # never read: the input is checked first
  done = run_generate(f"--workdir={workdir}", *args, cwd=tmp_path)
  assert done.returncode == 2 and done.stderr.strip().splitlines() == [message], done.stderr


def test_generate_command_without_a_run_is_one_error_line(tmp_path):
  done = run_generate(f"--workdir={tmp_path / 'nowhere'}", "--prompt=a", cwd=tmp_path)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines() == [f"error: the work directory '{tmp_path / 'nowhere'}' does not exist "
                                              f"(pass a run's config.workdir, e.g. runs/experiment_1)"]
  os.makedirs(tmp_path / "empty")
  (tmp_path / "empty" / "tokenizer.json").write_text("{}")
  done = run_generate(f"--workdir={tmp_path / 'empty'}", "--prompt=a", cwd=tmp_path)
  assert done.returncode == 1 and done.stderr.strip().splitlines() == [
      f"error: {tmp_path / 'empty'} has no `best` checkpoint yet: train first (a run saves `last` during its first "
      f"epoch and `best` after its first validation)"]
