"""The original guide's first tuning run: its baseline (configs/base.py) with learning rate 5e-4.

  python -m jaxlm.main --config=configs/lr_5e-4.py --config.workdir=runs/lr_5e-4
"""
import os

from jaxlm import config as config_lib


def get_config():
  config = config_lib.from_file(os.path.join(os.path.dirname(__file__), "base.py"))
  config.workdir = "runs/lr_5e-4"
  config.training.learning_rate = 5e-4
  return config
