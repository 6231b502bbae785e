"""Hyperparameter sweeps: every point of a grid trained as its own resumable run, then one table.

    python -m jaxlm.sweep --config=configs/base.py --sweep=training.learning_rate=1e-4,3e-4,5e-4 \\
        --sweep=model.num_layers=4,6 [--workdir=runs/sweep] [--config.<key>=VALUE ...]
    python -m jaxlm.sweep --workdir=runs/sweep --report      # the table and plots again

Each point runs in `<workdir>/<its overrides>` (e.g. `learning_rate=0.0003,num_layers=4`), one after
another in this process, exactly as `python -m jaxlm.main` would run it: a finished point is skipped,
an interrupted one resumes (the settings it ran with may change only as `changed_settings` allows).
At the end (and with --report) the sweep writes `results.md` and `results.csv` (one row per point)
and, with matplotlib installed (`pip install -e ".[plots]"`), `val_loss.png` (per epoch) and
`train_loss.png` (per logged step, from the TensorBoard events).
"""
import csv
import functools
import itertools
import json
import math
import os

import ml_collections

from jaxlm import checkpoint as checkpoint_lib
from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import run as run_lib
from jaxlm import workdir as workdir_lib
from jaxlm.cli import UsageError, UserError

_CASTS = {int: int, float: float, str: str, bool: lambda v: {"true": True, "false": False}[v.lower()]}

# The table's columns after the overrides, and where each comes from.
COLUMNS = ("status", "params", "epochs", "stopped_early", "best_epoch", "best_val_loss", "best_val_perplexity",
           "best_val_bpb", "test_perplexity", "test_bpb", "test_word_perplexity", "tokens_per_s", "wall_time_s",
           "device")


def parse_sweeps(specs: list[str]) -> dict[str, list]:
  """{key: values} from --sweep=KEY=V1,V2,...; a bad one is a UsageError naming it."""
  sweeps = {}
  for spec in specs:
    key, sep, values = spec.partition("=")
    if not sep:
      raise UsageError(f"--sweep={spec}: write KEY=VALUE1,VALUE2,... (e.g. training.learning_rate=1e-4,3e-4)")
    if key not in config_lib.SCHEMA or key in config_lib.LOCATION_KEYS:
      raise UsageError(f"--sweep={spec}: '{key}' is not a config key that a sweep can vary (see configs/base.py)")
    if key in sweeps:
      raise UsageError(f"--sweep: '{key}' is given twice; list all its values in one --sweep")
    kind = config_lib.SCHEMA[key][0]
    items = [v.strip() for v in values.split(",")] if values.strip() else []
    if not items or any(not v for v in items):
      raise UsageError(f"--sweep={spec}: give at least one value, separated by commas without empty ones")
    try:
      sweeps[key] = [_CASTS[kind](v) for v in items]
    except (ValueError, KeyError):
      raise UsageError(f"--sweep={spec}: '{key}' takes values of type {kind.__name__}") from None
    if len(set(sweeps[key])) != len(sweeps[key]):
      raise UsageError(f"--sweep={spec}: a value is listed twice")
  if not sweeps:
    raise UsageError("give at least one --sweep=KEY=VALUE1,VALUE2,... (or --report for an earlier sweep)")
  return sweeps


def point_name(overrides: dict) -> str:
  """The directory of a grid point: its overrides, by the keys' last part (the full key where two
  keys end alike), e.g. learning_rate=0.0003,num_layers=4."""
  short = [k.rsplit(".", 1)[-1] for k in overrides]
  names = [s if short.count(s) == 1 else k for s, k in zip(short, overrides)]
  return ",".join(f"{n}={v}" for n, v in zip(names, overrides.values())).replace("/", "_")


def point_names(sweeps: dict[str, list]) -> list[str]:
  """The directory names of a grid's points, in the grid's order."""
  return [point_name(dict(zip(sweeps, values))) for values in itertools.product(*sweeps.values())]


def grid(config: ml_collections.ConfigDict, sweeps: dict[str, list], workdir: str) -> list[ml_collections.ConfigDict]:
  """One validated config per grid point, in `workdir`/<point name>; any invalid point fails first."""
  points = []
  for values in itertools.product(*sweeps.values()):
    overrides = dict(zip(sweeps, values))
    point = config.copy_and_resolve_references()
    for key, value in overrides.items():
      node, name = config_lib.lookup(point, key)
      node[name] = value
    point.workdir = os.path.join(workdir, point_name(overrides))
    try:
      config_lib.validate(point)
    except config_lib.ConfigError as e:
      raise config_lib.ConfigError(f"the grid point {point_name(overrides)}: {e}") from None
    if any(p.workdir == point.workdir for p in points):
      raise UsageError(f"two grid points would share the directory {point.workdir}: give values that differ "
                       f"in more than '/' and '_'")
    points.append(point)
  return points


# A point's settings that may differ from those it was run with: where and how it runs, not what it
# trains. A change of _EXTENDING keys runs a finished point again (it trains on, or checks that the
# data moved elsewhere is the same); any other change is refused.
_HOW = config_lib.LOCATION_KEYS + ("device", "mesh.data", "mesh.fsdp", "data.raw_dir", "data.processed_dir",
                                   "training.eval_batch_size", "training.log_every_steps",
                                   "training.checkpoint_every_steps", "training.checkpoint_every_minutes",
                                   "training.steps_per_call")
_EXTENDING = ("training.epochs", "training.patience", "data.data_dir")


def changed_settings(point: ml_collections.ConfigDict) -> list[str]:
  """'key old -> new' for each setting of `point` that differs from what its directory was run with
  ([] for a point not started), sample.* and _HOW left out."""
  path = os.path.join(point.workdir, workdir_lib.CONFIG_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    old = config_lib.flatten(config_lib.upgrade(json.load(f)))
  new = config_lib.flatten(point)
  if point.model.init_from:  # the run's config.json holds the shape and tokenizer init_from gave it
    from jaxlm import export
    new.update(export.gpt2_overrides(point.model.init_from))
  return [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items()
          if old.get(k) != v and k not in _HOW and not k.startswith("sample.")]


FAILED_FILE = "sweep_failed.txt"  # in a point's run directory: why its training stopped


def _write_text(path: str, text: str) -> None:
  with open(path, "w") as f:
    f.write(text)


def is_finished(workdir: str) -> bool:
  return os.path.exists(os.path.join(workdir, "test_metrics.json"))


def _tested_at_its_end(workdir: str) -> bool:
  """A point to skip: tested at the step its `last` checkpoint holds. (A test_metrics.json from
  before the point was extended, with more epochs, then interrupted, is not of its newest state.)"""
  if not is_finished(workdir):
    return False
  with open(os.path.join(workdir, "test_metrics.json")) as f:
    tested = json.load(f).get("global_step")
  with checkpoint_lib.Checkpoints(workdir, writer=False) as checkpoints:
    return tested == checkpoints.step("last")


def run_sweep(config: ml_collections.ConfigDict, sweeps: dict[str, list], workdir: str) -> list[dict]:
  """Trains every point not yet finished, one after another; returns the table's rows. A point whose
  training fails (e.g. diverges at a high learning rate, or its batch does not fit the data) is
  reported as failed, and the sweep goes on; running the sweep again tries it again."""
  points = grid(config, sweeps, workdir)
  changes = {os.path.basename(p.workdir): changed_settings(p) for p in points}
  refused = {name: [c for c in changed if not c.startswith(_EXTENDING)] for name, changed in changes.items()}
  refused = {name: changed for name, changed in refused.items() if changed}
  if refused:
    name, changed = next(iter(refused.items()))
    # (status 1, as jaxlm.main's refusal of another run's checkpoint: the directory's state, not the command line)
    raise UserError(f"the sweep in {workdir} ran with other settings ({len(refused)} point(s); {name}: "
                    f"{'; '.join(changed)}): re-run it with the settings it had (more training.epochs or "
                    f"patience train its points on), or give this sweep another --workdir")
  os.makedirs(workdir, exist_ok=True)
  workdir_lib.write_json(os.path.join(workdir, "sweep.json"), {"sweep": sweeps, "config": config.to_dict()})
  for i, point in enumerate(points, 1):
    name, failed = os.path.basename(point.workdir), os.path.join(point.workdir, FAILED_FILE)
    if _tested_at_its_end(point.workdir) and not changes[name]:
      print(f"sweep: point {i}/{len(points)} {name} is finished; skipped", flush=True)
      continue
    print(f"sweep: point {i}/{len(points)} {name}", flush=True)
    try:
      run_lib.train_and_evaluate(point, in_sweep=True)
    except (run_lib.TrainingError, data_lib.DataError, config_lib.ConfigError) as e:  # about this point
      print(f"sweep: point {name} failed: {e}", flush=True)
      os.makedirs(point.workdir, exist_ok=True)  # (one that failed while setting up left no directory)
      workdir_lib.write_atomically(failed, functools.partial(_write_text, text=str(e)))
    else:
      if os.path.exists(failed):
        os.remove(failed)
  return report(workdir)


def run_row(point_dir: str, keys: list[str]) -> dict:
  """The table's row of one run directory (a sweep's point or any other run; one not finished has
  its epochs so far), with the config values of `keys`."""
  flat = {}  # (none for a point that failed while setting up: its name says its values)
  if os.path.exists(os.path.join(point_dir, workdir_lib.CONFIG_FILE)):
    with open(os.path.join(point_dir, workdir_lib.CONFIG_FILE)) as f:
      flat = config_lib.flatten(json.load(f))
  row = {"point": os.path.basename(point_dir), **{k: flat.get(k) for k in keys}}
  epochs = read_epochs(point_dir)
  test = {}
  if is_finished(point_dir):
    with open(os.path.join(point_dir, "test_metrics.json")) as f:
      test = json.load(f)
  best = min(epochs, key=lambda e: e["val_loss"]) if epochs else {}
  rates = [e["tokens_per_s"] for e in epochs[1:] or epochs if e.get("tokens_per_s")]  # first epoch compiles
  status = ("finished" if test else "failed" if os.path.exists(os.path.join(point_dir, FAILED_FILE)) else
            "incomplete")
  row.update(status=status, params=test.get("num_params"), epochs=len(epochs), stopped_early=test.get("stopped_early"),
             best_epoch=best.get("epoch"), best_val_loss=best.get("val_loss"),
             best_val_perplexity=best.get("val_perplexity"), best_val_bpb=best.get("val_bpb"),
             test_perplexity=test.get("test_perplexity"), test_bpb=test.get("test_bpb"),
             test_word_perplexity=test.get("test_word_perplexity"),
             tokens_per_s=sorted(rates)[len(rates) // 2] if rates else None,
             wall_time_s=sum(e["epoch_time_s"] for e in epochs) if epochs else None, device=test.get("device"))
  return row


def report(workdir: str) -> list[dict]:
  """Writes results.md, results.csv and (with matplotlib) the learning-curve plots of the sweep in
  `workdir`; returns the rows."""
  path = os.path.join(workdir, "sweep.json")
  if not os.path.exists(path):
    raise UserError(f"{workdir} holds no sweep (no sweep.json): pass the --workdir of a `jaxlm.sweep` run")
  with open(path) as f:
    sweeps = json.load(f)["sweep"]
  keys, order = list(sweeps), point_names(sweeps)
  runs = {d.name: d.path for d in os.scandir(workdir) if d.is_dir() and any(
      os.path.exists(os.path.join(d.path, name)) for name in (workdir_lib.CONFIG_FILE, FAILED_FILE))}
  # The grid's order, then any run directories of earlier sweeps in the same folder.
  dirs = [runs[n] for n in order if n in runs] + sorted(p for n, p in runs.items() if n not in order)
  rows = [run_row(d, keys) for d in dirs]
  write_table(workdir, rows, ["point", *keys, *COLUMNS], lambda c, v: cell(v) if c in COLUMNS else str(v))
  plots = plot(workdir, dirs)
  print(f"sweep: {len(rows)} point(s); {os.path.join(workdir, 'results.md')}, results.csv"
        + (f", {', '.join(plots)}" if plots else " (plots: pip install -e \".[plots]\")"), flush=True)
  return rows


def write_table(directory: str, rows: list[dict], columns: list[str], format_cell) -> None:
  """`rows` as `directory`/results.csv (raw values) and results.md (format_cell(column, value)),
  the markdown also printed."""
  with open(os.path.join(directory, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)
  table = "\n".join(["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)] +
                    ["| " + " | ".join(format_cell(c, r[c]) for c in columns) + " |" for r in rows])
  with open(os.path.join(directory, "results.md"), "w") as f:
    f.write(table + "\n")
  print(table, flush=True)


def cell(value) -> str:
  if value is None:
    return ""
  if isinstance(value, int) and not isinstance(value, bool):
    return f"{value:,}"
  if isinstance(value, float):
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}" if math.isfinite(value) else str(value)
  return str(value)


def plot(workdir: str, dirs: list[str]) -> list[str]:
  """val_loss.png and train_loss.png in `workdir`, one line per run directory; [] without matplotlib."""
  try:
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  except ImportError:
    return []
  written = []
  for name, ylabel, xlabel, series in (
      ("val_loss.png", "validation loss", "epoch", _val_curves),
      ("train_loss.png", "train loss (logging interval mean)", "step", lambda d: _train_curve(d, EventAccumulator))):
    fig, ax = plt.subplots(figsize=(8, 5))
    for d in dirs:
      xs, ys = series(d)
      if xs:
        ax.plot(xs, ys, marker="o" if name == "val_loss.png" else None, label=os.path.basename(d))
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, name), dpi=120)
    plt.close(fig)
    written.append(name)
  return written


def read_epochs(point_dir: str) -> list[dict]:
  """The point's metrics.jsonl records, one per epoch done ([] before the first)."""
  path = os.path.join(point_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:  # a last line cut off by a crash: the resumed run writes it again
        pass
  return records


def _val_curves(point_dir: str) -> tuple[list, list]:
  epochs = read_epochs(point_dir)
  return [e["epoch"] for e in epochs], [e["val_loss"] for e in epochs]


def _train_curve(point_dir: str, accumulator) -> tuple[list, list]:
  """(steps, train losses) from the run's TensorBoard events; none when they were not kept (e.g. a
  run directory copied without them)."""
  if not os.path.isdir(os.path.join(point_dir, "tensorboard")):
    return [], []
  events = accumulator(os.path.join(point_dir, "tensorboard"))
  events.Reload()
  if "train/loss" not in events.Tags()["scalars"]:
    return [], []
  points = events.Scalars("train/loss")
  return [p.step for p in points], [p.value for p in points]


# ----------------------------------------------------------------------------------------------- CLI
if __name__ == "__main__":
  from absl import flags
  from ml_collections import config_flags

  from jaxlm import cli
  _CONFIG = config_flags.DEFINE_config_file("config", None, "The config every point starts from, e.g. "
                                            "configs/base.py; --config.<key>=VALUE applies to all points.")
  _SWEEP = flags.DEFINE_multi_string("sweep", [], "KEY=VALUE1,VALUE2,...: a config key and its values; "
                                     "several --sweep flags make a grid.")
  _WORKDIR = flags.DEFINE_string("workdir", "runs/sweep", "Where the points' run directories and the results go.")
  _REPORT = flags.DEFINE_bool("report", False, "Only write the table and plots of the sweep in --workdir.")

  def _main(argv):
    del argv
    if _REPORT.value:
      report(_WORKDIR.value)
      return
    if _CONFIG.value is None:
      raise UsageError("--config is required to run a sweep (e.g. --config=configs/base.py)")
    sweeps = parse_sweeps(_SWEEP.value)
    try:
      rows = run_sweep(_CONFIG.value, sweeps, _WORKDIR.value)
    except run_lib.Interrupted as e:
      print(f"{e}; re-run the same command to resume the sweep from there.", flush=True)
      raise SystemExit(128 + e.signum) from None
    # (status 1: a script running the sweep must not take it for a success). The table may also list
    # other sweeps' points in the same folder: only this grid's count.
    ours = point_names(sweeps)
    failed = [r["point"] for r in rows if r["point"] in ours and r["status"] == "failed"]
    if failed:
      raise UserError(f"{len(failed)} of {len(ours)} point(s) failed: {', '.join(failed)} (why: above, and in each "
                      f"one's {FAILED_FILE})")

  cli.run(_main, config_flag="config")
