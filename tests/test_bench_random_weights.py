"""python -m align.bench --random-weights --tiny: the full-size cost check's code on CPU, every algorithm a row."""
import json
import os
import subprocess
import sys

import pytest

from align.bench import algorithm_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tiny_sd3_every_algorithm_has_a_row_and_changes_the_lora(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "align.bench", "--random-weights", "--model", "sd3", "--tiny",
                           "--device", "cpu", "--warmup", "1", "--updates", "1", "--checkpointing", "off",
                           "--decoders", "default", "--json", str(out)], capture_output=True, text=True, env=env,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["algorithm", "model", "resolution", "checkpointing", "decoder", "batch", "peak CUDA memory (MB)",
                      "s / update", "s / sampling", "update ÷ sampling", "LoRA changed"]
    algos = algorithm_configs()
    assert sorted(line.split("|")[1].strip() for line in table[2:]) == sorted(algos)
    rows = json.loads(out.read_text())["rows"]
    assert {r["algorithm"]: r.get("params_changed") for r in rows} == {a: True for a in algos}
    assert all(r["s_median"] > 0 and r["sampling_s_median"] > 0 for r in rows)
