"""The README's "adding an algorithm" example works as written: one file + one config, nothing else."""
import os
import re

from align.config import CONF_DIR, compose_config
from align.trainer import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_example_algorithm_trains(tmp_path):
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    code = re.search(r"```python\n(# algorithms/reward_max.py\n.*?)```", readme, re.S).group(1)
    conf = re.search(r"```yaml\n(# align/conf/algo/reward_max.yaml\n.*?)```", readme, re.S).group(1)
    py_path = os.path.join(ROOT, "algorithms", "reward_max.py")
    yaml_path = os.path.join(CONF_DIR, "algo", "reward_max.yaml")
    assert not os.path.exists(py_path) and not os.path.exists(yaml_path)
    try:
        with open(py_path, "w") as fh:
            fh.write(code)
        with open(yaml_path, "w") as fh:
            fh.write(conf)
        run_dir = str(tmp_path / "run")
        cfg = compose_config(["algo=reward_max", "reward=linear", "train.steps=15", "train.lr=1e-2", "train.progress=false",
                              "eval.every=0", "eval.n_samples=64", "eval.final_samples=8"], run_dir=run_dir)
        trainer = Trainer(cfg, run_dir)
        trainer.train()
        from align.run_logging import read_metrics
        rows = read_metrics(run_dir)
        assert rows[-1]["eval/reward"] > rows[0]["eval/reward"] + 0.2
    finally:
        for p in (py_path, yaml_path):
            if os.path.exists(p):
                os.remove(p)
