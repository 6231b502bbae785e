"""Where a whole training run's device time goes between kernels: runs `python -m jaxlm.main`'s code
unchanged, traces one epoch (its training steps and its end: validation, sample, saves) with JAX's
profiler, and prints one JSON line per finding: the GPU's busy time against the epoch's span, the idle
gaps by size, and the longest gaps with the kernels around them and the run's host work during them
(its methods are wrapped in trace annotations named `run.<method>`).

  python experiments/profile_run.py --config=configs/gpu.py --config.training.epochs=2 \
      --trace_epoch=2 --trace_dir=/tmp/trace_run
"""
import collections
import functools
import glob
import gzip
import json
import time

import jax
from absl import flags
from ml_collections import config_flags

from jaxlm import cli
from jaxlm import run as run_lib
from jaxlm.cli import UserError

_CONFIG = config_flags.DEFINE_config_file("config", None, "e.g. configs/gpu.py")
_EPOCH = flags.DEFINE_integer("trace_epoch", 2, "the epoch to trace (its training steps and its end)")
_DIR = flags.DEFINE_string("trace_dir", "/tmp/trace_run", "where the trace goes")
_GAPS = flags.DEFINE_integer("gaps", 12, "how many of the longest idle gaps to print")
_ANNOTATED = ("train_epoch", "end_epoch", "log_steps", "agreed", "evaluate", "sample", "save", "epoch_sequences",
              "_program")


def _annotate(cls, timings: dict) -> None:
  """Wraps the run's methods and its compiled calls ("run.call") in trace annotations that also add
  their wall time to `timings` [the epoch under way][name]; starts and stops the trace around the epoch."""
  under_way = [0]

  def timed(name, fn):
    def wrapped(*args, **kwargs):
      epoch, t0 = under_way[0], time.perf_counter()
      try:
        with jax.profiler.TraceAnnotation(f"run.{name}"):
          return fn(*args, **kwargs)
      finally:
        timings[epoch][name] += time.perf_counter() - t0
    return wrapped

  for name in _ANNOTATED:
    method = getattr(cls, name)

    @functools.wraps(method)
    def annotated(self, *args, _method=method, _name=name, **kwargs):
      if _name == "_program":  # (program, compile seconds): the program's calls timed too
        program, compile_s = _method(self, *args, **kwargs)
        return timed("call", program), compile_s
      return timed(_name, functools.partial(_method, self))(*args, **kwargs)
    setattr(cls, name, annotated)
  train_epoch, end_epoch = cls.train_epoch, cls.end_epoch

  def traced_train_epoch(self, epoch):
    under_way[0] = epoch
    if epoch == _EPOCH.value:
      jax.block_until_ready(self.state)
      options = jax.profiler.ProfileOptions()
      # The annotations and little else: a trace keeps 1M events.
      options.python_tracer_level, options.host_tracer_level = 0, 1
      jax.profiler.start_trace(_DIR.value, create_perfetto_trace=True, profiler_options=options)
    return train_epoch(self, epoch)

  def traced_end_epoch(self, epoch, *args):
    out = end_epoch(self, epoch, *args)
    if epoch == _EPOCH.value:
      self.checkpoints.wait()
      jax.profiler.stop_trace()
    return out
  cls.train_epoch, cls.end_epoch = traced_train_epoch, traced_end_epoch


def gaps_report(trace_dir: str, count: int) -> list[dict]:
  """Rows: per GPU, its kernels' span, busy time and idle gaps by size; then the `count` longest gaps."""
  traces = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))  # the newest last
  if not traces:
    raise UserError(f"no trace in {trace_dir}: the run ended before epoch {_EPOCH.value} (early stopping?)")
  with gzip.open(traces[-1]) as f:
    events = json.load(f)["traceEvents"]
  names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu_pids = {p for p, n in names.items() if "/device:" in n and "CPU" not in n}
  every = [(e["ts"], e["ts"] + e.get("dur", 0), e["name"][:60]) for e in events
           if e.get("ph") == "X" and e["pid"] not in gpu_pids]
  host = [h for h in every if h[2].startswith("run.")]
  rows = []
  for name in sorted({n for _, _, n in host}):
    each = [round((b - a) / 1e3, 2) for a, b, n in host if n == name]
    rows.append({"host": name, "ms": round(sum(each), 2), "calls": len(each),
                 **({"each_ms": each} if len(each) <= 4 else {})})
  kernels = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and e["pid"] in gpu_pids:
      kernels[e["pid"]].append((e["ts"], e["ts"] + e["dur"], e["name"][:60]))
  for pid, ks in sorted(kernels.items()):
    ks.sort()
    merged = []  # [start, end, name of the first kernel, name of the last]
    for a, b, n in ks:
      if merged and a <= merged[-1][1]:
        merged[-1][1], merged[-1][3] = max(merged[-1][1], b), n
      else:
        merged.append([a, b, n, n])
    t0 = merged[0][0]
    gaps = [(nxt[0] - cur[1], cur[1], cur[3], nxt[2]) for cur, nxt in zip(merged, merged[1:])]
    by_size = collections.defaultdict(lambda: [0, 0.0])
    for us, *_ in gaps:
      size = "<10us" if us < 10 else "10-100us" if us < 100 else "0.1-1ms" if us < 1000 else ">1ms"
      by_size[size][0] += 1
      by_size[size][1] += us / 1e3
    rows.append({"gpu": names[pid], "span_ms": round((merged[-1][1] - t0) / 1e3, 2),
                 "busy_ms": round(sum(b - a for a, b, *_ in merged) / 1e3, 2), "kernels": len(ks),
                 "gaps": {k: {"count": c, "ms": round(ms, 2)} for k, (c, ms) in sorted(by_size.items())}})
    # Gaps of 0.1 ms or more by the kernels around them and the run's work during them
    groups = collections.defaultdict(lambda: [0, 0.0])
    for us, at, before, after in gaps:
      if us >= 100:
        key = (before, after, tuple(sorted({n for a, b, n in host if a < at + us and b > at})))
        groups[key][0] += 1
        groups[key][1] += us / 1e3
    for (before, after, during), (c, ms) in sorted(groups.items(), key=lambda g: -g[1][1])[:count]:
      rows.append({"gaps": c, "ms": round(ms, 2), "after_kernel": before, "before_kernel": after, "host": during})
    for us, at, before, after in sorted(gaps, reverse=True)[:count]:
      during = sorted({n for a, b, n in host if a < at + us and b > at})
      longest = sorted(((b - a, n) for a, b, n in every if a < at + us and b > at and b - a > 500), reverse=True)
      rows.append({"gap_us": round(us), "at_ms": round((at - t0) / 1e3, 2), "after_kernel": before,
                   "before_kernel": after, "host": during,
                   "host_events_ms": [(n, round(d / 1e3, 1)) for d, n in longest[:6]]})
  return rows


def main(argv):
  del argv
  if not 1 <= _EPOCH.value <= _CONFIG.value.training.epochs:
    raise UserError(f"--trace_epoch={_EPOCH.value}: the run has epochs 1 to {_CONFIG.value.training.epochs}")
  timings = collections.defaultdict(lambda: collections.defaultdict(float))
  _annotate(run_lib._Run, timings)
  run_lib.train_and_evaluate(_CONFIG.value, fresh=True)
  for epoch, times in sorted(timings.items()):  # wall ms (the test's evaluation in the last epoch's)
    print(json.dumps({"epoch": epoch, **{k: round(1e3 * v, 1) for k, v in sorted(times.items())}}), flush=True)
  for row in gaps_report(_DIR.value, _GAPS.value):
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main, config_flag="config")
