"""The SAMI job's configuration; ``configs/sami_vit{t,s,b}.py`` pick the student size.

Defaults are the paper's recipe (§4.1, REFERENCE.md §2): ImageNet-1K views at
224, mask ratio 0.75, cross-attention decoder 8 × 512 wide / 16 heads, AdamW
(0.9, 0.95), weight decay 0.05, lr 1.5e-4 · 4096/256 = 2.4e-3, 400 epochs with
40 of warm-up, cosine decay, global batch 4096, MSE over all tokens. An epoch is a
pass over the source images (the manifests count them), not over their stored views.
The ``smoke`` variant runs the whole pipeline on this CPU in about a minute:
bundled photographs, a small random teacher, a tiny student.
"""

import ml_collections

from efficientsam_jax.data.precompute import get_precompute_config
from efficientsam_jax.models.vit import VIT_SIZES


def get_sami_config(variant: str, arg=None) -> ml_collections.ConfigDict:
  size = VIT_SIZES[variant]
  config = ml_collections.ConfigDict()
  config.task = "sami"
  config.seed = 0
  config.model = ml_collections.ConfigDict(dict(
      encoder_embed_dim=size.width, encoder_depth=size.depth, encoder_num_heads=size.num_heads,
      img_size=224, patch_size=16, decoder_dim=512, decoder_depth=8, decoder_num_heads=16,
      decoder_type="cross", target_dim=256, mask_ratio=0.75))
  config.loss = ml_collections.ConfigDict({"kind": "mse", "tokens": "all"})
  # How the blocks compute (models/layers.py Kernels; same parameters whatever the choice): attention "xla",
  # "cudnn" (NVIDIA GPU, bf16), "pallas" (models/short_attention.py: all the keys of a head in one tile) or "auto"
  # (on NVIDIA GPUs in bf16: pallas where it fits, as for every SAMI attention, else cudnn; xla elsewhere. On an
  # H200 the ViT-S step ran 1.3× faster with cudnn than with xla, and 2.2% faster again with pallas: BENCHMARKS.md);
  # LayerNorm "one_pass" (flax's default, fp32 statistics) or "two_pass" (PyTorch's);
  # the decoder's GELU "exact" or "tanh" (the student encoder keeps the exact GELU it is exported with);
  # backward "lean" (LayerNorm and GELU keep only their inputs for the backward pass: ViT-S 87 → 54 MB of
  # activations per example) or "autodiff"; tiling: the Pallas attention's blocks and warps ("" the default, or
  # e.g. "64/4/16/4/4/32": short_attention.Tiling.parse), which a GPU other than the H200 may want tuned; mlp "xla"
  # or "pallas" (the GELU inside the MLP's matmuls, models/gelu_mlp.py: the ViT-S step moves 49.3 GB instead of 54.1
  # in an H100 compile; not yet timed on a GPU, so not the default).
  config.kernels = ml_collections.ConfigDict({"attention": "auto", "layer_norm": "one_pass", "gelu": "exact",
                                              "backward": "lean", "tiling": "", "mlp": "xla"})
  config.dtype = "bfloat16"
  config.remat = "none"  # or "full", "dots", "projections": what the blocks keep for the backward (layers.remat)
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  config.global_batch_size = 4096
  # Gradient accumulation: the batch runs as this many parts one after the other, each split over every device
  # (global_batch_size must be a multiple of microbatches × devices): the recipe's batch 4096 on fewer or smaller
  # GPUs, with the same masks, loss and update as one pass (train.state.accumulate_gradients).
  config.microbatches = 1
  config.num_epochs = 400
  config.total_steps = 0  # 0: num_epochs × source images / global_batch_size (an epoch: one view per image)
  config.optimizer = ml_collections.ConfigDict({"name": "adamw", "b1": 0.9, "b2": 0.95, "weight_decay": 0.05,
                                                "grad_clip_norm": 0.0})
  config.lr = ml_collections.ConfigDict({"base_lr": 1.5e-4, "base_batch": 256, "schedule": "cosine",
                                         "warmup_epochs": 40, "warmup_steps": -1, "end_lr": 0.0})
  # warmup_steps -1: warmup_epochs × steps per epoch.
  config.data = ml_collections.ConfigDict({"records_dir": "", "shuffle_window": 10_000, "cycle_length": 16,
                                           "verify": True})
  config.log_every_steps = 100
  config.checkpoint = ml_collections.ConfigDict({"every_steps": 1000, "keep": 3})
  # The teacher precompute to run first when records_dir has no shards (the smoke test chains them).
  config.precompute = get_precompute_config()
  config.precompute.enabled = False
  if arg == "smoke":
    config.model.update(encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=2, decoder_dim=64,
                        decoder_depth=2, decoder_num_heads=4)
    config.dtype = "float32"
    config.global_batch_size = 8
    config.total_steps = 60
    config.num_epochs = 0
    config.lr.base_lr = 2e-3 * 256 / 8
    config.lr.warmup_epochs = 0
    config.lr.warmup_steps = 5
    config.data.shuffle_window = 16
    config.data.cycle_length = 2
    config.log_every_steps = 10
    config.checkpoint.every_steps = 20
    config.precompute = get_precompute_config("smoke")
    config.precompute.enabled = True
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; known: smoke")
  return config
