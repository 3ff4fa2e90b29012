"""python -m align.bench --random-weights --tiny: the full-size cost check's code on CPU, every algorithm a row."""
import json
import os
import subprocess
import sys

import pytest

from align.bench import algorithm_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "align.bench", "--random-weights", "--tiny", "--device", "cpu",
                           "--warmup", "1", "--updates", "1", *argv], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_tiny_sd3_every_algorithm_has_a_row_and_changes_the_lora(tmp_path):
    out = tmp_path / "rows.json"
    proc = bench("--model", "sd3", "--checkpointing", "off", "--decoders", "default", "--json", str(out))
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header == ["algorithm", "model", "resolution", "checkpointing", "decoder", "batch", "peak CUDA memory (GB)", "memory_slice estimate (GB)",
                      "s / update", "s / sampling", "update ÷ sampling", "LoRA changed"]
    algos = algorithm_configs()
    assert sorted(line.split("|")[1].strip() for line in table[2:]) == sorted(algos)
    rows = json.loads(out.read_text())["rows"]
    assert {r["algorithm"]: r.get("params_changed") for r in rows} == {a: True for a in algos}
    assert all(r["s_median"] > 0 and r["sampling_s_median"] > 0 for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("model, reward", [("flux", "aesthetic"), ("sd35", "hpsv2")])
def test_tiny_flux_and_sd35_vae_rows_with_checkpointing(tmp_path, model, reward):
    out = tmp_path / "rows.json"
    bench("--model", model, "--reward", reward, "--algos", "refl", "--checkpointing", "on", "--decoders", "vae",
          "--json", str(out))       # the default decoder's rows: the SD3 test's
    rows = json.loads(out.read_text())["rows"]
    assert [(r["decoder"], r["checkpointing"], r["params_changed"]) for r in rows] == [("vae", "on", True)]


def test_an_out_of_memory_row_says_oom(monkeypatch):
    import argparse

    import torch

    from align import bench
    from align.bench.full_size import format_table

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bench, "bench_one", out_of_memory)
    args = argparse.Namespace(child="refl", model="sd3", overrides=[], warmup=0, updates=1, random_weights=True)
    row = bench.child_row(args)
    assert row == {"algo": "refl", "oom": True}
    row.update(algorithm="refl", model="sd3", resolution=1024, checkpointing="off", decoder="vae", batch=1)
    line = format_table([row]).splitlines()[-1]
    assert [c.strip() for c in line.strip("|").split("|")][6:] == ["OOM"] * 6


def test_the_memory_slice_estimate_of_each_row(tmp_path):
    from align.bench.full_size import estimate_gb, load_estimates

    rows = [{"algorithm": "refl", "decoder": "vae", "no_ckpt": 40.0, "ckpt": 30.0},
            {"algorithm": "refl", "decoder": "taef1", "no_ckpt": 20.0, "ckpt": 15.0},
            {"algorithm": "draft (LV, n = 2)", "decoder": "taef1", "no_ckpt": 25.0, "ckpt": 18.0},
            {"algorithm": "draft (K = 1)", "decoder": "taef1", "no_ckpt": 21.0, "ckpt": 16.0},
            {"algorithm": "flow_grpo (N = 6)", "decoder": "—", "no_ckpt": 50.0, "ckpt": 22.0},
            {"algorithm": "flow_grpo (N = 10, default)", "decoder": "—", "no_ckpt": 70.0, "ckpt": 24.0}]
    path = tmp_path / "mem.json"
    path.write_text(json.dumps({"resolution": 1024, "estimates_sd3": rows}))
    est = load_estimates([str(path)])

    def at(algo, decoder, ckpt, res=1024, model="sd3"):
        return estimate_gb(est, model, algo, {"resolution": res, "decoder": decoder, "checkpointing": ckpt})

    assert at("refl", "vae", "off") == 40.0 and at("refl", "default", "on") == 15.0
    assert at("draft", "default", "on") == 18.0              # the default variant, LV
    assert at("flow_grpo", "vae", "off") == 70.0             # its default N; no decoder in its graph
    assert at("refl", "vae", "off", res=512) is None and at("refl", "vae", "off", model="flux") is None
    assert at("vggflow", "vae", "off") is None


def test_bad_options_are_refused_before_any_work(capsys):
    from align.bench import main

    for argv in (["--random-weights", "--model", "sd4"], ["--random-weights", "--model", "sd3", "--checkpointing",
                                                         "yes"], ["--tiny"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert "--checkpointing yes" in capsys.readouterr().err
