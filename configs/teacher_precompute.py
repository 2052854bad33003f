"""Teacher precompute: SAM ViT-H features of augmented views, written to TFRecord shards.

``python -m efficientsam_jax.main --config=configs/teacher_precompute.py --workdir=DIR
--config.source.folder=/data/imagenet/train --config.teacher.checkpoint=weights/sam_vit_h``
(convert the teacher first: ``python -m efficientsam_jax.convert sam-to-jax``).
``:smoke`` runs on scikit-image's bundled photographs with a small RANDOM teacher.

Sources (``source.kind``): "folder" (every image under ``source.folder``, ids
= relative paths without extension), "tfds" (a tensorflow-datasets split read
without TensorFlow, ``source.tfds.{name,split,data_dir,image_feature}``, default
ImageNet-1K ``imagenet2012`` / ``train``; ids = ``file_name`` stems, else
``<split>/<index>``), "skimage_samples". The tfds dataset must be prepared in the
ArrayRecord format, once, on a machine with TensorFlow: put the ILSVRC2012 train
and val tars into ``<data_dir>/downloads/manual/``, then
``tfds build imagenet2012 --data_dir=<data_dir> --file_format=array_record``
(see ``efficientsam_jax/data/tfds_source.py``). Then
``--config.source.kind=tfds --config.source.tfds.data_dir=<data_dir>``.

Teacher alignment (``teacher.mode``), default "upsample": each 224 view is
upsampled to the teacher's native 1024, so SAM ViT-H runs in the regime it was
trained in (14×14 windows over a 64×64 grid, its own position tables), and its
64×64 features are area-averaged to the student's 14×14 grid. "native" runs
ViT-H on the 224 view with resized tables: about 20× cheaper, but the 14×14 grid
is a single window, so every windowed block turns into global attention that
SAM never saw in training. The precompute runs once, so we pay for fidelity.

``teacher.dtype`` (default bfloat16) and ``teacher.attention``: "xla", or "cudnn"
on NVIDIA GPUs, the same function with the decomposed relative positions folded
into q·k so that cuDNN's fused attention never materializes the 4096 × 4096
logits of the global blocks (``models/sam_vit.py`` ``fold_relative_positions``).
"""

from efficientsam_jax.data.precompute import get_precompute_config


def get_config(arg=None):
  return get_precompute_config(arg)
