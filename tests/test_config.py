import os
import subprocess
import sys
from unittest import mock

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from jaxlm import config as config_lib

from conftest import BASE_CONFIG, load_config, subprocess_env


def parse(*overrides, variant=""):
  """The config exactly as `python -m jaxlm.main --config=... <overrides>` builds it."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True)
  argv = ["prog", f"--config={BASE_CONFIG}{':' + variant if variant else ''}", *overrides]
  with mock.patch.object(sys, "argv", argv):  # config_flags reads the overrides from sys.argv
    flag_values(argv)
  return flag_values.config


def test_base_config_holds_the_guides_values():
  c = load_config()
  config_lib.validate(c)
  assert (c.data.seq_length, c.training.epochs, c.training.batch_size) == (128, 3, 2)
  assert (c.model.d_model, c.model.num_layers, c.model.num_heads, c.model.d_ff) == (256, 4, 4, 1024)
  assert (c.model.dropout, c.training.learning_rate, c.training.weight_decay) == (0.1, 3e-4, 0.01)
  assert (c.training.warmup_steps, c.training.patience, c.data.tokenizer.vocab_size) == (300, 2, 8192)
  assert c.training.num_steps == -1  # derived from the data; 3000 stays reachable by override
  assert c.workdir == "runs/experiment_1"
  assert (c.data.dataset_name, c.data.dataset_config) == ("wikitext", "wikitext-2-raw-v1")


def test_tiny_variant_validates():
  config_lib.validate(load_config("tiny"))


def test_command_line_overrides_reach_the_config():
  c = parse("--config.training.learning_rate=5e-4", "--config.model.d_model=128", "--config.device=cuda",
            "--config.training.num_steps=3000", "--config.data.data_dir=/some/dir")
  assert c.training.learning_rate == 5e-4
  assert c.model.d_model == 128
  assert c.device == "cuda"
  assert c.training.num_steps == 3000
  assert c.data.data_dir == "/some/dir"
  config_lib.validate(c)


def test_override_of_unknown_key_fails_at_parse_time():
  with pytest.raises(Exception, match="learning_rat"):
    parse("--config.training.learning_rat=5e-4")


def test_unknown_variant_fails():
  with pytest.raises(Exception, match="unknown config variant"):
    parse(variant="huge")


@pytest.mark.parametrize("key, value, message", [
    ("model.d_model", 250, "'model.d_model' = 250 must be divisible by 'model.num_heads' = 4"),
    ("model.num_heads", 0, "'model.num_heads' = 0 must be > 0"),
    ("model.num_layers", -1, "'model.num_layers' = -1 must be > 0"),
    ("model.d_ff", 0, "'model.d_ff' = 0 must be > 0"),
    ("model.dropout", 1.0, r"'model.dropout' = 1.0 must be in \[0, 1\)"),
    ("model.dtype", "float16", "'model.dtype' = 'float16' must be one of"),
    ("model.attention", "flash", "'model.attention' = 'flash' must be one of"),
    ("model.max_seq_length", 64, "'data.seq_length' = 128 exceeds the model's positions 'model.max_seq_length' = 64"),
    ("data.seq_length", 1, "'data.seq_length' = 1 must be >= 2"),
    ("data.tokenizer.vocab_size", 100, "'data.tokenizer.vocab_size' = 100 must be >= 258"),
    ("training.batch_size", 0, "'training.batch_size' = 0 must be > 0"),
    ("training.epochs", 0, "'training.epochs' = 0 must be > 0"),
    ("training.learning_rate", -1e-3, "'training.learning_rate' = -0.001 must be >= 0"),
    ("training.learning_rate", float("inf"), "'training.learning_rate' = inf must be >= 0 and finite"),
    ("training.min_learning_rate", 1e-3, "'training.min_learning_rate' = 0.001 must not exceed"),
    ("training.warmup_steps", 3000, "'training.warmup_steps' = 3000 must be below 'training.num_steps' = 3000"),
    ("training.num_steps", 0, "'training.num_steps' = 0 must be > 0, or -1"),
    ("training.patience", 0, "'training.patience' = 0 must be > 0"),
    ("training.b2", 1.0, r"'training.b2' = 1.0 must be in \[0, 1\)"),
    ("training.clip_norm", 0.0, "'training.clip_norm' = 0.0 must be > 0"),
    ("device", "gpu0", "'device' = 'gpu0' must be one of"),
    ("workdir", "", "'workdir' = '' must name a directory"),
    ("model.activation", "relu", "'model.activation' = 'relu' must be one of 'gelu', 'gelu_tanh'"),
    ("training.checkpoint_every_steps", -1, "'training.checkpoint_every_steps' = -1 must be >= 0"),
    ("training.checkpoint_every_minutes", -5.0, "'training.checkpoint_every_minutes' = -5.0 must be >= 0"),
    ("sample.max_new_tokens", -1, "'sample.max_new_tokens' = -1 must be >= 0"),
    ("sample.temperature", -0.1, "'sample.temperature' = -0.1 must be >= 0"),
    ("sample.seed", 2**31, r"'sample.seed' = 2147483648 must be in \[0, 2\*\*31\)"),
    ("training.seed", 2**32, r"'training.seed' = 4294967296 must be in \[0, 2\*\*32\)"),
    ("training.seed", -1, r"'training.seed' = -1 must be in \[0, 2\*\*32\)"),
    ("sample.top_p", 0.0, r"'sample.top_p' = 0.0 must be in \(0, 1\]"),
    ("sample.top_p", 1.5, r"'sample.top_p' = 1.5 must be in \(0, 1\]"),
    ("sample.prompt", "  ", "'sample.prompt' is empty: give the samples while training a prompt"),
])
def test_each_bad_value_gives_one_error_naming_the_key(key, value, message):
  c = load_config()
  if key == "training.warmup_steps":
    c.training.num_steps = 3000
  group, _, name = key.rpartition(".")
  target = c
  for part in filter(None, group.split(".")):
    target = target[part]
  target[name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_unknown_and_missing_keys_are_named():
  c = load_config()
  c.unlock()
  c.training.learning_rat = 1e-3
  with pytest.raises(config_lib.ConfigError, match="'training.learning_rat' is unknown"):
    config_lib.validate(c)
  c = load_config()
  c.unlock()
  del c.training["patience"]
  with pytest.raises(config_lib.ConfigError, match="'training.patience' is missing"):
    config_lib.validate(c)


def test_wrong_type_is_named():
  c = load_config()
  c.unlock()
  del c.training["epochs"]
  c.training.epochs = "3"
  with pytest.raises(config_lib.ConfigError, match="'training.epochs' = '3' must be of type int"):
    config_lib.validate(c)


def test_two_tokenizer_sources_conflict():
  c = load_config()
  c.data.tokenizer.file, c.data.tokenizer.pretrained = "tok.json", "gpt2"
  with pytest.raises(config_lib.ConfigError, match="both set"):
    config_lib.validate(c)


def test_device_choice():
  c = load_config()
  assert config_lib.select_device(c).platform in ("cpu", "gpu", "tpu")
  c.device = "cpu"
  assert config_lib.select_device(c).platform == "cpu"
  import jax
  if not any(d.platform == "gpu" for d in jax.devices()):
    for name in ("gpu", "cuda"):  # "cuda" is the original guide's spelling
      c.device = name
      with pytest.raises(config_lib.ConfigError, match="no gpu backend"):
        config_lib.select_device(c)


def test_compute_dtype_and_cudnn_attention_need_the_right_device():
  import jax
  import jax.numpy as jnp
  c = load_config()
  cpu = jax.devices("cpu")[0]
  assert config_lib.compute_dtype(c, cpu) == jnp.float32  # auto: float32 on a CPU
  c.model.dtype = "bfloat16"
  assert config_lib.compute_dtype(c, cpu) == jnp.bfloat16
  c.model.attention = "cudnn"
  with pytest.raises(config_lib.ConfigError, match="'model.attention' = 'cudnn' needs an NVIDIA GPU"):
    config_lib.compute_dtype(c, cpu)


class _Gpu:
  """Stands in for a jax.Device of an NVIDIA GPU, for the choices made from the device's kind."""
  platform = "gpu"


def test_attention_auto_is_cudnn_on_a_gpu_in_bfloat16_from_256_tokens_on_and_blocked_on_a_cpu():
  import jax
  import jax.numpy as jnp
  c = load_config()
  assert config_lib.attention_kernel(c, jax.devices("cpu")[0], jnp.float32) == "blocked"
  assert config_lib.attention_kernel(c, _Gpu(), jnp.bfloat16) == "xla"  # 128 tokens: level, XLA's kept
  c.data.seq_length = config_lib.CUDNN_MIN_SEQ_LENGTH
  assert config_lib.attention_kernel(c, _Gpu(), jnp.bfloat16) == "cudnn"
  assert config_lib.attention_kernel(c, _Gpu(), jnp.float32) == "xla"  # cuDNN's kernel is bf16/fp16 only
  c.model.d_model, c.model.num_heads = 320, 2  # head size 160: beyond cuDNN's 128
  assert config_lib.attention_kernel(c, _Gpu(), jnp.bfloat16) == "xla"
  with pytest.raises(config_lib.ConfigError, match="head size"):
    c.model.attention = "cudnn"
    config_lib.compute_dtype(c, _Gpu())
  c.model.attention = "xla"
  assert config_lib.attention_kernel(c, _Gpu(), jnp.bfloat16) == "xla"


def test_loss_chunk_auto_is_chunks_on_a_cpu_and_all_logits_at_once_elsewhere():
  import jax
  c = load_config()
  assert config_lib.loss_chunk(c, jax.devices("cpu")[0]) == config_lib.CPU_LOSS_CHUNK
  assert config_lib.loss_chunk(c, _Gpu()) == 0
  c.training.loss_chunk = 512
  assert config_lib.loss_chunk(c, _Gpu()) == 512
  c.training.loss_chunk = -2
  with pytest.raises(config_lib.ConfigError, match="'training.loss_chunk' = -2 must be >= 0"):
    config_lib.validate(c)


def test_gpu_matmuls_auto_is_cublas_alone_for_big_steps_on_a_gpu_and_xla_elsewhere():
  import jax
  c = load_config()
  gpt2_small, gpu_config = 1.26e13, 5.9e11  # FLOPs per device and step
  assert config_lib.gpu_matmuls(c, _Gpu(), gpt2_small) == "cublas"
  assert config_lib.gpu_matmuls(c, _Gpu(), gpu_config) == "xla"
  assert config_lib.gpu_matmuls(c, jax.devices("cpu")[0], gpt2_small) == "xla"
  assert config_lib.compiler_options("cublas") == {"xla_gpu_enable_triton_gemm": False}
  assert config_lib.compiler_options("xla") == {}
  c.training.gpu_matmuls = "xla"
  assert config_lib.gpu_matmuls(c, _Gpu(), gpt2_small) == "xla"
  c.training.gpu_matmuls = "cublas"
  assert config_lib.gpu_matmuls(c, _Gpu(), gpu_config) == "cublas"
  with pytest.raises(config_lib.ConfigError, match="'training.gpu_matmuls' = 'cublas' needs an NVIDIA GPU"):
    config_lib.gpu_matmuls(c, jax.devices("cpu")[0], gpu_config)
  c.training.gpu_matmuls = "triton"
  with pytest.raises(config_lib.ConfigError, match="'training.gpu_matmuls' = 'triton'"):
    config_lib.validate(c)


def test_steps_per_call_auto_is_one_on_a_cpu_two_for_big_steps_of_long_runs_and_divides_the_log_interval():
  import jax
  c = load_config()
  small, big, gpt2 = 8.5e9, 5.9e11, 1.26e13  # FLOPs per step: base config at batch 2, GPU config, GPT-2-small
  runs = 3 * 290, 10**6  # steps in a run: short, long
  cpu = jax.devices("cpu")[0]
  assert [config_lib.steps_per_call(c, cpu, f, n) for f in (small, gpt2) for n in runs] == [1, 1, 1, 1]
  assert config_lib.steps_per_call(c, _Gpu(), small, runs[0]) == 10  # log_every_steps 100
  assert config_lib.steps_per_call(c, _Gpu(), big, runs[0]) == 10  # a whole run's epoch: 2.4 s against 3.0-3.1 s
  assert config_lib.steps_per_call(c, _Gpu(), gpt2, runs[0]) == 1  # the second program's compile not won back
  assert config_lib.steps_per_call(c, _Gpu(), gpt2, runs[1]) == 2  # one loop iteration of two: 1.2-1.6% faster
  assert config_lib.steps_per_call(c, _Gpu(), gpt2 / 2, runs[1]) == 2  # the same per GPU of two
  long_run = config_lib.LONG_RUN_STEPS
  assert [config_lib.steps_per_call(c, _Gpu(), gpt2, n) for n in (long_run - 1, long_run)] == [1, 2]
  c.training.log_every_steps = 64
  assert config_lib.steps_per_call(c, _Gpu(), small, runs[0]) == 16
  c.training.log_every_steps = 7
  assert config_lib.steps_per_call(c, _Gpu(), small, runs[0]) == 7
  assert config_lib.steps_per_call(c, _Gpu(), gpt2, runs[1]) == 1  # no shorter call between two log lines
  c.training.steps_per_call = 5
  assert config_lib.steps_per_call(c, cpu, big, runs[0]) == 5
  c.training.steps_per_call = 0
  with pytest.raises(config_lib.ConfigError, match="'training.steps_per_call' = 0 must be > 0, or -1"):
    config_lib.validate(c)


def test_a_config_saved_before_keys_were_added_still_validates():
  saved = load_config().to_dict()
  for key in config_lib.ADDED_KEYS:
    *group, name = key.split(".")
    del (saved[group[0]] if group else saved)[name]
  del saved["sample"]  # a whole group added later
  with pytest.raises(config_lib.ConfigError, match="is missing"):
    config_lib.validate(ml_collections.ConfigDict(saved))
  upgraded = ml_collections.ConfigDict(config_lib.upgrade(saved))
  config_lib.validate(upgraded)
  assert upgraded.training.steps_per_call == -1 and upgraded.model.activation == "gelu"
  assert upgraded.compile_cache_dir == ""  # a top-level key too
  assert upgraded.model.d_model == saved["model"]["d_model"]  # what was saved is kept
  assert "sample" not in saved  # the saved dict itself is left as it was


@pytest.mark.parametrize("name, changes", [
    ("lr_5e-4.py", {"training.learning_rate": 5e-4}),
    ("more_capacity.py", {"model.d_model": 512, "model.num_layers": 6}),
    ("gpu.py", {"training.batch_size": 32, "model.d_model": 512, "model.num_layers": 6, "model.num_heads": 8,
                "model.d_ff": 2048}),
    ("tuned.py", {"training.batch_size": 8, "data.seq_length": 512, "model.d_model": 384, "model.num_layers": 8,
                  "model.num_heads": 8, "model.d_ff": 2048, "data.tokenizer.vocab_size": 4096,
                  "data.shift_windows": True, "model.dropout": 0.2, "model.attention_dropout": 0.1,
                  "training.weight_decay": 1.0, "training.learning_rate": 1.2e-3, "training.epochs": 48,
                  "training.patience": 3, "training.ema_decay": 0.995, "model.positions": "rope"}),
])
def test_the_tuning_story_configs_are_the_baseline_with_their_changes(name, changes):
  config = config_lib.from_file(os.path.join(os.path.dirname(BASE_CONFIG), name))
  config_lib.validate(config)
  ours, base = config_lib.flatten(config), config_lib.flatten(load_config())
  assert {k: v for k, v in ours.items() if v != base[k] and k != "workdir"} == changes


# jax is imported before conftest, which would otherwise set the tests' own cache folder
_COMPILE = """
import sys
import jax, jax.numpy as jnp
from jaxlm import config as config_lib
sys.path.insert(0, sys.argv[2])
from conftest import load_config
config = load_config()
config.compile_cache_dir = sys.argv[1]
config_lib.use_compile_cache(config)
print(float(jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.ones((64, 64))).sum()))
"""


def test_compiled_programs_are_kept_in_compile_cache_dir_for_the_next_process(tmp_path):
  env = subprocess_env(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_LOG_COMPILES="1", JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR")  # the tests' own cache
  run = lambda cache_dir, **extra: subprocess.run(  # noqa: E731
      [sys.executable, "-c", _COMPILE, cache_dir, os.path.dirname(__file__)], env=dict(env, **extra),
      capture_output=True, text=True, timeout=300, cwd=tmp_path / "cwd")
  (tmp_path / "cwd").mkdir()
  cache = tmp_path / "home" / "cache"
  first, second = run(str(cache)), run(str(cache))
  assert first.returncode == second.returncode == 0, first.stderr + second.stderr
  assert first.stdout == second.stdout
  assert any(f.name.startswith("jit__lambda") for f in cache.iterdir())
  assert "Persistent compilation cache hit for 'jit__lambda'" not in first.stderr
  assert "Persistent compilation cache hit for 'jit__lambda'" in second.stderr
  # JAX_COMPILATION_CACHE_DIR, when set, is the user's choice and wins; '' sets none
  theirs = tmp_path / "theirs"
  assert run(str(tmp_path / "ours"), JAX_COMPILATION_CACHE_DIR=str(theirs)).returncode == 0
  assert any(theirs.iterdir()) and not (tmp_path / "ours").exists()
  off = [run(""), run("")]
  assert [o.returncode for o in off] == [0, 0] and all("cache hit" not in o.stderr for o in off)
  assert not any((tmp_path / "cwd").iterdir())
  # A folder that cannot be made: one warning, and the program still compiles and runs
  (tmp_path / "a_file").write_text("")
  bad = run(str(tmp_path / "a_file" / "cache"))
  assert bad.returncode == 0 and bad.stdout.splitlines()[-1] == first.stdout.splitlines()[-1]
  assert "WARNING: config key 'compile_cache_dir'" in bad.stderr and "cannot be made" in bad.stderr
