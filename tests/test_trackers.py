"""train.trackers: TensorBoard, wandb (offline) and MLflow (local SQLite) receive what metrics.jsonl holds.

Each tracker is read back with its own reader (TensorBoard's EventAccumulator, wandb's protobuf records of the
offline run file, MLflow's client), independently of the code that wrote it."""
import glob
import os
import struct

import pytest

from align.setup.assemble import build_trainer
from align.setup.compose import compose_config
from align.core.run_dir import read_metrics

OVERRIDES = ["model=gmm", "algo=refl", "reward=linear", "train.steps=3", "train.batch_size=8", "eval.every=2",
             "eval.n_samples=32", "eval.final_samples=8", "train.progress=false"]


def _train(run_dir: str, trackers: str):
    cfg = compose_config(OVERRIDES + [f"train.trackers={trackers}"], run_dir=run_dir)
    build_trainer(cfg, run_dir).train()
    return read_metrics(run_dir)


def _wandb_history(run_file: str) -> dict[int, dict[str, str]]:
    """step -> {key: value_json} from a wandb offline run file (a LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, chunk, records = open(run_file, "rb").read(), 7, b"", []   # 7: the ':W&B' file header
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:                                        # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):                                                 # FULL or LAST fragment
            records.append(chunk)
            chunk = b""
    history: dict[int, dict[str, str]] = {}
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in rec.history.item}
            history.setdefault(int(items["_step"]), {}).update(items)
    return history


@pytest.mark.slow
def test_every_tracker_receives_the_metrics_rows(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = str(tmp_path / "run")
    rows = _train(run_dir, "[tensorboard,wandb,mlflow]")
    evals = [r["step"] for r in rows if "eval/reward" in r]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and evals == [0, 2, 3]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(os.path.join(run_dir, "tb"), size_guidance={"images": 0}).Reload()
    assert [e.step for e in tb.Scalars("eval/reward")] == evals
    assert [e.value for e in tb.Scalars("reward_mean")] == pytest.approx([r["reward_mean"] for r in rows[1:]])
    assert [e.step for e in tb.Images("samples")] == evals

    (run_file,) = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    history = _wandb_history(run_file)
    assert sorted(history) == [0, 1, 2, 3]
    for r in rows[1:]:
        assert float(history[r["step"]]["reward_mean"]) == pytest.approx(r["reward_mean"])
    assert all("samples/filenames" in history[s] for s in evals)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{os.path.join(run_dir, 'mlflow.db')}")
    (run,) = client.search_runs([client.get_experiment_by_name("align").experiment_id])
    assert run.data.params["algo.name"] == "refl" and run.data.params["train.steps"] == "3"
    hist = sorted(client.get_metric_history(run.info.run_id, "eval/reward"), key=lambda m: m.step)
    assert [m.step for m in hist] == evals
    assert [m.value for m in hist] == pytest.approx([r["eval/reward"] for r in rows if "eval/reward" in r])
    pngs = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert len(pngs) == len(evals) and all(p.endswith(".png") for p in pngs)


def test_tensorboard_continues_exactly_on_resume(tmp_path):
    """Kill after the step-2 checkpoint, resume: TensorBoard holds each step once, like metrics.jsonl."""
    run_dir = str(tmp_path / "run")
    cfg = compose_config(OVERRIDES + ["train.checkpoint_every=2"], run_dir=run_dir)
    trainer = build_trainer(cfg, run_dir)
    trainer.train()
    import shutil

    shutil.rmtree(os.path.join(run_dir, "checkpoints", "step_0000003"))      # as if killed before step 3's
    os.remove(os.path.join(run_dir, "samples_final.pt"))
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.resume = run_dir
    build_trainer(cfg, run_dir).train()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(os.path.join(run_dir, "tb")).Reload()
    assert [e.step for e in tb.Scalars("reward_mean")] == [1, 2, 3]
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2, 3]


def test_an_uninstalled_or_unknown_tracker_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    from align.run import main

    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as err:
        main(OVERRIDES + ["train.trackers=[tensorbored]", f"run_dir={run_dir}"])
    assert err.value.code == 2 and "valid choices for train.trackers[0]: tensorboard, wandb, mlflow" in \
        capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(SystemExit) as err:
        main(OVERRIDES + ["train.trackers=[tensorboard,wandb]", f"run_dir={run_dir}"])
    assert err.value.code == 2 and 'pip install -e ".[wandb]"' in capsys.readouterr().err
    assert not run_dir.exists()
