import errno
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer

from jaxlm import data as data_lib
from jaxlm import train as train_lib

from conftest import BASE_CONFIG, SHARED_DATA, subprocess_env, write_corpus


def cache_folders(config):
  d = config.data.processed_dir
  return sorted(os.listdir(d)) if os.path.isdir(d) else []


def test_prepare_trains_tokenizer_and_round_trips(tiny_config, corpus_dir):
  corpus = data_lib.load(tiny_config)
  tok = corpus.tokenizer()
  assert corpus.vocab_size == tok.get_vocab_size() <= tiny_config.data.tokenizer.vocab_size
  assert corpus.vocab_size > 300  # merges were learned, not just the 256 bytes
  with open(os.path.join(corpus_dir, "validation.txt"), encoding="utf-8") as f:
    text = f.read()[:-1]  # the rows joined by "\n"
  ids = corpus.tokens["validation"]
  assert ids.dtype == np.uint16
  assert tok.decode(ids.tolist()) == text  # byte-level BPE loses nothing
  # Per-row batch encoding equals encoding the whole text at once.
  assert np.array_equal(ids, tok.encode(text, add_special_tokens=False).ids)
  meta = corpus.meta
  assert meta["splits"]["validation"] == {"rows": text.count("\n") + 1, "tokens": len(ids),
                                          "bytes": len(text.encode("utf-8")), "words": len(text.split())}
  # token_bytes gives the exact UTF-8 length of any token sequence
  assert corpus.token_bytes[np.asarray(ids)].sum() == len(text.encode("utf-8"))


def test_cache_hit_does_no_work(tiny_config, capsys):
  first = data_lib.load(tiny_config, verbose=True)
  assert "preparing" in capsys.readouterr().out
  stamps = {f: os.stat(os.path.join(first.path, f)).st_mtime_ns for f in os.listdir(first.path)}
  second = data_lib.load(tiny_config, verbose=True)
  out = capsys.readouterr().out
  assert "cache hit" in out and "preparing" not in out
  assert second.path == first.path
  assert stamps == {f: os.stat(os.path.join(first.path, f)).st_mtime_ns for f in os.listdir(first.path)}
  assert isinstance(second.tokens["train"], np.memmap)
  assert cache_folders(tiny_config) == [os.path.basename(first.path)]


def test_changed_source_or_tokenizer_makes_a_new_cache(tiny_config, corpus_dir):
  base = data_lib.load(tiny_config)
  with open(os.path.join(corpus_dir, "train.txt"), "a", encoding="utf-8") as f:
    f.write(" An extra row .\n")
  edited = data_lib.load(tiny_config)
  assert edited.path != base.path
  assert len(edited.tokens["train"]) > len(base.tokens["train"])
  tiny_config.data.tokenizer.vocab_size = 400
  smaller = data_lib.load(tiny_config)
  assert smaller.path not in (base.path, edited.path) and smaller.vocab_size <= 400
  assert len(cache_folders(tiny_config)) == 3


def test_given_tokenizer_file(tiny_config, tmp_path):
  trained = data_lib.load(tiny_config)
  tok_file = str(tmp_path / "my_tokenizer.json")
  trained.tokenizer().save(tok_file)
  tiny_config.data.tokenizer.file = tok_file
  from_file = data_lib.load(tiny_config)
  assert from_file.path != trained.path and from_file.meta["tokenizer"]["kind"] == "file"
  for split in data_lib.SPLITS:
    assert np.array_equal(from_file.tokens[split], trained.tokens[split])


def test_a_tokenizer_file_that_cannot_be_read_is_one_clear_error(tiny_config, tmp_path):
  bad = tmp_path / "tokenizer.json"
  bad.write_text('{"not": "a tokenizer"}')
  tiny_config.data.tokenizer.file = str(bad)
  with pytest.raises(data_lib.DataError, match=rf"data.tokenizer.file '{bad}' is not a tokenizer the tokenizers "
                                               r"library reads \(.+\): give a tokenizer.json saved by it"):
    data_lib.load(tiny_config)
  tiny_config.data.tokenizer.file = str(tmp_path)
  with pytest.raises(data_lib.DataError, match=rf"data.tokenizer.file '{tmp_path}' is a directory. Give the path"):
    data_lib.load(tiny_config)


def test_a_crash_while_writing_leaves_no_cache(tiny_config, monkeypatch):
  real_save = np.save
  calls = []

  def save_then_crash(path, array):
    calls.append(path)
    if len(calls) == 2:
      raise OSError("disk full (simulated)")
    real_save(path, array)

  monkeypatch.setattr(data_lib.np, "save", save_then_crash)
  with pytest.raises(data_lib.DataError, match=r"cannot write the data cache in .* \(disk full \(simulated\)\)"):
    data_lib.load(tiny_config)
  assert cache_folders(tiny_config) == []  # neither a half-written cache nor a temporary folder
  monkeypatch.setattr(data_lib.np, "save", real_save)
  corpus = data_lib.load(tiny_config)
  assert len(corpus.tokens["test"]) > 0 and cache_folders(tiny_config) == [os.path.basename(corpus.path)]


def test_parquet_and_raw_names_give_the_same_tokens(tiny_config, tmp_path):
  import pandas as pd
  from_text = data_lib.load(tiny_config)
  rows_by_split = write_corpus(tmp_path / "raw", names=("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"))
  tiny_config.data.data_dir = str(tmp_path / "raw")
  from_raw = data_lib.load(tiny_config)
  # The hub's parquet rows: "" for a blank row, others keep their "\n". Train in two shards.
  os.makedirs(tmp_path / "parquet")
  for split, rows in zip(("train", "validation", "test"), rows_by_split):
    hub_rows = ["" if not r.strip() else r + "\n" for r in rows]
    shards = [hub_rows[:len(hub_rows) // 2], hub_rows[len(hub_rows) // 2:]] if split == "train" else [hub_rows]
    for i, shard in enumerate(shards):
      name = f"{split}-{i:05d}-of-{len(shards):05d}.parquet"
      pd.DataFrame({"text": shard}).to_parquet(tmp_path / "parquet" / name)
  tiny_config.data.data_dir = str(tmp_path / "parquet")
  from_parquet = data_lib.load(tiny_config)
  assert from_parquet.meta["source"]["kind"] == "parquet" and from_raw.meta["source"]["kind"] == "text"
  for split in data_lib.SPLITS:
    assert np.array_equal(from_text.tokens[split], from_raw.tokens[split])
    assert np.array_equal(from_text.tokens[split], from_parquet.tokens[split])


def rewrite_meta(path, **changes):
  with open(os.path.join(path, "meta.json")) as f:
    meta = json.load(f)
  meta.update(changes)
  with open(os.path.join(path, "meta.json"), "w") as f:
    json.dump(meta, f)


@pytest.mark.parametrize("damage", ["another split", "truncated", "ids beyond the vocabulary", "wrong dtype",
                                    "no meta.json", "tokenizer.json edited", "meta.json's dtype edited",
                                    "meta.json's vocab_size a string"])
def test_a_damaged_cache_is_rebuilt_never_used(tiny_config, capsys, damage):
  original = data_lib.load(tiny_config)
  path = original.path
  train = np.asarray(original.tokens["train"]).copy()
  del original
  train_npy = os.path.join(path, "train.npy")
  if damage == "another split":  # another split's array in its place: the silent-training case
    shutil.copy(os.path.join(path, "validation.npy"), train_npy)
  elif damage == "truncated":
    with open(train_npy, "r+b") as f:
      f.truncate(os.path.getsize(train_npy) // 2)
  elif damage in ("ids beyond the vocabulary", "wrong dtype"):
    # Checksums updated as well: the other checks must catch it on their own.
    bad = train.copy()
    if damage == "wrong dtype":
      bad = bad.astype(np.int64)
    else:
      bad[5] = 60_000
    np.save(train_npy, bad)
    with open(os.path.join(path, "meta.json")) as f:
      sha = json.load(f)["sha256"]
    rewrite_meta(path, sha256={**sha, "train.npy": data_lib._file_sha256(train_npy)})
  elif damage == "no meta.json":
    os.remove(os.path.join(path, "meta.json"))
  elif damage == "meta.json's dtype edited":
    rewrite_meta(path, dtype="foo")
  elif damage == "meta.json's vocab_size a string":
    with open(os.path.join(path, "meta.json")) as f:
      rewrite_meta(path, vocab_size=str(json.load(f)["vocab_size"]))
  else:
    with open(os.path.join(path, "tokenizer.json"), "a") as f:
      f.write(" ")
  capsys.readouterr()
  rebuilt = data_lib.load(tiny_config)
  out = capsys.readouterr().out
  assert f"data: WARNING: the cache {path} is damaged (" in out and "rebuilding it" in out
  assert rebuilt.path == path and np.array_equal(rebuilt.tokens["train"], train)
  assert cache_folders(tiny_config) == [os.path.basename(path)]  # nothing left aside
  again = data_lib.load(tiny_config, verbose=True)  # and the rebuilt cache is trusted
  assert "cache hit" in capsys.readouterr().out and np.array_equal(again.tokens["train"], train)


def test_a_damaged_cache_in_a_folder_that_cannot_be_written_is_one_clear_error(tiny_config, monkeypatch):
  path = data_lib.load(tiny_config).path
  os.remove(os.path.join(path, "meta.json"))

  def refused(*args, **kwargs):  # a read-only folder (root writes to any: the permission is simulated)
    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(tiny_config.data.processed_dir, "x"))

  monkeypatch.setattr(data_lib.tempfile, "mkdtemp", refused)
  with pytest.raises(data_lib.DataError, match=rf"^cannot rebuild the data cache in {tiny_config.data.processed_dir} "
                                               r"\(Permission denied\). Point --config.data.processed_dir at a "):
    data_lib.load(tiny_config)


def test_text_that_is_not_utf8_or_not_text_is_named(tiny_config, corpus_dir):
  path = os.path.join(corpus_dir, "test.txt")
  with open(path, "ab") as f:
    f.write(" Caf\xe9 .\n".encode("latin-1"))
  with pytest.raises(data_lib.DataError, match=rf"{path} is not UTF-8 text \(byte 0xe9 at offset [\d,]+ cannot"):
    data_lib.load(tiny_config)
  with open(path, "wb") as f:
    f.write(b"\x7fELF\x02\x01\x01\x00\x00")
  with pytest.raises(data_lib.DataError, match=rf"{path} is not text \(a NUL byte at offset 7\)"):
    data_lib.load(tiny_config)


def test_empty_split_is_a_clear_error(tiny_config, corpus_dir):
  open(os.path.join(corpus_dir, "validation.txt"), "w").close()
  with pytest.raises(data_lib.DataError, match="validation.txt is empty"):
    data_lib.load(tiny_config)


def test_stale_temporary_folders_are_removed(tiny_config):
  stale = os.path.join(tiny_config.data.processed_dir, ".tmp-killed")
  fresh = os.path.join(tiny_config.data.processed_dir, ".tmp-in-progress")
  for folder in (stale, fresh):
    os.makedirs(folder)
  os.utime(stale, (0, 0))  # left by a preparation killed long ago
  data_lib.load(tiny_config)
  assert not os.path.exists(stale) and os.path.exists(fresh)


def test_missing_split_and_missing_dir_are_clear_errors(tiny_config, corpus_dir):
  os.remove(os.path.join(corpus_dir, "test.txt"))
  with pytest.raises(data_lib.DataError, match="lacks some splits.*test: test.txt or wiki.test.raw"):
    data_lib.load(tiny_config)
  tiny_config.data.data_dir = corpus_dir + "-nowhere"
  with pytest.raises(data_lib.DataError, match="is not a directory"):
    data_lib.load(tiny_config)


def test_offline_without_local_copy_says_how_to_use_a_local_directory(tmp_path):
  env = subprocess_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
  result = subprocess.run(
      [sys.executable, "-m", "jaxlm.data", f"--config={BASE_CONFIG}",
       f"--config.data.raw_dir={tmp_path / 'raw'}", f"--config.data.processed_dir={tmp_path / 'processed'}"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  last_line = result.stderr.strip().splitlines()[-1]
  assert last_line.startswith("error: could not load 'wikitext/wikitext-2-raw-v1' from the Hugging Face hub")
  assert "--config.data.data_dir=FOLDER" in last_line
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "processed") or os.listdir(tmp_path / "processed") == []


def test_prepare_command_prints_what_it_did(tmp_path, corpus_dir):
  result = subprocess.run(
      [sys.executable, "-m", "jaxlm.data", f"--config={BASE_CONFIG}:tiny", f"--config.data.data_dir={corpus_dir}",
       f"--config.data.raw_dir={tmp_path / 'raw'}", f"--config.data.processed_dir={tmp_path / 'processed'}"],
      cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  for expected in ("rows", "tokens", "bytes", "vocab", "processed", "sequences of 32"):
    assert expected in result.stdout


# ------------------------------------------------------------------------------------------- batches
def test_sequences_and_steps():
  tokens = np.arange(103, dtype=np.uint16)
  seqs = data_lib.sequences(tokens, 10)
  assert seqs.shape == (10, 10) and seqs[3, 0] == 30 and seqs[-1, -1] == 99
  assert data_lib.steps_per_epoch(len(seqs), 3) == 3  # the last partial batch is dropped


def test_shifted_windows_start_at_a_pure_function_of_seed_and_epoch():
  """data.shift_windows: every epoch cuts as many windows, from an offset in [0, L) that (seed, epoch)
  alone decide; offset 0 with that count is the unshifted split less its last window at most."""
  tokens, L = np.arange(1003, dtype=np.uint16), 10
  n = data_lib.num_train_windows(len(tokens), L, shift=True)
  assert n == 99 and data_lib.num_train_windows(len(tokens), L, shift=False) == 100
  offsets = [data_lib.window_offset(0, e, L) for e in range(1, 21)]
  assert offsets == [data_lib.window_offset(0, e, L) for e in range(1, 21)]  # deterministic
  assert all(0 <= o < L for o in offsets) and len(set(offsets)) > 3
  assert offsets != [data_lib.window_offset(1, e, L) for e in range(1, 21)]  # the seed matters
  for offset in range(L):
    seqs = data_lib.sequences(tokens, L, offset, n)
    assert seqs.shape == (n, L) and seqs[0, 0] == offset and seqs[-1, -1] == offset + n * L - 1
  np.testing.assert_array_equal(data_lib.sequences(tokens, L, 0, n), data_lib.sequences(tokens, L)[:n])


def test_batch_order_is_deterministic_shuffled_and_resumable():
  """Batch i of an epoch, gathered on the device from the epoch's order, without replaying 0..i-1."""
  seqs = np.arange(50 * 4, dtype=np.uint16).reshape(50, 4)
  B = 3
  steps = data_lib.steps_per_epoch(len(seqs), B)

  def epoch(seed, e, start=0):
    order = data_lib.epoch_order(seed, e, len(seqs)).astype(np.int32)
    return [np.asarray(train_lib.batch_at(jnp.asarray(seqs), jnp.asarray(order), jnp.int32(i), B))
            for i in range(start, steps)]

  epoch1 = epoch(0, 1)
  assert len(epoch1) == 16 and all(b.shape == (B, 4) and b.dtype == np.int32 for b in epoch1)
  assert all(np.array_equal(a, b) for a, b in zip(epoch1, epoch(0, 1)))
  order = data_lib.epoch_order(0, 1, len(seqs))
  assert all(np.array_equal(b, seqs[order[i * B:(i + 1) * B]]) for i, b in enumerate(epoch1))
  firsts = np.concatenate([b[:, 0] // 4 for b in epoch1])
  assert len(set(firsts)) == 48  # each sequence at most once; the last partial batch dropped
  assert not np.array_equal(firsts, np.sort(firsts))  # shuffled
  assert not np.array_equal(epoch1[0], epoch(0, 2)[0])
  assert not np.array_equal(epoch1[0], epoch(1, 1)[0])
  for k in (0, 5, 15):  # resume at batch k
    assert all(np.array_equal(a, b) for a, b in zip(epoch1[k:], epoch(0, 1, start=k)))


# ------------------------------------------------------------------------------------ real WikiText
@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "wikitext-2-mini")),
                    reason="../shared/data (this workplace's WikiText copy) is absent")
def test_real_wikitext_rows_tokenize_like_the_whole_text(tiny_config):
  tiny_config.data.data_dir = os.path.join(SHARED_DATA, "wikitext-2-mini")
  tiny_config.data.tokenizer.vocab_size = 2048
  corpus = data_lib.load(tiny_config)
  tok = corpus.tokenizer()
  with open(os.path.join(tiny_config.data.data_dir, "validation.txt"), encoding="utf-8") as f:
    text = f.read()[:-1]
  assert np.array_equal(corpus.tokens["validation"], tok.encode(text, add_special_tokens=False).ids)
  assert corpus.meta["splits"]["train"]["rows"] == 6616
  assert json.loads(tok.to_str())["model"]["type"] == "BPE"
  assert isinstance(tok, Tokenizer)
