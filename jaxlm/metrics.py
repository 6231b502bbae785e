"""Where a run's numbers go: the console, `<workdir>/metrics.jsonl` and TensorBoard event files."""
import json
import math
import os
import time

import jax

from jaxlm.cli import naming

# Datasheet dense bf16 peak FLOP/s per chip, for MFU. Devices not listed report no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12,
                   "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def peak_flops(device: jax.Device, compute_dtype) -> float | None:
  if jax.numpy.dtype(compute_dtype) != jax.numpy.bfloat16:
    return None  # float32 rates vary with the matmul precision; only bf16 has one clear peak
  return next((v for k, v in PEAK_BF16_FLOPS.items() if k in device.device_kind), None)


def mfu(tokens_per_s: float | None, flops_per_token: float, peak: float | None) -> float | None:
  """Model FLOPs utilization: achieved model FLOP/s over the chip's peak (None when unknown)."""
  return tokens_per_s * flops_per_token / peak if peak and tokens_per_s is not None else None


def bits_per_byte(nats: float, num_bytes: int) -> float:
  return nats / (math.log(2) * num_bytes)


def format_duration(seconds: float) -> str:
  seconds = int(seconds)
  h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class JsonlWriter:
  """metrics.jsonl: one JSON object per line (pandas.read_json(path, lines=True))."""

  def __init__(self, path: str, keep_epochs_up_to: int):
    """Opens for appending; lines of epochs after `keep_epochs_up_to` (written after the checkpoint
    a run resumes from) are dropped, so the file always agrees with the checkpoint."""
    self.path = path
    if os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if _epoch_of(line) <= keep_epochs_up_to]
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(kept)
      os.replace(tmp, path)

  def write(self, record: dict) -> None:
    with naming(self.path), open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
      f.flush()
      os.fsync(f.fileno())


def _epoch_of(line: str) -> float:
  """The epoch of a metrics.jsonl line; inf for a line cut off by a crash (so it is dropped)."""
  try:
    return json.loads(line)["epoch"]
  except (ValueError, KeyError, TypeError):
    return float("inf")


class TensorBoard:
  """Scalars and text under <workdir>/tensorboard, written synchronously: a failed write (a full
  disk) raises here, in the training loop, instead of killing a writer thread that the loop would
  then wait on forever. A run starting from step S (0 without a checkpoint) hides what an earlier
  process logged after S (work this run redoes); what it logged up to S stays."""

  def __init__(self, logdir: str, resume_step: int):
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event, SessionLog
    os.makedirs(logdir, exist_ok=True)
    self._event = Event
    with naming(logdir):
      # tensorboardX names the file by the second it opens it in and truncates one of that name: a
      # run resumed within the same second would erase what the stopped run logged. The suffix
      # numbers the files in the order the runs wrote them, which TensorBoard reads them in (by name).
      count = sum("tfevents" in name for name in os.listdir(logdir))
      self._writer = EventsWriter(os.path.join(logdir, "events"), f".{count:04d}")
      self.path = self._writer._file_name
    # TensorBoard hides the points at and after a restart marker's step: what an earlier process
    # logged past the checkpoint this run starts from (all of it when there is none).
    self._write(Event(step=resume_step + 1, session_log=SessionLog(status=SessionLog.START)))

  def scalars(self, step: int, values: dict, prefix: str) -> None:
    from tensorboardX.summary import scalar
    for name, value in values.items():
      if value is not None:
        self._write(self._event(step=step, summary=scalar(f"{prefix}/{name}", value)))
    self.flush()

  def text(self, step: int, tag: str, text: str) -> None:
    from tensorboardX.summary import text as text_summary
    self._write(self._event(step=step, summary=text_summary(tag, text)))
    self.flush()

  def flush(self) -> None:
    with naming(self.path):
      self._writer.flush()

  def close(self) -> None:
    with naming(self.path):
      self._writer.close()

  def _write(self, event) -> None:
    event.wall_time = time.time()
    with naming(self.path):
      self._writer.write_event(event)


class Progress:
  """One console line every `log_every_steps` steps: step, loss, lr, tokens/s, MFU, ETA."""

  def __init__(self, total_steps: int, tokens_per_step: int, flops_per_token: float, peak: float | None):
    self.total_steps, self.tokens_per_step = total_steps, tokens_per_step
    self.flops_per_token, self.peak = flops_per_token, peak
    self.reset(0)

  def reset(self, step: int) -> None:
    """Start timing from `step` (after compilation, evaluation or a resume)."""
    self.t0, self.step0 = time.perf_counter(), step

  def rates(self, step: int) -> dict:
    elapsed = max(time.perf_counter() - self.t0, 1e-9)
    tokens_per_s = (step - self.step0) * self.tokens_per_step / elapsed
    return {"tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak)}

  def line(self, epoch: int, epochs: int, step: int, loss: float, lr: float, steps_left_in_epoch: int) -> str:
    r = self.rates(step)
    per_step = self.tokens_per_step / max(r["tokens_per_s"], 1e-9)
    mfu = f" | MFU {100 * r['mfu']:.1f}%" if r["mfu"] is not None else ""
    return (f"epoch {epoch}/{epochs} step {step:,}/{self.total_steps:,} | loss {loss:.4f} | lr {lr:.2e} | "
            f"{r['tokens_per_s']:,.0f} tok/s{mfu} | ETA epoch {format_duration(steps_left_in_epoch * per_step)}"
            f", run {format_duration((self.total_steps - step) * per_step)}")
