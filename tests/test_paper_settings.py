"""The paper's β and lr per (model, reward, algorithm) are filled in automatically (align/setup/paper_settings.py):
every Table-1 cell resolves to the table of docs/sd3.md (parsed here as the independent source), anything set
explicitly wins, digits and gmm keep their per-domain values, and the runner prints what it took."""
import os

import pytest
import torch

from align.setup.overrides import ConfigProblem
from align.setup.compose import compose_config
from align.setup.paper_settings import TABLE, describe, fmt, lookup
from helpers.cli import align_run, subprocess_run

torch.set_num_threads(1)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REWARDS = ("aesthetic", "hpsv2", "pickscore")
ALGOS = ("vggflow", "vggflow_pmp", "refl", "draft", "adjoint_matching")
# The Flow-GRPO paper's SD3.5-M settings (Liu et al. 2025 and its code's config/grpo.py; DiffusionNFT's code uses
# the same lr and group size): lr 3e-4, G = 24 images per prompt, KL coefficient 0.04 (GenEval/OCR)
FLOW_GRPO_PAPER = {"flow_grpo": (3e-4, 24, 0.04), "diffusion_nft": (3e-4, 24, None)}


def _readme_table() -> dict[str, dict[str, tuple[float | None, float]]]:
    """reward -> algo -> (β or None, lr), from the markdown table under "The paper's Table 1" in docs/sd3.md."""
    text = open(os.path.join(ROOT, "docs", "sd3.md"), encoding="utf-8").read()
    start = text.index("**The paper's Table 1.**")
    lines = text[start:].splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[first:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    header, body = rows[0], [r for r in rows[2:]]
    col = {name: i for i, name in enumerate(header)}
    i_beta = next(i for n, i in col.items() if n.startswith("β") and "VGG-Flow" in n)
    i_am = next(i for n, i in col.items() if n.startswith("β") and "AM" in n)
    i_lr = next(i for n, i in col.items() if n.startswith("lr"))
    lr_names = [part.strip() for part in header[i_lr].partition(":")[2].split("/")]
    assert lr_names == ["VGG-Flow", "PMP", "ReFL, DRaFT, AM"], header[i_lr]
    out = {}
    for r in body:
        reward = r[0].lower()
        assert reward in REWARDS, r
        assert f"table1_{reward}.yaml" in r[col["command"]]
        beta, am = float(r[i_beta]), float(r[i_am])
        lr_vgg, lr_pmp, lr_rest = (float(x) for x in r[i_lr].split("/"))
        out[reward] = {"vggflow": (beta, lr_vgg), "vggflow_pmp": (beta, lr_pmp), "refl": (None, lr_rest),
                       "draft": (None, lr_rest), "adjoint_matching": (am, lr_rest)}
    assert sorted(out) == sorted(REWARDS)
    return out


README = _readme_table()


def test_the_readme_table_parses_to_the_paper_numbers():
    assert README["hpsv2"]["vggflow"] == (3e7, 5e-4) and README["pickscore"]["adjoint_matching"] == (1e4, 1e-4)
    assert README["aesthetic"]["vggflow_pmp"] == (5e4, 1e-4) and README["hpsv2"]["vggflow_pmp"] == (3e7, 5e-5)


@pytest.mark.parametrize("reward", REWARDS)
@pytest.mark.parametrize("algo", ALGOS)
def test_every_table1_cell_resolves_to_the_readme_table(reward, algo):
    beta, lr = README[reward][algo]
    cfg = compose_config(["model=sd3", f"reward={reward}", f"algo={algo}"])     # the runner's composition
    assert (cfg.model.name, cfg.reward.name, cfg.algo.name) == ("sd3", reward, algo)
    assert float(cfg.train.lr) == pytest.approx(lr, rel=1e-12)
    if beta is None:
        assert "beta" not in cfg.algo
    else:
        assert float(cfg.algo.beta) == pytest.approx(beta, rel=1e-12)
    line = describe(cfg)
    assert line.startswith(f"align: paper settings for sd3 × {reward} × {algo}: ")
    assert f"train.lr={fmt(lr)}" in line and (beta is None or f"algo.beta={fmt(beta)}" in line)


@pytest.mark.slow
@pytest.mark.parametrize("reward", REWARDS)
def test_the_table1_sweep_files_resolve_to_the_readme_table(reward):
    from align.sweep import load_sweep

    sweep = load_sweep(os.path.join(ROOT, "experiments", "paper", f"table1_{reward}.yaml"))
    seen = set()
    for run in sweep.runs:
        cfg = compose_config(run.overrides, run_dir=run.dir)
        # one trajectory per micro-batch, checkpointed: what docs/sd3.md's memory table assumes (the same updates)
        assert int(cfg.train.grad_accum) == int(cfg.train.batch_size) and cfg.model.gradient_checkpointing
        if cfg.algo.name in FLOW_GRPO_PAPER:          # not in the VGG-Flow paper's table: the Flow-GRPO paper's
            lr, G, beta = FLOW_GRPO_PAPER[cfg.algo.name]
            assert float(cfg.train.lr) == pytest.approx(lr) and int(cfg.algo.group_size) == G
            assert int(cfg.train.batch_size) % G == 0
            assert int(cfg.train.grad_accum) == int(cfg.train.batch_size)     # a group spans G micro-batches of one
            if cfg.algo.name == "flow_grpo":          # its published β (PickScore 0.01) assume the code's KL form
                assert float(cfg.algo.beta) == (0.01 if reward == "pickscore" else beta) and cfg.algo.kl == "code"
            seen.add((cfg.algo.name, int(cfg.seed)))
            continue
        if cfg.algo.name == "vggflow_authors":       # VGG-Flow's β and α, the authors' run.sh learning rate
            beta, lr = README[reward]["vggflow"][0], 1e-3
        else:
            beta, lr = README[reward][cfg.algo.name]
        assert cfg.reward.name == reward and float(cfg.train.lr) == pytest.approx(lr, rel=1e-12)
        assert beta is None or float(cfg.algo.beta) == pytest.approx(beta, rel=1e-12)
        seen.add((cfg.algo.name, int(cfg.seed)))
    assert seen == {(a, s) for a in ALGOS + ("vggflow_authors",) + tuple(FLOW_GRPO_PAPER) for s in (0, 1, 2)}


def test_what_is_given_explicitly_wins():
    cfg = compose_config(["model=sd3", "reward=hpsv2", "algo=vggflow", "algo.beta=1e4", "train.lr=2e-4"])
    assert (float(cfg.algo.beta), float(cfg.train.lr)) == (1e4, 2e-4)
    assert describe(cfg) is None                                     # nothing came from the table
    cfg = compose_config(["model=sd3", "reward=hpsv2", "algo=vggflow_pmp", "algo.beta=1e4"])
    assert (float(cfg.algo.beta), float(cfg.train.lr)) == (1e4, 5e-5)
    assert describe(cfg) == ("align: paper settings for sd3 × hpsv2 × vggflow_pmp: train.lr=5e-5 "
                             "(align/setup/paper_settings.py: paper Table 1, reference §1.8/§3); "
                             "set explicitly: algo.beta=1e4")
    cfg = compose_config(["model=sd3", "reward=pickscore", "algo=adjoint_matching", "algo.lr=3e-5"])
    assert (float(cfg.algo.beta), float(cfg.train.lr)) == (1e4, 3e-5)
    # a Hydra multirun / sweep override is an override like any other
    cfg = compose_config(["model=sd3", "reward=hpsv2", "algo=adjoint_matching", "algo.beta=7"])
    assert float(cfg.algo.beta) == 7.0


# The per-domain values (align/setup/paper_settings.py's (model, "*", algo) rows), lr the algorithm's paper value.
DOMAIN = {
    "digits": {"vggflow": (10.0, 5e-4), "vggflow_pmp": (10.0, 1e-4), "adjoint_matching": (10.0, 1e-4),
               "refl": (None, 1e-4), "draft": (None, 1e-4)},
    "gmm": {"vggflow": (1.0, 5e-4), "vggflow_pmp": (1.0, 1e-4), "adjoint_matching": (1.0, 1e-4),
            "refl": (None, 1e-4), "draft": (None, 1e-4)},
}


@pytest.mark.parametrize("model,reward", [("digits", "digits_thickness"), ("digits", "digits_classifier"),
                                          ("digits", "digits_symmetry"), ("gmm", "linear"), ("gmm", "quadratic")])
def test_digits_and_gmm_keep_their_domain_values(model, reward):
    for algo, (beta, lr) in DOMAIN[model].items():
        cfg = compose_config([f"model={model}", f"reward={reward}", f"algo={algo}"])
        assert float(cfg.train.lr) == lr and float(cfg.algo.lr) == lr
        assert beta is None or float(cfg.algo.beta) == beta
        if algo == "vggflow":
            assert float(cfg.algo.alpha) == 10.0
        assert describe(cfg).startswith(f"align: domain defaults for {model} × {reward} × {algo} ")
    cfg = compose_config([f"model={model}", f"reward={reward}", "algo=adjoint_matching", "algo.beta=4"])
    assert float(cfg.algo.beta) == 4.0


def test_sd3_alpha_is_unchanged_and_unknown_sd3_rewards_fall_back_to_the_domain_default():
    cfg = compose_config(["model=sd3", "reward=hpsv2", "algo=vggflow"])
    assert float(cfg.algo.alpha) == 1e4
    cfg = compose_config(["model=sd3", "reward=aesthetic", "algo=vggflow"])
    cfg.reward.name = "my_sd3_reward"           # an SD3 reward without a Table-1 row: the sd3 domain's β, said so
    assert float(cfg.algo.beta) == 5e4 and "algo.beta=5e4 (the sd3 domain's value)" in describe(cfg)


def test_a_missing_setting_is_a_one_line_error(monkeypatch):
    alpha_only = {"alpha": TABLE[("gmm", "*", "vggflow")]["alpha"]}
    monkeypatch.setitem(TABLE, ("gmm", "*", "vggflow"), alpha_only)           # a domain without VGG-Flow's β
    with pytest.raises(ConfigProblem) as err:
        compose_config(["model=gmm", "reward=linear", "algo=vggflow"])
    msg = str(err.value)
    assert "no paper setting of algo.beta for model=gmm × reward=linear × algo=vggflow" in msg
    assert "algo.beta=<value>" in msg and "\n" not in msg
    cfg = compose_config(["model=gmm", "reward=linear", "algo=vggflow", "algo.beta=2"])
    assert float(cfg.algo.beta) == 2.0


# Cells typed from the paper (Table 1, reference §1.8 / §3) and the domains' rows: what ``lookup`` must return.
PAPER_CELLS = [
    (("sd3", "hpsv2", "vggflow", "beta"), 3e7),
    (("sd3", "aesthetic", "adjoint_matching", "beta"), 5e3),
    (("sd3", "hpsv2", "vggflow_pmp", "lr"), 5e-5),
    (("flux", "pickscore", "vggflow", "beta"), 5e5),               # SD3's PickScore row, borrowed
    (("flux", "hpsv2", "flow_grpo", "beta"), 0.0),                 # FLUX's own: flow_grpo's FLUX configs
    (("flux", "aesthetic", "flow_grpo", "beta"), 0.0),
    (("digits", "digits_thickness", "vggflow", "alpha"), 10.0),
    (("digits", "digits_classifier", "vggflow", "alpha"), 10.0),
    (("sd3", "pickscore", "vggflow_authors", "beta"), 5e5),        # VGG-Flow's row
    (("digits", "digits_thickness", "vggflow_authors", "alpha"), 10.0),
]


@pytest.mark.parametrize("cell,value", PAPER_CELLS)
def test_lookup_returns_the_papers_values(cell, value):
    assert lookup(*cell).value == value


def test_lookup_says_where_a_value_comes_from():
    assert lookup("sd3", "hpsv2", "vggflow", "beta").source == \
        "align/setup/paper_settings.py: paper Table 1, reference §1.8/§3"
    assert lookup("flux", "pickscore", "vggflow", "beta").source == \
        "align/setup/paper_settings.py: paper Table 1, reference §1.8/§3, sd3's row borrowed for flux (untuned there)"
    assert lookup("flux", "pickscore", "flow_grpo", "beta").source == "the flux domain's value"
    assert lookup("gmm", "linear", "refl", "lr").source == "the algorithm's paper value, reference §1.8"
    assert lookup("sd3", "my_sd3_reward", "vggflow", "beta") == (5e4, "the sd3 domain's value")
    for setting in ("beta", "alpha", "lr"):
        assert lookup("gmm", "linear", "vggflow_authors", setting) == lookup("gmm", "linear", "vggflow", setting)


def test_fmt_gives_short_command_line_values():
    assert [fmt(x) for x in (3e7, 5e4, 5e-4, 5e-5, 1e-4, 10.0, 1.0, 0.5)] == \
        ["3e7", "5e4", "5e-4", "5e-5", "1e-4", "10", "1", "0.5"]


# An algorithm added outside the source tree (README "Adding an algorithm") whose β is the table's.
TEMPERED = """
from dataclasses import dataclass

from omegaconf import II

from algorithms.refl import ReFL, ReFLConfig
from align.core.registry import register_algorithm


@dataclass
class TemperedConfig(ReFLConfig):
    name: str = "tempered"
    lr: float = 1.0e-4
    beta: float = II("align_paper:beta")


@register_algorithm("tempered", config=TemperedConfig)
class Tempered(ReFL):
    name = "tempered"
"""


@pytest.mark.slow
def test_the_runner_prints_and_saves_the_resolved_settings(tmp_path):
    tiny = ["reward=linear", "algo=adjoint_matching", "train.steps=1", "train.batch_size=4", "eval.n_samples=16",
            "eval.final_samples=8", "train.progress=false", "sampler.steps=4"]
    res = align_run(*tiny, f"run_dir={tmp_path / 'a'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    line = ("align: domain defaults for gmm × linear × adjoint_matching (align/setup/paper_settings.py, gmm row): "
            "algo.beta=1 (the gmm domain's value), train.lr=1e-4 (the algorithm's paper value, reference §1.8)")
    assert res.stdout.count(line) == 1, res.stdout
    from omegaconf import OmegaConf
    saved = OmegaConf.load(tmp_path / "a" / "config.yaml")
    assert saved.algo.beta == 1.0 and saved.train.lr == 1e-4 and saved.algo.lr == 1e-4   # resolved, literal
    # given on the command line: it wins, and the line says so
    res = align_run(*tiny, "algo.beta=0.5", f"run_dir={tmp_path / 'b'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "train.lr=1e-4 (the algorithm's paper value, reference §1.8); set explicitly: algo.beta=0.5" in res.stdout
    assert OmegaConf.load(tmp_path / "b" / "config.yaml").algo.beta == 0.5
    # Hydra multirun: every job resolves and prints its own settings
    multi = [o for o in tiny if not o.startswith("algo=")] + ["algo=adjoint_matching,refl"]
    res = align_run("-m", *multi, f"hydra.sweep.dir={tmp_path / 'm'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(line) == 1 and res.stdout.count(
        "align: domain defaults for gmm × linear × refl (align/setup/paper_settings.py, gmm row): train.lr=1e-4") == 1
    # no setting and none given (an added algorithm that takes β from the table, which has no entry for it):
    # the CLI's one-line error, before any work (a real process: the plugin registers itself for good)
    (tmp_path / "tempered.py").write_text(TEMPERED)
    res = subprocess_run("align.run", ["reward=linear", "algo=tempered", f"run_dir={tmp_path / 'c'}"], cwd=tmp_path,
                         env={"ALIGN_PLUGINS": "tempered", "PYTHONPATH": str(tmp_path)})
    assert res.returncode == 2 and res.stderr.startswith("align: no paper setting of algo.beta"), res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()


# flow_grpo's pickscore_flux (config/grpo.py) and DanceGRPO's FLUX script: resolution, sampler steps, G, flow_grpo's
# training steps (None: the sampler's), its β (no KL in either)
FLUX_PEERS = {"pickscore": (512, 28, 24, 6), "hpsv2": (720, 16, 12, None)}


@pytest.mark.slow
@pytest.mark.parametrize("reward", sorted(FLUX_PEERS))
def test_the_flux_sweep_files_take_the_peers_settings_and_sd3s_rows(reward):
    """experiments/paper/flux_*.yaml: FLUX at the FLUX peers' settings; the VGG-Flow family borrows SD3's Table-1 row
    of the same reward (docs/sd3.md's table, the independent source)."""
    from align.sweep import load_sweep

    resolution, steps, G, train_steps = FLUX_PEERS[reward]
    sweep = load_sweep(os.path.join(ROOT, "experiments", "paper", f"flux_{reward}.yaml"))
    seen = set()
    for run in sweep.runs:
        cfg = compose_config(run.overrides, run_dir=run.dir)
        assert cfg.model.name == "flux" and cfg.sampler.grid == "flux" and cfg.reward.name == reward
        assert cfg.model.resolution == resolution and cfg.sampler.steps == steps and cfg.model.guidance_scale == 3.5
        assert len(cfg.eval.rewards) == 2
        name = cfg.algo.name
        micro_batch = int(cfg.train.batch_size) // int(cfg.train.grad_accum)
        assert micro_batch == 1               # one trajectory (groups span micro-batches): docs/flux.md's memory table
        if name in FLOW_GRPO_PAPER:
            assert int(cfg.algo.group_size) == G and int(cfg.train.batch_size) % G == 0
            if name == "flow_grpo":
                assert float(cfg.algo.beta) == 0.0
                assert cfg.algo.train_steps == train_steps
                assert cfg.algo.train_grid == ("flux" if train_steps else "model")
        else:
            beta, lr = README[reward][name]
            assert float(cfg.train.lr) == pytest.approx(lr, rel=1e-12)
            assert beta is None or float(cfg.algo.beta) == pytest.approx(beta, rel=1e-12)
        seen.add((name, int(cfg.seed)))
    assert seen == {(a, s) for a in ALGOS + tuple(FLOW_GRPO_PAPER) for s in (0, 1, 2)}
