"""The whole training run on the tiny config, with real files on disk."""
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pandas as pd
import pytest
from flax.training import train_state
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import data as data_lib
from jaxlm import evaluate as evaluate_lib
from jaxlm import inspect as inspect_lib
from jaxlm import metrics as metrics_lib
from jaxlm import run as run_lib
from jaxlm import train as train_lib
from jaxlm import workdir as workdir_lib

import fault_child
from conftest import BASE_CONFIG, signal_as_the_test_ends, signal_here, subprocess_env, write_corpus

METRIC_KEYS = {"epoch", "global_step", "train_loss", "val_loss", "val_perplexity", "val_bpb", "learning_rate",
               "epoch_time_s", "tokens_per_s"}
TIMING_KEYS = {"epoch_time_s", "tokens_per_s", "mfu"}


def abstract_state(config, vocab_size):
  return train_lib.setup(config, vocab_size, num_steps=1000).abstract_state  # what a checkpoint restores into


def restore(workdir, name, config, vocab_size):
  checkpoints = checkpoint_lib.Checkpoints(workdir, writer=False)
  try:
    return checkpoints.restore(name, abstract_state(config, vocab_size))
  finally:
    checkpoints.close()


def assert_same_tree(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def read_metrics(workdir):
  return pd.read_json(os.path.join(workdir, "metrics.jsonl"), lines=True)


def test_full_run_writes_metrics_events_and_checkpoints(tiny_config):
  summary = run_lib.train_and_evaluate(tiny_config)
  workdir = tiny_config.workdir
  vocab = data_lib.load(tiny_config).vocab_size

  df = read_metrics(workdir)  # as the original guide reads it
  assert METRIC_KEYS <= set(df.columns)
  assert df["epoch"].tolist() == [1, 2]
  steps_per_epoch = df["global_step"][0]
  assert df["global_step"].tolist() == [steps_per_epoch, 2 * steps_per_epoch]
  np.testing.assert_allclose(df["val_perplexity"], np.exp(df["val_loss"]), rtol=1e-12)  # math.exp vs np.exp: an ulp
  assert df["val_loss"][1] < df["val_loss"][0] < np.log(vocab)  # it learns
  assert (df["tokens_per_s"] > 0).all() and (df["val_bpb"] > 0).all()

  events = scalars(workdir)
  assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_s", "val/loss",
          "val/perplexity", "val/bpb", "test/loss"} <= set(events)
  np.testing.assert_allclose([v for _, v in events["val/loss"]], df["val_loss"], rtol=1e-6)
  assert [s for s, _ in events["val/loss"]] == df["global_step"].tolist()
  train_steps = [s for s, _ in events["train/loss"]]
  assert train_steps[0] == tiny_config.training.log_every_steps and len(train_steps) >= 3

  last, last_meta = restore(workdir, "last", tiny_config, vocab)
  best, best_meta = restore(workdir, "best", tiny_config, vocab)
  assert int(last.step) == last_meta["global_step"] == 2 * steps_per_epoch and last_meta["epoch"] == 2
  assert int(best.step) == best_meta["global_step"]  # val improved at epoch 2, so best is last
  assert_same_tree(last.params, best.params)
  assert_same_tree(last.opt_state, best.opt_state)  # the schedule's count travels in the optimizer state
  assert best_meta["best_val_loss"] == pytest.approx(df["val_loss"].min())
  assert last_meta["bad_epochs"] == 0 and last_meta["config"]["model"]["d_model"] == 32

  with open(os.path.join(workdir, "test_metrics.json")) as f:
    test_metrics = json.load(f)
  assert test_metrics == json.loads(json.dumps(summary))
  assert summary["test_perplexity"] == pytest.approx(np.exp(summary["test_loss"]))
  assert summary["test_mode"] == "disjoint windows of 32 tokens" and summary["test_word_perplexity"] > 1
  assert (df["val_word_perplexity"] > df["val_perplexity"]).all()  # more than one token per word
  # Samples from the fixed prompt after each validation, in TensorBoard's text tab.
  samples = text_events(workdir, "sample")
  assert [step for step, _ in samples] == df["global_step"].tolist()
  assert all(text.startswith(tiny_config.sample.prompt) and len(text) > len(tiny_config.sample.prompt)
             for _, text in samples)
  # The work directory holds what using the model needs: its config and its tokenizer.
  with open(os.path.join(workdir, "tokenizer.json")) as f, open(os.path.join(data_lib.load(tiny_config).path,
                                                                            "tokenizer.json")) as g:
    assert f.read() == g.read()
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f) == tiny_config.to_dict()
  report = inspect_lib.describe(workdir)
  assert f"last: after epoch 2, step {2 * steps_per_epoch:,}" in report
  assert f"{summary['num_params']:,} parameters" in report

  # Re-running a finished run resumes, finds nothing to do and tests again.
  again = run_lib.train_and_evaluate(tiny_config)
  assert again == summary
  assert len(read_metrics(workdir)) == 2


def test_saves_within_epochs_change_nothing_but_how_much_a_crash_loses(tiny_config, tmp_path):
  reference = tiny_config.copy_and_resolve_references()
  reference.workdir = str(tmp_path / "reference")
  reference.training.checkpoint_every_minutes = 0.0
  summary = run_lib.train_and_evaluate(reference)
  tiny_config.training.checkpoint_every_minutes = 0.0005  # 30 ms: several times per epoch
  assert run_lib.train_and_evaluate(tiny_config) == summary
  saves = int(os.listdir(os.path.join(tiny_config.workdir, "checkpoints", "last"))[0])  # orbax numbers the saves
  assert saves > 2 * tiny_config.training.epochs
  assert os.listdir(os.path.join(reference.workdir, "checkpoints", "last")) == [str(tiny_config.training.epochs)]
  ours, _ = restore(tiny_config.workdir, "last", tiny_config, data_lib.load(tiny_config).vocab_size)
  theirs, _ = restore(reference.workdir, "last", reference, data_lib.load(reference).vocab_size)
  assert_same_tree(ours.params, theirs.params)


def test_early_stopping_after_exactly_patience_epochs_and_best_only_on_improvement(tiny_config):
  tiny_config.training.learning_rate = 0.0  # nothing changes after epoch 1: no improvement ever
  tiny_config.training.min_learning_rate = 0.0
  tiny_config.training.epochs = 6
  tiny_config.training.patience = 3
  summary = run_lib.train_and_evaluate(tiny_config)
  df = read_metrics(tiny_config.workdir)
  assert df["epoch"].tolist() == [1, 2, 3, 4]  # 1 improvement (from nothing), then 3 without
  assert df["improved"].tolist() == [True, False, False, False]
  assert summary["stopped_early"] and summary["best_epoch"] == 1
  checkpoints = checkpoint_lib.Checkpoints(tiny_config.workdir, writer=False)
  steps_per_epoch = int(df["global_step"][0])
  assert checkpoints.step("best") == steps_per_epoch  # written once, at epoch 1
  assert checkpoints.step("last") == 4 * steps_per_epoch
  assert checkpoints.restore_meta("last")["bad_epochs"] == 3
  checkpoints.close()
  # A stopped run stays stopped when re-run.
  run_lib.train_and_evaluate(tiny_config)
  assert len(read_metrics(tiny_config.workdir)) == 4


def run_cli(args, cwd, **kwargs):
  return subprocess.Popen([sys.executable, "-u", "-m", "jaxlm.main", f"--config={BASE_CONFIG}:tiny", *args],
                          cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kwargs)


def cli_overrides(config):
  return [f"--config.data.data_dir={config.data.data_dir}", f"--config.data.raw_dir={config.data.raw_dir}",
          f"--config.data.processed_dir={config.data.processed_dir}", f"--config.workdir={config.workdir}",
          "--config.device=cpu", f"--config.training.log_every_steps={config.training.log_every_steps}",
          f"--config.training.epochs={config.training.epochs}"]


def test_interrupted_cli_run_resumes_to_the_same_result(tiny_config, tmp_path):
  """SIGTERM (a cluster's preemption) mid-run through the CLI, then the same command again: the
  final parameters, optimizer state, metrics and TensorBoard curves equal an uninterrupted run's."""
  write_corpus(tiny_config.data.data_dir, articles=(120, 3, 3))  # long enough epochs to interrupt
  tiny_config.training.epochs = 2
  tiny_config.training.log_every_steps = 5
  reference = tiny_config.copy_and_resolve_references()
  reference.workdir = str(tmp_path / "uninterrupted")
  run_lib.train_and_evaluate(reference)
  total = int(read_metrics(reference.workdir)["global_step"].iloc[-1])

  process = run_cli(cli_overrides(tiny_config), cwd=tmp_path)
  output = []
  for line in process.stdout:
    output.append(line)
    if line.startswith("epoch 1/2 step "):  # the first progress line: training is under way
      process.send_signal(signal.SIGTERM)
      break
  output += process.stdout.readlines()
  assert process.wait(timeout=120) == 128 + signal.SIGTERM, "".join(output)
  text = "".join(output)
  assert "SIGTERM: stopping once the steps already under way are done, and saving a checkpoint" in text
  assert "Re-run the same command to resume" in text and "Traceback" not in text
  checkpoints = checkpoint_lib.Checkpoints(tiny_config.workdir, writer=False)
  interrupted_at = checkpoints.step("last")
  checkpoints.close()
  assert 0 < interrupted_at < total

  resumed = run_cli(cli_overrides(tiny_config), cwd=tmp_path)
  text = resumed.communicate(timeout=300)[0]
  assert resumed.returncode == 0, text
  assert f"resuming from {os.path.abspath(tiny_config.workdir)}/checkpoints/last" in text
  vocab = data_lib.load(tiny_config).vocab_size
  for name in ("last", "best"):
    ours, ours_meta = restore(tiny_config.workdir, name, tiny_config, vocab)
    theirs, theirs_meta = restore(reference.workdir, name, reference, vocab)
    assert_same_tree(ours.params, theirs.params)
    assert_same_tree(ours.opt_state, theirs.opt_state)
    assert int(ours.step) == int(theirs.step)
  a, b = read_metrics(tiny_config.workdir), read_metrics(reference.workdir)
  columns = sorted(set(a.columns) - TIMING_KEYS)
  pd.testing.assert_frame_equal(a[columns], b[columns])
  ours, theirs = scalars(tiny_config.workdir), scalars(reference.workdir)
  # Every point, once, with the same values: the training curves' means over a logging interval too,
  # the one a stop cut included (its first steps are kept in the checkpoint).
  for tag in ("val/loss", "val/bpb", "train/learning_rate", "train/loss", "train/grad_norm", "test/loss"):
    assert ours[tag] == theirs[tag], tag


def text_events(workdir, tag) -> list[tuple[int, str]]:
  events = EventAccumulator(os.path.join(workdir, "tensorboard"))
  events.Reload()
  return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(f"{tag}/text_summary")]


def test_the_work_directory_lock_admits_one_run(tmp_path):
  workdir = str(tmp_path / "run")
  workdir_lib.create(workdir)
  lock_file = os.path.join(workdir, "run.lock")
  with workdir_lib.Lock(workdir):
    with open(lock_file) as f:
      assert json.load(f)["pid"] == os.getpid()
    with pytest.raises(workdir_lib.WorkdirError, match=rf"{workdir} is in use by another run \(pid {os.getpid()} "
                                                        rf"on host .*, started .*\)\. Wait for it"):
      workdir_lib.Lock(workdir).__enter__()
  assert not os.path.exists(lock_file)  # released
  with open(lock_file, "w") as f:  # left by a killed run: its process is gone, so is its flock
    json.dump({"host": "elsewhere", "pid": 1, "started": "yesterday"}, f)
  with workdir_lib.Lock(workdir):
    with open(lock_file) as f:
      assert json.load(f)["pid"] == os.getpid()


def scalars(workdir) -> dict:
  """{tag: [(step, value), ...]} as TensorBoard shows them (purged points left out)."""
  events = EventAccumulator(os.path.join(workdir, "tensorboard"))
  events.Reload()
  return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def interrupt_after(monkeypatch, global_step):
  """Sends this process SIGINT while the run makes step `global_step` (as Ctrl-C would): just before
  the call of the train steps that runs it, so that the run stops when that call is done."""
  real = train_lib.compile_train_steps

  def compile_train_steps(s, state, seqs, order, num_steps):
    program, seconds = real(s, state, seqs, order, num_steps)

    def run(state, *args):
      if int(state.step) < global_step <= int(state.step) + num_steps:
        signal.raise_signal(signal.SIGINT)
      return program(state, *args)
    return run, seconds

  monkeypatch.setattr(train_lib, "compile_train_steps", compile_train_steps)


def test_ctrl_c_anywhere_then_resume_gives_the_uninterrupted_run(tiny_config, tmp_path, monkeypatch, capsys):
  tiny_config.training.epochs = 2
  reference = tiny_config.copy_and_resolve_references()
  reference.workdir = str(tmp_path / "uninterrupted")
  reference_summary = run_lib.train_and_evaluate(reference)
  steps_per_epoch = int(read_metrics(reference.workdir)["global_step"][0])
  # Mid-epoch, an epoch's last step, the step after it, the run's last step.
  for at in (7, steps_per_epoch, steps_per_epoch + 1, 2 * steps_per_epoch):
    tiny_config.workdir = str(tmp_path / f"interrupted_at_{at}")
    interrupt_after(monkeypatch, at)
    with pytest.raises(run_lib.Interrupted, match=f"SIGINT at step {at}"):
      run_lib.train_and_evaluate(tiny_config)
    monkeypatch.undo()
    assert checkpoint_lib.Checkpoints(tiny_config.workdir, writer=False).step("last") == at
    assert run_lib.train_and_evaluate(tiny_config) == reference_summary
    vocab = data_lib.load(tiny_config).vocab_size
    for name in ("last", "best"):
      ours, ours_meta = restore(tiny_config.workdir, name, tiny_config, vocab)
      theirs, theirs_meta = restore(reference.workdir, name, reference, vocab)
      assert_same_tree(ours.params, theirs.params)
      assert ours_meta["epoch"] == theirs_meta["epoch"] and ours_meta["best_val_loss"] == theirs_meta["best_val_loss"]
    a, b = read_metrics(tiny_config.workdir), read_metrics(reference.workdir)
    columns = sorted(set(a.columns) - TIMING_KEYS)
    pd.testing.assert_frame_equal(a[columns], b[columns])
    ours, theirs = scalars(tiny_config.workdir), scalars(reference.workdir)
    # Every training point is logged once, with the same value: a stop's interval by the resumed run.
    for tag in ("val/loss", "train/loss", "train/grad_norm"):
      assert ours[tag] == theirs[tag], tag


def test_a_run_started_with_sigint_ignored_keeps_ignoring_it(tiny_config, monkeypatch):
  """As a shell without job control starts a background job (`python -m jaxlm.main ... &` in a
  script): a Ctrl-C meant for the job in the foreground reaches it too, and must not stop it."""
  reference = tiny_config.copy_and_resolve_references()
  reference.workdir = reference.workdir + "-uninterrupted"
  want = run_lib.train_and_evaluate(reference)
  interrupt_after(monkeypatch, 7)
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
  try:
    summary = run_lib.train_and_evaluate(tiny_config)
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # left as the run found it
  finally:
    signal.signal(signal.SIGINT, previous)
  assert summary == want


def test_a_ctrl_c_while_the_fresh_state_compiles_stops_the_run_once_the_compile_is_done(tiny_config, monkeypatch):
  """KeyboardInterrupt raised inside XLA's compile could crash Python on its way out (status 139)."""
  real, compiled = train_lib.init_state, []

  def init_state(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C as the compile starts
    compiled.append(real(*args, **kwargs))
    return compiled[-1]

  monkeypatch.setattr(train_lib, "init_state", init_state)
  with pytest.raises(KeyboardInterrupt):
    run_lib.train_and_evaluate(tiny_config)
  assert compiled and not os.path.exists(os.path.join(tiny_config.workdir, "checkpoints"))


def test_a_ctrl_c_that_python_drops_while_the_data_is_prepared_stops_the_run_at_once(tiny_config, monkeypatch):
  """A Ctrl-C whose KeyboardInterrupt is raised inside a garbage collector's callback is printed as
  "Exception ignored" and dropped (seen in JAX's, while the data was tokenized): the run must not
  go on to train for hours."""
  real_load, dropped, loaded = data_lib.load, [], []

  def load(*args, **kwargs):
    dropped.append(fault_child.drop_a_sigint())
    time.sleep(5)  # as a long tokenization: the signal, delivered again, ends it
    loaded.append(real_load(*args, **kwargs))
    return loaded[-1]

  monkeypatch.setattr(data_lib, "load", load)
  with pytest.raises(KeyboardInterrupt):
    run_lib.train_and_evaluate(tiny_config)
  assert dropped == [True]  # raised inside the callback, where Python dropped it
  assert not loaded  # delivered again at once, not after the data is prepared
  assert not os.path.exists(os.path.join(tiny_config.workdir, "metrics.jsonl"))  # no step was trained


def test_a_ctrl_c_dropped_just_before_training_stops_the_run_once(tiny_config, monkeypatch):
  """Dropped as the setup ends, before it is sent again: `training` stops the run itself, and the
  signal is not sent again into the run's unwinding (where it would be a second Ctrl-C)."""
  real_training = run_lib._StopRequest.training

  def training(self):
    assert fault_child.drop_a_sigint()
    real_training(self)

  monkeypatch.setattr(run_lib._StopRequest, "training", training)
  with pytest.raises(KeyboardInterrupt):
    run_lib.train_and_evaluate(tiny_config)
  time.sleep(0.5)  # a KeyboardInterrupt sent again would land here
  assert not os.path.exists(os.path.join(tiny_config.workdir, "metrics.jsonl"))


def test_a_ctrl_c_once_the_run_is_tested_quits_at_once(tiny_config, monkeypatch):
  """Once the test's evaluation is done, a Ctrl-C ends the command (status 130), not a request to
  stop that nothing would read any more; the results are not written, and re-running tests again."""
  real_closing = run_lib._StopRequest.closing

  def closing(self):
    real_closing(self)
    signal_here(signal.SIGINT)  # Ctrl-C as the run closes

  with monkeypatch.context() as m:
    m.setattr(run_lib._StopRequest, "closing", closing)
    with pytest.raises(KeyboardInterrupt):
      run_lib.train_and_evaluate(tiny_config)
  assert not os.path.exists(os.path.join(tiny_config.workdir, "test_metrics.json"))
  summary = run_lib.train_and_evaluate(tiny_config)
  assert summary["epochs"] == tiny_config.training.epochs
  assert os.path.exists(os.path.join(tiny_config.workdir, "test_metrics.json"))


def test_a_stop_during_the_test_says_so_and_the_same_command_tests_again(tiny_config, monkeypatch, capsys):
  """SIGTERM (a preemption) while `best` is tested: the message is about the test, not a checkpoint
  to save; the run stops untested, and re-running it tests. A stop that comes as the test's last
  batch ends lets the finished test stand (the run is complete)."""
  tiny_config.training.epochs = 1
  real_testing = run_lib._StopRequest.testing

  def testing(self):
    real_testing(self)
    signal_here(signal.SIGTERM)

  with monkeypatch.context() as m:
    m.setattr(run_lib._StopRequest, "testing", testing)
    with pytest.raises(run_lib.Interrupted, match="SIGTERM"):
      run_lib.train_and_evaluate(tiny_config)
  out = capsys.readouterr().out
  assert "SIGTERM: stopping the test; the trained run is saved, and re-running the same command tests it" in out
  assert "saving a checkpoint" not in out
  assert not os.path.exists(os.path.join(tiny_config.workdir, "test_metrics.json"))

  with monkeypatch.context() as m:
    signal_as_the_test_ends(m)
    summary = run_lib.train_and_evaluate(tiny_config)
  assert "the test ended before the stop could: the run is complete" in capsys.readouterr().out
  with open(os.path.join(tiny_config.workdir, "test_metrics.json")) as f:
    assert json.load(f) == summary


def test_a_run_resumed_within_the_same_second_keeps_the_earlier_event_file(tmp_path, monkeypatch):
  """tensorboardX names an event file by the second it opens and truncates an existing one: a run
  stopped and resumed within one second must still keep the stopped run's points."""
  logdir = str(tmp_path / "tensorboard")
  with monkeypatch.context() as m:
    m.setattr(time, "time", lambda: 1796000000.5)  # both processes open their file in this second
    first = metrics_lib.TensorBoard(logdir, resume_step=0)
    first.scalars(5, {"loss": 2.0}, "train")
    first.close()
    resumed = metrics_lib.TensorBoard(logdir, resume_step=7)
    resumed.scalars(10, {"loss": 1.0}, "train")
    resumed.close()
  assert first.path != resumed.path and sorted([first.path, resumed.path]) == [first.path, resumed.path]
  events = EventAccumulator(logdir)
  events.Reload()
  assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(5, 2.0), (10, 1.0)]


def test_several_steps_per_call_train_as_single_steps_and_resume_exactly(tiny_config, tmp_path, monkeypatch,
                                                                        capsys):
  """A lax.scan over k steps (the default on a GPU) makes the same updates as k calls of one step,
  including the single steps up to a log line or the epoch's end, and a stop lands after its call."""
  reference = tiny_config.copy_and_resolve_references()
  reference.workdir = str(tmp_path / "single_steps")
  reference.training.steps_per_call = 1
  reference_summary = run_lib.train_and_evaluate(reference)
  tiny_config.training.steps_per_call = 3  # divides neither log_every_steps (5) nor the epoch (20 steps)
  tiny_config.workdir = str(tmp_path / "three_per_call")
  interrupt_after(monkeypatch, 7)  # calls: steps 1-3, then 4 and 5 singly, then 6-8
  with pytest.raises(run_lib.Interrupted, match="SIGINT at step 8"):
    run_lib.train_and_evaluate(tiny_config)
  monkeypatch.undo()
  assert "compiled the train step (3 step(s) per call)" in capsys.readouterr().out
  summary = run_lib.train_and_evaluate(tiny_config)
  assert "compiled the train step (1 step(s) per call)" in capsys.readouterr().out
  assert summary == reference_summary
  vocab = data_lib.load(tiny_config).vocab_size
  ours, _ = restore(tiny_config.workdir, "last", tiny_config, vocab)
  theirs, _ = restore(reference.workdir, "last", reference, vocab)
  assert_same_tree((ours.params, ours.opt_state, ours.step), (theirs.params, theirs.opt_state, theirs.step))
  a, b = read_metrics(tiny_config.workdir), read_metrics(reference.workdir)
  columns = sorted(set(a.columns) - TIMING_KEYS)
  pd.testing.assert_frame_equal(a[columns], b[columns])
  ours, theirs = scalars(tiny_config.workdir)["train/loss"], scalars(reference.workdir)["train/loss"]
  assert ours == theirs  # the interval a stop cut (steps 6-10) too


def test_progress_is_logged_with_its_rate_when_the_call_after_a_log_line_compiles(tiny_config, capsys):
  """A log line's metrics wait for the next call; when that call needs a new program (single steps
  up to a save), they are logged before the compile, which restarts the progress clock."""
  tiny_config.training.epochs = 1
  tiny_config.training.steps_per_call = 5
  tiny_config.training.checkpoint_every_steps = 7  # after step 5: single steps up to the save at 7
  run_lib.train_and_evaluate(tiny_config)
  lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1 step ")]
  assert [line.split()[3] for line in lines] == ["5/20", "10/20", "15/20", "20/20"]
  assert not [line for line in lines if " 0 tok/s" in line], lines
  rates = scalars(tiny_config.workdir)["train/tokens_per_s"]
  assert [s for s, _ in rates] == [5, 10, 15, 20] and min(r for _, r in rates) > 0


def test_the_weights_moving_average_is_evaluated_kept_and_used_and_resumes_exactly(tiny_config, tmp_path,
                                                                                    monkeypatch):
  """training.ema_decay: validation and test measure the average, `best` keeps it beside the
  parameters, inference loads it, and a run interrupted mid-epoch ends as the uninterrupted one."""
  tiny_config.training.ema_decay = 0.9
  reference = tiny_config.copy_and_resolve_references()
  reference.workdir = str(tmp_path / "uninterrupted")
  reference_summary = run_lib.train_and_evaluate(reference)
  tiny_config.workdir = str(tmp_path / "interrupted")
  interrupt_after(monkeypatch, 7)
  with pytest.raises(run_lib.Interrupted, match="SIGINT at step 7"):
    run_lib.train_and_evaluate(tiny_config)
  monkeypatch.undo()
  assert run_lib.train_and_evaluate(tiny_config) == reference_summary
  corpus = data_lib.load(tiny_config)
  best, meta = restore(tiny_config.workdir, "best", tiny_config, corpus.vocab_size)
  theirs, _ = restore(reference.workdir, "best", reference, corpus.vocab_size)
  assert_same_tree((best.params, best.ema_params, best.opt_state), (theirs.params, theirs.ema_params, theirs.opt_state))
  assert not np.allclose(best.ema_params["tok_emb"], best.params["tok_emb"])

  trained = workdir_lib.load(tiny_config.workdir, "best", "cpu")
  assert_same_tree(trained.params, best.ema_params)
  eval_step = evaluate_lib.make_eval_step(trained.model.apply)
  measure = lambda params, split: evaluate_lib.evaluate(  # noqa: E731
      eval_step, params, corpus.tokens[split], corpus.token_bytes, corpus.meta["splits"][split]["words"],
      tiny_config.data.seq_length, batch_size=tiny_config.training.eval_batch_size)["loss"]
  assert measure(trained.params, "validation") == pytest.approx(meta["best_val_loss"], rel=1e-6)
  assert measure(trained.params, "test") == pytest.approx(reference_summary["test_loss"], rel=1e-6)
  assert measure(jax.device_get(best.params), "test") != pytest.approx(reference_summary["test_loss"], rel=1e-4)


def test_checkpoints_saved_before_the_moving_average_existed_resume_exactly(tiny_config, tmp_path, monkeypatch):
  """`last` and `best` written by a TrainState without ema_params (jaxlm before training.ema_decay)
  resume and test as the uninterrupted run; turning the average on for them is refused by name."""
  reference = tiny_config.copy_and_resolve_references()
  reference.workdir = str(tmp_path / "uninterrupted")
  reference_summary = run_lib.train_and_evaluate(reference)
  interrupt_after(monkeypatch, 25)  # in epoch 2: `best` is epoch 1's
  with pytest.raises(run_lib.Interrupted):
    run_lib.train_and_evaluate(tiny_config)
  monkeypatch.undo()

  class EarlierTrainState(train_state.TrainState):
    dropout_key: jax.Array

  vocab = data_lib.load(tiny_config).vocab_size
  with checkpoint_lib.Checkpoints(tiny_config.workdir) as checkpoints:
    for name in checkpoint_lib.NAMES:
      state, meta = restore(tiny_config.workdir, name, tiny_config, vocab)
      earlier = EarlierTrainState(step=state.step, apply_fn=None, params=state.params, tx=None,
                                  opt_state=state.opt_state, dropout_key=state.dropout_key)
      checkpoints.save(name, earlier, meta, wait=True)
  on = tiny_config.copy_and_resolve_references()
  on.training.ema_decay = 0.9
  with pytest.raises(checkpoint_lib.CheckpointError, match=r"training.ema_decay 0.0 -> 0.9 \(a moving average"):
    run_lib.train_and_evaluate(on)
  assert run_lib.train_and_evaluate(tiny_config) == reference_summary


def test_shifted_windows_train_on_new_windows_each_epoch_and_resume_exactly(tiny_config, tmp_path, monkeypatch,
                                                                           capsys):
  """data.shift_windows: the windows move every epoch (the run differs from the unshifted one from
  the epoch whose offset is not 0), and a run stopped mid-epoch resumes onto the same windows."""
  tiny_config.training.epochs = 2
  unshifted = tiny_config.copy_and_resolve_references()
  unshifted.workdir = str(tmp_path / "unshifted")
  run_lib.train_and_evaluate(unshifted)
  tiny_config.data.shift_windows = True
  reference = tiny_config.copy_and_resolve_references()
  reference.workdir = str(tmp_path / "shifted")
  reference_summary = run_lib.train_and_evaluate(reference)
  assert "the windows start at a new offset every epoch" in capsys.readouterr().out
  L, seed = tiny_config.data.seq_length, tiny_config.training.seed
  assert [data_lib.window_offset(seed, e, L) for e in (1, 2)] != [0, 0]  # else this test shows nothing
  a, b = read_metrics(reference.workdir), read_metrics(unshifted.workdir)
  assert not np.allclose(a["train_loss"], b["train_loss"])
  steps_per_epoch = int(a["global_step"][0])
  tokens = len(data_lib.load(tiny_config).tokens["train"])
  assert steps_per_epoch == data_lib.num_train_windows(tokens, L, shift=True) // tiny_config.training.batch_size
  tiny_config.workdir = str(tmp_path / "interrupted")
  interrupt_after(monkeypatch, steps_per_epoch + 3)
  with pytest.raises(run_lib.Interrupted):
    run_lib.train_and_evaluate(tiny_config)
  monkeypatch.undo()
  assert run_lib.train_and_evaluate(tiny_config) == reference_summary
  vocab = data_lib.load(tiny_config).vocab_size
  ours, _ = restore(tiny_config.workdir, "last", tiny_config, vocab)
  theirs, _ = restore(reference.workdir, "last", reference, vocab)
  assert_same_tree(ours.params, theirs.params)
  unshifted.workdir = tiny_config.workdir  # the setting shapes the data: no resuming across it
  with pytest.raises(checkpoint_lib.CheckpointError, match="data.shift_windows True -> False"):
    run_lib.train_and_evaluate(unshifted)


def test_saves_every_n_steps_land_on_their_step_with_several_steps_per_call(tiny_config, monkeypatch):
  tiny_config.training.steps_per_call = 3
  tiny_config.training.checkpoint_every_steps = 7
  tiny_config.training.checkpoint_every_minutes = 0.0
  saved = []
  real = checkpoint_lib.Checkpoints.save

  def save(self, name, state, meta, wait=False):
    if name == "last":
      saved.append(meta["global_step"])
    return real(self, name, state, meta, wait=wait)

  monkeypatch.setattr(checkpoint_lib.Checkpoints, "save", save)
  run_lib.train_and_evaluate(tiny_config)
  assert saved == [7, 14, 20, 27, 34, 40]  # every 7 steps since the last save; each epoch's end (20 steps)


def test_crash_between_saving_best_and_last_resumes_correctly(tiny_config, tmp_path):
  """The process died after epoch 2's `best` was written but before its `last`: the resumed run
  redoes epoch 2 and ends as the uninterrupted run."""
  tiny_config.training.epochs = 2
  reference = tiny_config.copy_and_resolve_references()
  reference.workdir = str(tmp_path / "uninterrupted")
  reference_summary = run_lib.train_and_evaluate(reference)
  tiny_config.training.num_steps = int(read_metrics(reference.workdir)["global_step"].iloc[-1])
  tiny_config.training.epochs = 1
  run_lib.train_and_evaluate(tiny_config)
  best_dir = os.path.join(reference.workdir, "checkpoints", "best")
  (step,) = os.listdir(best_dir)
  shutil.copytree(os.path.join(best_dir, step), os.path.join(tiny_config.workdir, "checkpoints", "best", step))
  tiny_config.training.epochs = 2
  assert run_lib.train_and_evaluate(tiny_config)["test_loss"] == reference_summary["test_loss"]
  vocab = data_lib.load(tiny_config).vocab_size
  ours, _ = restore(tiny_config.workdir, "last", tiny_config, vocab)
  theirs, _ = restore(reference.workdir, "last", reference, vocab)
  assert_same_tree(ours.params, theirs.params)


def test_a_run_whose_last_is_missing_resumes_from_best_to_the_same_result(tiny_config, tmp_path, capsys):
  """`last` gone while `best` is there: after a kill between the first epoch's two saves, or moved
  away after the run. The run goes on from `best` (a whole state) and ends as the uninterrupted run,
  instead of starting over on top of the old run's files."""
  tiny_config.training.epochs = 3
  reference = tiny_config.copy_and_resolve_references()
  reference.workdir = str(tmp_path / "uninterrupted")
  run_lib.train_and_evaluate(reference)
  df_ref = read_metrics(reference.workdir)
  reference_test = json.load(open(os.path.join(reference.workdir, "test_metrics.json")))
  vocab = data_lib.load(tiny_config).vocab_size
  theirs, _ = restore(reference.workdir, "last", reference, vocab)
  columns = sorted(set(df_ref.columns) - TIMING_KEYS)
  # The first epoch's `best` saved, its `last` not yet.
  tiny_config.training.num_steps = int(df_ref["global_step"].iloc[-1])
  tiny_config.training.epochs = 1
  run_lib.train_and_evaluate(tiny_config)
  shutil.rmtree(os.path.join(tiny_config.workdir, "checkpoints", "last"))
  first_epoch = read_metrics(tiny_config.workdir).iloc[0]
  # The finished run's `last` moved away, its `best` one of an earlier epoch: the later ones are redone.
  moved = tmp_path / "moved"
  shutil.copytree(reference.workdir, moved)
  shutil.rmtree(moved / "checkpoints")
  shutil.copytree(os.path.join(tiny_config.workdir, "checkpoints"), moved / "checkpoints")
  for workdir in (tiny_config.workdir, str(moved)):
    config = tiny_config.copy_and_resolve_references()
    config.workdir, config.training.epochs = workdir, 3
    capsys.readouterr()
    summary = run_lib.train_and_evaluate(config)
    assert f"{workdir}/checkpoints/last is missing: resuming from `best` instead" in capsys.readouterr().out
    df = read_metrics(workdir)
    pd.testing.assert_frame_equal(df[columns], df_ref[columns])
    assert {k: summary[k] for k in reference_test} == reference_test
    ours, _ = restore(workdir, "last", config, vocab)
    assert_same_tree(ours.params, theirs.params)
  assert read_metrics(tiny_config.workdir).iloc[0]["epoch_time_s"] == first_epoch["epoch_time_s"]  # not redone


@pytest.mark.parametrize("path", ["checkpoints", "checkpoints/last", "checkpoints/best"])
def test_a_checkpoint_path_that_is_a_file_is_refused_before_anything_is_written(tiny_config, path):
  os.makedirs(os.path.dirname(os.path.join(tiny_config.workdir, path)), exist_ok=True)
  with open(os.path.join(tiny_config.workdir, path), "w") as f:
    f.write("not a checkpoint")
  with pytest.raises(checkpoint_lib.CheckpointError, match=rf"{path} is not a directory, where orbax keeps the "
                                                           r"checkpoints: move it out of the way"):
    run_lib.train_and_evaluate(tiny_config)
  assert sorted(os.listdir(tiny_config.workdir)) == ["checkpoints"]
  assert not os.path.exists(tiny_config.data.processed_dir)  # refused before the data was prepared


def test_resume_at_an_epoch_boundary_continues_the_same_run(tiny_config, tmp_path, capsys):
  tiny_config.training.epochs = 3
  reference = tiny_config.copy_and_resolve_references()
  reference.workdir = str(tmp_path / "uninterrupted")
  run_lib.train_and_evaluate(reference)
  df_ref = read_metrics(reference.workdir)
  # The same run stopped after one epoch (the schedule pinned to the full run's length), then resumed.
  tiny_config.training.num_steps = int(df_ref["global_step"].iloc[-1])
  reference_summary = json.load(open(os.path.join(reference.workdir, "test_metrics.json")))
  tiny_config.training.epochs = 1
  run_lib.train_and_evaluate(tiny_config)
  tiny_config.training.epochs = 3
  summary = run_lib.train_and_evaluate(tiny_config)
  assert "resuming with changed settings: training.epochs 1 -> 3" in capsys.readouterr().out
  df = read_metrics(tiny_config.workdir)
  columns = sorted(set(df.columns) - TIMING_KEYS)
  pd.testing.assert_frame_equal(df[columns], df_ref[columns])
  assert summary["test_loss"] == reference_summary["test_loss"]


def test_a_resumed_run_holds_one_state_and_tests_best_with_its_weights_alone(tiny_config, monkeypatch):
  """A resume restores into the state's shapes (no fresh state made beside it), and the test reads
  `best`'s weights, not its optimizer state: a model that fits when it starts fits when it resumes."""
  def live_bytes():  # of the distinct buffers (orbax's copies for a save share theirs on a CPU)
    gc.collect()
    return sum(dict((s.data.unsafe_buffer_pointer(), s.data.nbytes)
                    for a in jax.live_arrays() for s in a.addressable_shards).values())

  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
  seen = []  # (what, bytes live beyond those before the run, the state's, its parameters')
  real_epoch, real_evaluate = run_lib._Run.train_epoch, run_lib._Run.evaluate

  def train_epoch(self, epoch):
    seen.append((f"epoch {epoch}", live_bytes() - before, nbytes(self.state), nbytes(self.state.params)))
    return real_epoch(self, epoch)

  def evaluate(self, split, params=None):
    if split == "test":
      seen.append(("test", live_bytes() - before, nbytes(self.state), nbytes(self.state.params)))
    return real_evaluate(self, split, params)

  made, restored = [], []  # fresh states made; whole states restored (not the weights alone)
  real_init, real_restore = train_lib.init_state, checkpoint_lib.Checkpoints.restore
  monkeypatch.setattr(train_lib, "init_state", lambda s: made.append(1) or real_init(s))
  monkeypatch.setattr(checkpoint_lib.Checkpoints, "restore",
                      lambda self, name, target: restored.append(name) or real_restore(self, name, target))
  monkeypatch.setattr(run_lib._Run, "train_epoch", train_epoch)
  monkeypatch.setattr(run_lib._Run, "evaluate", evaluate)
  tiny_config.training.epochs = 1
  before = live_bytes()
  run_lib.train_and_evaluate(tiny_config)
  assert (made, restored) == ([1], [])
  tiny_config.training.epochs = 2
  before = live_bytes()
  run_lib.train_and_evaluate(tiny_config)
  assert (made, restored) == ([1], ["last"])  # the resume made no fresh state, the test no whole `best`
  assert [what for what, *_ in seen] == ["epoch 1", "test", "epoch 2", "test"]
  for what, live, state, params in seen:
    # The state is its parameters, Adam's two moments and a few scalars; beside it the train split
    # (160 x 32 tokens), and while testing `best`'s weights: one state where two used to be.
    assert 3 * params <= state < 3 * params + 100
    assert live < state + (2 * params if what == "test" else params), (what, live, state)


def test_more_epochs_on_resume_warns_that_the_schedule_changes(tiny_config, capsys):
  tiny_config.training.epochs = 1
  run_lib.train_and_evaluate(tiny_config)
  steps_per_epoch = int(read_metrics(tiny_config.workdir)["global_step"][0])
  tiny_config.training.epochs = 2
  capsys.readouterr()
  run_lib.train_and_evaluate(tiny_config)
  assert (f"the learning-rate schedule now spans {2 * steps_per_epoch:,} steps instead of "
          f"{steps_per_epoch:,}: the rate jumps to the new curve at step {steps_per_epoch:,}. Keep it with "
          f"--config.training.num_steps={steps_per_epoch}.") in capsys.readouterr().out


def test_a_run_resumes_on_its_corpus_moved_elsewhere_and_refuses_another_corpus(tiny_config, tmp_path, capsys):
  """The corpus is recognised by its files' contents, not by the folder's name or place."""
  tiny_config.training.epochs = 1
  run_lib.train_and_evaluate(tiny_config)
  moved = tmp_path / "elsewhere" / "wikitext"
  original, tiny_config.data.data_dir = tiny_config.data.data_dir, str(moved)
  shutil.copytree(original, moved)
  tiny_config.training.epochs = 2
  capsys.readouterr()
  run_lib.train_and_evaluate(tiny_config)
  assert f"resuming from {os.path.abspath(tiny_config.workdir)}/checkpoints/last: 1 epoch(s) done" in \
      capsys.readouterr().out
  assert len(read_metrics(tiny_config.workdir)) == 2
  write_corpus(moved, seed=1)  # other text in the same folder
  tiny_config.training.epochs = 3
  caches = sorted(os.listdir(tiny_config.data.processed_dir))
  with pytest.raises(checkpoint_lib.CheckpointError, match=r"data \(tokenized corpus\) wikitext-bpe\d+-\w+ -> "
                                                           r"wikitext-bpe\d+-\w+: other text or tokenizer\)"):
    run_lib.train_and_evaluate(tiny_config)
  # Refused before its data was prepared: no tokenizer trained on the other text, no cache made.
  assert sorted(os.listdir(tiny_config.data.processed_dir)) == caches
  tiny_config.data.data_dir = original  # the run's own text, another tokenizer
  tiny_config.data.tokenizer.vocab_size += 8
  with pytest.raises(checkpoint_lib.CheckpointError, match=r"other text or tokenizer\)"):
    run_lib.train_and_evaluate(tiny_config)
  assert sorted(os.listdir(tiny_config.data.processed_dir)) == caches


def test_cli_overrides_reach_the_run_and_inspect_reports_it(tiny_config, tmp_path):
  process = run_cli(cli_overrides(tiny_config) + ["--config.model.d_model=48", "--config.model.num_heads=3",
                                                  "--config.training.epochs=1"], cwd=tmp_path)
  text = process.communicate(timeout=300)[0]
  assert process.returncode == 0, text
  with open(os.path.join(tiny_config.workdir, "config.json")) as f:
    written = json.load(f)
  assert written["model"]["d_model"] == 48 and written["model"]["num_heads"] == 3
  assert written["training"]["epochs"] == 1
  assert read_metrics(tiny_config.workdir)["epoch"].tolist() == [1]
  assert "d_model: 48" in text  # the config is printed
  inspected = subprocess.run([sys.executable, "-m", "jaxlm.inspect", tiny_config.workdir], cwd=tmp_path,
                             env=subprocess_env(), capture_output=True, text=True)
  params = int(re.search(r"^model: ([\d,]+) parameters", text, re.M).group(1).replace(",", ""))
  assert inspected.returncode == 0 and f"{params:,} parameters" in inspected.stdout
  assert "last: after epoch 1" in inspected.stdout and "best: after epoch 1" in inspected.stdout
  missing = subprocess.run([sys.executable, "-m", "jaxlm.inspect", str(tmp_path / "nowhere")], cwd=tmp_path,
                           env=subprocess_env(), capture_output=True, text=True)
  assert missing.returncode == 1 and missing.stderr.startswith("error: no checkpoints in")


def test_bad_config_on_the_command_line_is_one_clear_error(tiny_config, tmp_path):
  process = run_cli(cli_overrides(tiny_config) + ["--config.model.d_model=33"], cwd=tmp_path)
  text = process.communicate(timeout=120)[0]
  assert process.returncode == 1
  assert text.strip().splitlines()[-1] == ("error: config key 'model.d_model' = 33 must be divisible by "
                                           "'model.num_heads' = 2")
  assert not os.path.exists(tiny_config.workdir)


def test_a_train_split_smaller_than_one_batch_is_one_clear_error(tiny_config):
  tiny_config.training.batch_size = 512
  with pytest.raises(data_lib.DataError, match=r"the train split has [\d,]+ tokens: too few for one batch of 512 "
                                               r"sequences of data.seq_length = 32\. Use more data"):
    run_lib.train_and_evaluate(tiny_config)
  assert not os.path.exists(os.path.join(tiny_config.workdir, "checkpoints"))


def test_diverging_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tiny_config):
  tiny_config.training.epochs = 1
  tiny_config.training.num_steps = 1000
  run_lib.train_and_evaluate(tiny_config)
  before = read_metrics(tiny_config.workdir)
  tiny_config.training.epochs = 2
  tiny_config.training.learning_rate = 1e30  # diverges within a few steps
  with pytest.raises(run_lib.TrainingError, match=r"the training diverged by step [\d,]+ \(epoch 2, loss .*, "
                                                    r"gradient norm .*Nothing after step 20 was saved; the "
                                                    r"checkpoints .* are intact"):
    run_lib.train_and_evaluate(tiny_config)
  checkpoints = checkpoint_lib.Checkpoints(tiny_config.workdir, writer=False)
  assert checkpoints.restore_meta("last")["epoch"] == 1
  checkpoints.close()
  pd.testing.assert_frame_equal(read_metrics(tiny_config.workdir), before)


@pytest.mark.parametrize("in_sweep", [False, True])
def test_a_validation_loss_that_is_not_finite_stops_the_run_with_advice_it_can_follow(tiny_config, monkeypatch,
                                                                                        in_sweep):
  """(With finite training losses: e.g. a validation window the training never saw.) A sweep's point
  cannot be re-run with --fresh or another learning rate, so its message stops at the diagnosis."""
  real_evaluate = run_lib._Run.evaluate

  def evaluate(self, split, params=None):
    result = real_evaluate(self, split, params)
    return {**result, "loss": float("nan")} if split == "validation" else result

  monkeypatch.setattr(run_lib._Run, "evaluate", evaluate)
  with pytest.raises(run_lib.TrainingError) as e:
    run_lib.train_and_evaluate(tiny_config, in_sweep=in_sweep)
  advice = "" if in_sweep else " Lower --config.training.learning_rate and re-run with --fresh."
  assert str(e.value) == "the validation loss is nan after epoch 1: training diverged." + advice
  with checkpoint_lib.Checkpoints(tiny_config.workdir, writer=False) as checkpoints:
    assert not checkpoints.exists("best")  # nothing validated is saved as the best


def test_a_divergence_logged_once_the_next_call_is_queued_is_caught_before_that_calls_save(tiny_config):
  """A log line's metrics are fetched after the next call is dispatched: a loss that diverged by the
  log line at step 25 still stops the run before the save due after step 26."""
  tiny_config.training.epochs = 1
  tiny_config.training.num_steps = 1000
  run_lib.train_and_evaluate(tiny_config)
  tiny_config.training.epochs = 2
  tiny_config.training.learning_rate = 1e30
  tiny_config.training.checkpoint_every_steps = 6  # `last` due at step 26
  with pytest.raises(run_lib.TrainingError, match=r"the training diverged by step 25 \(epoch 2,.*Nothing after "
                                                    r"step 20 was saved"):
    run_lib.train_and_evaluate(tiny_config)
  checkpoints = checkpoint_lib.Checkpoints(tiny_config.workdir, writer=False)
  assert checkpoints.restore_meta("last")["global_step"] == 20
  checkpoints.close()


def test_damaged_checkpoint_is_one_clear_error(tiny_config):
  tiny_config.training.epochs = 1
  run_lib.train_and_evaluate(tiny_config)
  last = os.path.join(tiny_config.workdir, "checkpoints", "last")
  step_dir = os.path.join(last, os.listdir(last)[0])
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"garbage")
  with pytest.raises(checkpoint_lib.CheckpointError, match=r"cannot be read .* Move it out of the way \(nothing "
                     r"is deleted\) and re-run: training resumes from the other checkpoint"):
    run_lib.train_and_evaluate(tiny_config)
  assert os.path.isdir(step_dir)  # nothing deleted
  os.rename(last, last + ".damaged")  # as the message says: the run then resumes from `best`
  summary = run_lib.train_and_evaluate(tiny_config)
  with checkpoint_lib.Checkpoints(tiny_config.workdir, writer=False) as checkpoints:
    assert summary["global_step"] == checkpoints.step("best")


def test_the_device_running_out_of_memory_in_a_restore_is_not_called_a_damaged_checkpoint(tiny_config, monkeypatch):
  """A resume's restore is its state's first allocation on the devices: XLA's out-of-memory error
  there reaches the command line as such ("make the work smaller"), not as "move the checkpoint
  aside". (Injected: a CPU cannot run out of memory on cue.)"""
  tiny_config.training.epochs = 1
  run_lib.train_and_evaluate(tiny_config)
  real = ocp.CheckpointManager.restore

  def restore(self, step, args=None):
    if "state" in args:  # the arrays; the metadata alone still reads
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00TiB.")
    return real(self, step, args=args)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", restore)
  tiny_config.training.epochs = 2
  with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
    run_lib.train_and_evaluate(tiny_config)


def test_incompatible_config_refuses_to_resume_and_fresh_keeps_the_old_run(tiny_config):
  tiny_config.training.epochs = 1
  run_lib.train_and_evaluate(tiny_config)
  tiny_config.model.d_model = 64
  with open(os.path.join(tiny_config.workdir, "config.json")) as f:
    written = f.read()
  with pytest.raises(checkpoint_lib.CheckpointError, match=r"model.d_model 32 -> 64"):
    run_lib.train_and_evaluate(tiny_config)
  with open(os.path.join(tiny_config.workdir, "config.json")) as f:
    assert f.read() == written  # the refused config is not recorded as the run's
  summary = run_lib.train_and_evaluate(tiny_config, fresh=True)
  parent = os.path.dirname(tiny_config.workdir)
  aside = [d for d in os.listdir(parent) if d.startswith("run.old-")]
  assert len(aside) == 1
  assert os.path.isfile(os.path.join(parent, aside[0], "metrics.jsonl"))
  assert summary["epochs"] == 1 and len(read_metrics(tiny_config.workdir)) == 1
  shutil.rmtree(os.path.join(parent, aside[0]))
