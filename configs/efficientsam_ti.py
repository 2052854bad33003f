"""EfficientSAM-Ti finetuning on SA-1B (``:smoke`` = generated data, a tiny model, this CPU).

See ``efficientsam_jax/train/finetune_config.py`` for the fields and the paper's recipe.
"""

from efficientsam_jax.train.finetune_config import get_finetune_config


def get_config(arg=None):
  return get_finetune_config("ti", arg)
