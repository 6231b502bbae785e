"""WikiText-2 (or any text corpus) to cached token arrays, and the batches a run reads from them.

Pipeline: source rows (Hugging Face hub, or local .txt/.raw/.parquet files, both read through
`datasets`) -> tokenizer (a byte-level BPE trained on the train split, a tokenizer.json, or a
pretrained one) -> one flat token array per split, saved as .npy under
`<processed_dir>/<name>-<fingerprint>/` with tokenizer.json and meta.json. The fingerprint covers
the source's content and the tokenizer settings, so a changed input makes a new cache, never a
stale hit; the folder appears by one atomic rename, so a crash never leaves a half-written cache.
Later runs memory-map the arrays after checking them against meta.json (lengths, dtype, SHA-256,
token ids below the vocabulary size): a damaged cache is rebuilt, never used.

Rows follow the WikiText raw layout: one row per line, a blank row written as a single space. The
hub's rows ("" for blank, others ending in "\n") are mapped to it, so all sources give the same
tokens. A split's text is its rows joined by "\n"; each row is tokenized with its "\n" (batch API),
which for a tokenizer trained without newlines equals tokenizing the whole text at once.

Run ahead of training: python -m jaxlm.data --config=configs/base.py
"""
import codecs
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import ml_collections
import numpy as np

from jaxlm.cli import UserError, naming

SPLITS = ("train", "validation", "test")
# Local file names per split, in order of preference (WikiText raw names included).
TEXT_FILES = {
    "train": ("train.txt", "wiki.train.raw"),
    "validation": ("validation.txt", "valid.txt", "wiki.valid.raw"),
    "test": ("test.txt", "wiki.test.raw"),
}
# Parquet shards per split: <prefix>-*.parquet (the hub's train-00000-of-00001.parquet) or <prefix>.parquet.
PARQUET_PREFIXES = {"train": ("train",), "validation": ("validation", "valid"), "test": ("test",)}
END_OF_TEXT = "<|endoftext|>"  # the BPE's one special token (GPT-2's too): ends a text in generation
SPECIAL_TOKENS = [END_OF_TEXT]
CACHE_FORMAT = 2  # bump when the cache layout or tokenization changes
ARRAYS = tuple(f"{s}.npy" for s in SPLITS) + ("token_bytes.npy",)


class DataError(UserError):
  """A data source or cache that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Corpus:
  tokens: dict[str, np.ndarray]  # split -> flat token ids, memory-mapped
  token_bytes: np.ndarray  # [vocab] UTF-8 bytes of text each token id stands for
  vocab_size: int
  path: str  # the cache folder
  meta: dict

  def tokenizer(self):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(os.path.join(self.path, "tokenizer.json"))


# ------------------------------------------------------------------------------------------- sources
def _find_local_files(data_dir: str, splits=SPLITS) -> tuple[str, dict[str, list[str]]]:
  """('text' | 'parquet', {split: its files}) in data_dir, for `splits`; a parquet split may have
  several shards."""
  if not os.path.isdir(data_dir):
    raise DataError(f"data.data_dir '{data_dir}' is not a directory. Point --config.data.data_dir at "
                    "a folder holding train/validation/test text or parquet files.")
  text, parquet = {}, {}
  for split in splits:
    names = [n for n in TEXT_FILES[split] if os.path.isfile(os.path.join(data_dir, n))]
    if names:
      text[split] = [os.path.join(data_dir, names[0])]
    shards = sorted({f for p in PARQUET_PREFIXES[split]
                     for f in glob.glob(os.path.join(data_dir, f"{p}-*.parquet")) +
                     glob.glob(os.path.join(data_dir, f"{p}.parquet"))})
    if shards:
      parquet[split] = shards
  for kind, files in (("text", text), ("parquet", parquet)):
    if len(files) == len(splits):
      empty = [f for paths in files.values() for f in paths if os.path.getsize(f) == 0]
      if empty:
        raise DataError(f"{', '.join(empty)} is empty: every split needs text.")
      return kind, files
  wanted = "; ".join(f"{s}: {' or '.join(TEXT_FILES[s])} or {PARQUET_PREFIXES[s][0]}-*.parquet" for s in splits)
  raise DataError(f"data.data_dir '{data_dir}' lacks some splits (found {sorted(set(text) | set(parquet))}). "
                  f"Expected one file per split: {wanted}.")


def _file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def source_spec(config: ml_collections.ConfigDict, splits=SPLITS) -> dict:
  """What identifies the source of `splits`: the local files' contents, or the hub dataset's name."""
  d = config.data
  if d.data_dir:
    fmt, files = _find_local_files(d.data_dir, splits)
    return {"kind": fmt, "files": {s: [{"name": os.path.basename(p), "sha256": _file_sha256(p)} for p in paths]
                                   for s, paths in files.items()}, "dir": os.path.abspath(d.data_dir)}
  return {"kind": "hub", "name": d.dataset_name, "config": d.dataset_config}


def _tokenizer_spec(config: ml_collections.ConfigDict) -> dict:
  tok = config.data.tokenizer
  if tok.file:
    if not os.path.isfile(tok.file):
      what = "is a directory" if os.path.isdir(tok.file) else "does not exist"
      raise DataError(f"data.tokenizer.file '{tok.file}' {what}. Give the path of a "
                      "tokenizers JSON file, or leave it empty to train a BPE on the train split.")
    return {"kind": "file", "sha256": _file_sha256(tok.file)}
  if tok.pretrained:
    return {"kind": "pretrained", "name": tok.pretrained}
  return {"kind": "bpe", "vocab_size": tok.vocab_size, "special_tokens": SPECIAL_TOKENS}


def _check_text_file(path: str) -> None:
  """DataError naming the file unless it is UTF-8 text."""
  decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      if b"\0" in block:
        raise DataError(f"{path} is not text (a NUL byte at offset {offset + block.index(0):,}): is it the "
                        f"right file? data.data_dir must hold the splits as UTF-8 text or parquet files.")
      try:
        decoder.decode(block)
      except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte 0x{block[e.start]:02x} at offset {offset + e.start:,}"
                        f" cannot be decoded). Convert it to UTF-8, e.g. iconv -f latin1 -t utf-8.") from None
      offset += len(block)
  try:
    decoder.decode(b"", final=True)
  except UnicodeDecodeError:
    raise DataError(f"{path} is not UTF-8 text (it ends inside a character). Convert it to UTF-8.") from None


_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = _FULL + (errno.EROFS, errno.EACCES, errno.EPERM, errno.EEXIST, errno.ENOTDIR)


def _raw_cache_error(config: ml_collections.ConfigDict, error: BaseException) -> DataError | None:
  """The error to report when `datasets` failed to write its cache in data.raw_dir (a full or
  read-only disk, a missing permission, a file in the way: it wraps such an OSError in its own
  types), or a full disk elsewhere; None when the cause is something else (e.g. an unreadable file)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _NOT_WRITABLE:
      raw_dir = os.path.abspath(config.data.raw_dir)
      if error.filename:
        in_cache = os.path.commonpath([raw_dir, os.path.abspath(error.filename)]) == raw_dir
      else:  # a full or read-only disk is a write; a permission error naming no file may be a read
        in_cache = error.errno in _FULL + (errno.EROFS,)
      if in_cache:
        return DataError(f"cannot write the datasets cache in {config.data.raw_dir} ({error.strerror}). Point "
                         f"--config.data.raw_dir at a writable folder with free space.")
      if error.errno in _FULL:
        return DataError(f"cannot write {error.filename} ({error.strerror}) while reading the data: free "
                         f"space there.")
    error = error.__cause__ or error.__context__
  return None


def read_rows(config: ml_collections.ConfigDict, source: dict, splits=SPLITS) -> dict[str, list[str]]:
  """{split: rows in the WikiText raw layout} of `source` (see `source_spec`), read through `datasets`."""
  import datasets  # heavy, and absent where only prepared data is used (e.g. a GPU machine)
  datasets.disable_progress_bars()
  d = config.data
  if source["kind"] == "hub":
    try:
      dsd = datasets.load_dataset(d.dataset_name, d.dataset_config, cache_dir=d.raw_dir)
    except Exception as e:  # offline, unknown name, ...: datasets raises many types
      raise _raw_cache_error(config, e) or DataError(
          f"could not load '{d.dataset_name}/{d.dataset_config}' from the Hugging Face hub "
          f"({type(e).__name__}: {str(e)[:200]}). Offline? Put the three splits in a folder "
          f"(train.txt, validation.txt, test.txt; or wiki.*.raw, or the hub's parquet files) and "
          f"pass --config.data.data_dir=FOLDER.") from None
    missing = [s for s in splits if s not in dsd]
    if missing:
      raise DataError(f"hub dataset '{d.dataset_name}/{d.dataset_config}' has no split(s) {missing}")
    return {s: _hub_rows_to_lines(dsd[s]["text"]) for s in splits}
  files = {s: [os.path.join(source["dir"], f["name"]) for f in source["files"][s]] for s in splits}
  if source["kind"] == "text":
    for paths in files.values():
      _check_text_file(paths[0])
  try:
    if source["kind"] == "text":
      dsd = datasets.load_dataset("text", data_files=files, cache_dir=d.raw_dir, keep_linebreaks=False)
      return {s: list(dsd[s]["text"]) for s in splits}
    dsd = datasets.load_dataset("parquet", data_files=files, cache_dir=d.raw_dir)
  except Exception as e:  # unreadable or malformed files
    raise _raw_cache_error(config, e) or DataError(
        f"could not read the files in {source['dir']} ({type(e).__name__}: {str(e)[:300]})") from None
  for s in splits:
    if "text" not in dsd[s].column_names:
      raise DataError(f"{files[s][0]} has no 'text' column (columns: {dsd[s].column_names})")
  return {s: _hub_rows_to_lines(dsd[s]["text"]) for s in splits}


def _hub_rows_to_lines(rows) -> list[str]:
  """Hub rows ("" blank, else ending in "\n") -> raw lines (" " blank, no newline)."""
  return [r[:-1] if r.endswith("\n") else (r or " ") for r in rows]


# ------------------------------------------------------------------------------------------ tokenizer
def _build_tokenizer(config: ml_collections.ConfigDict, spec: dict, train_lines: list[str]):
  from tokenizers import ByteLevelBPETokenizer, Tokenizer
  tok = config.data.tokenizer
  if spec["kind"] == "file":
    try:
      return Tokenizer.from_file(tok.file)
    except Exception as e:  # tokenizers raises a bare Exception for a malformed file
      raise DataError(f"data.tokenizer.file '{tok.file}' is not a tokenizer the tokenizers library reads "
                      f"({str(e)[:200]}): give a tokenizer.json saved by it (Tokenizer.save, or "
                      f"save_pretrained of a fast tokenizer)") from None
  if spec["kind"] == "pretrained":
    try:
      return Tokenizer.from_pretrained(tok.pretrained)
    except Exception as e:
      raise DataError(f"could not fetch tokenizer '{tok.pretrained}' from the hub ({type(e).__name__}). "
                      "Offline? Pass a local file with --config.data.tokenizer.file=tokenizer.json.") from None
  # Trained on lines without their newline, as the PyTorch baseline does: no merge spans a line end.
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(train_lines, vocab_size=tok.vocab_size, special_tokens=SPECIAL_TOKENS,
                          show_progress=False)
  return Tokenizer.from_str(bpe.to_str())


def token_byte_lengths(tokenizer) -> np.ndarray:
  """[vocab] UTF-8 bytes each token id stands for: exact for byte-level BPE (one char per byte),
  the decoded text's length otherwise."""
  from tokenizers import pre_tokenizers
  decoder = json.loads(tokenizer.to_str()).get("decoder") or {}
  byte_level = decoder.get("type") == "ByteLevel"
  alphabet = set(pre_tokenizers.ByteLevel.alphabet())
  added = {i: t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
  lengths = np.zeros(tokenizer.get_vocab_size(), np.int64)
  for piece, i in tokenizer.get_vocab().items():
    if i in added:
      lengths[i] = len(added[i].encode("utf-8"))
    elif byte_level and set(piece) <= alphabet:
      lengths[i] = len(piece)
    else:
      lengths[i] = len(tokenizer.decode([i]).encode("utf-8"))
  return lengths


def encode(tokenizer, lines: list[str], dtype=np.int32) -> np.ndarray:
  """The rows' token ids as one flat array (a split's text is its rows joined by "\n")."""
  rows = [line + "\n" for line in lines[:-1]] + lines[-1:]
  encodings = tokenizer.encode_batch_fast(rows, add_special_tokens=False)
  return np.concatenate([np.asarray(e.ids, dtype) for e in encodings] or [np.zeros(0, dtype)])


# ------------------------------------------------------------------------------------------ the cache
def cache_name(source: dict, tok_spec: dict) -> str:
  blob = json.dumps({"format": CACHE_FORMAT, "source": {k: v for k, v in source.items() if k != "dir"},
                     "tokenizer": tok_spec}, sort_keys=True)
  label = (f"{source['name']}-{source['config']}" if source["kind"] == "hub"
           else os.path.basename(os.path.normpath(source["dir"])) or "local")
  tok_label = {"bpe": f"bpe{tok_spec.get('vocab_size')}", "file": "tokfile",
               "pretrained": str(tok_spec.get("name", "")).replace("/", "_")}[tok_spec["kind"]]
  return f"{label}-{tok_label}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def fingerprint(cache_name: str) -> str:
  """What identifies a cache's tokens in its name (from cache_name): the hash; the label before it
  is the source folder's name, for people, which a moved or copied folder changes."""
  return cache_name.rsplit("-", 1)[-1]


def spec(config: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """(source, tokenizer) specs of `config.data`: what its cache's name is made of."""
  return source_spec(config), _tokenizer_spec(config)


def load(config: ml_collections.ConfigDict, data_spec: tuple[dict, dict] | None = None,
         verbose: bool = False) -> Corpus:
  """The tokenized corpus of `config.data` (`data_spec`: its `spec`, when already computed), prepared
  on first use, then verified and memory-mapped."""
  t0 = time.perf_counter()
  log = (lambda msg: print(f"data: {msg}", flush=True)) if verbose else (lambda msg: None)
  source, tok_spec = data_spec or spec(config)
  path = os.path.join(config.data.processed_dir, cache_name(source, tok_spec))
  corpus = None
  if os.path.exists(path):
    corpus, problem = _open_cache(path)
    if problem:
      print(f"data: WARNING: the cache {path} is damaged ({problem}); rebuilding it", flush=True)
      try:
        _discard(path, config.data.processed_dir)
      except OSError as e:
        raise DataError(f"cannot rebuild the data cache in {config.data.processed_dir} ({e.strerror or e}). "
                        f"Point --config.data.processed_dir at a writable folder with free space.") from None
    else:
      log(f"cache hit {path}")
  if corpus is None:
    _prepare(config, source, tok_spec, path, log)
    corpus, problem = _open_cache(path)
    if problem:
      raise DataError(f"the data cache {path} just written does not read back ({problem}). Is the disk "
                      f"failing? Check {config.data.processed_dir}, or point --config.data.processed_dir "
                      f"elsewhere.")
  log(f"ready in {time.perf_counter() - t0:.1f}s")
  return corpus


def _open_cache(path: str) -> tuple[Corpus | None, str | None]:
  """(the memory-mapped corpus, None), or (None, what is wrong) when a file is missing, unreadable or
  disagrees with meta.json."""
  try:
    with open(os.path.join(path, "meta.json")) as f:
      meta = json.load(f)
    vocab_size, sizes = meta["vocab_size"], {s: meta["splits"][s]["tokens"] for s in SPLITS}
    arrays = {name: np.load(os.path.join(path, name), mmap_mode="r") for name in ARRAYS}
    for name in ARRAYS + ("tokenizer.json",):
      if _file_sha256(os.path.join(path, name)) != meta["sha256"][name]:
        return None, f"{name} does not match the checksum in meta.json"
    for s in SPLITS:  # (meta.json itself has no checksum: a value of another type raises here)
      a = arrays[f"{s}.npy"]
      if a.dtype != np.dtype(meta["dtype"]) or a.shape != (sizes[s],):
        return None, f"{s}.npy holds {a.dtype} {a.shape}, meta.json says {meta['dtype']} ({sizes[s]},)"
      if a.size and int(a.max()) >= vocab_size:
        return None, f"{s}.npy holds token id {int(a.max())}, beyond the vocabulary of {vocab_size}"
    if arrays["token_bytes.npy"].shape != (vocab_size,):
      return None, f"token_bytes.npy has {arrays['token_bytes.npy'].shape} entries for a vocabulary of {vocab_size}"
  except (OSError, ValueError, KeyError, TypeError) as e:
    return None, f"{type(e).__name__}: {e}"
  tokens = {s: arrays[f"{s}.npy"] for s in SPLITS}
  return Corpus(tokens=tokens, token_bytes=np.asarray(arrays["token_bytes.npy"]), vocab_size=vocab_size,
                path=path, meta=meta), None


def _discard(path: str, processed_dir: str) -> None:
  """Moves a damaged cache out of the way at once (a rename), then deletes it."""
  aside = tempfile.mkdtemp(prefix=".tmp-damaged-", dir=processed_dir)
  try:
    os.rename(path, os.path.join(aside, "cache"))
  except FileNotFoundError:  # another process got there first
    pass
  shutil.rmtree(aside, ignore_errors=True)


def _prepare(config, source: dict, tok_spec: dict, path: str, log) -> None:
  t0 = time.perf_counter()
  where = source.get("dir") or f"hub {source['name']}/{source['config']}"
  log(f"preparing {where} -> {path}")
  lines = read_rows(config, source)
  t_load = time.perf_counter()
  log(f"read {', '.join(f'{s} {len(lines[s]):,} rows' for s in SPLITS)} in {t_load - t0:.1f}s")
  tokenizer = _build_tokenizer(config, tok_spec, lines["train"])
  vocab_size = tokenizer.get_vocab_size()
  dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
  t_tok = time.perf_counter()
  log(f"tokenizer ({tok_spec['kind']}, vocab {vocab_size:,}) in {t_tok - t_load:.1f}s")
  tokens = {s: encode(tokenizer, lines[s], dtype) for s in SPLITS}
  splits = {s: {"rows": len(lines[s]), "tokens": int(tokens[s].size), "bytes": len("\n".join(lines[s]).encode("utf-8")),
                "words": count_words(lines[s])} for s in SPLITS}
  log(f"encoded {sum(v['tokens'] for v in splits.values()):,} tokens in {time.perf_counter() - t_tok:.1f}s")
  try:
    _write_cache(config.data.processed_dir, path, tokens, tokenizer, {
        "format": CACHE_FORMAT, "source": source, "tokenizer": tok_spec, "vocab_size": vocab_size,
        "dtype": np.dtype(dtype).name, "splits": splits, "seconds": round(time.perf_counter() - t0, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
  except OSError as e:
    raise DataError(f"cannot write the data cache in {config.data.processed_dir} ({e.strerror or e}). Point "
                    f"--config.data.processed_dir at a writable folder with free space.") from None


def _write_cache(processed_dir: str, path: str, tokens: dict, tokenizer, meta: dict) -> None:
  os.makedirs(processed_dir, exist_ok=True)
  _remove_stale_temporaries(processed_dir)
  tmp = tempfile.mkdtemp(prefix=".tmp-", dir=processed_dir)
  try:
    for s in SPLITS:
      np.save(os.path.join(tmp, f"{s}.npy"), tokens[s])
    np.save(os.path.join(tmp, "token_bytes.npy"), token_byte_lengths(tokenizer))
    with naming(os.path.join(tmp, "tokenizer.json")):
      tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    meta["sha256"] = {name: _file_sha256(os.path.join(tmp, name)) for name in ARRAYS + ("tokenizer.json",)}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
      json.dump(meta, f, indent=2)
    try:
      os.rename(tmp, path)  # atomic: the cache appears whole or not at all
    except OSError:
      if not os.path.isfile(os.path.join(path, "meta.json")):  # not another process's finished cache
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def count_words(lines: list[str]) -> int:
  """Whitespace-separated words: the unit of WikiText's word-level perplexity."""
  return sum(len(line.split()) for line in lines)


def _remove_stale_temporaries(processed_dir: str, age_s: float = 3600) -> None:
  """Removes what a preparation killed mid-write left (an hour old: not another run's, in progress)."""
  for tmp in glob.glob(os.path.join(processed_dir, ".tmp-*")):
    if time.time() - os.path.getmtime(tmp) > age_s:
      shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------- batches
def sequences(tokens: np.ndarray, seq_length: int, offset: int = 0, count: int | None = None) -> np.ndarray:
  """[count, seq_length] view of consecutive tokens from `offset` on (count: as many as fit); the
  tokens before the offset and the tail shorter than a sequence are left out."""
  n = (len(tokens) - offset) // seq_length if count is None else count
  return tokens[offset: offset + n * seq_length].reshape(n, seq_length)


def num_train_windows(num_tokens: int, seq_length: int, shift: bool) -> int:
  """Train sequences per epoch: as many as fit, or with data.shift_windows as many as fit from any
  offset in [0, seq_length), so that every epoch has the same number of steps."""
  return (num_tokens - (seq_length - 1 if shift else 0)) // seq_length


def window_offset(seed: int, epoch: int, seq_length: int) -> int:
  """Where epoch `epoch`'s train sequences start with data.shift_windows: a pure function of (seed,
  epoch), like the epoch's order, so a resumed epoch cuts the same windows."""
  return int(np.random.default_rng([seed, epoch, 1]).integers(seq_length))


def steps_per_epoch(num_sequences: int, batch_size: int) -> int:
  return num_sequences // batch_size  # the last partial batch is dropped


def epoch_order(seed: int, epoch: int, num_sequences: int) -> np.ndarray:
  """The training order of epoch `epoch` (1-based): a pure function of (seed, epoch)."""
  return np.random.default_rng([seed, epoch]).permutation(num_sequences)


# ----------------------------------------------------------------------------------------------- CLI
def _print_summary(config: ml_collections.ConfigDict) -> None:
  from jaxlm.config import validate
  validate(config)
  corpus = load(config, verbose=True)
  print(f"data: {corpus.path}")
  print(f"data: vocab {corpus.vocab_size:,}, tokenizer {corpus.meta['tokenizer']['kind']}, "
        f"prepared in {corpus.meta['seconds']}s")
  for s in SPLITS:
    info = corpus.meta["splits"][s]
    n_seq = len(corpus.tokens[s]) // config.data.seq_length
    print(f"data: {s:<10} {info['rows']:>8,} rows {info['words']:>10,} words {info['bytes']:>12,} bytes "
          f"{info['tokens']:>10,} tokens {info['bytes'] / max(1, info['tokens']):.2f} bytes/token "
          f"{n_seq:>8,} sequences of {config.data.seq_length}")


if __name__ == "__main__":
  from absl import flags
  from ml_collections import config_flags

  from jaxlm import cli
  _CONFIG = config_flags.DEFINE_config_file("config", None, "A config file, e.g. configs/base.py.")
  flags.mark_flags_as_required(["config"])

  def _main(argv):
    del argv
    _print_summary(_CONFIG.value)

  cli.run(_main, config_flag="config")
