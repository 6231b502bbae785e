"""The original guide's "more capacity" tuning run: its baseline (configs/base.py) with d_model 512
and 6 layers (heads, d_ff and everything else as the baseline's).

  python -m jaxlm.main --config=configs/more_capacity.py
"""
import os

from jaxlm import config as config_lib


def get_config():
  config = config_lib.from_file(os.path.join(os.path.dirname(__file__), "base.py"))
  config.workdir = "runs/more_capacity"
  config.model.d_model = 512
  config.model.num_layers = 6
  return config
