"""Shared fixtures: a small WikiText-like corpus written by the test, and the tiny config over it."""
import importlib.util
import os
import signal
import tempfile

# Before JAX is imported (here and in the subprocesses the tests start): compile at LLVM -O0, which
# halves XLA:CPU compile times for these tiny models, and reuse compiled programs across tests.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxlm-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The signal tests expect SIGINT as a terminal's foreground job has it, whoever started pytest: a
# shell without job control starts a background job with it ignored, which jaxlm respects (and so
# would the commands the tests start, which inherit it).
signal.signal(signal.SIGINT, signal.default_int_handler)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(ROOT, "configs", "base.py")
SHARED_DATA = os.path.join(ROOT, "..", "shared", "data")

_WORDS = ("the of and in to a was is for as on with by he that at from his it an were are which this "
          "be first also new had after or one two three year time film game song album city river "
          "team season war state world music series station army church school house king "
          "early later during while between against around received released played began became "
          "called known built named written recorded won lost moved served").split()


def subprocess_env(**extra) -> dict:
  """This process's environment for a `python -m jaxlm...` child, with the checkout importable."""
  path = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
  return dict(os.environ, PYTHONPATH=path, **extra)


def load_config(variant: str = ""):
  spec = importlib.util.spec_from_file_location("jaxlm_test_base_config", BASE_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


def write_corpus(directory, seed: int = 0, articles=(24, 3, 3), names=("train.txt", "validation.txt", "test.txt")):
  """Writes WikiText-raw-like splits (headings, paragraphs, blank rows as " "); returns the rows."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  rows_by_split = []
  for name, n_articles in zip(names, articles):
    rows = []
    for _ in range(n_articles):
      title = " ".join(rng.choice(_WORDS, 2)).title()
      rows += [" ", f" = {title} = ", " "]
      for _ in range(rng.integers(3, 6)):
        sentences = []
        for _ in range(rng.integers(3, 7)):
          words = list(rng.choice(_WORDS, rng.integers(5, 14)))
          if rng.random() < 0.3:
            words.insert(rng.integers(len(words)), f"{rng.integers(1, 2000)}")
          sentences.append(" ".join(words).capitalize() + " .")
        rows.append(" " + " ".join(sentences) + " ")
      rows.append(" ")
    with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
      f.write("\n".join(rows) + "\n")
    rows_by_split.append(rows)
  return rows_by_split


def signal_here(signum: int) -> None:
  """Sends this process `signum` and lets Python run its handler here (at the loop's jumps)."""
  os.kill(os.getpid(), signum)
  for _ in range(10_000):
    pass


def signal_as_the_test_ends(patcher, signum: int = signal.SIGTERM) -> None:
  """Through `patcher` (monkeypatch or its context), `signum` arrives as a run's test evaluation
  returns: its last batch done, before the run acts on a stop."""
  from jaxlm import run as run_lib
  real_evaluate = run_lib._Run.evaluate

  def evaluate(self, split, params=None):
    result = real_evaluate(self, split, params)
    if split == "test":
      signal_here(signum)
    return result

  patcher.setattr(run_lib._Run, "evaluate", evaluate)


@pytest.fixture
def corpus_dir(tmp_path):
  directory = tmp_path / "corpus"
  write_corpus(directory)
  return str(directory)


@pytest.fixture
def tiny_config(tmp_path, corpus_dir):
  """configs/base.py:tiny over the test corpus, every path inside tmp_path."""
  config = load_config("tiny")
  config.data.data_dir = corpus_dir
  config.data.raw_dir = str(tmp_path / "data" / "raw")
  config.data.processed_dir = str(tmp_path / "data" / "processed")
  config.workdir = str(tmp_path / "run")
  config.device = "cpu"
  config.training.log_every_steps = 5  # a few progress lines in epochs of ~20 steps
  return config
