"""The Colab demo notebook runs end to end, on a random checkpoint of the released EfficientSAM-Ti architecture."""

import json
import os
import re

import numpy as np

from conftest import SHARED_FIXTURES

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks",
                        "efficientsam_jax_demo.ipynb")


def notebook_cells(path: str, overrides: dict) -> list[str]:
  """The code cells as Python: shell lines (``!cmd``) become ``pass``; ``overrides`` are assigned at the end of
  the cell tagged "parameters" (as papermill does)."""
  with open(path) as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
  sources = []
  for cell in cells:
    source = re.sub(r"^(\s*)!.*$", r"\1pass", "".join(cell["source"]), flags=re.M)
    if "parameters" in cell.get("metadata", {}).get("tags", []):
      source += "\n" + "\n".join(f"{name} = {value!r}" for name, value in overrides.items())
    sources.append(source)
  return sources


def test_demo_notebook_runs_end_to_end(tmp_path, monkeypatch):
  checkpoint = os.path.join(SHARED_FIXTURES, "efficientsam_ti", "efficient_sam_random.pt")
  monkeypatch.chdir(tmp_path)
  shown = []
  namespace = {"__name__": "__main__", "display": shown.append}
  # Random weights predict low IoUs: filters opened so that segment-everything has records to draw.
  cells = notebook_cells(NOTEBOOK, {"CHECKPOINT_PT": checkpoint, "CHECKPOINT_URL": "", "POINTS_PER_SIDE": 4,
                                    "PRED_IOU_THRESH": -10.0, "STABILITY_SCORE_THRESH": 0.0})
  assert len(cells) >= 7
  for index, source in enumerate(cells):
    exec(compile(source, f"{NOTEBOOK} code cell {index}", "exec"), namespace)  # pylint: disable=exec-used

  image = namespace["image"]
  height, width = image.shape[:2]
  assert os.path.isfile(tmp_path / "weights" / "efficientsam_ti" / "config.json")  # converted here
  point_masks, point_scores = namespace["point_masks"], namespace["point_scores"]
  assert point_masks.shape == (3, height, width) and point_masks.dtype == bool
  assert np.all(np.diff(point_scores) <= 0)  # best first
  assert namespace["box_masks"].shape == (1, height, width)
  assert namespace["records"]
  for record in namespace["records"]:
    assert record["segmentation"].shape == (height, width) and record["area"] == record["segmentation"].sum()
  # Three pictures: the point and the box overlays (with a title strip), segment-everything.
  assert len(shown) == 3
  assert [picture.size[0] for picture in shown] == [width] * 3
  assert shown[2].size == (width, height)
  assert namespace["same"] is True  # the export equals the official-format checkpoint it came from
