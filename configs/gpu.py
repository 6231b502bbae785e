"""The original guide's configuration scaled for a GPU: batch 32, d_model 512, 6 layers, 8 heads,
d_ff 2048 (23.2M parameters with the 8,192-token BPE); the rest as configs/base.py.

  python -m jaxlm.main --config=configs/gpu.py
"""
import os

from jaxlm import config as config_lib


def get_config():
  config = config_lib.from_file(os.path.join(os.path.dirname(__file__), "base.py"))
  config.workdir = "runs/gpu"
  config.training.batch_size = 32
  config.model.d_model, config.model.num_layers, config.model.num_heads, config.model.d_ff = 512, 6, 8, 2048
  return config
