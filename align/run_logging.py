"""metrics.jsonl (the run-directory contract) and TensorBoard, written by the main process."""
from __future__ import annotations

import json
import math
import os
from typing import Any

from torch.utils.tensorboard import SummaryWriter


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    return v


class RunLogger:
    """Appends one JSON object per line to metrics.jsonl and mirrors scalars to TensorBoard.

    On resume from step k, rows with step > k are dropped first so the file continues exactly.
    """

    def __init__(self, run_dir: str, resume_step: int | None = None, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        if resume_step is not None and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as fh:
                rows = [line for line in fh if line.strip() and json.loads(line)["step"] <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(rows)
            os.replace(tmp, self.path)
        purge = None if resume_step is None else resume_step + 1
        self.tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        step = int(row["step"])
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)

    def images(self, tag: str, grid, step: int) -> str | None:
        """Log an image grid [3, H, W] in [0, 1] to TensorBoard and as ``<run_dir>/<tag>/step_XXXXXXX.png``
        (plus ``<tag>/latest.png``); returns the PNG's path."""
        if not self.enabled or grid is None:
            return None
        from torchvision.utils import save_image

        self.tb.add_image(tag, grid, step)
        folder = os.path.join(os.path.dirname(self.path), tag)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step_{step:07d}.png")
        for target in (path, os.path.join(folder, "latest.png")):
            tmp = target + ".tmp.png"
            save_image(grid.float().clamp(0, 1), tmp)
            os.replace(tmp, target)
        return path

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """All rows of <run_dir>/metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
