"""Interrupt a run inside an update and resume it: for the exact-resume tests."""
import pytest

from align.setup.assemble import build_trainer
from align.setup.compose import compose_config
from align.core.run_dir import list_checkpoints
from align.train.trainer import Trainer


def crash_then_resume(monkeypatch, overrides: list[str], run_dir: str, crash_at: int = 5) -> list[int]:
    """Train ``overrides`` in ``run_dir`` until a KeyboardInterrupt in update ``crash_at``, then resume it to the end;
    returns the checkpoint steps the interrupted run had left."""
    original, calls = Trainer.update, {"n": 0}

    def crashing_update(self):
        calls["n"] += 1
        if calls["n"] == crash_at:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "update", crashing_update)
    with pytest.raises(KeyboardInterrupt):
        build_trainer(compose_config(overrides, run_dir=run_dir), run_dir).train()
    monkeypatch.setattr(Trainer, "update", original)
    left = list_checkpoints(run_dir)
    build_trainer(compose_config(overrides + [f"resume={run_dir}"], run_dir=run_dir), run_dir).train()
    return left
