"""Config validation and the few values derived from a config.

The values live in `configs/base.py`; this module says what each key may hold, checks a config once,
before any work, and turns the `auto` settings into concrete choices.
"""
import importlib.util
import math
import os
import sys
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from jaxlm.cli import UserError


class ConfigError(UserError):
  """A config value that cannot work; the message names the key and what to do."""


def _positive(v):
  return v > 0 or "must be > 0"


def _non_negative(v):
  return 0 <= v < math.inf or "must be >= 0 and finite"


def _one_of(*choices):
  return lambda v: v in choices or f"must be one of {', '.join(map(repr, choices))}"


def _fraction(v):
  return 0 <= v < 1 or "must be in [0, 1)"


_ANY = lambda v: True  # noqa: E731

# key -> (type, check). A check returns True or the reason the value is wrong.
SCHEMA: dict[str, tuple[type, Callable[[Any], Any]]] = {
    "workdir": (str, lambda v: bool(v) or "must name a directory"),
    "device": (str, _one_of("auto", "cpu", "gpu", "cuda", "tpu")),
    "compile_cache_dir": (str, _ANY),
    "mesh.data": (int, lambda v: v == -1 or v > 0 or "must be > 0, or -1 for the devices mesh.fsdp leaves"),
    "mesh.fsdp": (int, lambda v: v == -1 or v > 0 or "must be > 0, or -1 for the devices mesh.data leaves"),
    "data.dataset_name": (str, _ANY),
    "data.dataset_config": (str, _ANY),
    "data.data_dir": (str, _ANY),
    "data.raw_dir": (str, lambda v: bool(v) or "must name a directory"),
    "data.processed_dir": (str, lambda v: bool(v) or "must name a directory"),
    "data.seq_length": (int, lambda v: v >= 2 or "must be >= 2 (one input and one target token)"),
    "data.shift_windows": (bool, _ANY),
    "data.tokenizer.vocab_size": (int, lambda v: v >= 258 or "must be >= 258 (256 bytes + specials)"),
    "data.tokenizer.file": (str, _ANY),
    "data.tokenizer.pretrained": (str, _ANY),
    "model.d_model": (int, _positive),
    "model.num_layers": (int, _positive),
    "model.num_heads": (int, _positive),
    "model.d_ff": (int, _positive),
    "model.dropout": (float, _fraction),
    "model.attention_dropout": (float, _fraction),
    "model.token_dropout": (float, _fraction),
    "model.positions": (str, _one_of("learned", "rope")),
    "model.max_seq_length": (int, lambda v: v == -1 or v > 0 or "must be > 0, or -1 for data.seq_length"),
    "model.tie_embeddings": (bool, _ANY),
    "model.init_std": (float, _positive),
    "model.scaled_residual_init": (bool, _ANY),
    "model.layer_norm_eps": (float, _positive),
    "model.dtype": (str, _one_of("auto", "float32", "bfloat16")),
    "model.param_dtype": (str, _one_of("float32", "bfloat16")),
    "model.attention": (str, _one_of("auto", "blocked", "xla", "cudnn")),
    "model.activation": (str, _one_of("gelu", "gelu_tanh")),
    "model.scan_layers": (bool, _ANY),
    "model.init_from": (str, _ANY),
    "training.epochs": (int, _positive),
    "training.batch_size": (int, _positive),
    "training.eval_batch_size": (int, _positive),
    "training.learning_rate": (float, _non_negative),
    "training.min_learning_rate": (float, _non_negative),
    "training.warmup_steps": (int, _non_negative),
    "training.num_steps": (int, lambda v: v == -1 or v > 0 or "must be > 0, or -1 to derive it from the data"),
    "training.weight_decay": (float, _non_negative),
    "training.decay_all_params": (bool, _ANY),
    "training.ema_decay": (float, _fraction),
    "training.clip_norm": (float, _positive),
    "training.b1": (float, _fraction),
    "training.b2": (float, _fraction),
    "training.eps": (float, _positive),
    "training.patience": (int, _positive),
    # (jax.random.PRNGKey keeps 32 bits: seeds 2**32 apart would start from the same weights)
    "training.seed": (int, lambda v: 0 <= v < 2**32 or "must be in [0, 2**32)"),
    "training.log_every_steps": (int, _positive),
    "training.checkpoint_every_steps": (int, _non_negative),
    "training.checkpoint_every_minutes": (float, _non_negative),
    "training.steps_per_call": (int, lambda v: v == -1 or v > 0 or "must be > 0, or -1 to choose by device"),
    "training.loss_chunk": (int, lambda v: v >= -1 or "must be >= 0 (0: all at once), or -1 to choose by device"),
    "training.gpu_matmuls": (str, _one_of("auto", "xla", "cublas")),
    "sample.prompt": (str, _ANY),
    "sample.max_new_tokens": (int, _non_negative),
    "sample.temperature": (float, _non_negative),
    "sample.top_k": (int, _non_negative),
    "sample.top_p": (float, lambda v: 0 < v <= 1 or "must be in (0, 1]"),
    "sample.seed": (int, lambda v: 0 <= v < 2**31 or "must be in [0, 2**31)"),
}


# Where a run writes, not what it trains: a resume may change them, and a sweep does not vary them.
LOCATION_KEYS = ("workdir", "compile_cache_dir")


# Keys added since the first version that wrote checkpoints, at the values that version behaved
# with: a checkpoint saved without them still loads and resumes (see `upgrade`).
ADDED_KEYS = {
    "model.activation": "gelu", "model.init_from": "", "model.scan_layers": False, "model.attention_dropout": 0.0,
    "model.token_dropout": 0.0, "training.ema_decay": 0.0, "model.positions": "learned",
    "training.checkpoint_every_steps": 0, "training.checkpoint_every_minutes": 10.0,
    "training.steps_per_call": -1, "mesh.data": -1, "mesh.fsdp": 1, "data.shift_windows": False,
    "training.loss_chunk": -1, "training.gpu_matmuls": "xla",
    "sample.prompt": " The", "sample.max_new_tokens": 48, "sample.temperature": 0.8, "sample.top_k": 200,
    "sample.top_p": 1.0, "sample.seed": 0, "compile_cache_dir": "",
}


def upgrade(saved: dict) -> dict:
  """A config saved by an earlier version (a checkpoint's, as a dict) with the keys added since."""
  saved = {group: dict(value) if isinstance(value, dict) else value for group, value in saved.items()}
  for key, value in ADDED_KEYS.items():
    *group, name = key.split(".")
    (saved.setdefault(group[0], {}) if group else saved).setdefault(name, value)
  return saved


def from_file(path: str, variant: str = "") -> ml_collections.ConfigDict:
  """get_config(variant) of a config file (as --config=path:variant loads it), for config files
  that start from another one, e.g. configs/gpu.py from configs/base.py."""
  spec = importlib.util.spec_from_file_location(f"jaxlm_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def lookup(config: ml_collections.ConfigDict, key: str) -> tuple[ml_collections.ConfigDict, str]:
  """(the ConfigDict that holds `key`, the key's last part): "model.d_model" -> (config.model, "d_model")."""
  *groups, name = key.split(".")
  node = config
  for group in groups:
    node = node[group]
  return node, name


def flatten(config, prefix: str = "") -> dict[str, Any]:
  """{"group.key": value} of a ConfigDict or of its to_dict()."""
  flat = {}
  for key, value in config.items():
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      flat.update(flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError, naming the key, for the first value that cannot work."""
  flat = flatten(config)
  for key in flat:
    if key not in SCHEMA:
      raise ConfigError(f"config key '{key}' is unknown (a typo? see configs/base.py for the keys)")
  for key, (kind, check) in SCHEMA.items():
    if key not in flat:
      raise ConfigError(f"config key '{key}' is missing (start from configs/base.py)")
    value = flat[key]
    # bool is an int subclass, and an int is a fine float: accept exactly what the key means.
    type_ok = (isinstance(value, bool) if kind is bool else
               isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
               isinstance(value, kind) and not isinstance(value, bool))
    if not type_ok:
      raise ConfigError(f"config key '{key}' = {value!r} must be of type {kind.__name__}")
    verdict = check(value)
    if verdict is not True:
      raise ConfigError(f"config key '{key}' = {value!r} {verdict}")

  m, t, tok = config.model, config.training, config.data.tokenizer
  if m.d_model % m.num_heads:
    raise ConfigError(f"config key 'model.d_model' = {m.d_model} must be divisible by "
                      f"'model.num_heads' = {m.num_heads}")
  if m.positions == "rope" and (m.d_model // m.num_heads) % 2:
    raise ConfigError(f"config key 'model.positions' = 'rope' rotates pairs of each head's features: the "
                      f"head size 'model.d_model' / 'model.num_heads' = {m.d_model // m.num_heads} must be even")
  if m.max_seq_length != -1 and config.data.seq_length > m.max_seq_length:
    raise ConfigError(f"config key 'data.seq_length' = {config.data.seq_length} exceeds the model's "
                      f"positions 'model.max_seq_length' = {m.max_seq_length}")
  if t.num_steps != -1 and t.warmup_steps >= t.num_steps:
    raise ConfigError(f"config key 'training.warmup_steps' = {t.warmup_steps} must be below "
                      f"'training.num_steps' = {t.num_steps}")
  if t.min_learning_rate > t.learning_rate:
    raise ConfigError(f"config key 'training.min_learning_rate' = {t.min_learning_rate} must not exceed "
                      f"'training.learning_rate' = {t.learning_rate}")
  if tok.file and tok.pretrained:
    raise ConfigError("config keys 'data.tokenizer.file' and 'data.tokenizer.pretrained' are both set: "
                      "choose one (or neither, to train a BPE of 'data.tokenizer.vocab_size')")
  if config.sample.max_new_tokens and not config.sample.prompt.strip():
    raise ConfigError("config key 'sample.prompt' is empty: give the samples while training a prompt, or "
                      "turn them off with --config.sample.max_new_tokens=0")
  if config.mesh.data == -1 and config.mesh.fsdp == -1:
    raise ConfigError("config keys 'mesh.data' and 'mesh.fsdp' are both -1: set one of them "
                      "(e.g. --config.mesh.fsdp=1 for pure data parallel)")
  if not config.data.data_dir and not (config.data.dataset_name and config.data.dataset_config):
    raise ConfigError("config key 'data.data_dir' is empty and so is 'data.dataset_name' or "
                      "'data.dataset_config': name a hub dataset or a local directory")


def max_seq_length(config: ml_collections.ConfigDict) -> int:
  """Positions the model has embeddings for."""
  m = config.model.max_seq_length
  return config.data.seq_length if m == -1 else m


def select_devices(config: ml_collections.ConfigDict) -> list[jax.Device]:
  """Every device of every process on the platform config.device names; `auto` is JAX's default
  (GPU or TPU when present)."""
  platform = {"auto": None, "cuda": "gpu"}.get(config.device, config.device)
  try:
    return jax.devices(platform)
  except RuntimeError as e:
    available = sorted({d.platform for d in jax.devices()})
    raise ConfigError(
        f"config key 'device' = {config.device!r}, but JAX has no {platform} backend here "
        f"(available: {', '.join(available)}). Set --config.device=auto, or install a JAX build "
        f"for it (e.g. pip install -U 'jax[cuda12]' for NVIDIA GPUs). ({e})") from None


def select_device(config: ml_collections.ConfigDict) -> jax.Device:
  """This process's first device of that platform: where inference runs, and what a run's choices
  (dtype, attention kernel, peak FLOP/s) are made for."""
  return next(d for d in select_devices(config) if d.process_index == jax.process_index())


def use_compile_cache(config: ml_collections.ConfigDict) -> None:
  """Points JAX's persistent compilation cache at config.compile_cache_dir, unless JAX has one
  already (JAX_COMPILATION_CACHE_DIR, or an earlier run in this process: JAX reads the setting once,
  at its first compile). A folder that cannot be made is reported and compiling goes on without it."""
  if not config.compile_cache_dir or jax.config.jax_compilation_cache_dir:
    return
  path = os.path.abspath(os.path.expanduser(config.compile_cache_dir))
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    print(f"WARNING: config key 'compile_cache_dir' = {config.compile_cache_dir!r}: {path} cannot be made "
          f"({e.strerror}); compiling without a cache (set another folder, or '' for none)", file=sys.stderr,
          flush=True)
    return
  jax.config.update("jax_compilation_cache_dir", path)


def compute_dtype(config: ml_collections.ConfigDict, device: jax.Device) -> jnp.dtype:
  """model.dtype on `device` (auto: bfloat16 on GPU/TPU, float32 on CPU)."""
  if config.model.dtype == "auto":
    dtype = jnp.dtype(jnp.float32 if device.platform == "cpu" else jnp.bfloat16)
  else:
    dtype = jnp.dtype(config.model.dtype)
  if config.model.attention == "cudnn" and not _cudnn_attention_runs(config, device, dtype):
    raise ConfigError(f"config key 'model.attention' = 'cudnn' needs an NVIDIA GPU computing in bfloat16 and "
                      f"a head size (d_model / num_heads) of at most 128, a multiple of 8 (here: "
                      f"{device.platform}, {dtype.name}, head size {config.model.d_model // config.model.num_heads}). "
                      f"Use --config.model.attention=auto.")
  return dtype


def _cudnn_attention_runs(config: ml_collections.ConfigDict, device: jax.Device, dtype) -> bool:
  head_size = config.model.d_model // config.model.num_heads
  return device.platform == "gpu" and dtype == jnp.bfloat16 and head_size <= 128 and head_size % 8 == 0


# From this sequence length on, cuDNN's flash attention beats XLA's on the GPUs measured (see
# experiments/README.md, "Attention kernel"); below it the two are level and XLA's is kept.
CUDNN_MIN_SEQ_LENGTH = 256


def attention_kernel(config: ml_collections.ConfigDict, device: jax.Device, dtype) -> str:
  """model.attention on `device` computing in `dtype`: auto is cuDNN's fused flash attention where it
  runs and wins (an NVIDIA GPU, bfloat16, sequences of CUDNN_MIN_SEQ_LENGTH or more), attention by
  blocks of queries on a CPU (model.causal_attention_by_blocks), else XLA's."""
  if config.model.attention != "auto":
    return config.model.attention
  if _cudnn_attention_runs(config, device, dtype) and config.data.seq_length >= CUDNN_MIN_SEQ_LENGTH:
    return "cudnn"
  return "blocked" if device.platform == "cpu" else "xla"


# Tokens per chunk of the training loss's output projection on a CPU (see experiments/README.md,
# "The loss by chunks"): the base config's batch-32 step is 12-15% faster than with [B, L, V]
# logits at once (1.25-1.33 against 1.46-1.58 s), level at batch 2. On an H200 chunks did not help
# (GPT-2-small shape 34.00 against 33.83-33.92 ms, GPU config 4.31 against 4.18-4.22 ms): the logits
# stay whole there.
CPU_LOSS_CHUNK = 256


def loss_chunk(config: ml_collections.ConfigDict, device: jax.Device) -> int:
  """training.loss_chunk on `device`: auto (-1) is CPU_LOSS_CHUNK on a CPU and 0 (the logits at
  once) elsewhere."""
  if config.training.loss_chunk != -1:
    return config.training.loss_chunk
  return CPU_LOSS_CHUNK if device.platform == "cpu" else 0


# XLA lets Triton and cuBLAS compete for each matmul on a GPU ("xla"), and fuses Triton's with their
# neighbours. For steps of CUBLAS_MIN_STEP_FLOPS or more per device, cuBLAS alone was faster on an
# H200 (experiments/README.md, "Speed"): the GPT-2-small shape (12.6 TFLOP per GPU) by 2.3-2.6% on 1
# and on 2 GPUs, with 1.15 GB less memory and a shorter compile; the GPU config (0.59 TFLOP) was 4%
# slower with it.
CUBLAS_MIN_STEP_FLOPS = 1e12


def gpu_matmuls(config: ml_collections.ConfigDict, device: jax.Device, flops_per_device_step: float) -> str:
  """training.gpu_matmuls on `device` for a training step of `flops_per_device_step` per device:
  auto is "cublas" on a GPU for steps of CUBLAS_MIN_STEP_FLOPS or more, else "xla"; off a GPU "xla"."""
  choice = config.training.gpu_matmuls
  if choice == "cublas" and device.platform != "gpu":
    raise ConfigError(f"config key 'training.gpu_matmuls' = 'cublas' needs an NVIDIA GPU (here: "
                      f"{device.platform}). Use --config.training.gpu_matmuls=auto.")
  if choice == "auto":
    return "cublas" if device.platform == "gpu" and flops_per_device_step >= CUBLAS_MIN_STEP_FLOPS else "xla"
  return choice


def compiler_options(gpu_matmuls: str) -> dict:
  """XLA's options for compiling a training step with `gpu_matmuls` (see gpu_matmuls)."""
  return {"xla_gpu_enable_triton_gemm": False} if gpu_matmuls == "cublas" else {}


# Updates per jitted call on an accelerator for steps whose devices' work takes less time than
# Python's dispatch of them (see experiments/README.md, "Speed" and "Several GPUs"): the guide's
# base config at batch 2 (8.5 GFLOP per step) trains 1.9x faster with 10 steps per call on an H200;
# its GPU config (590 GFLOP per step) trains an epoch in 2.4 s with 10 steps per call against 3.0-3.1
# s with one on one H200 (whole runs, back to back; the bench's bare loop timed both alike), and
# 1.17x faster on two (295 GFLOP per GPU). Steps of SMALL_STEP_FLOPS or more keep a GPU busy by
# themselves; two per call, one iteration of the scan's loop (train_steps), are still 1.2-1.6%
# faster (the GPT-2-small shape's 12.6 TFLOP step: 31.35-31.48 ms against 31.78-31.88 ms on an H200,
# alternated) but compile for about 20 s more, and a run whose epochs (or checkpoint_every_steps)
# have an odd number of steps compiles the single step too: only a run of LONG_RUN_STEPS or more wins
# that back (0.4-0.5 ms a step: 40-50 s).
ACCELERATOR_STEPS_PER_CALL = 16
LARGE_STEPS_PER_CALL = 2
LONG_RUN_STEPS = 100_000
SMALL_STEP_FLOPS = 1e12  # per device


def steps_per_call(config: ml_collections.ConfigDict, device: jax.Device, flops_per_device_step: float,
                   run_steps: int) -> int:
  """training.steps_per_call; auto (-1): one on a CPU; on an accelerator the largest divisor of
  training.log_every_steps up to ACCELERATOR_STEPS_PER_CALL, or for a step of SMALL_STEP_FLOPS or
  more per device up to LARGE_STEPS_PER_CALL in a run of LONG_RUN_STEPS or more and else one (calls
  then end on logging boundaries without a shorter call in between)."""
  if config.training.steps_per_call != -1:
    return config.training.steps_per_call
  if device.platform == "cpu":
    return 1
  most = ACCELERATOR_STEPS_PER_CALL
  if flops_per_device_step >= SMALL_STEP_FLOPS:
    most = LARGE_STEPS_PER_CALL if run_steps >= LONG_RUN_STEPS else 1
  every = config.training.log_every_steps
  return max(k for k in range(1, most + 1) if every % k == 0)
