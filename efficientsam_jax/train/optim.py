"""Optimizers and learning-rate schedules for every training phase (the one place they are built).

Paper recipes (EfficientSAM §4.1, ``shared/REFERENCE.md`` §2–§3):

* SAMI pretraining (ImageNet-1K, 224²): AdamW, betas (0.9, 0.95), weight decay
  0.05, lr 2.4e-3 at batch 4096 (MAE's rule ``base_lr · batch / 256`` with
  base_lr 1.5e-4), 400 epochs of which 40 are linear warm-up, then cosine decay
  to 0, evaluated per step. No decay on biases, norms, position embeddings or
  tokens.
* EfficientSAM finetuning (SA-1B, 1024²): AdamW, betas (0.9, 0.999), lr 4e-4
  at batch 128 (``lr.base_lr = 4e-4, lr.base_batch = 128``), weight decay 0.1,
  linear decay to 0, 5 epochs; encoder and decoder trained together. The
  prompt encoder's Gaussian matrix is a buffer in the official model and is
  never trained.

``make_optimizer(config)`` returns ``(tx, schedule)``. The learning rate of the
update with 0-based index ``k`` (optax's internal count, equal to
``TrainState.step`` before the update) is ``schedule(k)``; with warm-up,
``schedule(0) == 0`` (as in MAE), so the first update moves nothing.
Step counts are in optimizer steps: the training loop converts epochs to steps.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Sequence, Union

import jax
import jax.numpy as jnp
import optax

PyTree = Any
Prefix = Union[str, Sequence[str]]

# Leaf names that never take weight decay, whatever their rank: position tables,
# learned tokens / nn.Embed tables, norm parameters and biases, and the fixed buffer.
NO_DECAY_NAMES = frozenset({
    "bias", "scale",  # Dense/Conv biases, LayerNorm/GroupNorm scale and bias
    "pos_embed", "decoder_pos_embed", "rel_pos_h", "rel_pos_w",  # position embeddings
    "cls_token", "mask_token", "embedding",  # tokens; nn.Embed tables (iou_token, mask_tokens, point embeddings)
    "positional_encoding_gaussian_matrix",
})
# Leaf names that are never trained: buffers of the official PyTorch model.
FROZEN_NAMES = frozenset({"positional_encoding_gaussian_matrix"})
# Encoder parts that sit below block 0 for layer-wise lr decay.
_EMBED_NAMES = frozenset({"patch_embed", "pos_embed", "cls_token"})
_BLOCK_RE = re.compile(r"blocks_(\d+)")
_SCHEDULES = ("cosine", "linear")


# ----------------------------------------------------------------------------
# Learning rate.
# ----------------------------------------------------------------------------


def scaled_learning_rate(base_lr: float, global_batch_size: int, base_batch: int = 256) -> float:
  """MAE's linear scaling rule: ``base_lr · global_batch_size / base_batch``."""
  _check_positive("base_lr", base_lr)
  _check_positive_int("global_batch_size", global_batch_size)
  _check_positive_int("base_batch", base_batch)
  return float(base_lr) * int(global_batch_size) / int(base_batch)


def learning_rate_schedule(peak_lr: float, total_steps: int, warmup_steps: int, kind: str = "cosine",
                           end_lr: float = 0.0) -> optax.Schedule:
  """Linear warm-up 0 → ``peak_lr`` over ``warmup_steps``, then decay to ``end_lr`` at ``total_steps``.

  ``kind`` "cosine" (SAMI) or "linear" (finetuning). Steps past ``total_steps``
  stay at ``end_lr``. The returned function accepts Python or traced steps.
  """
  _check_positive("peak_lr", peak_lr)
  total_steps = _check_positive_int("total_steps", total_steps)
  warmup_steps = _as_int("warmup_steps", warmup_steps)
  if not 0 <= warmup_steps <= total_steps:
    raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
  if kind not in _SCHEDULES:
    raise ValueError(f"learning-rate schedule must be one of {_SCHEDULES}, got {kind!r}")
  if not (_is_number(end_lr) and 0.0 <= end_lr <= peak_lr):
    raise ValueError(f"end_lr must be in [0, peak_lr={peak_lr}], got {end_lr}")
  peak, end = float(peak_lr), float(end_lr)
  # A zero-length decay phase would divide by zero; its only point is then the end.
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.maximum(jnp.asarray(step, jnp.float32), 0.0)
    frac = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    if kind == "cosine":
      decayed = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    else:
      decayed = peak + (end - peak) * frac
    if warmup_steps == 0:
      return decayed
    return jnp.where(step < warmup_steps, peak * step / warmup_steps, decayed)

  return schedule


# ----------------------------------------------------------------------------
# Per-parameter masks and scales (by path and rank).
# ----------------------------------------------------------------------------


def weight_decay_mask(params: PyTree) -> PyTree:
  """True where weight decay applies.

  A leaf decays iff it has rank >= 2 and its name is not in ``NO_DECAY_NAMES``
  (biases, norm scales, ``pos_embed``/``decoder_pos_embed``/``rel_pos_*``,
  ``mask_token``/``cls_token``, nn.Embed ``embedding`` tables, the Gaussian
  buffer). So Dense/Conv ``kernel``s decay, and a 1-D leaf never does; as in MAE,
  any other matrix defaults to decaying.
  """
  return _map_with_names(
      lambda names, leaf: len(jnp.shape(leaf)) >= 2 and names[-1] not in NO_DECAY_NAMES, params)


def frozen_mask(params: PyTree, freeze: Iterable[Prefix] = ()) -> PyTree:
  """True for parameters that must never change.

  Always frozen: leaves named in ``FROZEN_NAMES`` (the prompt encoder's
  ``positional_encoding_gaussian_matrix``, a buffer in the official model).
  ``freeze`` adds path prefixes, as tuples or "a/b" strings, e.g.
  ``("image_encoder",)``; a leading "params" collection level in the tree is
  skipped when matching. A prefix that matches no parameter raises ValueError
  (a typo must not silently train what was meant to be frozen).
  """
  prefixes = [_normalize_prefix(p) for p in freeze]
  matched = set()

  def is_frozen(names, leaf):
    del leaf
    hits = {p for p in prefixes if _has_prefix(names, p)}
    matched.update(hits)
    return bool(hits) or names[-1] in FROZEN_NAMES

  mask = _map_with_names(is_frozen, params)
  missing = [p for p in prefixes if p not in matched]
  if missing:
    top = sorted({names[0] for names in _leaf_names(params) if names})
    raise ValueError(f"freeze prefixes {['/'.join(p) for p in missing]} match no parameter; "
                     f"top-level names are {top}")
  return mask


def layer_decay_scales(params: PyTree, decay: float) -> PyTree:
  """Layer-wise lr multipliers for a ViT encoder (BEiT/MAE finetuning rule).

  With ``depth`` blocks named ``blocks_0 .. blocks_{depth-1}``: ``blocks_i`` →
  ``decay**(depth - i)``, the encoder's ``patch_embed``/``pos_embed``/
  ``cls_token`` → ``decay**(depth + 1)``, everything else (neck, decoders,
  heads) → 1. The encoder is the one module holding ``blocks_N`` children;
  a tree with none, or with ``blocks_N`` under several modules, raises ValueError.
  """
  if not (_is_number(decay) and 0.0 < decay <= 1.0):
    raise ValueError(f"layer_decay must be in (0, 1], got {decay!r}")
  roots: dict[tuple[str, ...], set[int]] = {}
  for names in _leaf_names(params):
    for j, name in enumerate(names[:-1]):
      match = _BLOCK_RE.fullmatch(name)
      if match:
        roots.setdefault(names[:j], set()).add(int(match[1]))
        break
  if len(roots) != 1:
    found = ["/".join(r) or "<root>" for r in roots]
    raise ValueError("layer_decay needs exactly one ViT encoder with blocks_N children, found "
                     f"{len(roots)}: {found}")
  (root, indices), = roots.items()
  depth = max(indices) + 1
  if indices != set(range(depth)):
    raise ValueError(f"encoder blocks under {'/'.join(root)} are not numbered 0..{depth - 1}: "
                     f"{sorted(indices)}")

  def scale(names, leaf):
    del leaf
    if len(names) > len(root) and names[:len(root)] == root:
      child = names[len(root)]
      match = _BLOCK_RE.fullmatch(child)
      if match:
        return float(decay) ** (depth - int(match[1]))
      if child in _EMBED_NAMES:
        return float(decay) ** (depth + 1)
    return 1.0

  return _map_with_names(scale, params)


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies each update by its ``layer_decay_scales`` factor (stateless, computed from paths)."""

  def init(params):
    layer_decay_scales(params, decay)  # fail at init, not inside the first jitted step
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    scales = layer_decay_scales(updates, decay)
    return jax.tree.map(lambda s, u: u * s, scales, updates), state

  return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------------------
# The optimizer.
# ----------------------------------------------------------------------------


def make_optimizer(config: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW from a config; returns ``(tx, schedule)``.

  Fields (ConfigDict, attribute object or mapping): ``optimizer.name``
  ("adamw"), ``optimizer.b1``, ``optimizer.b2``, ``optimizer.weight_decay``,
  optional ``optimizer.eps`` (1e-8), ``optimizer.grad_clip_norm`` (0/None: off),
  ``optimizer.layer_decay`` (None/1: off), ``optimizer.freeze`` (path prefixes);
  ``lr.base_lr``, ``lr.base_batch`` (256), ``lr.schedule`` ("cosine"),
  ``lr.warmup_steps``, ``lr.end_lr`` (0); ``global_batch_size``, ``total_steps``.

  Frozen parameters (``frozen_mask``) get exactly zero updates and no Adam
  moments (their optimizer state is ``optax.MaskedNode``), and their gradients
  are left out of the clipping norm, as a buffer or a frozen module's would be
  in PyTorch. Clipping → Adam → decoupled weight decay (masked by
  ``weight_decay_mask``) → ``-lr`` → layer-decay factors.
  """
  opt = _field(config, "optimizer", "config")
  lr = _field(config, "lr", "config")
  name = _field(opt, "name", "optimizer", "adamw")
  if name != "adamw":
    raise ValueError(f"optimizer.name must be 'adamw', got {name!r}")
  b1 = _check_beta("optimizer.b1", _field(opt, "b1", "optimizer"))
  b2 = _check_beta("optimizer.b2", _field(opt, "b2", "optimizer"))
  eps = _check_positive("optimizer.eps", _field(opt, "eps", "optimizer", 1e-8))
  weight_decay = _field(opt, "weight_decay", "optimizer")
  if not (_is_number(weight_decay) and weight_decay >= 0.0):
    raise ValueError(f"optimizer.weight_decay must be a number >= 0, got {weight_decay!r}")
  clip = _field(opt, "grad_clip_norm", "optimizer", None)
  if clip is not None and not (_is_number(clip) and clip >= 0.0):
    raise ValueError(f"optimizer.grad_clip_norm must be None, 0 (off) or > 0, got {clip!r}")
  layer_decay = _field(opt, "layer_decay", "optimizer", None)
  if layer_decay is not None and not (_is_number(layer_decay) and 0.0 < layer_decay <= 1.0):
    raise ValueError(f"optimizer.layer_decay must be None or in (0, 1], got {layer_decay!r}")
  freeze = _field(opt, "freeze", "optimizer", None) or ()
  if isinstance(freeze, str):
    freeze = (freeze,)  # one prefix given as "a/b"
  freeze = tuple(_normalize_prefix(p) for p in freeze)

  peak_lr = scaled_learning_rate(_field(lr, "base_lr", "lr"), _field(config, "global_batch_size", "config"),
                                 _field(lr, "base_batch", "lr", 256))
  schedule = learning_rate_schedule(peak_lr, _field(config, "total_steps", "config"),
                                    _field(lr, "warmup_steps", "lr"), _field(lr, "schedule", "lr", "cosine"),
                                    _field(lr, "end_lr", "lr", None) or 0.0)

  trainable = []
  if clip:
    trainable.append(optax.clip_by_global_norm(float(clip)))
  trainable.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=float(weight_decay),
                               mask=weight_decay_mask))

  def labels(tree):
    return jax.tree.map(lambda frozen: "frozen" if frozen else "trainable", frozen_mask(tree, freeze))

  tx = optax.multi_transform({"trainable": optax.chain(*trainable), "frozen": optax.set_to_zero()}, labels)
  if layer_decay is not None and layer_decay != 1.0:
    # Scaling after -lr equals scaling the lr of each group (weight decay included, as in MAE).
    tx = optax.chain(tx, scale_by_layer_decay(float(layer_decay)))
  return tx, schedule


# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------


def _key_name(entry) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _map_with_names(fn: Callable[[tuple[str, ...], Any], Any], tree: PyTree) -> PyTree:
  return jax.tree_util.tree_map_with_path(lambda path, leaf: fn(tuple(_key_name(k) for k in path), leaf), tree)


def _leaf_names(tree: PyTree) -> list[tuple[str, ...]]:
  return [tuple(_key_name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _normalize_prefix(prefix: Prefix) -> tuple[str, ...]:
  parts = tuple(p for p in prefix.split("/") if p) if isinstance(prefix, str) else tuple(str(p) for p in prefix)
  if not parts:
    raise ValueError(f"freeze prefix must name at least one path component, got {prefix!r}")
  return parts


def _has_prefix(names: tuple[str, ...], prefix: tuple[str, ...]) -> bool:
  n = len(prefix)
  return names[:n] == prefix or (len(names) > n and names[0] == "params" and names[1:n + 1] == prefix)


_MISSING = object()


def _field(obj: Any, name: str, where: str, default: Any = _MISSING) -> Any:
  value = obj.get(name, _MISSING) if isinstance(obj, Mapping) else getattr(obj, name, _MISSING)
  if value is _MISSING:
    if default is _MISSING:
      raise ValueError(f"{where} is missing the required field {name!r}")
    return default
  return value


def _is_number(value: Any) -> bool:
  # numbers.Real also admits NumPy scalars, which configs built with NumPy arithmetic hold.
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_positive(name: str, value: Any) -> float:
  if not (_is_number(value) and value > 0):
    raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
  return float(value)


def _check_beta(name: str, value: Any) -> float:
  if not (_is_number(value) and 0.0 <= value < 1.0):
    raise ValueError(f"{name} must be in [0, 1), got {value!r}")
  return float(value)


def _as_int(name: str, value: Any) -> int:
  # Step counts often come from arithmetic (epochs · steps per epoch); accept integral floats.
  if isinstance(value, bool) or not _is_number(value) or value != int(value):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  return int(value)


def _check_positive_int(name: str, value: Any) -> int:
  value = _as_int(name, value)
  if value <= 0:
    raise ValueError(f"{name} must be > 0, got {value}")
  return value
