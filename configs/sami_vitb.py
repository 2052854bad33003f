"""SAMI pretraining of a ViT-B student (``:smoke`` = the embedded default).

See ``efficientsam_jax/train/sami_config.py`` for the fields and the paper's recipe.
"""

from efficientsam_jax.train.sami_config import get_sami_config


def get_config(arg=None):
  return get_sami_config("b", arg)
