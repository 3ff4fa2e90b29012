"""Two processes on the CPU: ``torchrun --nproc_per_node 2 tests/helpers/dist_worker.py`` (gloo, through
accelerate), and the two-process runs that several test files read (``shared_launch``: once per test session, also
across pytest-xdist workers; the fixtures are in tests/conftest.py).

Each launch costs two Python processes that import torch (≈ 10 s of two cores), so one launch serves every claim that
can be read off the same run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(TESTS, "helpers", "dist_worker.py")


def torchrun(cwd: Path, run_dir: Path, steps: int, out: Path, mode: str = "fresh", extra: tuple | list = (),
             env_extra: dict[str, str] | None = None) -> list[dict]:
    """Launch the worker on 2 processes; each rank's record (see dist_worker.py), rank 0 first."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([TESTS, os.path.dirname(TESTS)]), **(env_extra or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
           str(run_dir), str(steps), str(out), mode, *extra]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [torch.load(f"{out}.rank{r}.pt", weights_only=False) for r in (0, 1)]


def shared_launch(tmp_path_factory, name: str, launch: Callable[[Path], list[dict]]) -> tuple[Path, list[dict]]:
    """``launch(folder)`` once per test session: under pytest-xdist the workers share one folder (the session's
    base temporary directory's parent, as pytest-xdist documents) and a lock, so the first worker to need the run
    launches it and the others wait for it and read it. (folder, each rank's record)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            ranks = launch(folder)
            torch.save(ranks, folder / "ranks.pt")
            done.write_text(json.dumps({"worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}))
    return folder, torch.load(folder / "ranks.pt", weights_only=False)


# The shared DRaFT-K run (helpers/dist_worker.py's default algorithm) in float64: 3 updates of 4 trajectories per
# process, a checkpoint after each (tests/test_distributed.py: one process with the global batch, the exact resume;
# tests/test_compute_accounting.py: the two processes' counts add up).
SHARED_STEPS = 3
SHARED_ENV = {"ALIGN_TEST_FP64": "1"}
SHARED_EXTRA = ["train.adam_eps=1.0"]      # tests/helpers/fp64.py LINEAR_ADAM

# The shared probe run (mode ``probe``): VGG-Flow (θ and φ, two parameter groups) on a mix of two gmm rewards with two
# held-out rewards, 2 updates, evaluated at every step in chunks of 32 rows: 40 evaluation samples (5 groups of 8) are
# 32 + 8 rows, rank 0 taking the first chunk and rank 1 the second; 37 final samples are 32 + 5. In float32: the
# evaluation is compared bitwise with one process (the same chunks, the same kernels); the gradient syncs are
# recorded (tests/test_distributed.py, tests/test_eval_rewards.py).
PROBE = ["algo=vggflow", "algo.subsample_bins=6", "reward=mix",
         "reward.parts=[{name: quadratic, weight: 1.0, center: [1.0, 0.5], precision: [[1.0, 0.3], [0.3, 0.6]]}, "
         "{name: linear, weight: 0.5}]",
         "eval.rewards=[{name: gmm_region}, {name: quadratic, center: [0.0, 1.0], label: q01}]",
         "eval.n_samples=40", "eval.group_size=8", "eval.final_samples=37", "eval.every=1", "eval.batch_size=32",
         "eval.fid_reference=independent", "train.collective_timeout_s=321"]
