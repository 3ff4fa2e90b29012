"""The README's "Adding an algorithm" example works as written: one file (class + config dataclass), registered
from a temporary directory through ALIGN_PLUGINS; nothing in the source tree changes."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _example() -> str:
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    return re.search(r"```python\n(# reward_max.py\n.*?)```", readme, re.S).group(1)


def _run(args, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ALIGN_PLUGINS": "reward_max",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "align.run", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_readme_example_algorithm_trains_from_a_plugin(tmp_path):
    (tmp_path / "reward_max.py").write_text(_example())
    run_dir = tmp_path / "run"
    res = _run(["algo=reward_max", "reward=linear", "train.steps=15", "train.lr=1e-2", "train.progress=false",
                "eval.every=0", "eval.n_samples=64", "eval.final_samples=8", f"run_dir={run_dir}"], tmp_path)
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl", encoding="utf-8")]
    assert rows[-1]["eval/reward"] > rows[0]["eval/reward"] + 0.2
    assert not os.path.exists(os.path.join(ROOT, "algorithms", "reward_max.py"))


@pytest.mark.slow
def test_the_plugins_config_is_typed_and_listed(tmp_path):
    (tmp_path / "reward_max.py").write_text(_example())
    res = _run(["algo=reward_max", "algo.from_end=two", f"run_dir={tmp_path / 'r'}"], tmp_path)
    assert res.returncode == 2 and res.stderr.startswith("align: bad value for algo.from_end: "), res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "r").exists()
    res = _run(["algo=nope"], tmp_path)
    assert res.returncode == 2 and "reward_max" in res.stderr and "_schema" not in res.stderr, res.stderr
