"""Evaluation: windows that score every token once, exact sums, and `python -m jaxlm.evaluate`."""
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import data as data_lib
from jaxlm import evaluate as evaluate_lib
from jaxlm import model as model_lib
from jaxlm import run as run_lib
from jaxlm import workdir as workdir_lib

from conftest import load_config, subprocess_env
from test_sharding import devices_env


@pytest.mark.parametrize("n,context,stride", [(1, 8, 7), (2, 8, 7), (8, 8, 7), (9, 8, 7), (50, 8, 7), (50, 8, 1),
                                              (50, 8, 3), (51, 8, 4), (7, 8, 2), (100, 16, 15), (100, 16, 5)])
def test_windows_score_every_token_but_the_first_exactly_once(n, context, stride):
  tokens = np.arange(n)  # each token is its own position
  if n < 2:
    with pytest.raises(evaluate_lib.EvaluateError, match="nothing to predict"):
      next(evaluate_lib.windows(tokens, context, stride, 4))
    return
  scored = np.zeros(n, int)
  for ids, weights in evaluate_lib.windows(tokens, context, stride, batch_size=3):
    assert ids.shape == (3, context) and weights.shape == (3, context - 1) and ids.dtype == np.int32
    for row, w in zip(ids, weights):
      for j in np.flatnonzero(w):  # target j is token j + 1 of the window
        scored[row[0] + j + 1] += 1
        if stride < context - 1 and row[0] > 0:
          assert j + 1 >= context - stride  # a sliding window scores only its last `stride` targets
  assert scored[0] == 0 and (scored[1:] == 1).all()


@pytest.mark.parametrize("n,most", [(50, 1), (50, 2), (50, 3), (9, 4), (120, 4), (120, 16), (300, 4)])
def test_calls_hold_windows_batches_in_order_spread_evenly_over_the_fewest_calls(n, most):
  tokens = np.arange(n)
  batches = list(evaluate_lib.windows(tokens, 8, 7, 3))
  got = list(evaluate_lib.calls(tokens, 8, 7, 3, most))
  assert len(got) == -(-len(batches) // most)  # the fewest calls
  K = got[0][0].shape[0]
  assert K <= most and len(got) * K - len(batches) < len(got)  # fewer empty batches than calls
  for ids, weights in got:
    assert ids.shape == (K, 3, 8) and weights.shape == (K, 3, 7) and ids.dtype == np.int32
  ids = np.concatenate([c[0] for c in got])
  weights = np.concatenate([c[1] for c in got])
  for k, (b_ids, b_weights) in enumerate(batches):
    assert (ids[k] == b_ids).all() and (weights[k] == b_weights).all()
  assert not weights[len(batches):].any()


def test_bad_stride_is_an_error():
  for stride in (0, 8, -1):
    with pytest.raises(evaluate_lib.EvaluateError, match="stride"):
      next(evaluate_lib.windows(np.arange(20), 8, stride, 4))


def small_model(context=16, vocab=64):
  config = load_config("tiny")
  config.data.seq_length = context
  model = model_lib.build(config, vocab)
  params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, context), jnp.int32))["params"]
  return model, params


def reference_nats(model, params, tokens, context, stride):
  """Sum of -log p over every token but the first, window by window, with no batching."""
  total, done = 0.0, 1  # tokens scored so far: [1, done)
  start = 0
  log_probs = jax.jit(lambda p, window: jax.nn.log_softmax(model.apply({"params": p}, window)[0], -1))
  while done < len(tokens):
    window = tokens[start:start + context]
    logp = log_probs(params, jnp.asarray(window[None], jnp.int32))
    for j in range(len(window) - 1):
      if start + j + 1 >= done:
        total += -float(logp[j, window[j + 1]])
    done = start + len(window)
    start += stride
  return total


@pytest.mark.parametrize("stride", [None, 5, 1])
def test_evaluate_is_exact_whatever_the_batch_size(stride):
  model, params = small_model()
  tokens = np.random.default_rng(0).integers(0, 64, 75).astype(np.uint16)
  token_bytes = np.arange(64) % 5 + 1
  eval_step = evaluate_lib.make_eval_step(model.apply)
  expected = reference_nats(model, params, tokens, 16, stride or 15)
  results = [evaluate_lib.evaluate(eval_step, params, tokens, token_bytes, 20, 16, stride, batch_size, per_call)
             for batch_size, per_call in ((1, 1), (3, 1), (16, 1), (1, 4), (3, 2), (2, 16))]
  for r in results:
    assert r["tokens"] == len(tokens) - 1
    assert r["loss"] == pytest.approx(expected / (len(tokens) - 1), rel=1e-5)
    assert r["loss"] == pytest.approx(results[0]["loss"], rel=1e-6)
    assert r["perplexity"] == pytest.approx(math.exp(r["loss"]), rel=1e-12)
    assert r["bytes"] == token_bytes[tokens[1:]].sum()
    assert r["bpb"] == pytest.approx(expected / (math.log(2) * r["bytes"]), rel=1e-5)
    assert r["word_perplexity"] == pytest.approx(math.exp(expected / 20), rel=1e-5)
    assert r["mode"] == ("disjoint windows of 16 tokens" if stride is None else
                         f"sliding window of 16 tokens, stride {stride}")


def test_a_batch_larger_than_the_split_shrinks_to_its_windows():
  model, params = small_model()
  tokens = np.random.default_rng(0).integers(0, 64, 75)  # 5 windows of 16 tokens
  step, shapes = evaluate_lib.make_eval_step(model.apply), []
  eval_step = lambda params, ids, weights: shapes.append(ids.shape) or step(params, ids, weights)  # noqa: E731
  small = evaluate_lib.evaluate(eval_step, params, tokens, np.ones(64, int), None, 16, batch_size=2)
  large = evaluate_lib.evaluate(eval_step, params, tokens, np.ones(64, int), None, 16, batch_size=100_000)
  on_4 = evaluate_lib.evaluate(eval_step, params, tokens, np.ones(64, int), None, 16, batch_size=100_000, multiple=4)
  assert shapes == [(1, 2, 16)] * 3 + [(1, 5, 16), (1, 8, 16)]
  assert large["loss"] == pytest.approx(small["loss"], rel=1e-6)
  assert on_4["loss"] == pytest.approx(small["loss"], rel=1e-6)


def test_a_split_shorter_than_the_context_is_one_forward_pass_in_every_mode():
  model, params = small_model()
  tokens = np.random.default_rng(1).integers(0, 64, 12)
  logits = model.apply({"params": params}, jnp.asarray(tokens[None], jnp.int32))
  expected = float(model_lib.next_token_losses(logits, jnp.asarray(tokens[None])).mean())
  eval_step = evaluate_lib.make_eval_step(model.apply)
  for stride in (None, 1, 7):
    r = evaluate_lib.evaluate(eval_step, params, tokens, np.ones(64, int), None, 16, stride)
    assert r["loss"] == pytest.approx(expected, rel=1e-6) and r["word_perplexity"] is None


def test_the_eval_step_sums_each_of_its_batches_as_a_call_of_that_batch_alone():
  model, params = small_model()
  ids, weights = next(evaluate_lib.calls(np.arange(200) % 64, 16, 15, 2, 3))
  eval_step = evaluate_lib.make_eval_step(model.apply)
  nats, counts = jax.device_get(eval_step(params, ids, weights))
  assert nats.shape == counts.shape == (3,) and (counts == 2 * 15).all()
  for k in range(3):
    alone = jax.device_get(eval_step(params, ids[k:k + 1], weights[k:k + 1]))
    assert alone[0][0] == pytest.approx(nats[k], rel=1e-6) and alone[1][0] == counts[k]


_MESH_EVAL = """
import json, sys
sys.path.insert(0, sys.argv[1])
import jax, numpy as np
from jaxlm import evaluate as evaluate_lib, sharding as sharding_lib
from conftest import load_config
from test_evaluate import small_model
model, params = small_model()
config = load_config("tiny")
config.mesh.data, config.mesh.fsdp, config.training.batch_size = 2, 2, 4
mesh = sharding_lib.make_mesh(config, jax.devices())
shardings = sharding_lib.state_shardings(mesh, jax.eval_shape(lambda: params))
tokens = np.random.default_rng(0).integers(0, 64, 300)
alone = evaluate_lib.evaluate(evaluate_lib.make_eval_step(model.apply), params, tokens, np.ones(64, int), None,
                              16, batch_size=4)
meshed = evaluate_lib.evaluate(evaluate_lib.make_eval_step(model.apply, mesh, shardings),
                               jax.device_put(params, shardings), tokens, np.ones(64, int), None, 16,
                               batch_size=4, per_call=3)
print(json.dumps([len(jax.devices()), alone["loss"], meshed["loss"], alone["tokens"], meshed["tokens"]]))
"""


def test_several_batches_per_call_split_over_a_mesh_of_4_devices_measure_as_one_device():
  done = subprocess.run([sys.executable, "-c", _MESH_EVAL, os.path.dirname(__file__)],
                        env=dict(devices_env(4), JAX_PLATFORMS="cpu"),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  devices, alone, meshed, tokens_alone, tokens_meshed = json.loads(done.stdout.splitlines()[-1])
  assert devices == 4 and tokens_alone == tokens_meshed == 299
  assert meshed == pytest.approx(alone, rel=1e-5)


def test_evaluate_stops_when_asked():
  model, params = small_model()
  eval_step = evaluate_lib.make_eval_step(model.apply)
  calls = []
  result = evaluate_lib.evaluate(eval_step, params, np.arange(500) % 64, np.ones(64, int), None, 16,
                                 batch_size=2, stop=lambda: calls.append(1) or len(calls) > 3)
  assert result is None and len(calls) == 4
  # Several batches per call: asked before each call (17 batches, 5 calls of 4)
  calls.clear()
  result = evaluate_lib.evaluate(eval_step, params, np.arange(500) % 64, np.ones(64, int), None, 16,
                                 batch_size=2, per_call=4, stop=lambda: calls.append(1) or False)
  assert result is not None and len(calls) == 5
  calls.clear()
  result = evaluate_lib.evaluate(eval_step, params, np.arange(500) % 64, np.ones(64, int), None, 16,
                                 batch_size=2, per_call=4, stop=lambda: calls.append(1) or len(calls) > 3)
  assert result is None and len(calls) == 4


def run_evaluate(*args, cwd):
  return subprocess.run([sys.executable, "-m", "jaxlm.evaluate", *args], cwd=cwd, env=subprocess_env(),
                        capture_output=True, text=True, timeout=180)


def test_evaluate_command_measures_a_checkpoint_from_the_workdir_alone(tiny_config, tmp_path):
  tiny_config.training.epochs = 1
  summary = run_lib.train_and_evaluate(tiny_config)
  corpus = data_lib.load(tiny_config)
  test_tokens = np.asarray(corpus.tokens["test"])
  words = corpus.meta["splits"]["test"]["words"]
  # The corpus moves and the data cache is gone: the split's text (--data_dir) and the work
  # directory are all evaluate needs.
  moved = str(tmp_path / "moved_corpus")
  shutil.move(tiny_config.data.data_dir, moved)
  shutil.rmtree(tiny_config.data.processed_dir)
  done = run_evaluate(f"--workdir={tiny_config.workdir}", f"--data_dir={moved}", "--json", cwd=tmp_path)
  assert done.returncode == 0, done.stderr
  result = json.loads(done.stdout)
  assert result["split"] == "test" and result["checkpoint"] == "best"
  assert result["tokens"] == len(test_tokens) - 1 and result["words"] == words
  assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
  assert result["word_perplexity"] == pytest.approx(math.exp(result["loss"] * result["tokens"] / words), rel=1e-9)
  # The training run's own test evaluation is the same function on the same tokens.
  assert result["loss"] == pytest.approx(summary["test_loss"], rel=1e-6)
  assert result["word_perplexity"] == pytest.approx(summary["test_word_perplexity"], rel=1e-6)
  assert result["mode"] == summary["test_mode"] == "disjoint windows of 32 tokens"

  sliding = run_evaluate(f"--workdir={tiny_config.workdir}", f"--data_dir={moved}", "--split=validation",
                         "--stride=8", "--checkpoint=last", cwd=tmp_path)
  assert sliding.returncode == 0, sliding.stderr
  line = sliding.stdout.strip()
  assert line.startswith("validation (sliding window of 32 tokens, stride 8): loss ") and "word ppl" in line


def test_a_finished_run_whose_best_was_moved_says_how_to_go_on(tiny_config, tmp_path):
  """The run's test, and the commands that read `best`, name the missing checkpoint and what to do;
  the command they suggest works, and putting `best` back tests as before."""
  tiny_config.training.epochs = 1
  summary = run_lib.train_and_evaluate(tiny_config)
  workdir, checkpoints = tiny_config.workdir, os.path.join(tiny_config.workdir, "checkpoints")
  os.rename(os.path.join(checkpoints, "best"), tmp_path / "best_aside")
  with pytest.raises(checkpoint_lib.CheckpointError) as error:
    run_lib.train_and_evaluate(tiny_config)
  command = f"python -m jaxlm.evaluate --workdir={workdir} --checkpoint=last"
  assert str(error.value) == (
      f"the run is trained (1 epoch(s), best epoch 1) but {checkpoints}/best, which the test measures, is missing "
      f"(moved or deleted?). Put it back and re-run the same command, or measure `last`: {command}")
  with pytest.raises(workdir_lib.WorkdirError) as error:
    workdir_lib.load(workdir)
  assert str(error.value) == (
      f"{workdir} has no `best` checkpoint (not saved yet, or moved or deleted); its `last` holds step 20: pass "
      f"--checkpoint=last to use that one")
  last = run_evaluate(*command.split()[3:], "--json", cwd=tmp_path)
  assert last.returncode == 0, last.stderr
  assert json.loads(last.stdout.strip().splitlines()[-1])["loss"] == pytest.approx(summary["test_loss"], rel=1e-6)
  os.rename(tmp_path / "best_aside", os.path.join(checkpoints, "best"))
  assert run_lib.train_and_evaluate(tiny_config) == summary


def test_evaluate_command_errors_are_one_line(tiny_config, tmp_path):
  missing = run_evaluate(f"--workdir={tmp_path / 'nowhere'}", cwd=tmp_path)
  assert missing.returncode == 1
  assert missing.stderr.strip().splitlines() == [
      f"error: the work directory '{tmp_path / 'nowhere'}' does not exist (pass a run's config.workdir, "
      f"e.g. runs/experiment_1)"]
  tiny_config.training.epochs = 1
  run_lib.train_and_evaluate(tiny_config)
  bad_stride = run_evaluate(f"--workdir={tiny_config.workdir}", "--stride=32", cwd=tmp_path)
  assert bad_stride.returncode == 2
  assert bad_stride.stderr.strip().splitlines() == ["error: --stride=32 must be between 1 and the context - 1 = 31"]
  no_text = run_evaluate(f"--workdir={tiny_config.workdir}", f"--data_dir={tmp_path / 'gone'}", cwd=tmp_path)
  assert no_text.returncode == 1 and no_text.stderr.strip().splitlines() == [
      f"error: the folder '{tmp_path / 'gone'}' is not there (from {tmp_path}): pass --data_dir=FOLDER holding the "
      f"test split's text"]
  a_file = os.path.join(tiny_config.data.data_dir, "test.txt")
  not_folder = run_evaluate(f"--workdir={tiny_config.workdir}", f"--data_dir={a_file}", cwd=tmp_path)
  assert not_folder.returncode == 1 and not_folder.stderr.strip().splitlines() == [
      f"error: the folder '{a_file}' is a file, not a folder: pass --data_dir=FOLDER holding the test split's text"]
  bad_batch = run_evaluate(f"--workdir={tiny_config.workdir}", "--batch_size=0", cwd=tmp_path)
  assert bad_batch.returncode == 2 and bad_batch.stderr.strip().splitlines() == ["error: --batch_size=0 must be >= 1"]
  no_flag = run_evaluate(cwd=tmp_path)
  assert no_flag.returncode == 2 and no_flag.stderr.startswith("error: ")
  os.rename(os.path.join(tiny_config.workdir, "checkpoints"), str(tmp_path / "elsewhere"))
  no_checkpoint = run_evaluate(f"--workdir={tiny_config.workdir}", cwd=tmp_path)
  assert no_checkpoint.returncode == 1
  assert no_checkpoint.stderr.strip().splitlines() == [
      f"error: {tiny_config.workdir} has no `best` checkpoint yet: train first (a run saves `last` during its "
      f"first epoch and `best` after its first validation)"]
