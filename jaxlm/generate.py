"""Text from a trained model: autoregressive sampling with a KV cache, and its command line.

    python -m jaxlm.generate --workdir=runs/experiment_1 --prompt="The meaning of life is"

`make_sampler` compiles the whole decode loop once: the prompts are prefilled in one call of the
model's decode mode, then a loop (`lax.fori_loop` in chunks under a `lax.while_loop`) feeds one token
per step, updating the cache in place. Rows are prompts of any lengths (right-padded; each row keeps
its own position). Once the longest would pass the model's context, every row continues over a
sliding window: the last `context` tokens are run through the model again for each new token
(learned positions cannot be shifted in a cache), as nanoGPT does. A row ends at the end-of-text
token. Temperature 0 is greedy; top-k and top-p (nucleus) cut the distribution before sampling.
Randomness: fold_in(PRNGKey(seed), step), so a seed repeats.
"""
import math
import sys
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from jaxlm import cli
from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm import sharding as sharding_lib
from jaxlm.data import END_OF_TEXT

MAX_NEW_TOKENS = 2**30  # positions are int32


class GenerateError(cli.UserError):
  """Bad input to generation; the message says what to fix."""


def check_settings(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
  if not 0 <= temperature < math.inf:
    raise GenerateError(f"temperature={temperature} must be >= 0 and finite (0 is greedy)")
  if not 0 < top_p <= 1:
    raise GenerateError(f"top_p={top_p} must be in (0, 1] (1 turns it off)")
  if top_k < 0:
    raise GenerateError(f"top_k={top_k} must be >= 0 (0 turns it off)")
  if not 0 <= max_new_tokens <= MAX_NEW_TOKENS:
    raise GenerateError(f"max_new_tokens={max_new_tokens} must be in [0, {MAX_NEW_TOKENS:,}]")


def filter_logits(logits_BV: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """-inf outside the top_k most likely tokens and outside the smallest set whose probability
  reaches top_p (the most likely token is always kept). Kept by rank, not by value: of tokens tied
  at the cut (common in bfloat16), the lower ids are kept, so exactly top_k stay."""
  V = logits_BV.shape[-1]
  k = top_k if 0 < top_k < V else V
  if k == V and top_p >= 1:
    return logits_BV
  top_BK, ids_BK = jax.lax.top_k(logits_BV, k)  # descending; ties in id order
  kept_BK = jnp.ones(top_BK.shape, bool)
  if top_p < 1:  # of the top_k, renormalised
    probs_BK = jax.nn.softmax(top_BK, axis=-1)
    kept_BK = jnp.cumsum(probs_BK, axis=-1) - probs_BK < top_p  # probability ranked above < top_p
  rows_B1 = jnp.arange(logits_BV.shape[0])[:, None]
  kept_BV = jnp.zeros(logits_BV.shape, bool).at[rows_B1, ids_BK].set(kept_BK)
  return jnp.where(kept_BV, logits_BV, -jnp.inf)


def sample_token(key: jax.Array, logits_BV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """int32 [B]: the next token of each row, chosen in float32 from logits of any dtype."""
  logits_BV = logits_BV.astype(jnp.float32)
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  # The best logit at 0 first: a tiny temperature then sends the others to -inf, never one to +inf.
  logits_BV = logits_BV - jnp.max(logits_BV, axis=-1, keepdims=True)
  logits_BV = filter_logits(logits_BV / temperature, top_k, top_p)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


class _Decoding(NamedTuple):
  """What the decode loop carries from one token to the next."""
  step: jax.Array  # decode steps so far (an ended row's length stops growing)
  tokens_BT: jax.Array  # prompts and what follows them
  lengths_B: jax.Array  # each row's tokens so far
  done_B: jax.Array  # rows that made the end token
  logits_BV: jax.Array  # of each row's next token
  cache: dict  # the model's decode cache (unused past the context)


def _steps(body, state: _Decoding, n: int, stop: Callable[[], bool] | None = None, chunk: int = 64) -> _Decoding:
  """`n` (static) calls of body, stopping early once every row has ended, or when `stop()` (asked on
  the host) says so. A loop of known length runs on a GPU without the host reading its condition
  back at every token: that is done once per `chunk` tokens (on an H200 at batch 1: 9.5k tokens/s
  for the base model at 16 tokens, 8.5k at every token). At 64, asking `stop` costs 0.5-1.6%, at
  16 1.5-4.9% (experiments/README.md, "Text generation speed")."""
  full, rest = divmod(n, chunk)
  run = lambda s, k: jax.lax.fori_loop(0, k, lambda _, s: body(s), s)  # noqa: E731

  def run_chunk(s: _Decoding) -> _Decoding:
    s = run(s, chunk)
    if stop is not None:  # every row ends
      s = s._replace(done_B=s.done_B | io_callback(lambda: np.bool_(stop()), jax.ShapeDtypeStruct((), jnp.bool_)))
    return s

  if full:
    end = state.step + full * chunk
    state = jax.lax.while_loop(lambda s: (s.step < end) & ~jnp.all(s.done_B), run_chunk, state)
  if rest:
    state = jax.lax.cond(jnp.all(state.done_B), lambda s: s, lambda s: run(s, rest), state)
  return state


def make_sampler(model: model_lib.Transformer, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, end_id: int | None = None,
                 stream: Callable[[np.ndarray], None] | None = None, stop: Callable[[], bool] | None = None):
  """A jitted fn(params, tokens_BP, lengths_B, seed) -> (tokens [B, P + max_new_tokens], lengths [B]):
  row b's prompt is tokens_BP[b, :lengths_B[b]] (each at most the model's context, the longest
  P = tokens_BP.shape[1] long); the result holds the prompt and what follows it, up to the row's
  final length (an end token included). `stream`, when given, receives each step's new tokens [B]
  on the host as they are made; `stop`, when given, is asked every few tokens whether to end every
  row there (a Ctrl-C: the loop runs on the device, out of Python's reach)."""
  check_settings(temperature, top_k, top_p, max_new_tokens)
  context = model.max_seq_length
  end = -1 if end_id is None else end_id

  def next_logits(params, tokens_BT, lengths_B):
    """Logits of the token after each row's last, from the last `context` tokens (no cache)."""
    start_B = jnp.maximum(lengths_B - context, 0)
    window_BC = jax.vmap(lambda row, s: jax.lax.dynamic_slice(row, (s,), (context,)))(tokens_BT, start_B)
    logits_BCV = model.apply({"params": params}, window_BC)
    return jnp.take_along_axis(logits_BCV, (lengths_B - 1 - start_B)[:, None, None], axis=1)[:, 0]

  def append(s: _Decoding, key) -> tuple[_Decoding, jax.Array]:
    """Samples each row's next token from the logits and writes it after the row's last."""
    new_B = sample_token(jax.random.fold_in(key, s.step), s.logits_BV, temperature, top_k, top_p)
    new_B = jnp.where(s.done_B, end, new_B)  # an ended row stays in place
    tokens_BT = s.tokens_BT.at[jnp.arange(s.tokens_BT.shape[0]), s.lengths_B].set(new_B)
    if stream is not None:
      io_callback(stream, None, new_B, ordered=True)
    return s._replace(step=s.step + 1, tokens_BT=tokens_BT, lengths_B=s.lengths_B + ~s.done_B,
                      done_B=s.done_B | (new_B == end)), new_B

  @jax.jit
  def sample(params, tokens_BP, lengths_B, seed):
    B, P = tokens_BP.shape
    if P > context:
      raise GenerateError(f"prompts of {P} tokens do not fit the model's context of {context}: keep their last "
                          f"{context} (encode_prompt does)")
    key = jax.random.PRNGKey(seed)
    tokens_BT = jnp.concatenate([tokens_BP, jnp.zeros((B, max_new_tokens), jnp.int32)], axis=1)
    # Prefill every row's prompt in one call; each row's cache index then sits at its own length.
    cache = model_lib.init_cache(model, B, context)
    logits_BPV, variables = model.apply({"params": params, "cache": cache}, tokens_BP, decode=True,
                                        mutable=["cache"])
    logits_BV = jnp.take_along_axis(logits_BPV, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    state = _Decoding(jnp.zeros((), jnp.int32), tokens_BT, lengths_B, jnp.zeros(B, bool), logits_BV,
                      {**variables["cache"], "index": lengths_B})

    def cached_step(s: _Decoding) -> _Decoding:  # feeds the new token at its position
      s, new_B = append(s, key)
      logits_B1V, variables = model.apply({"params": params, "cache": s.cache}, new_B[:, None], decode=True,
                                          mutable=["cache"])
      return s._replace(logits_BV=logits_B1V[:, 0], cache=variables["cache"])

    def window_step(s: _Decoding) -> _Decoding:  # past the context: the last `context` tokens again
      s, _ = append(s, key)
      return s._replace(logits_BV=next_logits(params, s.tokens_BT, s.lengths_B))

    # The longest prompt is P tokens: its next max_new_tokens fit the cache up to the context.
    cached = min(max_new_tokens, context - P)
    state = _steps(cached_step, state, cached, stop)
    state = _steps(window_step, state, max_new_tokens - cached, stop)
    return state.tokens_BT, state.lengths_B

  return sample


def pad_prompts(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
  """(int32 [B, P] right-padded with 0, int32 [B] lengths)."""
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.zeros((len(prompts), max(lengths)), np.int32)
  for row, p in zip(tokens, prompts):
    row[:len(p)] = p
  return tokens, lengths


def completions(tokens_BT: np.ndarray, lengths_B: np.ndarray, prompt_lengths: list[int],
                end_id: int | None) -> list[list[int]]:
  """The new tokens of each row, without the end token."""
  out = []
  for row, n, p in zip(np.asarray(tokens_BT), np.asarray(lengths_B), prompt_lengths):
    new = row[p:n].tolist()
    out.append(new[:new.index(end_id)] if end_id in new else new)
  return out


def check_prompt(text: str) -> None:
  if not text.strip():
    raise GenerateError("the prompt is empty: give some text with --prompt (or --prompt_file)")


def encode_prompt(tokenizer, text: str, context: int, warn: Callable[[str], None] = print) -> list[int]:
  check_prompt(text)
  ids = tokenizer.encode(text, add_special_tokens=False).ids
  if len(ids) > context:
    warn(f"WARNING: the prompt has {len(ids):,} tokens, more than the model's context of {context}: "
         f"only its last {context} are used")
    ids = ids[-context:]
  return ids


class TextStream:
  """Prints one row's tokens as text as they arrive (whole characters only). Each token decodes a
  few, not the whole row: the new text is the decoding of ids[start:] less that of
  ids[start:printed], the tokens before `printed` there to give the decoder its context (a leading
  space, say)."""

  def __init__(self, tokenizer, out=sys.stdout):
    self.tokenizer, self.out, self.ids, self.start, self.printed = tokenizer, out, [], 0, 0
    self.error = None  # a failed write (a closed pipe): raised by close(), not in the device's callback

  def __call__(self, new_B: np.ndarray) -> None:
    self.ids.append(int(new_B[0]))
    self._write(final=False)

  def _write(self, final: bool) -> None:
    before = self.tokenizer.decode(self.ids[self.start:self.printed])
    text = self.tokenizer.decode(self.ids[self.start:])
    if self.error or len(text) <= len(before) or (text.endswith("\ufffd") and not final):
      return  # nothing new, or a character split across tokens: wait for the rest
    try:
      self.out.write(text[len(before):])
      self.out.flush()
    except OSError as e:
      self.error = e
    self.start, self.printed = self.printed, len(self.ids)

  def close(self) -> None:
    """Prints what is left (an unfinished character as U+FFFD); raises a failed write's error."""
    self._write(final=True)
    if self.error:
      raise self.error


# ----------------------------------------------------------------------------------------------- CLI
def _define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "A run's work directory (its config.workdir).")
  flags.DEFINE_multi_string("prompt", [], "Text to continue; repeat the flag for several prompts.")
  flags.DEFINE_string("prompt_file", None, "A text file with one prompt per line (blank lines skipped).")
  flags.DEFINE_integer("max_new_tokens", 256, "Tokens to generate after each prompt.")
  flags.DEFINE_float("temperature", None, "0 is greedy; default: the run's sample.temperature.")
  flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens (0: all); default: sample.top_k.")
  flags.DEFINE_float("top_p", None, "Nucleus sampling, in (0, 1] (1: off); default: sample.top_p.")
  flags.DEFINE_integer("seed", None, "Random seed; default: the run's sample.seed.")
  flags.DEFINE_integer("num_samples", 1, "Samples per prompt.")
  flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Which checkpoint to use.")
  flags.DEFINE_string("device", "auto", "auto, cpu, gpu or tpu.")
  flags.mark_flag_as_required("workdir")


def _read_prompts(FLAGS) -> list[str]:
  prompts = list(FLAGS.prompt)
  if FLAGS.prompt_file:
    try:
      with open(FLAGS.prompt_file, encoding="utf-8") as f:
        prompts += [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
      raise GenerateError(f"cannot read --prompt_file={FLAGS.prompt_file}: {e}") from None
  if not prompts:
    raise cli.UsageError("no prompt: give --prompt=TEXT (repeatable) or --prompt_file=FILE")
  with cli.flag_values(prefix=""):
    for p in prompts:
      check_prompt(p)
  return prompts


def _check_fits(compiled, device, what: str) -> None:
  """GenerateError when the compiled sampler needs more memory than `device` has: refused before
  it runs (XLA would abort the process on a CPU)."""
  memory = compiled.memory_analysis()
  have, where = sharding_lib.memory_limit(device)
  need = memory and memory.temp_size_in_bytes + memory.argument_size_in_bytes + memory.output_size_in_bytes
  if have and need and need > have:
    raise GenerateError(f"{what} need {need / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB of {where}: "
                        f"ask for fewer prompts or --num_samples, or a smaller --max_new_tokens")


def main(argv) -> None:
  from absl import flags
  from jaxlm import workdir
  del argv
  FLAGS = flags.FLAGS
  prompts = _read_prompts(FLAGS)
  if FLAGS.num_samples < 1:
    raise cli.UsageError(f"--num_samples={FLAGS.num_samples} must be >= 1")
  seed_ok = True if FLAGS.seed is None else config_lib.SCHEMA["sample.seed"][1](FLAGS.seed)  # sample.seed's check
  if seed_ok is not True:
    raise cli.UsageError(f"--seed={FLAGS.seed} {seed_ok}")
  pick = lambda flag, default: default if flag is None else flag  # noqa: E731
  with cli.flag_values():
    check_settings(pick(FLAGS.temperature, 1.0), pick(FLAGS.top_k, 0), pick(FLAGS.top_p, 1.0), FLAGS.max_new_tokens)
  trained = workdir.load(FLAGS.workdir, FLAGS.checkpoint, FLAGS.device)
  s = trained.config.sample  # the run's sampling settings are the defaults
  settings = dict(temperature=pick(FLAGS.temperature, s.temperature), top_k=pick(FLAGS.top_k, s.top_k),
                  top_p=pick(FLAGS.top_p, s.top_p))
  encoded = [encode_prompt(trained.tokenizer, p, trained.context, lambda m: print(m, file=sys.stderr))
             for p in prompts]
  end_id = trained.tokenizer.token_to_id(END_OF_TEXT)
  rows, longest = len(encoded) * FLAGS.num_samples, max(len(e) for e in encoded)
  print(f"{trained.path}: {FLAGS.max_new_tokens} new tokens per prompt, temperature {settings['temperature']}, "
        f"top_k {settings['top_k']}, top_p {settings['top_p']}", file=sys.stderr, flush=True)
  stream = TextStream(trained.tokenizer) if rows == 1 else None
  with cli.interrupt_after() as interrupted:  # a Ctrl-C, or a reader gone (`| head`), ends the decode soon
    sampler = make_sampler(trained.model, FLAGS.max_new_tokens, **settings, end_id=end_id, stream=stream,
                           stop=lambda: interrupted() or bool(stream and stream.error))
    # Compiled for the rows' shapes, and refused if it cannot fit, before any row is made.
    sampler = sampler.lower(trained.params, jax.ShapeDtypeStruct((rows, longest), jnp.int32),
                            jax.ShapeDtypeStruct((rows,), jnp.int32), 0).compile()
    _check_fits(sampler, trained.device, f"{rows:,} rows of up to {longest + FLAGS.max_new_tokens:,} tokens")
    ids = [prompt_ids for prompt_ids in encoded for _ in range(FLAGS.num_samples)]
    if stream:
      print(trained.tokenizer.decode(ids[0]), end="", flush=True)
    tokens, lengths = jax.device_get(sampler(trained.params, *pad_prompts(ids), pick(FLAGS.seed, s.seed)))
  if stream:  # the text is out already
    stream.close()
    print(flush=True)
    return
  new = completions(tokens, lengths, [len(i) for i in ids], end_id)
  for row, (prompt_ids, new_ids) in enumerate(zip(ids, new)):
    print(f"--- prompt {row // FLAGS.num_samples + 1}, sample {row % FLAGS.num_samples + 1} ---")
    print(trained.tokenizer.decode(prompt_ids + new_ids), flush=True)


if __name__ == "__main__":
  _define_flags()
  cli.run(main, smaller="fewer prompts or --num_samples, or a smaller --max_new_tokens")
