"""One run over several devices and processes (jaxlm.sharding): the same losses as on one device.

The runs over 4 devices are real `python -m jaxlm.main` processes on this machine's CPU, which XLA
splits into 4 devices (--xla_force_host_platform_device_count=4); the two-process run joins two such
processes of 2 devices each through jax.distributed on localhost, with CPU collectives (gloo).
Tolerance: relative 2e-5 on every logged loss (measured differences: about 1e-7, float32 sums in
another order).
"""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import run as run_lib
from jaxlm import sharding as sharding_lib
from jaxlm.cli import UsageError

from conftest import BASE_CONFIG, load_config, subprocess_env
from test_train import cli_overrides, read_metrics, scalars

RTOL = 2e-5


# The tiny config with layers wide enough that fsdp shards their kernels (MIN_SHARDED_SIZE), and the
# schedule of two epochs of 20 steps, so that a one-epoch run resumes on the same schedule.
WIDER = {"model.d_model": 64, "model.d_ff": 256, "training.num_steps": 40}


def wider(config):
  for key, value in WIDER.items():
    node, name = config_lib.lookup(config, key)
    node[name] = value
  return config


def child_args(config, workdir, *extra):
  """`python -m jaxlm.main` on `config`'s corpus and settings (as test_train's cli_overrides), made
  WIDER, in `workdir`."""
  return [sys.executable, "-u", "-m", "jaxlm.main", f"--config={BASE_CONFIG}:tiny", *cli_overrides(config),
          f"--config.workdir={workdir}", *(f"--config.{key}={value}" for key, value in WIDER.items()), *extra]


def devices_env(count: int) -> dict:
  return subprocess_env(XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}")


def run_child(config, workdir, *extra, devices: int = 4) -> str:
  result = subprocess.run(child_args(config, workdir, *extra), env=devices_env(devices), capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def losses(workdir) -> dict:
  """Every loss a run logs: per logged interval (TensorBoard) and per epoch (metrics.jsonl)."""
  epochs = read_metrics(workdir)
  return {"train": [v for _, v in scalars(workdir)["train/loss"]], "val": list(epochs["val_loss"]),
          "train_epoch": list(epochs["train_loss"]),
          "test": json.load(open(os.path.join(workdir, "test_metrics.json")))["test_loss"]}


def assert_same_losses(got: dict, want: dict):
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=RTOL, err_msg=key)


def start_two_processes(args, env, extra=((), ())):
  """Popen of `args` (and `extra`[i]) as process i = 0, 1 of a jax.distributed run on localhost."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  return [subprocess.Popen(args + [*extra[i], f"--coordinator_address=localhost:{port}", "--num_processes=2",
                                   f"--process_id={i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for i in range(2)]


def finish(procs, timeout: float = 120) -> list[tuple[str, str]]:
  """(stdout, stderr) of each process once all have ended; a hang kills them all and fails the test
  with what they wrote (not leaving them to JAX's timeouts)."""
  deadline = time.monotonic() + timeout
  try:
    return [p.communicate(timeout=max(0.1, deadline - time.monotonic())) for p in procs]
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    outs = [p.communicate() for p in procs]
    pytest.fail(f"the processes were still running after {timeout} s:\n" +
                "\n".join(f"process {i}:\n{out[-2000:]}\n{err[-2000:]}" for i, (out, err) in enumerate(outs)))


@pytest.fixture
def reference(tiny_config):
  """The run on this process's one device: what every layout must reproduce."""
  run_lib.train_and_evaluate(wider(tiny_config))
  return tiny_config, losses(tiny_config.workdir)


def test_four_devices_data_parallel_and_fsdp_match_one_device_and_checkpoints_move_4_to_1_1_to_4(reference, tmp_path):
  config, want = reference
  # Evaluation batches of 6 windows become 8 (2 per device), the 2 extra weighted 0: losses stay exact.
  out = run_child(config, tmp_path / "data4", "--config.training.eval_batch_size=6")
  assert "training on 4 x cpu (cpu) in 1 process(es), mesh data 4 x fsdp 1" in out
  assert_same_losses(losses(tmp_path / "data4"), want)

  # fsdp=2 x data=2, stopped after epoch 1; its checkpoint then resumes on one device (4 -> 1).
  out = run_child(config, tmp_path / "fsdp", "--config.mesh.fsdp=2", "--config.training.epochs=1")
  assert "mesh data 2 x fsdp 2" in out
  out = run_child(config, tmp_path / "fsdp", "--config.training.epochs=2", devices=1)
  assert "resuming from" in out and "mesh data 1 x fsdp 1" in out
  assert_same_losses(losses(tmp_path / "fsdp"), want)

  # And 1 -> 4: epoch 1 on this process's one device, epoch 2 on 4 devices, fsdp 4.
  one = config.copy_and_resolve_references()
  one.workdir, one.training.epochs = str(tmp_path / "grow"), 1
  run_lib.train_and_evaluate(one)
  out = run_child(config, tmp_path / "grow", "--config.mesh.data=1", "--config.mesh.fsdp=4")
  assert "resuming from" in out and "mesh data 1 x fsdp 4" in out
  assert_same_losses(losses(tmp_path / "grow"), want)


def test_two_processes_train_checkpoint_and_resume_as_one_device(reference, tmp_path):
  """jax.distributed on localhost: 2 processes x 2 CPU devices, fsdp=2 x data=2. Epoch 1, then the
  same command again for epoch 2 (a resume); only process 0 prints."""
  config, want = reference
  workdir = tmp_path / "two"
  for epochs, saves in ((1, 3), (2, 6)):
    # Saves every 7 steps between log lines (every 5) land on their steps as in one process: 7, 14,
    # the epoch's end (20); then 27, 34, 40. Orbax numbers the saves.
    args = child_args(config, workdir, "--config.mesh.fsdp=2", f"--config.training.epochs={epochs}",
                      "--config.training.checkpoint_every_steps=7")
    procs = start_two_processes(args, devices_env(2))
    outs = finish(procs, timeout=300)
    for p, (out, err) in zip(procs, outs):
      assert p.returncode == 0, out[-3000:] + err[-3000:]
    assert "training on 4 x cpu (cpu) in 2 process(es), mesh data 2 x fsdp 2" in outs[0][0]
    assert outs[1][0] == ""  # process 1 says nothing: process 0 speaks for the run
    assert os.listdir(workdir / "checkpoints" / "last") == [str(saves)]
  assert "resuming from" in outs[0][0]
  assert_same_losses(losses(workdir), want)


def test_a_failure_on_process_0_stops_both_processes_at_once(tiny_config, tmp_path):
  """Process 0 alone prepares the data; when that fails, process 1 stops too (not after JAX's
  5-minute shutdown timeout), each with one line."""
  procs = start_two_processes(child_args(tiny_config, tmp_path / "run", f"--config.data.data_dir={tmp_path / 'none'}"),
                              devices_env(2))
  outs = finish(procs)
  assert [p.returncode for p in procs] == [1, 1]
  missing = f"data.data_dir '{tmp_path / 'none'}' is not a directory"
  assert outs[0][1].strip().splitlines()[-1].startswith(f"error: {missing}. Point --config.data.data_dir at")
  last = outs[1][1].strip().splitlines()[-1]
  assert last.startswith(f"error: process 0 left the run ({missing}") and last.endswith("); its output says more")


def test_processes_started_with_other_settings_stop_before_any_work(tiny_config, tmp_path):
  """Each process would otherwise update its copy of the weights with its own learning rate: the
  copies drift apart, and `best` is not the model that was validated."""
  procs = start_two_processes(child_args(tiny_config, tmp_path / "run"), devices_env(1),
                              extra=((), ("--config.training.learning_rate=0.03",)))
  outs = finish(procs)
  assert [p.returncode for p in procs] == [1, 1], outs[0][1][-2000:] + outs[1][1][-2000:]
  for _, err in outs:
    assert err.strip().splitlines()[-1] == ("error: the processes have different settings: process(es) 1 differ "
                                            "from process 0. Start every process with the same command (config and "
                                            "flags) and data.")
  assert not os.path.exists(tmp_path / "run")


def test_a_failed_write_on_process_0_stops_both_processes_at_once(tiny_config, tmp_path):
  """Only process 0 writes TensorBoard; when its disk is full, both processes stop with one line each
  (not by JAX's heartbeat timeout, a minute or more later)."""
  args = child_args(tiny_config, tmp_path / "run")
  fault = [args[0], "-u", os.path.join(os.path.dirname(__file__), "fault_child.py"), "tbfull:2", *args[4:]]
  procs = start_two_processes(fault, devices_env(2))
  outs = finish(procs)
  assert [p.returncode for p in procs] == [1, 1], outs[0][1][-2000:] + outs[1][1][-2000:]
  assert outs[0][1].strip().splitlines()[-1] == "error: No space left on device"
  assert outs[1][1].strip().splitlines()[-1] == ("error: process 0 left the run ([Errno 28] No space left on device); "
                                                 "its output says more")


def test_ctrl_c_on_one_process_stops_both_and_saves(tiny_config, tmp_path):
  """SIGINT to process 1 alone: both processes agree at the next log line, save `last` together and
  exit 130; the saved step is that log line's."""
  procs = start_two_processes(child_args(tiny_config, tmp_path / "run", "--config.training.epochs=50"),
                              devices_env(2))
  for line in procs[0].stdout:
    if line.startswith("epoch 2/"):
      procs[1].send_signal(signal.SIGINT)
      break
  outs = finish(procs)
  assert [p.returncode for p in procs] == [130, 130], outs[0][1][-2000:] + outs[1][1][-2000:]
  stopped = re.search(r"interrupted by SIGINT at step (\d+)", outs[0][0])
  assert stopped, outs[0][0][-2000:]
  step = int(stopped.group(1))
  assert step % tiny_config.training.log_every_steps == 0
  assert checkpoint_lib.Checkpoints(tmp_path / "run", writer=False).step("last") == step


def test_a_ctrl_c_that_python_drops_on_one_process_while_setting_up_stops_both(tiny_config, tmp_path):
  """Process 1's SIGINT, raised inside a garbage collector's callback while it loads the data, is
  dropped by Python: it still stops process 1 before its first step, as a Ctrl-C it had not
  dropped would, and process 0 with it."""
  args = child_args(tiny_config, tmp_path / "run")
  fault = [args[0], "-u", os.path.join(os.path.dirname(__file__), "fault_child.py"), "dropsigint:1", *args[4:]]
  procs = start_two_processes(fault, devices_env(2))
  outs = finish(procs, timeout=60)
  assert [p.returncode for p in procs] == [1, 130], outs[0][1][-2000:] + outs[1][1][-2000:]
  assert "step 5/" not in outs[0][0]
  assert outs[0][1].strip().splitlines()[-1] == ("error: process 1 left the run (interrupted by SIGINT); its output "
                                                 "says more")
  assert outs[1][1].strip().splitlines()[-1] == "interrupted; what was already saved is intact"


@pytest.mark.parametrize("where,how", [("compile", "sigint"), ("restore", "sigint"), ("compile", "sigterm"),
                                       ("compile", "fail"), ("restore", "fail")])
def test_a_process_stopping_alone_while_setting_up_stops_the_other_at_once(tiny_config, tmp_path, where, how):
  """Process 1 stops on a Ctrl-C or SIGTERM or fails before training, as it starts compiling or restoring
  `last`; process 0, by then inside one of orbax's barriers (opening the checkpoints, restoring) or
  waiting for process 1 to agree, ends within seconds with one line, instead of waiting there until
  JAX's or orbax's 5-minute timeouts abort both."""
  args = child_args(tiny_config, tmp_path / "run")
  if where == "restore":  # a checkpoint to resume: one epoch, on this process's one device
    config = wider(tiny_config)
    config.training.epochs = 1
    run_lib.train_and_evaluate(config)
    saved = checkpoint_lib.Checkpoints(tmp_path / "run", writer=False).step("last")
  fault = [args[0], "-u", os.path.join(os.path.dirname(__file__), "fault_child.py"), f"setup{how}:1:{where}",
           *args[4:]]
  procs = start_two_processes(fault, devices_env(2))
  outs = finish(procs, timeout=60)  # (about 10 s; orbax's barriers wait 300)
  # Process 1's last line on stderr: a SIGTERM ends it silently (status 143), as on one process.
  why, status, last = {"sigint": ("interrupted by SIGINT", 130, ["interrupted; what was already saved is intact"]),
                       "sigterm": ("stopped by SIGTERM", 143, []),
                       "fail": ("[Errno 5] Input/output error", 1, ["error: Input/output error"])}[how]
  assert [p.returncode for p in procs] == [1, status], outs[0][1][-2000:] + outs[1][1][-2000:]
  assert outs[0][1].strip().splitlines()[-1] == f"error: process 1 left the run ({why}); its output says more"
  assert outs[1][1].strip().splitlines()[-1:] == last
  if where == "restore":  # `last` is the first run's, untouched
    assert checkpoint_lib.Checkpoints(tmp_path / "run", writer=False).step("last") == saved


@pytest.mark.parametrize("failing", [0, 1])
def test_a_process_failing_alone_while_training_stops_the_other_at_once(tiny_config, tmp_path, failing):
  """One process fails at step 12; the other, whose devices (and, on a CPU, its host) wait for the
  failed one's collectives of step 13, ends within seconds with one line, and so does the failed
  one: without Python's teardown, which would wait for the devices' threads for ever. Process 0
  also hosts the coordination service."""
  args = child_args(tiny_config, tmp_path / "run")
  fault = [args[0], "-u", os.path.join(os.path.dirname(__file__), "fault_child.py"), f"fail:{failing}:12", *args[4:]]
  procs = start_two_processes(fault, devices_env(2))
  outs = finish(procs, timeout=60)
  assert [p.returncode for p in procs] == [1, 1], outs[0][1][-2000:] + outs[1][1][-2000:]
  assert "epoch 1/2 step 10/40" in outs[0][0] and "step 15/40" not in outs[0][0]
  other = 1 - failing
  assert outs[other][1].strip().splitlines()[-1] == (f"error: process {failing} left the run ([Errno 5] Input/output "
                                                     "error); its output says more")
  assert outs[failing][1].strip().splitlines()[-1] == "error: Input/output error"


def test_a_run_that_ends_well_stops_its_departures_watch_before_python_tears_down(tmp_path):
  """The watch of the other processes (a thread that polls JAX's coordination service) must not be
  inside one of the service's C++ calls as Python tears down: that aborts the process ("terminate
  called after throwing an instance of ''", status -6, once in CI after a run that went well). So
  it has stopped once `end_if_left` returns for a run that ends with the others."""
  child = tmp_path / "child.py"
  child.write_text("import sys, threading\n"
                   "from jaxlm import sharding\n"
                   "flags = dict(arg.lstrip('-').split('=') for arg in sys.argv[1:])  # start_two_processes's\n"
                   "sharding.initialize_processes(flags['coordinator_address'], int(flags['num_processes']),\n"
                   "                              int(flags['process_id']), False)\n"
                   "sharding.end_if_left(SystemExit(0))\n"
                   "print(sorted(t.name for t in threading.enumerate() if t.name.startswith('jaxlm')))\n")
  procs = start_two_processes([sys.executable, str(child)], devices_env(1))
  outs = finish(procs)
  assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
  assert [out.splitlines()[-1] for out, _ in outs] == ["[]", "[]"]


def test_fsdp_shards_the_largest_axis_it_divides_never_the_layer_axis():
  spec = lambda path, shape, fsdp=4: sharding_lib._leaf_spec(  # noqa: E731
      [jax.tree_util.DictKey(k) for k in path], jax.ShapeDtypeStruct(shape, np.float32), fsdp)
  P = jax.sharding.PartitionSpec
  assert spec(["block_0", "mlp", "kernel"], (256, 1024)) == P(None, "fsdp")
  assert spec(["embed", "embedding"], (8192, 256)) == P("fsdp", None)
  assert spec(["embed", "embedding"], (8190, 256)) == P(None, "fsdp")  # 8190 is not divisible by 4
  assert spec(["blocks", "mlp", "kernel"], (8, 256, 1024)) == P(None, None, "fsdp")
  assert spec(["blocks", "attn", "kernel"], (64, 256, 256)) == P(None, "fsdp", None)  # not the layer axis
  assert spec(["block_0", "ln1", "scale"], (256,)) == P()  # small: replicated
  assert spec(["block_0", "mlp", "kernel"], (256, 1024), fsdp=1) == P()
  assert spec(["head", "kernel"], (255, 257)) == P()  # no axis divisible


@pytest.mark.parametrize("args, message", [
    (("", 2, None, False), "--coordinator_address, --num_processes and --process_id go together"),
    (("node0", 2, 0, False), "--coordinator_address=node0: write process 0's host:port"),
])
def test_bad_process_flags_are_one_clear_error_before_joining(args, message):
  with pytest.raises(UsageError, match=re.escape(message)):
    sharding_lib.initialize_processes(*args)


@pytest.mark.parametrize("data, fsdp, devices, shape", [(-1, 1, 8, (8, 1)), (-1, 2, 8, (4, 2)), (2, -1, 8, (2, 4)),
                                                        (1, 1, 1, (1, 1))])
def test_mesh_axes_fill_the_devices(data, fsdp, devices, shape):
  config = load_config()
  config.mesh.data, config.mesh.fsdp = data, fsdp
  assert sharding_lib.mesh_shape(config, devices) == shape


@pytest.mark.parametrize("data, fsdp, batch, message", [
    (3, 1, 6, "'mesh.data' = 3 does not divide the 8 devices"),
    (2, 2, 4, "mesh.data' x 'mesh.fsdp' = 2 x 2 = 4 devices, but this run has 8"),
    (-1, 1, 12, "'training.batch_size' = 12 (the global batch) must be divisible by the 8 devices"),
])
def test_a_mesh_or_batch_the_devices_cannot_take_is_one_clear_error(data, fsdp, batch, message):
  config = load_config()
  config.mesh.data, config.mesh.fsdp, config.training.batch_size = data, fsdp, batch
  with pytest.raises(config_lib.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
    sharding_lib.make_mesh(config, [jax.devices("cpu")[0]] * 8)
