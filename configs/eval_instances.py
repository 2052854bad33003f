"""Zero-shot instance segmentation (paper Table 5): detector boxes → EfficientSAM masks → mask AP.

``python -m efficientsam_jax.main --config=configs/eval_instances.py --workdir=runs/instances_coco
--config.data.annotations=/data/coco/annotations/instances_val2017.json --config.data.images=/data/coco/val2017
--config.prompts.boxes=/data/vitdet_h/coco_instances_results.json --config.model.checkpoint=weights/efficientsam_ti``
``prompts.boxes="gt"`` prompts with the GT boxes (oracle). COCO is scored with pycocotools' COCOeval,
LVIS with its federated evaluation (``efficientsam_jax/evaluation/lvis.py``). ``:smoke`` runs on a
generated set with jittered GT boxes and a tiny RANDOM, UNTRAINED model: nothing to download, numbers
meaningless.
"""

import ml_collections

from efficientsam_jax.evaluation.synthetic import TINY_RANDOM_MODEL

def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.task = "eval_instances"

  config.data = ml_collections.ConfigDict()
  config.data.annotations = ""
  config.data.images = ""
  config.data.kind = "auto"  # "coco", "lvis" or "auto"
  config.data.max_images = 0  # 0 = all
  config.data.synthetic = False

  config.prompts = ml_collections.ConfigDict()
  config.prompts.boxes = ""  # detections in COCO results format, or "gt" for the GT boxes
  config.prompts.min_score = 0.0  # drop detections below this score
  config.prompts.max_per_image = 0  # keep the best N per image (0 = all; COCOeval uses 100, LVIS 300)

  config.model = ml_collections.ConfigDict()
  config.model.checkpoint = ""
  config.model.dtype = "float32"
  config.model.random_config = ml_collections.config_dict.placeholder(dict)

  config.eval = ml_collections.ConfigDict()
  config.eval.seed = 0
  config.eval.max_queries = 64
  config.eval.canvas_multiple = 256

  if arg == "smoke":
    config.data.synthetic = True
    config.prompts.boxes = "synthetic"  # the generated detections file
    config.model.random_config = dict(TINY_RANDOM_MODEL)
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of eval_instances; known: smoke")
  return config
