"""Mechanical mapping between PyTorch state dicts and our Flax parameter trees.

Our modules are named after the PyTorch attributes, with ``blocks.3`` spelled
``blocks_3``. A Flax leaf therefore maps to one PyTorch key:

* ``kernel`` → ``weight``: Linear kernels transposed, Conv kernels
  (kh, kw, in, out) ↔ (out, in, kh, kw), ConvTranspose kernels
  (kh, kw, in, out) ↔ (in, out, kh, kw);
* ``scale`` (LayerNorm/GroupNorm) and ``embedding`` (nn.Embed) → ``weight``;
* every other leaf keeps its name (``bias``, ``pos_embed``, ...).

Every transform is a transpose, so conversion is bit-exact in both directions.
Nothing here imports torch; reading and writing ``.pt`` files lives in
``efficientsam_jax.convert.torch_io``.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np
from flax import traverse_util

_INDEX = re.compile(r"_(\d+)(?=_|$)")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def torch_key(path: tuple[str, ...]) -> str:
  """('image_encoder', 'blocks_3', 'attn', 'qkv', 'kernel') → 'image_encoder.blocks.3.attn.qkv.weight'."""
  *modules, leaf = path
  parts = [_INDEX.sub(r".\1", m) for m in modules]
  return ".".join(parts + [_LEAF_TO_TORCH.get(leaf, leaf)])


def _kernel_permutation(ndim: int, transposed_conv: bool) -> tuple[int, ...]:
  """Axis permutation taking a Flax kernel to the PyTorch layout."""
  if ndim == 2:
    return (1, 0)
  if ndim == 4:
    return (2, 3, 0, 1) if transposed_conv else (3, 2, 0, 1)
  raise ValueError(f"unexpected kernel rank {ndim}")


def _to_torch_layout(value: np.ndarray, leaf: str, transposed_conv: bool) -> np.ndarray:
  if leaf != "kernel":
    return value
  return value.transpose(_kernel_permutation(value.ndim, transposed_conv))


def _from_torch_layout(value: np.ndarray, leaf: str, transposed_conv: bool) -> np.ndarray:
  if leaf != "kernel":
    return value
  return value.transpose(np.argsort(_kernel_permutation(value.ndim, transposed_conv)))


def params_to_state_dict(params: Mapping, is_transposed_conv: Callable[[tuple], bool] = lambda p: False,
                         prefix: str = "") -> dict[str, np.ndarray]:
  """Flax params → {torch key: array in torch layout}."""
  out = {}
  for path, value in traverse_util.flatten_dict(dict(params)).items():
    value = np.asarray(value)
    out[prefix + torch_key(path)] = np.ascontiguousarray(
        _to_torch_layout(value, path[-1], is_transposed_conv(path)))
  return out


def _natural(key: str):
  """Sort key that puts blocks.4 before blocks.10."""
  return [int(part) if part.isdigit() else part for part in key.split(".")]


class StateDictMismatch(ValueError):
  """A state dict does not fit the model; the message lists every offending key."""


def state_dict_to_params(state_dict: Mapping[str, np.ndarray], expected: Mapping,
                         is_transposed_conv: Callable[[tuple], bool] = lambda p: False,
                         prefix: str = "", ignore_prefixes: tuple[str, ...] = ()) -> dict:
  """{torch key: array} → Flax params shaped like ``expected`` (a tree of shapes/arrays).

  Raises ``StateDictMismatch`` naming every unknown, missing and mis-shaped key
  (with both shapes); never returns a partial result.
  """
  wanted = {}
  for path, spec in traverse_util.flatten_dict(dict(expected)).items():
    wanted[prefix + torch_key(path)] = (path, tuple(spec.shape))
  problems = []
  relevant = {k: v for k, v in state_dict.items() if not k.startswith(ignore_prefixes)}
  for key in sorted(set(relevant) - set(wanted), key=_natural):
    problems.append(f"unexpected key {key} (shape {tuple(np.shape(relevant[key]))})")
  for key in sorted(set(wanted) - set(relevant), key=_natural):
    problems.append(f"missing key {key} (expected torch shape "
                    f"{_torch_shape(wanted[key], is_transposed_conv)})")
  flat = {}
  for key in sorted(set(wanted) & set(relevant), key=_natural):
    path, shape = wanted[key]
    value = np.asarray(relevant[key])
    converted = _from_torch_layout(value, path[-1], is_transposed_conv(path)) if value.ndim in (2, 4) else value
    if converted.shape != shape:
      problems.append(f"shape mismatch for {key}: checkpoint has {tuple(value.shape)}, model expects "
                      f"{_torch_shape(wanted[key], is_transposed_conv)}")
      continue
    flat[path] = np.ascontiguousarray(converted)
  if problems:
    raise StateDictMismatch(f"{len(problems)} problem(s) with the state dict:\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict(flat)


def _torch_shape(entry, is_transposed_conv) -> tuple:
  path, shape = entry
  return tuple(_to_torch_layout(np.empty(shape, np.uint8), path[-1], is_transposed_conv(path)).shape)
