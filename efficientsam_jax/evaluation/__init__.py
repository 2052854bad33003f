"""Zero-shot evaluation on COCO-format data: point/box mIoU (Table 4) and box-prompted mask AP (Table 5).

Jobs: ``points.run_eval_points`` and ``instances.run_eval_instances`` (tasks
``eval_points`` / ``eval_instances`` of ``efficientsam_jax.main``). Pieces:
``coco`` (data, prompts, mIoU), ``segmenter`` (batched best-mask decoding),
``store`` (resumable per-image results), ``progress`` (ETA), ``synthetic``
(generated data for smoke runs and tests).
"""

from efficientsam_jax.evaluation.coco import load_coco, mask_iou, summarize_miou
from efficientsam_jax.evaluation.instances import evaluate_coco_segm, evaluate_lvis_segm, run_eval_instances
from efficientsam_jax.evaluation.points import run_eval_points

__all__ = ["evaluate_coco_segm", "evaluate_lvis_segm", "load_coco", "mask_iou", "run_eval_instances",
           "run_eval_points", "summarize_miou"]
