"""How well a model predicts a split of text, exactly, and the command line that measures it.

    python -m jaxlm.evaluate --workdir=runs/experiment_1 --split=test [--stride=64] [--json]

The split's tokens are cut into windows of `context` tokens that start `stride` tokens apart; a
window scores the tokens its predecessor did not, so every token but the split's first (which has
nothing to be predicted from) is scored exactly once, whatever the mode:
- disjoint windows (stride = context - 1, the default, and what training validates with): each
  window scores all its tokens, so a token is predicted from 1 to context - 1 tokens before it;
- a sliding window (stride < context - 1, how published WikiText perplexities are measured): each
  window scores only its last `stride` tokens, each predicted from at least context - stride.
Reported: loss per token (nats), perplexity, bits per byte (comparable across tokenizers) and
word-level perplexity (the split's total loss over its whitespace-separated words, the number
people compare on WikiText-2), each with the mode that produced it.
"""
import itertools
import math
import sys
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import metrics as metrics_lib
from jaxlm import model as model_lib
from jaxlm import sharding as sharding_lib
from jaxlm.cli import UsageError, UserError, flag_values


# What `evaluate` measures, the figures a run logs for validation and test.
METRICS = ("loss", "perplexity", "bpb", "word_perplexity")


class EvaluateError(UserError):
  """Bad input to an evaluation; the message says what to fix."""


def describe_mode(context: int, stride: int) -> str:
  if stride == context - 1:
    return f"disjoint windows of {context} tokens"
  return f"sliding window of {context} tokens, stride {stride}"


def check_stride(stride: int, context: int) -> None:
  if not 1 <= stride <= context - 1:
    raise EvaluateError(f"stride={stride} must be between 1 and the context - 1 = {context - 1}")


def _starts(n: int, context: int, stride: int) -> np.ndarray:
  """Where the windows over n tokens start: the last is the first >= n - context."""
  check_stride(stride, context)
  if n < 2:
    raise EvaluateError(f"the split has {n} token(s): nothing to predict")
  return np.arange(0, max(n - context, 0) + stride, stride)


def windows(tokens: np.ndarray, context: int, stride: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(int32 [batch_size, context] tokens, bool [batch_size, context - 1] weights of the targets each
  window scores: target j is token j + 1). The last batch is padded with windows of weight 0, so
  that one compiled step serves every batch."""
  n = len(tokens)
  starts = _starts(n, context, stride)
  target = np.arange(1, context)
  for i in range(0, len(starts), batch_size):
    s_B1 = np.pad(starts[i:i + batch_size], (0, max(0, i + batch_size - len(starts))), constant_values=n)[:, None]
    scored = (target >= context - stride) | (s_B1 == 0)  # what the previous window did not score
    weights = scored & (s_B1 + target < n)
    ids = np.asarray(tokens[np.minimum(s_B1 + np.arange(context), n - 1)], np.int32)
    yield ids, weights


# Most batches per call of the eval step on an accelerator, where a call of one small batch costs more
# in dispatch and transfers than the batch's compute (validation of the guide's GPU config: 40-53 ms in
# 27 calls on an H200). One on a CPU, where a batch outweighs its call and a stop should be heard soon.
ACCELERATOR_BATCHES_PER_CALL = 16


def batches_per_call(platform: str) -> int:
  return 1 if platform == "cpu" else ACCELERATOR_BATCHES_PER_CALL


def calls(tokens: np.ndarray, context: int, stride: int, batch_size: int,
          per_call: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """`windows`' batches K at a time, K <= `per_call` spreading them evenly over the fewest calls: (int32
  [K, B, context] tokens, bool [K, B, context - 1] weights); the last call's missing batches (fewer
  than the calls) are windows of weight 0."""
  num_batches = -(-len(_starts(len(tokens), context, stride)) // batch_size)
  k = -(-num_batches // -(-num_batches // per_call))
  batches = windows(tokens, context, stride, batch_size)
  for group in iter(lambda: list(itertools.islice(batches, k)), []):
    group += [tuple(np.zeros_like(a) for a in group[0])] * (k - len(group))
    yield np.stack([b[0] for b in group]), np.stack([b[1] for b in group])


def make_eval_step(apply_fn, mesh: jax.sharding.Mesh | None = None, params_shardings=None) -> Callable:
  """(params, tokens_KBW, weights_KBT) -> (float32 [K] summed loss, int32 [K] scored token count) of
  each of K batches, jitted; one batch at a time (a scan), so memory is a batch's whatever K. With a
  mesh, the params are laid out as `params_shardings` and each (host) batch is split over the mesh's
  devices, so its size must be a multiple of `sharding.batch_multiple(mesh)`."""

  def eval_batch(params, tokens_BW, weights_BT):
    logits_BWV = apply_fn({"params": params}, tokens_BW, deterministic=True)
    losses_BT = model_lib.next_token_losses(logits_BWV, tokens_BW)
    return jnp.sum(jnp.where(weights_BT, losses_BT, 0.0), dtype=jnp.float32), jnp.sum(weights_BT, dtype=jnp.int32)

  # A trip count known when compiling: a loop over an argument's count would copy its condition to
  # the host after every batch on a GPU.
  eval_batches = lambda params, tokens_KBW, weights_KBT: jax.lax.map(  # noqa: E731
      lambda batch: eval_batch(params, *batch), (tokens_KBW, weights_KBT))
  if mesh is None:
    return jax.jit(eval_batches)
  batches = sharding_lib.batches(mesh)
  step = jax.jit(eval_batches, in_shardings=(params_shardings, batches, batches),
                 out_shardings=sharding_lib.replicated(mesh))
  # Every process holds the whole host batches; each device gets its rows of each.
  return lambda params, tokens_KBW, weights_KBT: step(params, sharding_lib.put(tokens_KBW, batches),
                                                      sharding_lib.put(weights_KBT, batches))


def evaluate(eval_step, params, tokens: np.ndarray, token_bytes: np.ndarray, num_words: int | None,
             context: int, stride: int | None = None, batch_size: int = 16, per_call: int = 1,
             stop: Callable[[], bool] = lambda: False, multiple: int = 1) -> dict | None:
  """Loss, perplexity, bits per byte and word-level perplexity of `tokens` (one split), up to
  `per_call` batches per call of `eval_step` (`batches_per_call`), or None if `stop()` turned true on
  the way (checked between calls: a stop waits at most for two). Batches of `batch_size` windows (a
  multiple of `multiple`), or fewer when the split has fewer: padding windows cost as real ones do."""
  stride = context - 1 if stride is None else stride
  num_windows = len(_starts(len(tokens), context, stride))
  batch_size = min(batch_size, -(-num_windows // multiple) * multiple)
  in_flight, sums = [], []
  for ids, weights in calls(tokens, context, stride, batch_size, per_call):
    if stop():
      return None
    in_flight.append(eval_step(params, ids, weights))
    if len(in_flight) > 2:  # the device works ahead, but not far: a stop is heard quickly
      sums.append(jax.device_get(in_flight.pop(0)))
  sums += jax.device_get(in_flight)
  nats = math.fsum(float(s) for batch_sums, _ in sums for s in batch_sums)
  count = sum(int(c) for _, counts in sums for c in counts)
  num_bytes = int(token_bytes[np.asarray(tokens[1:], np.int64)].sum())
  assert count == len(tokens) - 1, (count, len(tokens))  # every token but the first, once
  loss = nats / count
  return {"mode": describe_mode(context, stride), "context": context, "stride": stride, "tokens": count,
          "bytes": num_bytes, "words": num_words, "loss": loss, "perplexity": _exp(loss),
          "bpb": metrics_lib.bits_per_byte(nats, num_bytes),
          "word_perplexity": _exp(nats / num_words) if num_words else None}


def _exp(x: float) -> float:
  return math.exp(min(x, 700.0))


def summary_line(name: str, result: dict) -> str:
  word = f" | word ppl {result['word_perplexity']:.2f}" if result.get("word_perplexity") else ""
  return (f"{name} ({result['mode']}): loss {result['loss']:.4f} | ppl {result['perplexity']:.2f} | bpb "
          f"{result['bpb']:.4f}{word} | {result['tokens']:,} tokens")


# ----------------------------------------------------------------------------------------------- CLI
def _define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "A run's work directory (its config.workdir).")
  flags.DEFINE_enum("split", "test", ["train", "validation", "test"], "The split to measure.")
  flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Which checkpoint to measure.")
  flags.DEFINE_string("data_dir", None, "A folder with the split's text file (named as data.data_dir's); "
                      "default: the run's own data source.")
  flags.DEFINE_integer("stride", None, "Tokens between windows, 1 to context - 1. Below context - 1: a sliding "
                       "window, each token predicted from at least context - stride tokens. Default: "
                       "context - 1, disjoint windows.")
  flags.DEFINE_integer("context", None, "Window length in tokens, up to the model's positions; default: the "
                       "run's data.seq_length.")
  flags.DEFINE_integer("batch_size", None, "Windows per batch; default: the run's training.eval_batch_size.")
  flags.DEFINE_string("device", "auto", "auto, cpu, gpu or tpu.")
  flags.DEFINE_bool("json", False, "Print the result as one JSON object.")
  flags.mark_flag_as_required("workdir")


def main(argv) -> None:
  import json
  import os

  from absl import flags

  from jaxlm import data, workdir
  FLAGS = flags.FLAGS
  del argv
  if FLAGS.batch_size is not None and FLAGS.batch_size < 1:
    raise UsageError(f"--batch_size={FLAGS.batch_size} must be >= 1")
  trained = workdir.load(FLAGS.workdir, FLAGS.checkpoint, FLAGS.device)
  config = trained.config
  context = config.data.seq_length if FLAGS.context is None else FLAGS.context
  if not 2 <= context <= trained.context:
    raise UsageError(f"--context={context} must be between 2 and the model's {trained.context} positions")
  if FLAGS.stride is not None:  # before the text is read
    with flag_values():
      check_stride(FLAGS.stride, context)
  if FLAGS.data_dir:
    config.data.data_dir = FLAGS.data_dir
  if config.data.data_dir and not os.path.isdir(config.data.data_dir):  # e.g. the run's relative path
    what = "is a file, not a folder" if os.path.exists(config.data.data_dir) else f"is not there (from {os.getcwd()})"
    raise EvaluateError(f"the folder {config.data.data_dir!r} {what}: pass --data_dir=FOLDER holding the "
                        f"{FLAGS.split} split's text")
  source = data.source_spec(config, [FLAGS.split])
  lines = data.read_rows(config, source, [FLAGS.split])[FLAGS.split]
  tokens = data.encode(trained.tokenizer, lines)
  where = source.get("dir") or f"hub {source['name']}/{source['config']}"
  print(f"{trained.path}: {FLAGS.split} split of {where}, {len(tokens):,} tokens", file=sys.stderr, flush=True)
  result = evaluate(make_eval_step(trained.model.apply), trained.params, tokens,
                    data.token_byte_lengths(trained.tokenizer), data.count_words(lines), context, FLAGS.stride,
                    FLAGS.batch_size or config.training.eval_batch_size, batches_per_call(trained.device.platform))
  result = {"workdir": os.path.abspath(FLAGS.workdir), "checkpoint": FLAGS.checkpoint,
            "step": trained.meta["global_step"], "split": FLAGS.split, **result}
  print(json.dumps(result) if FLAGS.json else summary_line(FLAGS.split, result), flush=True)


if __name__ == "__main__":
  from jaxlm import cli
  _define_flags()
  cli.run(main, smaller="a smaller --batch_size or --context")
