"""jaxlm.sweep (issue: the guide's tuning runs): the grid, resumable points, the results table and plots."""
import csv
import json
import os
import shutil
import subprocess
import sys
import threading

import pytest

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import export as export_lib
from jaxlm import run as run_lib
from jaxlm import sweep as sweep_lib
from jaxlm import workdir as workdir_lib
from jaxlm.cli import UsageError, UserError

from conftest import BASE_CONFIG, signal_as_the_test_ends, subprocess_env, write_corpus


@pytest.mark.parametrize("spec, message", [
    ("training.learnin_rate=1e-3", "'training.learnin_rate' is not a config key"),
    ("training.learning_rate=fast", "'training.learning_rate' takes values of type float"),
    ("model.num_layers=2.5", "'model.num_layers' takes values of type int"),
    ("model.tie_embeddings=yes", "'model.tie_embeddings' takes values of type bool"),
    ("training.learning_rate=", "give at least one value"),
    ("training.learning_rate=1e-3,,2e-3", "without empty ones"),
    ("training.learning_rate=1e-3,1e-3", "a value is listed twice"),
    ("training.learning_rate", "write KEY=VALUE1,VALUE2"),
    ("workdir=a,b", "not a config key that a sweep can vary"),
    ("compile_cache_dir=a,b", "not a config key that a sweep can vary"),
])
def test_a_bad_sweep_is_one_clear_error(spec, message):
  with pytest.raises(UsageError, match=message):
    sweep_lib.parse_sweeps([spec])


def test_sweeps_make_a_grid_of_validated_points_named_by_their_overrides(tiny_config, tmp_path):
  sweeps = sweep_lib.parse_sweeps(["training.learning_rate=1e-3,3e-3", "model.num_layers=1,2",
                                   "model.tie_embeddings=true,false"])
  assert sweeps == {"training.learning_rate": [1e-3, 3e-3], "model.num_layers": [1, 2],
                    "model.tie_embeddings": [True, False]}
  points = sweep_lib.grid(tiny_config, sweeps, str(tmp_path / "sweep"))
  assert len(points) == 8
  assert os.path.basename(points[0].workdir) == "learning_rate=0.001,num_layers=1,tie_embeddings=True"
  assert (points[-1].training.learning_rate, points[-1].model.num_layers, points[-1].model.tie_embeddings) == (
      3e-3, 2, False)
  assert sweep_lib.point_name({"model.dropout": 0.1, "data.dropout": 0.2}) == "model.dropout=0.1,data.dropout=0.2"
  with pytest.raises(sweep_lib.config_lib.ConfigError, match=r"the grid point num_heads=3: config key "
                     r"'model.d_model' = 32 must be divisible by 'model.num_heads' = 3"):
    sweep_lib.grid(tiny_config, {"model.num_heads": [2, 3]}, str(tmp_path / "sweep"))
  with pytest.raises(UsageError, match=r"two grid points would share the directory .*prompt= a_b"):
    sweep_lib.grid(tiny_config, {"sample.prompt": [" a/b", " a_b"]}, str(tmp_path / "sweep"))


def test_a_sweep_runs_every_point_skips_finished_ones_and_reports(tiny_config, tmp_path, capsys):
  tiny_config.training.epochs = 2
  tiny_config.sample.max_new_tokens = 0
  workdir = str(tmp_path / "sweep")
  sweeps = {"training.learning_rate": [3e-3, 1e-2]}
  rows = sweep_lib.run_sweep(tiny_config, sweeps, workdir)
  assert [r["point"] for r in rows] == ["learning_rate=0.003", "learning_rate=0.01"]
  for row in rows:
    assert row["epochs"] == 2 and row["params"] > 0 and row["device"] == "cpu"
    assert row["best_val_loss"] > 0 and row["test_perplexity"] > 1 and row["test_bpb"] > 0
    assert row["tokens_per_s"] > 0 and row["wall_time_s"] > 0 and row["stopped_early"] is False
    assert row["status"] == "finished"
  with open(os.path.join(workdir, "results.csv")) as f:
    table = list(csv.DictReader(f))
  assert [r["training.learning_rate"] for r in table] == ["0.003", "0.01"]
  assert float(table[1]["test_perplexity"]) == rows[1]["test_perplexity"]
  with open(os.path.join(workdir, "results.md")) as f:
    assert f.read().splitlines()[0].startswith("| point | training.learning_rate | status | params | epochs |")

  # Again: both points are finished and skipped; a point cut off before its test runs again (resumes).
  os.remove(os.path.join(workdir, "learning_rate=0.01", "test_metrics.json"))
  capsys.readouterr()
  again = sweep_lib.run_sweep(tiny_config, sweeps, workdir)
  out = capsys.readouterr().out
  assert "point 1/2 learning_rate=0.003 is finished; skipped" in out
  assert "the run in " in out and "is already complete (2 epochs)" in out  # the second resumed, nothing to train
  assert [r["test_perplexity"] for r in again] == [r["test_perplexity"] for r in rows]

  # A test_metrics.json older than the point's `last` (the point was extended with more epochs, then
  # interrupted) is not its end: the point runs on instead of being skipped for good.
  path = os.path.join(workdir, "learning_rate=0.003", "test_metrics.json")
  with open(path) as f:
    tested = json.load(f)
  with open(path, "w") as f:
    json.dump({**tested, "global_step": 1}, f)
  capsys.readouterr()
  sweep_lib.run_sweep(tiny_config, sweeps, workdir)
  out = capsys.readouterr().out
  assert "point 1/2 learning_rate=0.003 is finished" not in out and "point 2/2 learning_rate=0.01 is finished" in out
  with open(path) as f:
    assert json.load(f)["global_step"] == tested["global_step"]

  # Settings other than the ones it ran with are refused before anything runs: the finished points'
  # results would otherwise be shown as those of the new settings.
  with open(os.path.join(workdir, "sweep.json")) as f:
    recorded = f.read()
  for key, value, message in (("model.d_model", 64, "model.d_model 32 -> 64"),
                              ("training.weight_decay", 0.5, "training.weight_decay 0.01 -> 0.5")):
    changed = tiny_config.copy_and_resolve_references()
    changed[key.split(".")[0]][key.split(".")[1]] = value
    with pytest.raises(UserError, match=rf"the sweep in {workdir} ran with other settings \(2 point\(s\); "
                                        rf"learning_rate=0.003: {message}\): re-run it with the settings it had") as e:
      sweep_lib.run_sweep(changed, sweeps, workdir)
    assert not isinstance(e.value, UsageError)  # status 1 (the directory's state), not 2 (a bad command line)
    with open(os.path.join(workdir, "sweep.json")) as f:
      assert f.read() == recorded
  # More epochs train the finished points on; how a point runs may change (log lines, device, ...).
  tiny_config.training.epochs, tiny_config.training.log_every_steps = 3, 7
  capsys.readouterr()
  more = sweep_lib.run_sweep(tiny_config, sweeps, workdir)
  assert [r["epochs"] for r in more] == [3, 3]
  # Their schedules (num_steps -1: derived from the epochs) get longer; the sweep cannot keep them
  # (it refuses another training.num_steps), so it does not advise it.
  warnings = [line for line in capsys.readouterr().out.splitlines() if "the learning-rate schedule now spans" in line]
  assert len(warnings) == 2 and not any("--config" in w for w in warnings)
  # A metrics line cut off by a crash (the resumed run writes it again) does not stop the report.
  with open(os.path.join(workdir, "learning_rate=0.01", "metrics.jsonl"), "a") as f:
    f.write('{"epoch": 4, "global_st')
  assert [r["epochs"] for r in sweep_lib.report(workdir)] == [3, 3]


def test_a_point_that_diverges_is_reported_failed_and_the_sweep_goes_on(tiny_config, tmp_path, capsys):
  tiny_config.training.epochs = 1
  tiny_config.sample.max_new_tokens = 0
  workdir = str(tmp_path / "sweep")
  rows = sweep_lib.run_sweep(tiny_config, {"training.learning_rate": [1e30, 3e-3]}, workdir)
  assert [(r["point"], r["status"]) for r in rows] == [("learning_rate=1e+30", "failed"),
                                                      ("learning_rate=0.003", "finished")]
  out = capsys.readouterr().out
  assert "sweep: point learning_rate=1e+30 failed: the training diverged by step" in out
  # (the sweep has no --fresh, and its points keep their learning rates)
  failure = next(line for line in out.splitlines() if line.startswith("sweep: point learning_rate=1e+30 failed"))
  assert failure.endswith("are intact.") and "--fresh" not in failure and "--config" not in failure
  assert rows[0]["test_perplexity"] is None and rows[1]["test_perplexity"] > 1


def test_a_point_whose_batch_does_not_fit_the_data_is_reported_failed_and_the_sweep_goes_on(tiny_config, tmp_path,
                                                                                            capsys):
  tiny_config.training.epochs = 1
  tiny_config.sample.max_new_tokens = 0
  workdir = str(tmp_path / "sweep")
  rows = sweep_lib.run_sweep(tiny_config, {"training.batch_size": [100_000, 8]}, workdir)
  assert [(r["point"], r["status"]) for r in rows] == [("batch_size=100000", "failed"), ("batch_size=8", "finished")]
  assert "sweep: point batch_size=100000 failed: the train split has " in capsys.readouterr().out


def test_a_sweep_from_a_gpt2_directory_skips_its_finished_points_when_run_again(tiny_config, tmp_path, capsys):
  tiny_config.training.epochs = 1
  tiny_config.sample.max_new_tokens = 0
  run_lib.train_and_evaluate(tiny_config)
  hf = str(tmp_path / "hf")
  export_lib.export(tiny_config.workdir, hf)
  tiny_config.model.init_from = hf
  tiny_config.model.d_model = 64  # replaced by the GPT-2's, as the tokenizer is: not a change on the re-run
  workdir = str(tmp_path / "sweep")
  sweep_lib.run_sweep(tiny_config, {"training.learning_rate": [1e-3]}, workdir)
  capsys.readouterr()
  sweep_lib.run_sweep(tiny_config, {"training.learning_rate": [1e-3]}, workdir)
  assert "sweep: point 1/1 learning_rate=0.001 is finished; skipped" in capsys.readouterr().out


def test_the_report_draws_the_learning_curves(tiny_config, tmp_path):
  pytest.importorskip("matplotlib")
  pytest.importorskip("tensorboard")
  tiny_config.training.epochs = 2
  tiny_config.sample.max_new_tokens = 0
  workdir = str(tmp_path / "sweep")
  sweep_lib.run_sweep(tiny_config, {"model.dropout": [0.0, 0.1]}, workdir)
  from PIL import Image
  for name in ("val_loss.png", "train_loss.png"):
    with Image.open(os.path.join(workdir, name)) as image:
      assert image.size == (960, 600)
  assert sweep_lib._train_curve(os.path.join(workdir, "dropout=0.1"), _accumulator())[0][-1] > 0
  # Run directories copied without their TensorBoard events (as experiments/results keeps them) still
  # report: the table, and the curves of the runs that have events.
  shutil.rmtree(os.path.join(workdir, "dropout=0.1", "tensorboard"))
  rows = sweep_lib.report(workdir)
  assert [r["status"] for r in rows] == ["finished", "finished"]
  assert sweep_lib._train_curve(os.path.join(workdir, "dropout=0.1"), _accumulator()) == ([], [])


def _accumulator():
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  return EventAccumulator


def test_the_command_line_refuses_a_bad_sweep_before_any_run(tmp_path):
  done = subprocess.run([sys.executable, "-m", "jaxlm.sweep", f"--config={BASE_CONFIG}:tiny",
                         "--sweep=training.learning_rate=1e-3,oops", f"--workdir={tmp_path / 'sweep'}"],
                        env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines() == [
      "error: --sweep=training.learning_rate=1e-3,oops: 'training.learning_rate' takes values of type float"]
  assert not os.path.exists(tmp_path / "sweep")
  report = subprocess.run([sys.executable, "-m", "jaxlm.sweep", "--report", f"--workdir={tmp_path}"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert report.returncode == 1 and report.stderr.strip().startswith(f"error: {tmp_path} holds no sweep")


def test_the_command_ends_with_status_1_naming_the_points_that_failed(tiny_config, tmp_path):
  """A script that runs a sweep must not take one with failed points for a success."""
  t = tiny_config.training
  done = subprocess.run([sys.executable, "-m", "jaxlm.sweep", f"--config={BASE_CONFIG}:tiny", "--config.device=cpu",
                         f"--config.data.data_dir={tiny_config.data.data_dir}",
                         f"--config.data.raw_dir={tiny_config.data.raw_dir}",
                         f"--config.data.processed_dir={tiny_config.data.processed_dir}",
                         "--config.training.epochs=1", "--config.sample.max_new_tokens=0",
                         f"--sweep=training.batch_size=100000,{t.batch_size + 1}", f"--workdir={tmp_path / 'sweep'}"],
                        env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode == 1, done.stderr
  assert done.stderr.strip().splitlines()[-1] == (
      "error: 1 of 2 point(s) failed: batch_size=100000 (why: above, and in each one's sweep_failed.txt)")
  assert f"| batch_size={t.batch_size + 1} | {t.batch_size + 1} | finished |" in done.stdout
  assert os.path.exists(tmp_path / "sweep" / "results.md")
  # Another grid in the same folder: its table lists the failed point, which is not this sweep's.
  again = subprocess.run([*done.args[:-2], f"--sweep=training.batch_size={t.batch_size + 1}", done.args[-1]],
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr
  (row,) = [line for line in again.stdout.splitlines() if line.startswith("| batch_size=100000 |")]
  assert "| failed |" in row


def test_a_point_moved_to_other_text_is_refused_with_the_sweeps_own_advice(tiny_config, tmp_path):
  """data.data_dir may move (the same text elsewhere); other text is refused, and the advice is the
  sweep's (it has no --fresh or --config.workdir)."""
  tiny_config.training.epochs = 1
  tiny_config.sample.max_new_tokens = 0
  workdir, sweeps = str(tmp_path / "sweep"), {"training.learning_rate": [3e-3]}
  sweep_lib.run_sweep(tiny_config, sweeps, workdir)
  write_corpus(tmp_path / "other", seed=1)
  tiny_config.data.data_dir, tiny_config.training.epochs = str(tmp_path / "other"), 2
  with pytest.raises(checkpoint_lib.CheckpointError, match=r"other text or tokenizer\)\. Resume with the same "
                                                           r"settings, or give the sweep another --workdir\.$"):
    sweep_lib.run_sweep(tiny_config, sweeps, workdir)


def test_a_stop_during_a_points_test_stops_the_sweep_once_the_point_is_complete(tiny_config, tmp_path, monkeypatch):
  """A preemption's SIGTERM as a point's test ends: the point stands finished, and no next point starts."""
  tiny_config.training.epochs = 1
  tiny_config.sample.max_new_tokens = 0
  signal_as_the_test_ends(monkeypatch)
  workdir = str(tmp_path / "sweep")
  with pytest.raises(run_lib.Interrupted, match="SIGTERM"):
    sweep_lib.run_sweep(tiny_config, {"training.learning_rate": [3e-3, 1e-2]}, workdir)
  assert sweep_lib.is_finished(os.path.join(workdir, "learning_rate=0.003"))
  assert not os.path.exists(os.path.join(workdir, "learning_rate=0.01"))


def test_sweeps_sharing_a_workdir_write_its_files_without_clashing(tmp_path):
  """Several sweeps into one --workdir at once (one per GPU lane) each rewrite sweep.json: no writer
  may rename or delete another's temporary file, and the file is always one whole JSON document."""
  path = str(tmp_path / "sweep.json")
  errors = []

  def writer(i):
    try:
      for j in range(200):
        workdir_lib.write_json(path, {"writer": i, "write": j, "padding": "x" * 4096})
    except OSError as e:
      errors.append(e)

  threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert errors == []
  assert json.load(open(path))["write"] == 199
  assert os.listdir(tmp_path) == ["sweep.json"]  # no temporary file left behind
