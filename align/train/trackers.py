"""Experiment trackers through accelerate's tracking API: ``train.trackers=[tensorboard,wandb,mlflow]``.

TensorBoard (the default, always installed) writes ``<run_dir>/tb``; on resume from step k its events after k
are purged, so the curves continue exactly as ``metrics.jsonl`` does. The optional ones are extras
(``pip install -e ".[wandb]"`` / ``".[mlflow]"``) and keep their own environment configuration:

* wandb: project ``$WANDB_PROJECT`` (default ``align``), run name = the run directory's name, files under
  ``<run_dir>/wandb``; ``WANDB_MODE=offline`` logs without an account (``wandb sync`` uploads later).
* mlflow: ``$MLFLOW_TRACKING_URI`` if set, else a local SQLite store ``<run_dir>/mlflow.db`` (MLflow's
  offline mode; its file store is retired), experiment ``$MLFLOW_EXPERIMENT_NAME`` (default ``align``).
"""
from __future__ import annotations

import os
from typing import Sequence

from accelerate.tracking import GeneralTracker, MLflowTracker, TensorBoardTracker, WandBTracker

from align.core.run_dir import TB_DIR


def make_trackers(names: Sequence[str], run_dir: str, resume_step: int | None) -> list[GeneralTracker]:
    """Tracker objects for ``accelerate.Accelerator(log_with=...)``; they start at ``init_trackers``. The names
    are checked (known, installed) by the typed config, ``align.core.schema.TrainConfig``."""
    run_name = os.path.basename(os.path.abspath(run_dir))
    trackers: list[GeneralTracker] = []
    for name in dict.fromkeys(str(n) for n in names):
        if name == "tensorboard":
            purge = None if resume_step is None else resume_step + 1
            trackers.append(TensorBoardTracker(TB_DIR, run_dir, purge_step=purge))
        elif name == "wandb":
            trackers.append(WandBTracker(os.environ.get("WANDB_PROJECT", "align"), name=run_name,
                                         dir=os.path.abspath(run_dir)))
        elif name == "mlflow":
            trackers.append(_LocalMLflowTracker(run_dir, run_name))
    return trackers


class _LocalMLflowTracker(MLflowTracker):
    """accelerate's MLflow tracker, pointed at ``<run_dir>/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set."""

    def __init__(self, run_dir: str, run_name: str):
        super().__init__(experiment_name="align", logging_dir=os.path.join(os.path.abspath(run_dir), "mlflow"),
                         run_name=run_name)
        self.run_dir = os.path.abspath(run_dir)

    def start(self) -> None:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(f"sqlite:///{os.path.join(self.run_dir, 'mlflow.db')}")
        super().start()
