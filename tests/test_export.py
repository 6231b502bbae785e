"""jaxlm.export: a run as a Hugging Face GPT-2 directory, a GPT-2 directory as a run's start
(model.init_from), and the command line. The tests that compare logits with transformers' own GPT-2
are skipped where transformers or torch is not installed (pip install -e .[hf])."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from jaxlm import config as config_lib
from jaxlm import data as data_lib
from jaxlm import export as export_lib
from jaxlm import model as model_lib
from jaxlm import run as run_lib
from jaxlm import train as train_lib
from jaxlm import workdir as workdir_lib

from conftest import load_config, subprocess_env, write_corpus

HF_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
MODEL_KEYS = ["d_model", "num_layers", "num_heads", "d_ff", "layer_norm_eps", "activation", "tie_embeddings"]
# (activation, tie_embeddings, scan_layers) of the trained runs: together they cover both activations,
# both heads and both layouts of the layers' parameters.
RUNS = [("gelu", True, False), ("gelu_tanh", False, True)]


def make_config(directory):
  """configs/base.py:tiny over a corpus in `directory` (as conftest's tiny_config), one short epoch."""
  config = load_config("tiny")
  write_corpus(os.path.join(directory, "corpus"))
  config.data.data_dir = os.path.join(directory, "corpus")
  config.data.raw_dir = os.path.join(directory, "data", "raw")
  config.data.processed_dir = os.path.join(directory, "data", "processed")
  config.workdir = os.path.join(directory, "run")
  config.device = "cpu"
  config.training.epochs = 1
  config.sample.max_new_tokens = 0
  return config


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """fn(activation, tie_embeddings) -> the config of a tiny trained run, trained once per module."""
  runs = {}

  def get(activation: str, tie: bool, scan: bool):
    if (activation, tie, scan) not in runs:
      config = make_config(str(tmp_path_factory.mktemp(f"{activation}-{'tied' if tie else 'untied'}")))
      config.model.activation, config.model.tie_embeddings, config.model.scan_layers = activation, tie, scan
      run_lib.train_and_evaluate(config)
      runs[activation, tie, scan] = config
    return runs[activation, tie, scan]

  return get


@pytest.fixture(params=RUNS, ids=[f"{a}-{'tied' if t else 'untied'}{'-scan' if s else ''}" for a, t, s in RUNS])
def run(request, trained_run):
  return trained_run(*request.param)


def assert_same_tree(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def corpus_text(config, words: int = 16) -> str:
  """A piece of the validation split, short enough for the tiny model's context."""
  with open(os.path.join(config.data.data_dir, "validation.txt"), encoding="utf-8") as f:
    paragraph = max(f.read().splitlines(), key=len)
  return " ".join(paragraph.split()[:words])


# ------------------------------------------------------------------------------- without transformers
def current_umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_export_round_trips_through_the_gpt2_directory(run, tmp_path):
  out = tmp_path / "hf"
  out.mkdir()  # an empty directory is fine
  export_lib.export(run.workdir, str(out))
  assert sorted(os.listdir(out)) == HF_FILES
  assert os.listdir(tmp_path) == ["hf"]  # no temporary folder left
  modes = {name: os.stat(out / name).st_mode & 0o777 for name in HF_FILES}
  assert set(modes.values()) == {0o666 & ~current_umask()}, modes  # readable by others, like any file written

  trained = workdir_lib.load(run.workdir, "best", device="cpu")
  m, vocab = run.model, trained.params["tok_emb"].shape[0]
  config = json.loads((out / "config.json").read_text())
  end_id = trained.tokenizer.token_to_id("<|endoftext|>")
  assert config["architectures"] == ["GPT2LMHeadModel"] and config["model_type"] == "gpt2"
  assert (config["vocab_size"], config["n_positions"], config["n_embd"], config["n_layer"], config["n_head"],
          config["n_inner"]) == (vocab, run.data.seq_length, m.d_model, m.num_layers, m.num_heads, m.d_ff)
  assert config["activation_function"] == {"gelu": "gelu", "gelu_tanh": "gelu_new"}[m.activation]
  assert config["tie_word_embeddings"] == m.tie_embeddings
  assert config["bos_token_id"] == config["eos_token_id"] == end_id
  tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
  assert tokenizer_config["eos_token"] == "<|endoftext|>"
  assert tokenizer_config["model_max_length"] == run.data.seq_length

  tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
  layer = ["ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias", "attn.c_proj.weight",
           "attn.c_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
           "mlp.c_proj.bias"]
  expected = {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
              *(f"transformer.h.{i}.{name}" for i in range(m.num_layers) for name in layer)}
  assert set(tensors) == (expected if m.tie_embeddings else expected | {"lm_head.weight"})
  assert all(t.dtype == np.float32 for t in tensors.values())
  assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (m.d_model, 3 * m.d_model)  # Conv1D: [in, out]
  if not m.tie_embeddings:
    assert tensors["lm_head.weight"].shape == (vocab, m.d_model)

  assert_same_tree(export_lib.load_gpt2_params(str(out), trained.params), trained.params)
  overrides = export_lib.gpt2_overrides(str(out))
  assert {k: overrides[f"model.{k}"] for k in MODEL_KEYS} == {k: m[k] for k in MODEL_KEYS}
  assert overrides["model.max_seq_length"] == run.data.seq_length
  assert overrides["data.tokenizer.file"] == str(out / "tokenizer.json")
  assert overrides["data.tokenizer.pretrained"] == ""

  # Hub files vary: GPT2Model's names (no "transformer." prefix) and the old causal-mask buffers load too.
  hub = tmp_path / "hub"
  hub.mkdir()
  for name in ("config.json", "tokenizer.json"):
    (hub / name).write_bytes((out / name).read_bytes())
  renamed = {name.removeprefix("transformer."): t for name, t in tensors.items()}
  renamed["h.0.attn.bias"] = np.tril(np.ones((1, 1, 4, 4), np.float32))
  safetensors.numpy.save_file(renamed, str(hub / "model.safetensors"))
  assert_same_tree(export_lib.load_gpt2_params(str(hub), trained.params), trained.params)


def test_init_from_an_export_starts_from_exactly_its_parameters(run, tmp_path, monkeypatch):
  out = str(tmp_path / "hf")
  export_lib.export(run.workdir, out, checkpoint="last")
  exported = workdir_lib.load(run.workdir, "last", device="cpu")
  config = run.copy_and_resolve_references()
  config.workdir = str(tmp_path / "run")
  config.model.init_from = out
  # A shape and tokenizer unlike the export's: init_from replaces them.
  config.model.d_model, config.model.num_heads, config.model.d_ff = 64, 4, 96
  config.model.activation = "gelu" if run.model.activation == "gelu_tanh" else "gelu_tanh"
  config.model.tie_embeddings = not run.model.tie_embeddings
  config.data.tokenizer.vocab_size = 300
  # A rate of 0 all along: the steps run but change nothing, AdamW's decay included (optax.adamw scales
  # the decayed weights by the rate too), so `last` holds the parameters the run started from.
  config.training.learning_rate = config.training.min_learning_rate = 0.0
  # The moving average starts from the same weights, in buffers of its own: the state is donated to
  # each update on an accelerator, as here.
  config.training.ema_decay = 0.9
  monkeypatch.setattr(train_lib, "donate_state", lambda device: (0,))
  run_lib.train_and_evaluate(config)

  started = workdir_lib.load(config.workdir, "last", device="cpu")
  assert started.meta["global_step"] > 0
  assert {k: started.config.model[k] for k in MODEL_KEYS} == {k: run.model[k] for k in MODEL_KEYS}
  assert started.config.data.tokenizer.file == os.path.join(out, "tokenizer.json")
  assert started.tokenizer.to_str() == exported.tokenizer.to_str()
  assert_same_tree(started.params, exported.params)


def test_init_from_a_model_with_fewer_positions_than_the_sequences_names_the_fix(trained_run, tmp_path):
  run = trained_run(*RUNS[0])
  out = str(tmp_path / "hf")
  export_lib.export(run.workdir, out, checkpoint="last")
  config = run.copy_and_resolve_references()
  config.model.init_from = out
  positions = json.load(open(os.path.join(out, "config.json")))["n_positions"]
  config.data.seq_length = positions + 1
  with pytest.raises(config_lib.ConfigError, match=rf"the {positions} positions of model.init_from's model: "
                                                   rf"add --config.data.seq_length={positions} \(or less\)$"):
    run_lib._init_from(config)


def test_weights_in_shards_load_as_from_one_file(trained_run, tmp_path):
  run = trained_run(*RUNS[1])
  out = tmp_path / "hf"
  export_lib.export(run.workdir, str(out))
  like = workdir_lib.load(run.workdir, "best", device="cpu").params
  whole = export_lib.load_gpt2_params(str(out), like)
  # As save_pretrained writes a model over its max_shard_size: shards and an index naming each tensor's.
  tensors = safetensors.numpy.load_file(out / "model.safetensors")
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for file, part in shards.items():
    safetensors.numpy.save_file({n: tensors[n] for n in part}, out / file, metadata={"format": "pt"})
  with open(out / "model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
               "weight_map": {n: file for file, part in shards.items() for n in part}}, f)
  os.remove(out / "model.safetensors")
  assert export_lib.gpt2_overrides(str(out))["model.d_model"] == run.model.d_model
  assert_same_tree(export_lib.load_gpt2_params(str(out), like), whole)
  os.remove(out / "model-00002-of-00002.safetensors")
  with pytest.raises(export_lib.ExportError, match=r"hf has no model-00002-of-00002.safetensors: re-save the model"):
    export_lib.gpt2_overrides(str(out))


def test_export_refuses_an_existing_output_that_is_not_an_empty_directory(tmp_path):
  out = tmp_path / "hf"
  out.mkdir()
  (out / "notes.txt").write_text("keep me")
  with pytest.raises(export_lib.ExportError, match=r"hf exists and is not empty: choose another --out"):
    export_lib.export(str(tmp_path / "run"), str(out))
  assert os.listdir(out) == ["notes.txt"]
  (tmp_path / "file").write_text("")
  with pytest.raises(export_lib.ExportError, match=r"exists and is not a directory"):
    export_lib.export(str(tmp_path / "run"), str(tmp_path / "file"))
  with pytest.raises(workdir_lib.WorkdirError, match=r"does not exist"):
    export_lib.export(str(tmp_path / "run"), str(tmp_path / "new"))
  assert sorted(os.listdir(tmp_path)) == ["file", "hf"]


def test_a_model_with_rotary_positions_is_refused_with_a_reason_and_writes_nothing(tmp_path):
  config = make_config(str(tmp_path))
  config.model.positions = "rope"
  run_lib.train_and_evaluate(config)
  with pytest.raises(export_lib.ExportError, match=r"rotary positions \(model.positions='rope'\): GPT-2's format "
                                                   r"holds learned position embeddings only"):
    export_lib.export(config.workdir, str(tmp_path / "hf"))
  assert not os.path.exists(tmp_path / "hf") and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_init_from_a_directory_that_is_not_gpt2_is_one_clear_error(tiny_config, tmp_path):
  hf = tmp_path / "hf"
  tiny_config.model.init_from = str(hf)
  with pytest.raises(export_lib.ExportError, match=r"is not a directory"):
    run_lib.train_and_evaluate(tiny_config)
  hf.mkdir()
  with pytest.raises(export_lib.ExportError, match=r"hf has no config.json: model.init_from needs a Hugging Face"):
    run_lib.train_and_evaluate(tiny_config)
  config = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 32, "vocab_size": 300}
  (hf / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
  with pytest.raises(export_lib.ExportError, match=r"not a GPT-2 config \(model_type 'llama'\)"):
    run_lib.train_and_evaluate(tiny_config)
  (hf / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
  with pytest.raises(export_lib.ExportError, match=r"activation_function 'relu' is not supported"):
    run_lib.train_and_evaluate(tiny_config)
  (hf / "config.json").write_text(json.dumps(config))
  with pytest.raises(export_lib.ExportError, match=r"hf has no tokenizer.json: save .* with save_pretrained"):
    run_lib.train_and_evaluate(tiny_config)
  (hf / "tokenizer.json").write_text("{}")
  (hf / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(export_lib.ExportError, match=r"hf has no model.safetensors \(pytorch_model.bin is not "
                     r"supported\): re-save the model with save_pretrained\(dir, safe_serialization=True\)"):
    run_lib.train_and_evaluate(tiny_config)
  assert not os.path.exists(tiny_config.workdir)


def test_weights_that_do_not_fit_the_model_are_one_clear_error(trained_run, tmp_path):
  run = trained_run(*RUNS[0])
  out = tmp_path / "hf"
  export_lib.export(run.workdir, str(out))
  params = workdir_lib.load(run.workdir, "best", device="cpu").params
  vocab, d_model = params["tok_emb"].shape

  bigger_vocab = {**params, "tok_emb": jnp.zeros((vocab + 1, d_model))}
  with pytest.raises(export_lib.ExportError, match=rf"transformer.wte.weight has {vocab} rows but the tokenizer has "
                     rf"{vocab + 1} tokens"):
    export_lib.load_gpt2_params(str(out), bigger_vocab)
  wider = jax.tree.map(lambda x: x, params)
  wider["block_1"]["fc1"]["kernel"] = jnp.zeros((d_model, run.model.d_ff + 1))
  with pytest.raises(export_lib.ExportError, match=r"transformer.h.1.mlp.c_fc.weight has shape \[32, 64\], the "
                     r"configured model needs \[32, 65\]"):
    export_lib.load_gpt2_params(str(out), wider)
  untied = {**params, "head": {"kernel": jnp.zeros((d_model, vocab))}}
  with pytest.raises(export_lib.ExportError, match=r"has no tensor lm_head.weight"):
    export_lib.load_gpt2_params(str(out), untied)
  one_layer = {k: v for k, v in params.items() if k != "block_1"}
  with pytest.raises(export_lib.ExportError, match=r"holds tensors the configured model has no place for "
                     r"\(transformer.h.1."):
    export_lib.load_gpt2_params(str(out), one_layer)

  (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:1000])
  with pytest.raises(export_lib.ExportError, match=r"cannot read .*model.safetensors"):
    export_lib.load_gpt2_params(str(out), params)
  config = json.loads((out / "config.json").read_text())
  (out / "config.json").write_text(json.dumps({**config, "vocab_size": vocab + 8}))
  with pytest.raises(export_lib.ExportError, match=rf"config.json's vocab_size {vocab + 8} differs from the {vocab} "
                     rf"tokens of tokenizer.json"):
    export_lib.gpt2_overrides(str(out))


def test_cli_exports_and_reports_errors_in_one_line(trained_run, tmp_path):
  run = trained_run(*RUNS[0])
  out = tmp_path / "hf"
  done = subprocess.run([sys.executable, "-m", "jaxlm.export", f"--workdir={run.workdir}", f"--out={out}",
                         "--checkpoint=last"], cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  assert sorted(os.listdir(out)) == HF_FILES
  assert f"AutoModelForCausalLM.from_pretrained('{out}')" in done.stdout
  positions = json.load(open(out / "config.json"))["n_positions"]
  assert done.stdout.rstrip().endswith(f"--config.model.init_from={out} --config.data.seq_length={positions}")

  missing = subprocess.run([sys.executable, "-m", "jaxlm.export", f"--workdir={tmp_path / 'nowhere'}",
                            f"--out={tmp_path / 'hf2'}"], cwd=tmp_path, env=subprocess_env(), capture_output=True,
                           text=True)
  assert missing.returncode == 1
  assert missing.stderr.splitlines() == [f"error: the work directory '{tmp_path / 'nowhere'}' does not exist (pass a "
                                         f"run's config.workdir, e.g. runs/experiment_1)"]
  assert not os.path.exists(tmp_path / "hf2")


# ---------------------------------------------------------------------------------- with transformers
def max_logit_difference(hf_model, tokens: list[int], model, params) -> float:
  import torch
  with torch.no_grad():
    hf_logits = hf_model(torch.tensor([tokens])).logits.numpy()
  with jax.default_matmul_precision("highest"):  # float32 products on a GPU too (not TF32)
    logits = np.asarray(model.apply({"params": params}, jnp.array([tokens])))
  assert hf_logits.shape == logits.shape and hf_logits.dtype == logits.dtype == np.float32
  difference = float(np.abs(hf_logits - logits).max())
  print(f"max |logits difference| {difference:.3g} (logits up to {np.abs(logits).max():.3g})")
  return difference


def test_transformers_loads_the_export_with_the_same_tokens_and_logits(run, tmp_path):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  out = str(tmp_path / "hf")
  export_lib.export(run.workdir, out)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
  assert type(hf_model).__name__ == "GPT2LMHeadModel" and hf_model.dtype == torch.float32
  assert hf_tokenizer.bos_token == hf_tokenizer.eos_token == hf_tokenizer.unk_token == "<|endoftext|>"

  trained = workdir_lib.load(run.workdir, "best", device="cpu")
  text = corpus_text(run)
  tokens = trained.tokenizer.encode(text, add_special_tokens=False).ids
  assert 8 < len(tokens) <= trained.context
  assert hf_tokenizer(text)["input_ids"] == tokens
  assert hf_tokenizer.decode(tokens) == trained.tokenizer.decode(tokens) == text
  assert max_logit_difference(hf_model, tokens, trained.model, trained.params) < 1e-4


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_a_transformers_gpt2_imports_with_the_same_logits(tiny_config, tmp_path, tie):
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  # A hub-like directory: a random GPT-2 (every weight and bias random, so that each is checked) and
  # a tokenizer saved by transformers.
  tokenizer = data_lib.load(tiny_config).tokenizer()
  vocab = tokenizer.get_vocab_size()
  hf = str(tmp_path / "hf")
  torch.manual_seed(0)
  end_id = tokenizer.token_to_id("<|endoftext|>")
  hf_config = transformers.GPT2Config(vocab_size=vocab, n_positions=48, n_embd=32, n_layer=2, n_head=4,
                                      activation_function="gelu_new", tie_word_embeddings=tie,
                                      bos_token_id=end_id, eos_token_id=end_id)
  hf_model = transformers.GPT2LMHeadModel(hf_config).eval()
  with torch.no_grad():
    for p in hf_model.parameters():
      p.normal_(0.0, 0.3)
  # The untied one in shards, as save_pretrained splits a model over its max_shard_size (5 GB).
  hf_model.save_pretrained(hf, safe_serialization=True, max_shard_size="5GB" if tie else "20KB")
  assert os.path.exists(os.path.join(hf, "model.safetensors.index.json")) != tie
  transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(hf)

  tiny_config.model.init_from = hf
  config = run_lib._init_from(tiny_config)  # gpt2_overrides applied, as a run applies them
  assert (config.model.d_model, config.model.num_heads, config.model.d_ff, config.model.max_seq_length,
          config.model.activation, config.model.tie_embeddings) == (32, 4, 128, 48, "gelu_tanh", tie)
  model = model_lib.build(config, vocab)
  like = model.init(jax.random.PRNGKey(0), jnp.zeros((1, config.data.seq_length), jnp.int32))["params"]
  params = export_lib.load_gpt2_params(hf, like)
  assert jax.tree.structure(params) == jax.tree.structure(like)
  np.testing.assert_array_equal(params["tok_emb"], hf_model.transformer.wte.weight.detach().numpy())

  tokens = tokenizer.encode(corpus_text(tiny_config, words=30), add_special_tokens=False).ids[:48]
  assert max_logit_difference(hf_model, tokens, model, params) < 1e-4
