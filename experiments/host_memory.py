"""Host memory of a long training run: does the process grow as it trains, saves and logs? A week
on a GPU is ~100x the epochs a test runs, so a leak of a few MB per epoch matters there.

    python experiments/host_memory.py -- python -m jaxlm.main --config=configs/base.py:tiny \\
        --config.data.data_dir=... --config.training.epochs=40 --config.training.patience=1000

Runs the command as a child, samples its anonymous resident memory (RssAnon, /proc: the heap, not
the shared libraries' pages, which the kernel drops and reloads as it likes) twice a second, and
prints one JSON line per finished epoch (its RssAnon then, and the peak so far) and a last line: the
highest epoch end in each fifth of the run (a leak raises them one after the other; the allocator's
saw tooth does not), and the least-squares growth in MB per epoch and per 1,000 steps over the
epochs after the first (whose end still sees compiles and first-use allocations; one large drop
skews it). Linux only.
"""
import json
import re
import subprocess
import sys
import threading
import time

import numpy as np

MB = 2 ** 20
_EPOCH = re.compile(r"^epoch (\d+)/\d+ \| step ([\d,]+) \|")


def rss_bytes(pid: int) -> int:
  with open(f"/proc/{pid}/status") as f:
    kb = next(line for line in f if line.startswith("RssAnon:")).split()[1]
  return int(kb) * 1024


def main(command: list[str]) -> None:
  try:
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
  except OSError as e:
    sys.exit(f"error: cannot run {command[0]}: {e.strerror}")
  peak, done = [0], threading.Event()

  def sample():
    while not done.is_set():
      try:
        peak[0] = max(peak[0], rss_bytes(child.pid))
      except (FileNotFoundError, ProcessLookupError, StopIteration):
        return
      time.sleep(0.5)

  threading.Thread(target=sample, daemon=True).start()
  epochs, start = [], time.perf_counter()
  for line in child.stdout:
    sys.stderr.write(line)
    match = _EPOCH.match(line)
    if match:
      try:
        rss = rss_bytes(child.pid)
      except (FileNotFoundError, ProcessLookupError, StopIteration):  # it has just exited
        continue
      peak[0] = max(peak[0], rss)
      epochs.append((int(match[1]), int(match[2].replace(",", "")), rss))
      print(json.dumps({"epoch": epochs[-1][0], "step": epochs[-1][1], "rss_mb": round(rss / MB, 1),
                        "peak_rss_mb": round(peak[0] / MB, 1), "elapsed_s": round(time.perf_counter() - start, 1)}),
            flush=True)
  done.set()
  status = child.wait()
  summary = {"status": status, "epochs": len(epochs), "peak_rss_mb": round(peak[0] / MB, 1)}
  if len(epochs) >= 5:
    e, s, r = (np.array(c, float) for c in zip(*epochs[1:]))
    fifths = np.array_split(np.array([rss for _, _, rss in epochs], float), 5)
    summary.update(first_epoch_rss_mb=round(epochs[0][2] / MB, 1), last_epoch_rss_mb=round(epochs[-1][2] / MB, 1),
                   highest_epoch_end_by_fifths_mb=[round(f.max() / MB, 1) for f in fifths],
                   mb_per_epoch=round(np.polyfit(e, r / MB, 1)[0], 3),
                   mb_per_1000_steps=round(1000 * np.polyfit(s, r / MB, 1)[0], 3))
  print(json.dumps(summary), flush=True)


if __name__ == "__main__":
  args = sys.argv[1:]
  if not args or args[0] != "--":
    sys.exit(__doc__)
  main(args[1:])
