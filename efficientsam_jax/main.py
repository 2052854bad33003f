"""Entry point for every job: ``python -m efficientsam_jax.main --config=configs/X.py --workdir=DIR``.

The config's ``task`` field picks the job; configs are Python files with
``get_config(arg=None)`` (variants as ``--config=configs/X.py:arg``, fields
overridden as ``--config.field=value``).
"""

from __future__ import annotations

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Job configuration file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for outputs, checkpoints and logs.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Multi-host: call jax.distributed.initialize() first (auto-detects TPU pods, "
    "SLURM, or the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment).")
flags.mark_flags_as_required(["config", "workdir"])


def _predict_demo(config, workdir: str) -> None:
  # pylint: disable=import-outside-toplevel
  from efficientsam_jax.models import EfficientSamConfig
  from efficientsam_jax.predict import run_demo
  model_config = EfficientSamConfig.from_json(config.model_config) if config.model_config else None
  run_demo(workdir, variant=config.variant, seed=config.seed, config=model_config)


def _teacher_precompute(config, workdir: str) -> None:
  from efficientsam_jax.data.precompute import run_precompute  # pylint: disable=import-outside-toplevel
  run_precompute(config, workdir)


def _sami(config, workdir: str) -> None:
  from efficientsam_jax.train.sami import train_and_evaluate  # pylint: disable=import-outside-toplevel
  train_and_evaluate(config, workdir)


def _eval_points(config, workdir: str) -> None:
  from efficientsam_jax.evaluation.points import run_eval_points  # pylint: disable=import-outside-toplevel
  run_eval_points(config, workdir)


def _eval_instances(config, workdir: str) -> None:
  from efficientsam_jax.evaluation.instances import run_eval_instances  # pylint: disable=import-outside-toplevel
  run_eval_instances(config, workdir)


def _finetune(config, workdir: str) -> None:
  from efficientsam_jax.train.finetune import train_and_evaluate  # pylint: disable=import-outside-toplevel
  train_and_evaluate(config, workdir)


TASKS = {
    "sami": _sami,
    "finetune": _finetune,
    "predict_demo": _predict_demo,
    "teacher_precompute": _teacher_precompute,
    "eval_points": _eval_points,
    "eval_instances": _eval_instances,
}


def run(config, workdir: str) -> None:
  """Runs the job described by ``config`` (also what tests call)."""
  if config.task not in TASKS:
    raise ValueError(f"unknown task {config.task!r} in config; known tasks: {sorted(TASKS)}")
  TASKS[config.task](config, workdir)
  from efficientsam_jax.common.multihost import barrier  # pylint: disable=import-outside-toplevel
  # No process leaves (and shuts jax.distributed down) while another still finalizes its last checkpoint
  # or writes the export.
  barrier(f"{config.task}_done")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _DISTRIBUTED.value:
    from efficientsam_jax.common.multihost import initialize_distributed  # pylint: disable=import-outside-toplevel
    initialize_distributed()
  logging.info("config:\n%s", _CONFIG.value)
  run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
