"""Teacher precompute: SAM ViT-H features of augmented views, written to TFRecord shards.

``python -m efficientsam_jax.main --config=configs/teacher_precompute.py --workdir=DIR
--config.source.folder=/data/imagenet/train --config.teacher.checkpoint=weights/sam_vit_h``
(convert the teacher first: ``python -m efficientsam_jax.convert sam-to-jax``).
``:smoke`` runs on scikit-image's bundled photographs with a small RANDOM teacher.

Teacher alignment (``teacher.mode``), default "upsample": each 224 view is
upsampled to the teacher's native 1024, so SAM ViT-H runs in the regime it was
trained in (14×14 windows over a 64×64 grid, its own position tables), and its
64×64 features are area-averaged to the student's 14×14 grid. "native" runs
ViT-H on the 224 view with resized tables: about 20× cheaper, but the 14×14 grid
is a single window, so every windowed block turns into global attention that
SAM never saw in training. The precompute runs once, so we pay for fidelity.
"""

import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.task = "teacher_precompute"
  config.source = ml_collections.ConfigDict({"kind": "folder", "folder": ""})
  config.output_dir = ""  # default: WORKDIR/teacher_records
  config.views_per_image = 8  # augmented views stored per image (TinyViT-style replay)
  config.size = 224  # student resolution
  config.seed = 0
  config.num_shards = 1024
  config.batch_size = 64  # per process; a multiple of the local device count
  config.teacher = ml_collections.ConfigDict({
      "checkpoint": "",  # weights directory from `convert sam-to-jax`; empty: random teacher below
      "mode": "upsample",
      "dtype": "bfloat16",
      "random_seed": 0,
      "random_config": {"img_size": 1024, "embed_dim": 1280, "depth": 32, "num_heads": 16,
                        "global_attn_indexes": (7, 15, 23, 31)},
  })
  if arg == "smoke":
    config.source.kind = "skimage_samples"
    config.views_per_image = 2
    config.num_shards = 2
    config.batch_size = 8
    config.teacher.dtype = "float32"
    config.teacher.random_config = {"img_size": 448, "embed_dim": 64, "depth": 2, "num_heads": 4,
                                    "window_size": 7, "global_attn_indexes": (1,)}
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of teacher_precompute; known: smoke")
  return config
