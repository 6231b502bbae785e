"""Fault injection (`pytest -m faults`): kill -9 at many points, a full disk, two runs on one work
directory, double Ctrl-C. Every interrupted run, re-run, must end bit-identical to an uninterrupted
one (CPU runs are deterministic), with its earlier checkpoints readable at every point.

Each case runs the real command line in subprocesses (tests/fault_child.py injects the fault); the
cases run two at a time (the CI machine has two cores).
"""
import concurrent.futures
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import BASE_CONFIG, ROOT, subprocess_env, write_corpus

pytestmark = pytest.mark.faults

CHILD = os.path.join(ROOT, "tests", "fault_child.py")
TIMING = {"epoch_time_s", "tokens_per_s", "mfu"}
# 40 articles: 35 steps per epoch of batch 8; `last` every 10 steps and at each epoch's end.
STEPS_PER_EPOCH, EPOCHS = 35, 2


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
  root = tmp_path_factory.mktemp("faults")
  write_corpus(root / "corpus", articles=(40, 3, 3))
  args = [f"--config={BASE_CONFIG}:tiny", f"--config.data.data_dir={root / 'corpus'}",
          f"--config.data.raw_dir={root / 'data' / 'raw'}",
          f"--config.data.processed_dir={root / 'data' / 'processed'}",
          "--config.device=cpu", f"--config.training.epochs={EPOCHS}", "--config.training.log_every_steps=5",
          "--config.training.checkpoint_every_steps=10", "--config.training.checkpoint_every_minutes=0"]
  reference = str(root / "reference")
  done = run(root, "none", args + [f"--config.workdir={reference}"])
  assert done.returncode == 0, done.stdout
  assert f"{EPOCHS * STEPS_PER_EPOCH} steps in {EPOCHS} epochs" in done.stdout
  return root, args, outcome(reference)


def run(cwd, fault: str, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-u", CHILD, fault, *args], cwd=cwd, env=subprocess_env(),
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)


def read_checkpoint(workdir: str, name: str) -> tuple[dict, dict]:
  """(arrays of the TrainState, meta) of the newest `name` checkpoint, read by orbax directly."""
  directory = os.path.join(workdir, "checkpoints", name)
  # The newest save: a kill between committing a save and deleting the one before leaves both.
  number = str(max(int(d) for d in os.listdir(directory) if d.isdigit()))
  with ocp.PyTreeCheckpointer() as checkpointer:
    state = checkpointer.restore(os.path.join(directory, number, "state"))
  with open(os.path.join(directory, number, "meta", "metadata")) as f:
    meta = json.load(f)
  return state, meta


def outcome(workdir: str) -> dict:
  """Everything a finished run leaves that must not depend on how often it was interrupted."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]
  with open(os.path.join(workdir, "test_metrics.json")) as f:
    test = json.load(f)
  events = EventAccumulator(os.path.join(workdir, "tensorboard"))
  events.Reload()
  curves = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
            if tag.startswith(("val/", "test/")) or tag in ("train/loss", "train/grad_norm", "train/learning_rate")}
  return {"rows": rows, "test": test, "curves": curves,
          "checkpoints": {name: read_checkpoint(workdir, name) for name in ("last", "best")}}


def assert_same(ours: dict, reference: dict, label: str) -> None:
  assert ours["rows"] == reference["rows"], label
  assert ours["test"] == reference["test"], label
  assert ours["curves"] == reference["curves"], label
  for name in ("last", "best"):
    (state, meta), (ref_state, ref_meta) = ours["checkpoints"][name], reference["checkpoints"][name]
    flat = dict(_flatten(state))
    ref = dict(_flatten(ref_state))
    assert flat.keys() == ref.keys(), label
    for key in ref:
      np.testing.assert_array_equal(flat[key], ref[key], err_msg=f"{label}: {name} {key}")
    assert {k: v for k, v in meta.items() if k != "config"} == {k: v for k, v in ref_meta.items() if k != "config"}


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, f"{prefix}/{k}")
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from _flatten(v, f"{prefix}/{i}")
  else:
    yield prefix, np.asarray(tree)


def readable(workdir: str) -> None:
  """What survived a fault reads back: every checkpoint there is, and metrics.jsonl line by line."""
  for name in ("last", "best"):
    if os.path.isdir(os.path.join(workdir, "checkpoints", name)) and any(
        d.isdigit() for d in os.listdir(os.path.join(workdir, "checkpoints", name))):
      read_checkpoint(workdir, name)
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      lines = f.read().split("\n")
    for line in lines[:-1]:  # a kill may cut the last line short; the resumed run drops it
      json.loads(line)


# Targeted: each kind of save (periodic, epoch end, best; while writing and just after), each
# evaluation, the sample, data preparation, right after a resume, several kills in a row.
# Global steps: saves of `last` at 10, 20, 30, 35 (epoch 1's end), 45, 55, 65, 70.
TARGETED = {
    "before any save": ["step:5"],
    "after a periodic save": ["step:12"],
    "at an epoch's last step": [f"step:{STEPS_PER_EPOCH}"],
    "at the first step of an epoch": [f"step:{STEPS_PER_EPOCH + 1}"],
    "at the run's last step": [f"step:{EPOCHS * STEPS_PER_EPOCH}"],
    "writing the first periodic save": ["save:last:1"],
    "writing epoch 1's last": ["save:last:4"],
    "writing the final last": ["save:last:8"],
    "writing best, epoch 1": ["save:best:1"],
    "writing best, epoch 2": ["save:best:2"],
    "between best and last": ["saved:best:1"],
    "just after epoch 1's last": ["saved:last:4"],
    "validating epoch 1": ["eval:1"],
    "validating epoch 2": ["eval:2"],
    "testing": ["eval:3"],
    "sampling": ["sample:1"],
    "right after a resume": ["step:15", "step:11"],
    "three in a row": ["save:last:2", "step:25", "eval:1"],
    "kill, then a kill during the resumed run's first save": ["step:8", "save:last:1"],
}


def run_scenario(setting, label: str, faults: list[str]) -> dict:
  root, args, _ = setting
  workdir = str(root / label.replace(" ", "_").replace(",", "").replace("'", ""))
  for fault in faults:
    done = run(root, fault, args + [f"--config.workdir={workdir}"])
    assert done.returncode == -signal.SIGKILL, f"{label} / {fault}: {done.returncode}\n{done.stdout[-2000:]}"
    readable(workdir)
    assert os.path.exists(os.path.join(workdir, "run.lock"))  # left by the killed run: stale, taken over
  done = run(root, "none", args + [f"--config.workdir={workdir}"])
  assert done.returncode == 0, f"{label}: {done.stdout[-3000:]}"
  assert "Traceback" not in done.stdout
  return outcome(workdir)


def run_all(setting, scenarios: dict) -> None:
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = {label: pool.submit(fn, label) for label, fn in scenarios.items()}
    for label, future in futures.items():
      assert_same(future.result(), setting[2], label)


def test_kill_9_at_targeted_points_then_resume_is_bit_identical(setting):
  run_all(setting, {label: lambda label, f=faults: run_scenario(setting, label, f)
                    for label, faults in TARGETED.items()})


def test_kill_9_at_random_times_then_resume_is_bit_identical(setting):
  root, args, _ = setting
  rng = random.Random(2026)

  def scenario(label):
    workdir = str(root / label)
    kills = 0
    for delay in (rng.uniform(1.5, 4.5), rng.uniform(1.5, 4.5)):  # a whole run takes about 5 s
      process = subprocess.Popen([sys.executable, CHILD, "none", *args, f"--config.workdir={workdir}"], cwd=root,
                                 env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
      time.sleep(delay)
      process.kill()
      kills += process.wait() == -signal.SIGKILL
      readable(workdir)
    assert kills >= 1, label  # at least one kill landed before the run ended
    done = run(root, "none", args + [f"--config.workdir={workdir}"])
    assert done.returncode == 0, done.stdout[-3000:]
    return outcome(workdir)

  run_all(setting, {f"random_{i}": scenario for i in range(3)})


def test_kill_9_while_preparing_the_data(setting, tmp_path):
  root, args, reference = setting
  args = [a for a in args if "processed_dir" not in a] + [f"--config.data.processed_dir={tmp_path / 'processed'}",
                                                          f"--config.workdir={tmp_path / 'run'}"]
  assert run(root, "prepare", args).returncode == -signal.SIGKILL
  assert [d for d in os.listdir(tmp_path / "processed") if not d.startswith(".tmp-")] == []  # no half cache
  done = run(root, "none", args)
  assert done.returncode == 0, done.stdout
  assert_same(outcome(str(tmp_path / "run")), reference, "prepare")


DOUBLE_CTRL_C = ["sigint:15", "sigint:40", "sigint:15:0.0", "sigint:20:0.3", "sigint:45:1.0"]


def test_double_ctrl_c_quits_cleanly_and_loses_nothing(setting):
  """A second Ctrl-C quits at once, except that a checkpoint being written is finished first:
  during the save the first one asked for (sigint:N), and at delays after the first (sigint:N:D)."""
  root, args, _ = setting

  def scenario(fault):
    workdir = root / fault.replace(":", "_")
    done = run(root, fault, args + [f"--config.workdir={workdir}"])
    # 130 = 128 + SIGINT; a second Ctrl-C that lands after the run has stopped and said so (Python
    # shutting down, SIGINT back to its default) ends the process by the signal, which a shell also
    # reports as 130.
    stopped = "the checkpoint `last` holds it" in done.stdout
    assert done.returncode == 130 or (stopped and done.returncode == -signal.SIGINT), done.stdout
    assert "Traceback" not in done.stdout and "SIGINT: stopping" in done.stdout
    readable(str(workdir))
    if len(fault.split(":")) == 2:  # the second Ctrl-C came during the save: the save completed
      assert "quitting as soon as the checkpoint being written is complete" in done.stdout
      _, meta = read_checkpoint(str(workdir), "last")
      assert meta["global_step"] == int(fault.split(":")[1])  # the call under way (one step on a CPU)
    done = run(root, "none", args + [f"--config.workdir={workdir}"])
    assert done.returncode == 0, done.stdout
    leftovers = [d for name in ("last", "best") for d in os.listdir(workdir / "checkpoints" / name)
                 if not d.isdigit()]
    assert leftovers == []  # a save abandoned half-way is cleaned up by the next run
    return outcome(str(workdir))

  run_all(setting, {fault: scenario for fault in DOUBLE_CTRL_C})


def test_two_runs_on_one_work_directory(setting, tmp_path):
  root, args, reference = setting
  args = args + [f"--config.workdir={tmp_path / 'run'}"]
  first = subprocess.Popen([sys.executable, "-u", CHILD, "none", *args], cwd=root, env=subprocess_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in first.stdout:
    if line.startswith("compiled the train step"):
      break
  started = time.monotonic()
  second = run(root, "none", args)
  assert second.returncode == 1 and time.monotonic() - started < 30
  assert second.stdout.strip().splitlines()[-1].startswith(
      f"error: the work directory {tmp_path / 'run'} is in use by another run (pid {first.pid} on host ")
  assert "devices:" not in second.stdout  # stopped before any work
  first.stdout.read()
  assert first.wait(timeout=120) == 0
  assert_same(outcome(str(tmp_path / "run")), reference, "two runs")
  assert not os.path.exists(tmp_path / "run" / "run.lock")  # released on exit


def small_disk(tmp_path, size: str) -> tuple:
  """(tmp_path/disk, a command prefix that runs a command with a `size` tmpfs mounted there, in a
  private mount namespace: as root, or as a user where user namespaces are allowed); the test is
  skipped where neither works."""
  disk = tmp_path / "disk"
  disk.mkdir()
  for unshare in (["unshare", "-m"], ["unshare", "-rm"]):
    probe = subprocess.run(unshare + ["sh", "-c", f"mount -t tmpfs -o size={size} tmpfs {disk}"],
                           capture_output=True)
    if probe.returncode == 0:
      return disk, unshare + ["sh", "-c", f'mount -t tmpfs -o size={size} tmpfs {disk} && exec "$@"', "sh"]
  pytest.skip("cannot mount a small tmpfs here (needs root or user namespaces)")


def test_a_full_disk_stops_the_run_with_one_line_and_keeps_what_was_saved(setting, tmp_path):
  root, args, _ = setting
  disk, prefix = small_disk(tmp_path, "700k")  # the first save (`last` at step 10, about 400 KB) fits, no more
  workdir = disk / "run"
  script = (f"{sys.executable} -u {CHILD} none {' '.join(args)} --config.workdir={workdir} "
            f">{tmp_path}/out 2>{tmp_path}/err; echo $? >{tmp_path}/rc; "
            f"{sys.executable} -m jaxlm.inspect {workdir} >{tmp_path}/inspect 2>&1")
  started = time.monotonic()
  subprocess.run(prefix + ["sh", "-c", script], cwd=root, env=subprocess_env(), timeout=120)
  assert time.monotonic() - started < 60  # it stops: no thread is left to hang on
  err = (tmp_path / "err").read_text()
  assert (tmp_path / "rc").read_text().strip() == "1"
  assert err.strip().splitlines() == [line for line in err.strip().splitlines() if line.startswith("error: ")]
  assert len(err.strip().splitlines()) == 1 and "No space left on device" in err
  assert "The checkpoints saved before it are intact" in err
  assert "Traceback" not in (tmp_path / "out").read_text()
  inspected = (tmp_path / "inspect").read_text().splitlines()  # what was saved before the disk filled reads
  assert inspected[0].endswith("checkpoints") and inspected[1].startswith("last: in epoch 1, step 10, ")


def test_a_disk_full_from_the_start_is_one_line_and_leaves_no_work_directory(setting, tmp_path):
  root, args, _ = setting
  disk, prefix = small_disk(tmp_path, "64k")
  workdir = disk / "run"
  script = (f"cat /dev/zero >{disk}/filler 2>/dev/null; {sys.executable} -u {CHILD} none {' '.join(args)} "
            f"--config.workdir={workdir} >{tmp_path}/out 2>{tmp_path}/err; echo $? >{tmp_path}/rc; "
            f"ls -A {disk} >{tmp_path}/left")
  subprocess.run(prefix + ["sh", "-c", script], cwd=root, env=subprocess_env(), timeout=120)
  assert (tmp_path / "rc").read_text().strip() == "1"
  assert (tmp_path / "err").read_text().splitlines() == [f"error: No space left on device: {workdir}/run.lock"]
  assert (tmp_path / "left").read_text().split() == ["filler"]  # the work directory it made is removed


@pytest.mark.parametrize("folder", ["raw_dir", "processed_dir"])
def test_a_full_disk_while_preparing_the_data_is_one_line_naming_the_folder(tmp_path, folder):
  """The datasets library wraps a full disk in its own error types: the message still names the
  folder that is full (data.raw_dir, its cache of the read files; data.processed_dir, the tokens)."""
  write_corpus(tmp_path / "corpus")
  disk, prefix = small_disk(tmp_path, "20k")
  dirs = {"raw_dir": tmp_path / "raw", "processed_dir": tmp_path / "processed", folder: disk / folder}
  done = subprocess.run(prefix + [sys.executable, "-m", "jaxlm.data", f"--config={BASE_CONFIG}:tiny",
                                  f"--config.data.data_dir={tmp_path / 'corpus'}",
                                  *[f"--config.data.{key}={path}" for key, path in dirs.items()]],
                        cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert done.returncode == 1, done.stdout + done.stderr
  what = "the datasets cache" if folder == "raw_dir" else "the data cache"
  assert done.stderr.splitlines() == [
      f"error: cannot write {what} in {disk / folder} (No space left on device). Point "
      f"--config.data.{folder} at a writable folder with free space."]
