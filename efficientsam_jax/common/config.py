"""Model configs: frozen dataclasses that read and write JSON, refusing unknown keys."""

from __future__ import annotations

import dataclasses
import json


class JsonConfig:
  """Mixin for frozen dataclass configs; ``_KIND`` names the config in errors."""

  _KIND = "model"

  @classmethod
  def from_dict(cls, values: dict):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"unknown {cls._KIND} config keys {unknown}; known: {sorted(names)}")
    return cls(**values)

  @classmethod
  def from_json(cls, path: str):
    with open(path) as f:
      return cls.from_dict(json.load(f))

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)
