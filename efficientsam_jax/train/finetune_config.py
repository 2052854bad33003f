"""The finetuning job's configuration; ``configs/efficientsam_{ti,s}.py`` pick the model size.

Defaults are the paper's recipe (§4.1, REFERENCE.md §3): SA-1B at 1024², up to
64 masks per image (masks over 90% of the image skipped), AdamW (0.9, 0.999),
lr 4e-4 at batch 128 with linear decay to 0, weight decay 0.1, 5 epochs, image
encoder from the SAMI checkpoint (``init.encoder``: the ``efficientsam_student``
directory the SAMI job exports; its 224 position table is resized as the model
always does), prompt encoder and decoder from scratch or from an official
checkpoint converted with ``convert torch-to-jax`` (``init.decoder``); loss
20·focal + dice + IoU MSE over a first point/box prompt and 2 correction rounds.

The ``smoke`` variant finetunes a tiny model on generated SA-1B-format data on
a CPU in a few minutes and prints the held-out single-point mIoU before and after.
"""

import ml_collections

from efficientsam_jax.models.vit import VIT_SIZES


def get_finetune_config(variant: str, arg=None) -> ml_collections.ConfigDict:
  size = VIT_SIZES[variant]
  config = ml_collections.ConfigDict()
  config.task = "finetune"
  config.seed = 0
  # EfficientSamConfig fields.
  config.model = ml_collections.ConfigDict(dict(
      img_size=1024, encoder_embed_dim=size.width, encoder_depth=size.depth, encoder_num_heads=size.num_heads,
      decoder_dim=256, decoder_num_heads=8, decoder_mlp_dim=2048))
  config.init = ml_collections.ConfigDict({
      "checkpoint": "",  # a whole EfficientSAM weights directory (e.g. to continue from a finetuned model)
      "encoder": "",  # image encoder only: the SAMI job's WORKDIR/efficientsam_student
      "decoder": "",  # prompt encoder + mask decoder only: e.g. an official checkpoint, converted
  })
  config.dtype = "bfloat16"
  # What the encoder blocks and each decoder round keep for the backward pass (layers.remat: "none", "dots",
  # "projections", "full"). Every prompt carries its own copy of the image tokens through the decoder, so
  # EfficientSAM-Ti at 64 masks, 3 rounds, bf16 keeps per image: none 22.5 GB, dots 6.1 GB (+4% FLOPs),
  # projections 1.5 GB (+23% FLOPs: the encoder's 4096-token q·kᵀ again), full 0.06 GB (+33%); S alike
  # (26.8 / 8.7 / 1.6 / 0.08 GB). "projections" lets batch 128 run on one 8-GPU node (16 images per GPU);
  # with more GPUs, "dots" (or "none") trades memory for speed.
  config.remat = "projections"
  config.drop_path_rate = 0.0  # encoder stochastic depth (linear over the blocks); the paper uses none
  # How the image encoder's blocks compute (models/layers.py Kernels, same parameters): attention "xla",
  # "cudnn" (NVIDIA GPUs, bf16: the 4096-token attention at 1024 without materialized logits) or "auto"
  # (cuDNN on NVIDIA GPUs in bf16/fp16, else XLA: the step compiled for an H100 moves 774 GB instead of 1023 GB,
  # BENCHMARKS.md); LayerNorm "two_pass" (PyTorch's) or "one_pass" (no gain measured here: the attention
  # dominates); backward "lean" (LayerNorm and GELU keep only their inputs for the backward pass) or
  # "autodiff". The GELU stays exact.
  config.kernels = ml_collections.ConfigDict({"attention": "auto", "layer_norm": "two_pass", "backward": "lean"})
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  config.global_batch_size = 128
  # Gradient accumulation: the batch runs as this many parts one after the other, each split over every device
  # (global_batch_size must be a multiple of microbatches × devices): the recipe's batch on fewer or smaller
  # GPUs, with the same prompts, loss and update as one pass (train.state.accumulate_gradients; stochastic
  # depth, if enabled, draws per part).
  config.microbatches = 1
  config.num_epochs = 5
  config.total_steps = 0  # 0: num_epochs × images / global_batch_size
  config.optimizer = ml_collections.ConfigDict({"name": "adamw", "b1": 0.9, "b2": 0.999, "weight_decay": 0.1,
                                                "grad_clip_norm": 0.0, "layer_decay": 1.0})
  config.lr = ml_collections.ConfigDict({"base_lr": 4e-4, "base_batch": 128, "schedule": "linear",
                                         "warmup_epochs": 0, "warmup_steps": 0, "end_lr": 0.0})
  config.loss = ml_collections.ConfigDict({
      "correction_steps": 2,  # rounds after the first prompt; a box + corrections fit in 6 points (≤ 4)
      "multimask": "single",  # non-single-point prompts train the single-mask output ("best": min over 3)
      "point_prob": 0.5,  # first prompt: a point with this probability, else a noisy box
      "max_box_noise_px": 20.0,  # at a 1024 input
      "focal_weight": 20.0, "dice_weight": 1.0, "iou_weight": 1.0,
      "supervise_all_iou": False,  # True: the IoU head learns every output's IoU, not only the trained one's
  })
  config.data = ml_collections.ConfigDict({
      "sources": [],  # SA-1B .tar shards and/or folders of sa_*.jpg + sa_*.json
      "eval_sources": [],  # optional held-out SA-1B-format data: single-point mIoU before/after
      "eval_batch_size": 8,
      "mask_size": 0,  # loss grid; 0: the decoder's low-res grid (256 at 1024)
      "max_masks": 64,
      "max_area_fraction": 0.9,
      "read_threads": 8,
      "index_cache": "",  # where the tars' indexes are kept (data/sa1b.py); empty: WORKDIR/sa1b_index
      "synthetic": {"enabled": False, "num_images": 0, "held_out_images": 0, "size": 0, "images_per_tar": 0,
                    "seed": 0},
  })
  config.log_every_steps = 100
  config.checkpoint = ml_collections.ConfigDict({"every_steps": 1000, "keep": 3})
  if arg == "smoke":
    config.model.update(img_size=128, encoder_embed_dim=96, encoder_depth=4, encoder_num_heads=3, decoder_dim=64,
                        decoder_num_heads=4, decoder_mlp_dim=256)
    config.dtype = "float32"
    config.remat = "none"  # a few MB of activations: recomputing them would only slow the CPU down
    config.global_batch_size = 8
    config.num_epochs = 0
    config.total_steps = 600
    config.optimizer.grad_clip_norm = 1.0
    config.lr.base_lr = 3e-3
    config.lr.base_batch = 8
    config.lr.warmup_steps = 20
    config.loss.correction_steps = 1
    config.loss.supervise_all_iou = True  # the held-out mIoU picks masks by predicted IoU: calibrate it early
    config.data.max_masks = 32
    config.data.read_threads = 2
    config.data.synthetic = {"enabled": True, "num_images": 192, "held_out_images": 32, "size": 160,
                             "images_per_tar": 64, "seed": 0}
    config.log_every_steps = 50
    config.checkpoint.every_steps = 100
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; known: smoke")
  return config
