"""What the main process logs: ``metrics.jsonl`` (the run-directory contract), sample-grid PNGs, and the
experiment trackers (accelerate's tracking API, ``align/train/trackers.py``) that mirror both."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from accelerate import Accelerator

from align.core.run_dir import METRICS_FILE, flatten, truncate_metrics


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else str(v)
    return v


def _params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The run config as flat ``a.b.c`` parameters of the trackers' basic types."""
    return {k: v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
            for k, v in flatten(dict(config)).items()}


class RunLogger:
    """Appends one JSON object per line to metrics.jsonl and logs the same scalars to the trackers.

    On resume from step k, rows with step > k are dropped first so the file continues exactly (TensorBoard
    purges its events after k the same way, ``align/train/trackers.py``). ``config`` (the resolved run config) is
    stored by the trackers that keep hyperparameters (wandb, mlflow; TensorBoard has config.yaml beside it).
    """

    def __init__(self, run_dir: str, accelerator: Accelerator, resume_step: int | None = None,
                 config: Mapping[str, Any] | None = None):
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, METRICS_FILE)
        if not self.enabled:
            return
        if resume_step is not None:
            truncate_metrics(run_dir, resume_step)
        accelerator.init_trackers("align")
        if config is not None:
            for tracker in accelerator.trackers:
                if tracker.name != "tensorboard":
                    tracker.store_init_configuration(_params(config))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({k: _clean(v) for k, v in row.items()}) + "\n")
        scalars = {k: v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and math.isfinite(v)}
        self.accelerator.log(scalars, step=int(row["step"]))

    def images(self, tag: str, grid, step: int) -> str | None:
        """Log an image grid [3, H, W] in [0, 1] as ``<run_dir>/<tag>/step_XXXXXXX.png`` (plus
        ``<tag>/latest.png``) and to the trackers; returns the PNG's path."""
        if not self.enabled or grid is None:
            return None
        from torchvision.utils import save_image

        grid = grid.float().clamp(0, 1).cpu()
        folder = os.path.join(self.run_dir, tag)
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"step_{step:07d}.png")
        for target in (path, os.path.join(folder, "latest.png")):
            tmp = target + ".tmp.png"
            save_image(grid, tmp)
            os.replace(tmp, target)
        for tracker in self.accelerator.trackers:
            if tracker.name == "mlflow":          # no image API: the PNG as an artifact
                tracker.log_artifact(path, artifact_path=tag)
            elif tracker.name == "tensorboard":
                tracker.log_images({tag: grid[None]}, step=step)
            else:
                tracker.log_images({tag: [grid]}, step=step)
        return path

    def close(self) -> None:
        """Finish the trackers (the main process's) and end the process group on every process: a process that
        exits with its gloo group alive can abort at exit ("terminate called without an active exception")."""
        self.accelerator.end_training()

