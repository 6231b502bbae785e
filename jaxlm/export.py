"""Hugging Face GPT-2 interop, both ways: a run's checkpoint as a `GPT2LMHeadModel` directory, and a
GPT-2 directory as the starting point of a run (`model.init_from`).

    python -m jaxlm.export --workdir=runs/experiment_1 --out=exported/experiment_1

writes config.json, model.safetensors, tokenizer.json, tokenizer_config.json and generation_config.json,
which `transformers.AutoModelForCausalLM.from_pretrained(out)` and `AutoTokenizer.from_pretrained(out)`
load as they are. jaxlm's model is GPT-2's architecture, so the weights map one to one (`_hf_names`):
HF's Conv1D stores [in, out] as Flax's Dense does, c_attn's columns are (q, k, v) x (heads, head size)
as our `qkv`'s; only the untied lm_head is [V, D], our head kernel transposed. Neither way needs torch.
"""
import json
import os
import shutil
import tempfile

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm import model as model_lib
from jaxlm import sharding as sharding_lib
from jaxlm.data import END_OF_TEXT
from jaxlm.cli import UserError, naming

MODEL_FILE = "model.safetensors"
SHARDS_INDEX = "model.safetensors.index.json"  # save_pretrained's list of shards, for a model over max_shard_size
# jaxlm's activation -> HF's activation_function on export, and back on import. Each HF name here
# computes the same function as its jaxlm counterpart (gelu_fast is the tanh form written differently).
_TO_HF_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
_FROM_HF_ACTIVATION = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh",
                       "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # old GPT-2 checkpoints' causal-mask buffers


class ExportError(UserError):
  """A model that cannot be exported or imported as GPT-2; the message says what to do."""


def _hf_names(num_layers: int, tie_embeddings: bool) -> dict[tuple[str, ...], tuple[str, bool]]:
  """jaxlm param path -> (HF GPT2LMHeadModel state-dict name, whether the tensor is transposed)."""
  names = {("tok_emb",): ("transformer.wte.weight", False), ("pos_emb",): ("transformer.wpe.weight", False)}
  layer = {("ln1", "scale"): "ln_1.weight", ("ln1", "bias"): "ln_1.bias",
           ("qkv", "kernel"): "attn.c_attn.weight", ("qkv", "bias"): "attn.c_attn.bias",
           ("proj", "kernel"): "attn.c_proj.weight", ("proj", "bias"): "attn.c_proj.bias",
           ("ln2", "scale"): "ln_2.weight", ("ln2", "bias"): "ln_2.bias",
           ("fc1", "kernel"): "mlp.c_fc.weight", ("fc1", "bias"): "mlp.c_fc.bias",
           ("fc2", "kernel"): "mlp.c_proj.weight", ("fc2", "bias"): "mlp.c_proj.bias"}
  for i in range(num_layers):
    names.update({(f"block_{i}", *path): (f"transformer.h.{i}.{name}", False) for path, name in layer.items()})
  names[("ln_f", "scale")] = ("transformer.ln_f.weight", False)
  names[("ln_f", "bias")] = ("transformer.ln_f.bias", False)
  if not tie_embeddings:
    names[("head", "kernel")] = ("lm_head.weight", True)
  return names


def _path(key_path) -> tuple[str, ...]:
  return tuple(k.key for k in key_path)


def _leaves(params) -> dict[tuple[str, ...], object]:
  return {_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


# -------------------------------------------------------------------------------------------- export
def _gpt2_config(config, vocab_size: int, end_id: int | None) -> dict:
  m = config.model
  return {
      "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab_size,
      "n_positions": config_lib.max_seq_length(config), "n_embd": m.d_model, "n_layer": m.num_layers,
      "n_head": m.num_heads, "n_inner": m.d_ff, "activation_function": _TO_HF_ACTIVATION[m.activation],
      "layer_norm_epsilon": m.layer_norm_eps, "resid_pdrop": m.dropout, "embd_pdrop": m.dropout,
      "attn_pdrop": m.attention_dropout,
      "initializer_range": m.init_std, "tie_word_embeddings": m.tie_embeddings, "bos_token_id": end_id,
      "eos_token_id": end_id, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
      "reorder_and_upcast_attn": False, "use_cache": True, "torch_dtype": "float32"}


def _tokenizer_config(context: int, has_end: bool) -> dict:
  # PreTrainedTokenizerFast loads tokenizer.json as it is (GPT2Tokenizer would rebuild parts of it),
  # in transformers 4 and 5 alike. No clean-up of spaces, so decoding equals the tokenizers library's.
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context,
            "clean_up_tokenization_spaces": False}
  if has_end:
    config.update(bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT)
  return config


def _generation_config(sample, end_id: int | None) -> dict:
  """The run's sampling defaults (those of jaxlm.generate), so that HF's generate() matches it."""
  config = {"_from_model_config": True, "bos_token_id": end_id, "eos_token_id": end_id}
  if end_id is not None:
    config["pad_token_id"] = end_id  # HF warns and picks eos itself when there is none
  if sample.temperature > 0:
    config.update(do_sample=True, temperature=sample.temperature, top_k=sample.top_k, top_p=sample.top_p)
  return config


def _check_out(out: str) -> None:
  if os.path.isdir(out):
    if os.listdir(out):
      raise ExportError(f"{out} exists and is not empty: choose another --out, or delete it first")
  elif os.path.lexists(out):
    raise ExportError(f"{out} exists and is not a directory: choose another --out")


def export(workdir: str, out: str, checkpoint: str = "best") -> None:
  """Writes `workdir`'s `checkpoint` (best or last) to the new directory `out` as a Hugging Face
  GPT-2 model (float32) with its tokenizer. `out` appears whole or not at all."""
  import safetensors.numpy
  from jaxlm import workdir as workdir_lib
  out = os.path.normpath(out)
  _check_out(out)  # before loading: a large checkpoint should not be read for nothing
  trained = workdir_lib.load(workdir, checkpoint, device="cpu")
  m = trained.config.model
  if m.positions != "learned":
    raise ExportError(f"{workdir} trains rotary positions (model.positions={m.positions!r}): GPT-2's format holds "
                      f"learned position embeddings only, so this model cannot be exported to it. Evaluate and "
                      f"generate with jaxlm instead, or train with model.positions='learned' to export.")
  names = _hf_names(m.num_layers, m.tie_embeddings)
  leaves = _leaves(model_lib.unstack_layers(trained.params))
  if set(leaves) != set(names):  # the model changed and _hf_names did not follow
    raise AssertionError(f"unmapped parameters {sorted(set(leaves) ^ set(names))}")
  tensors = {}
  for path, (name, transpose) in names.items():
    array = np.asarray(leaves[path], np.float32)
    tensors[name] = np.ascontiguousarray(array.T if transpose else array)
  vocab_size = tensors["transformer.wte.weight"].shape[0]
  end_id = trained.tokenizer.token_to_id(END_OF_TEXT)

  parent = os.path.dirname(os.path.abspath(out))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=parent)
  try:
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 is for its secrecy, not wanted in an output folder

    def write_json(name, obj):
      with open(os.path.join(tmp, name), "w") as f:
        json.dump(obj, f, indent=2)

    write_json("config.json", _gpt2_config(trained.config, vocab_size, end_id))
    with naming(os.path.join(out, MODEL_FILE)):  # its I/O errors are plain exceptions ending "(os error N)"
      safetensors.numpy.save_file(tensors, os.path.join(tmp, MODEL_FILE), metadata={"format": "pt"})
    shutil.copymode(os.path.join(tmp, "config.json"), os.path.join(tmp, MODEL_FILE))  # not 0600, as written
    with naming(os.path.join(out, "tokenizer.json")):
      trained.tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    write_json("tokenizer_config.json", _tokenizer_config(trained.context, end_id is not None))
    write_json("generation_config.json", _generation_config(trained.config.sample, end_id))
    _check_out(out)  # again: something may have appeared there meanwhile
    os.rename(tmp, out)  # replaces an empty directory; fails on a non-empty one
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# -------------------------------------------------------------------------------------------- import
def _read_hf_config(hf_dir: str) -> dict:
  if not os.path.isdir(hf_dir):
    raise ExportError(f"model.init_from={hf_dir!r} is not a directory: give a Hugging Face GPT-2 directory "
                      f"(config.json, model.safetensors, tokenizer.json), e.g. one written by jaxlm.export")
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise ExportError(f"{hf_dir} has no config.json: model.init_from needs a Hugging Face GPT-2 directory, as "
                      f"written by save_pretrained or jaxlm.export")
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise ExportError(f"cannot read {path} ({e}): re-save the model with save_pretrained") from None
  if not isinstance(config, dict) or config.get("model_type") != "gpt2":
    found = config.get("model_type") if isinstance(config, dict) else None
    raise ExportError(f"{path} is not a GPT-2 config (model_type {found!r}): model.init_from supports GPT-2 "
                      f"checkpoints only")
  return config


def gpt2_overrides(hf_dir: str) -> dict[str, object]:
  """The jaxlm config values that the GPT-2 directory `hf_dir` implies (reads only its JSON files);
  ExportError when it cannot be a jaxlm model."""
  from tokenizers import Tokenizer
  c = _read_hf_config(hf_dir)
  activation = c.get("activation_function", "gelu_new")
  if activation not in _FROM_HF_ACTIVATION:
    raise ExportError(f"{hf_dir}/config.json: activation_function {activation!r} is not supported (jaxlm has "
                      f"{', '.join(sorted(_FROM_HF_ACTIVATION))})")
  if not c.get("scale_attn_weights", True) or c.get("scale_attn_by_inverse_layer_idx", False):
    raise ExportError(f"{hf_dir}/config.json: jaxlm scales attention by 1/sqrt(head size) only; this model sets "
                      f"scale_attn_weights=false or scale_attn_by_inverse_layer_idx=true")
  tokenizer_path = os.path.join(hf_dir, "tokenizer.json")
  if not os.path.isfile(tokenizer_path):
    raise ExportError(f"{hf_dir} has no tokenizer.json: save the model's GPT2TokenizerFast there with "
                      f"save_pretrained (the slow GPT2Tokenizer's vocab.json and merges.txt are not read)")
  _weight_files(hf_dir)
  try:
    vocab = Tokenizer.from_file(tokenizer_path).get_vocab_size()
  except Exception as e:  # tokenizers raises a bare Exception for a malformed file
    raise ExportError(f"cannot read {tokenizer_path} ({str(e)[:200]})") from None
  if "vocab_size" in c and c["vocab_size"] != vocab:  # the wte rows: caught here before the data is tokenized
    raise ExportError(f"{hf_dir}: config.json's vocab_size {c['vocab_size']} differs from the {vocab} tokens of "
                      f"tokenizer.json; jaxlm sizes the embedding by the tokenizer, so they must agree")
  try:
    d_model = c["n_embd"]
    return {"model.d_model": d_model, "model.num_layers": c["n_layer"], "model.num_heads": c["n_head"],
            "model.d_ff": c.get("n_inner") or 4 * d_model, "model.max_seq_length": c["n_positions"],
            "model.layer_norm_eps": float(c.get("layer_norm_epsilon", 1e-5)),
            "model.activation": _FROM_HF_ACTIVATION[activation],
            "model.tie_embeddings": bool(c.get("tie_word_embeddings", True)), "model.positions": "learned",
            "data.tokenizer.file": tokenizer_path, "data.tokenizer.pretrained": ""}
  except KeyError as e:
    raise ExportError(f"{hf_dir}/config.json has no {e.args[0]}: re-save the model with save_pretrained") from None


def _weight_files(hf_dir: str) -> list[str]:
  """The paths of `hf_dir`'s weights: model.safetensors, or the shards its index lists (save_pretrained
  splits a model larger than its max_shard_size, e.g. GPT-2 XL in float32); ExportError if any is missing."""
  index = os.path.join(hf_dir, SHARDS_INDEX)
  if os.path.isfile(os.path.join(hf_dir, MODEL_FILE)) or not os.path.isfile(index):
    names = [MODEL_FILE]
  else:
    try:
      with open(index) as f:
        names = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise ExportError(f"cannot read {index} ({type(e).__name__}: {str(e)[:200]}): re-save the model with "
                        f"save_pretrained") from None
  for name in names:
    if not os.path.isfile(os.path.join(hf_dir, name)):
      bin_only = os.path.isfile(os.path.join(hf_dir, "pytorch_model.bin"))
      raise ExportError(f"{hf_dir} has no {name}" + (" (pytorch_model.bin is not supported)" if bin_only else "")
                        + ": re-save the model with save_pretrained(dir, safe_serialization=True)")
  return [os.path.join(hf_dir, name) for name in names]


def load_gpt2_params(hf_dir: str, like):
  """The parameters in `hf_dir`'s safetensors file(s) as a tree of the structure, shapes, dtypes and
  devices of `like` (the freshly initialised parameters of the model gpt2_overrides configures)."""
  import safetensors.numpy
  files, raw = _weight_files(hf_dir), {}
  for path in files:
    try:
      raw.update(safetensors.numpy.load_file(path))
    except Exception as e:  # safetensors' own error types for a truncated or foreign file
      raise ExportError(f"cannot read {path} ({str(e)[:200]}): re-save the model with save_pretrained") from None
  where = files[0] if len(files) == 1 else f"{hf_dir}'s {len(files)} shards"
  # Hub checkpoints vary: GPT2Model's state dict has no "transformer." prefix, GPT2LMHeadModel's has.
  tensors = {name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}": t
             for name, t in raw.items()}
  scanned = "blocks" in like
  like = model_lib.unstack_layers(like)
  leaves = _leaves(like)
  num_layers = sum(1 for p in leaves if p[0].startswith("block_") and p[1:] == ("ln1", "scale"))
  names = _hf_names(num_layers, tie_embeddings="head" not in {p[0] for p in leaves})

  def load(key_path, leaf):
    name, transpose = names[_path(key_path)]
    if name not in tensors:
      raise ExportError(f"{where} has no tensor {name}: is it a GPT-2 checkpoint of the shape its config.json "
                        f"describes?")
    t = tensors[name].T if transpose else tensors[name]
    if t.shape != leaf.shape:
      if name == "transformer.wte.weight" and t.shape[1:] == leaf.shape[1:]:
        raise ExportError(f"{where}: {name} has {t.shape[0]} rows but the tokenizer has {leaf.shape[0]} tokens: "
                          f"use the tokenizer.json saved with this model")
      raise ExportError(f"{where}: {name} has shape {list(tensors[name].shape)}, the configured model needs "
                        f"{list(leaf.shape[::-1] if transpose else leaf.shape)}: does config.json match the weights?")
    array = np.asarray(t).astype(leaf.dtype)
    return sharding_lib.put(array, leaf.sharding) if isinstance(leaf, jax.Array) else array

  params = jax.tree_util.tree_map_with_path(load, like)
  used = {name for name, _ in names.values()} | {"lm_head.weight"}  # a tied model's copy of wte is ignored
  unused = sorted(n for n in tensors if n not in used and not n.endswith(_IGNORED_SUFFIXES))
  if unused:
    raise ExportError(f"{where} holds tensors the configured model has no place for ({', '.join(unused[:3])}"
                      f"{', ...' if len(unused) > 3 else ''}): does config.json match the weights?")
  return model_lib.stack_layers(params) if scanned else params


# ----------------------------------------------------------------------------------------------- CLI
def _define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("workdir", None, "A run's work directory (its config.workdir).")
  flags.DEFINE_string("out", None, "The directory to write (new, or empty).")
  flags.DEFINE_enum("checkpoint", "best", ["best", "last"], "Which checkpoint to export.")
  flags.mark_flags_as_required(["workdir", "out"])


def main(argv) -> None:
  from absl import flags
  del argv
  FLAGS = flags.FLAGS
  export(FLAGS.workdir, FLAGS.out, FLAGS.checkpoint)
  out = os.path.normpath(FLAGS.out)
  with open(os.path.join(out, "config.json")) as f:
    c = json.load(f)
  print(f"wrote {out} from {FLAGS.workdir}'s `{FLAGS.checkpoint}` checkpoint: a GPT-2 of {c['n_layer']} layers, "
        f"d_model {c['n_embd']}, vocab {c['vocab_size']:,}, context {c['n_positions']}")
  for name in sorted(os.listdir(out)):
    print(f"  {name:24} {os.path.getsize(os.path.join(out, name)):>12,} bytes")
  print(f"load it with transformers:\n"
        f"  model = AutoModelForCausalLM.from_pretrained({out!r})\n"
        f"  tokenizer = AutoTokenizer.from_pretrained({out!r})\n"
        f"or train from it: python -m jaxlm.main --config=configs/base.py --config.model.init_from={out}"
        f" --config.data.seq_length={c['n_positions']}")


if __name__ == "__main__":
  from jaxlm import cli
  _define_flags()
  cli.run(main)
