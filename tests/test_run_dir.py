"""align.core.run_dir: the bookkeeping table (and Hydra's exclude_keys agreeing with it), checkpoint listing, metrics
reading and a run directory's status."""
import json
import os

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from align.setup.compose import CONF_DIR
from align.setup.registration import prepare_compose
from align.core.run_dir import (RESUMABLE_KEYS, clear_partial_run, config_differences, keys_with, last_checkpoint_step,
                                list_checkpoints, read_metrics, run_status)


def test_the_bookkeeping_roles():
    execution = ("device", "train.collective_timeout_s", "eval.batch_size")   # how, not what, is computed
    assert RESUMABLE_KEYS == ("train.steps", "train.progress", "train.checkpoint_every", "train.keep_checkpoints",
                              "train.max_bad_steps", "train.max_param_growth", *execution)
    rerun = {"run_dir", "resume", "threads", "train.progress", "train.checkpoint_every", "train.keep_checkpoints",
             "train.max_bad_steps", "train.max_param_growth", "train.steps", "default_reward", *execution}
    assert set(keys_with("rerun")) == rerun
    assert set(keys_with("group")) == rerun - {"train.steps"} | {"seed"}
    assert set(keys_with("name")) == {"run_dir", "resume", "train.progress", "threads", *execution}


def test_hydra_leaves_the_name_keys_out_of_a_job_directory():
    prepare_compose()                                # the typed configs in ConfigStore, the resolvers
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(config_name="config", return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert sorted(cfg.hydra.job.config.override_dirname.exclude_keys) == sorted(keys_with("name"))


def test_a_rerun_ignores_bookkeeping_and_fills_in_keys_added_later():
    saved = {"seed": 0, "threads": 1, "train": {"steps": 5, "lr": 1e-3}, "eval": {"every": 5}}
    again = {"seed": 0, "threads": 4, "train": {"steps": 9, "lr": 1e-3}, "eval": {"every": 5, "fid_reference": "paired"}}
    assert config_differences(saved, again) == []
    assert config_differences(saved, {**again, "seed": 1}) == ["seed: saved 0, requested 1"]


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "w").close()


def test_status_and_checkpoints_of_a_run_directory(tmp_path):
    run = str(tmp_path / "run")
    assert run_status(run) == "new" and list_checkpoints(run) == [] and last_checkpoint_step(run) is None
    _touch(os.path.join(run, "run.log"))
    _touch(os.path.join(run, "metrics.jsonl"))
    assert run_status(run) == "partial"
    for name in ("step_0000004", "step_0000012", ".tmp_step_0000016"):       # complete, complete, being written
        _touch(os.path.join(run, "checkpoints", name, "state.pt"))
    os.makedirs(os.path.join(run, "checkpoints", "step_0000020"))          # no state.pt: not a checkpoint
    assert list_checkpoints(run) == [4, 12] and last_checkpoint_step(run) == 12
    assert run_status(run) == "checkpoint"
    _touch(os.path.join(run, "samples_final.pt"))
    assert run_status(run) == "checkpoint"                                  # no config.yaml: steps unknown
    with open(os.path.join(run, "config.yaml"), "w") as fh:
        fh.write("train:\n  steps: 12\n")
    assert run_status(run) == "finished"
    with open(os.path.join(run, "config.yaml"), "w") as fh:                 # an extension, interrupted
        fh.write("train:\n  steps: 20\n")
    assert run_status(run) == "checkpoint"
    os.remove(os.path.join(run, "samples_final.pt"))
    clear_partial_run(run)
    assert sorted(os.listdir(run)) == ["run.log"] and run_status(run) == "new"


def test_read_metrics_stops_at_a_line_cut_short(tmp_path):
    rows = [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}]
    with open(tmp_path / "metrics.jsonl", "w") as fh:
        fh.write("".join(json.dumps(r) + "\n" for r in rows) + "\n" + '{"step": 2, "lo')
    assert read_metrics(str(tmp_path)) == rows


def test_a_config_saved_by_an_earlier_version_matches_its_re_run():
    """Runs saved before the typed configs carry model.vggflow_beta, the budgets, reward.domain, model.prompts …
    and no top-level default_reward: a re-run of the same settings is the same run."""
    from align.setup.compose import compose_config
    from omegaconf import OmegaConf

    requested = OmegaConf.to_container(compose_config(["model=sd3", "reward=aesthetic"], run_dir="/x"), resolve=True,
                                       enum_to_str=True)
    saved = {**requested, "model": {**requested["model"], "vggflow_beta": 5e4, "train_steps": 400,
                                    "prompts": None, "sampler_shift": 3.0},
             "reward": {**requested["reward"], "domain": "sd3"}}
    del saved["default_reward"]
    assert config_differences(saved, requested) == []
    saved["model"]["guidance_scale"] = 4.0                                   # a real difference still counts
    assert config_differences(saved, requested) == ["model.guidance_scale: saved 4.0, requested 5.0"]
