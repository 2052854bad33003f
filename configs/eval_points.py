"""Single-point valid-mask evaluation (paper Table 4): mIoU for box, 1-click and 3-click prompts.

``python -m efficientsam_jax.main --config=configs/eval_points.py --workdir=runs/points_coco
--config.data.annotations=/data/coco/annotations/instances_val2017.json --config.data.images=/data/coco/val2017
--config.model.checkpoint=weights/efficientsam_ti`` (LVIS v1 val: its JSON and the COCO 2017 image folders).
``:smoke`` runs on a generated COCO-format set with a tiny RANDOM, UNTRAINED model: nothing to download,
numbers meaningless. A restarted job skips finished images; with ``--distributed`` each process
takes every n-th image and process 0 merges (the workdir must be shared).
"""

import ml_collections

from efficientsam_jax.evaluation.synthetic import TINY_RANDOM_MODEL

def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.task = "eval_points"

  config.data = ml_collections.ConfigDict()
  config.data.annotations = ""  # COCO-format JSON (instances_val2017.json, lvis_v1_val.json)
  config.data.images = ""  # folder of the images
  config.data.kind = "auto"  # "coco", "lvis" or "auto" (LVIS categories carry a frequency)
  config.data.max_images = 0  # 0 = all
  config.data.synthetic = False  # write and use the generated set instead

  config.model = ml_collections.ConfigDict()
  config.model.checkpoint = ""  # EfficientSAM weights directory (load_pretrained)
  config.model.dtype = "float32"
  config.model.random_config = ml_collections.config_dict.placeholder(dict)  # smoke: random init of these sizes

  config.eval = ml_collections.ConfigDict()
  config.eval.prompts = "box,1click,3click"
  config.eval.seed = 0  # click sampling (per object, order-independent)
  config.eval.max_queries = 64  # prompts decoded per call
  config.eval.canvas_multiple = 256  # full-res masks padded to multiples of this (one compilation per bucket)

  if arg == "smoke":
    config.data.synthetic = True
    config.model.random_config = dict(TINY_RANDOM_MODEL)
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of eval_points; known: smoke")
  return config
