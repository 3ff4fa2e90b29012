"""align.report on synthetic run directories with known metrics: every number of the tables (one per reward,
rounded to the standard deviation's precision), the best marking, unfinished runs, a missing metric, and that
every figure is written."""
import csv
import json
import math
import statistics

import pytest
from omegaconf import OmegaConf

from align.report import main
from align.report_data import mean_std
from align.report_plots import pareto_front
from align.report_table import format_mean_std

STEPS = (0, 5, 10)
# group: (algo, beta or None, reward, delta); reward rises by delta over training, FID by 10·delta.
GROUPS = {
    "vgg1": ("vggflow", 1.0, "r_a", 0.5),
    "vgg2": ("vggflow", 2.0, "r_a", 1.0),
    "refl": ("refl", None, "r_a", 2.0),
    "vgg1b": ("vggflow", 1.0, "r_b", 0.3),
    "reflb": ("refl", None, "r_b", 0.8),
}
UNFINISHED = {("refl", 2)}            # refl on r_a, seed 2: stopped at step 5 (no samples_final.pt)
SEEDS = (0, 1, 2)


def _metrics(delta, seed, step, reward):
    frac = step / STEPS[-1]
    row = {"eval/reward": 1.0 + 0.1 * seed + delta * frac + 0.03 * seed * seed * frac,
           "eval/diversity": 0.8 - 0.2 * delta * frac + 0.01 * seed}
    if reward == "r_a":                 # r_b has no FID: a model without a feature extractor
        row["eval/fid"] = 10.0 * delta * frac + (0.5 * seed if step else 0.0)
    return row


def _write_run(root, name, algo, beta, reward, seed, delta, last_step=STEPS[-1], finished=True):
    d = root / name / f"seed={seed}"
    d.mkdir(parents=True)
    algo_cfg = {"name": algo, "lr": 1e-4}
    if beta is not None:
        algo_cfg["beta"] = beta
    cfg = {"seed": seed, "run_dir": str(d), "resume": None, "threads": 1, "algo": algo_cfg,
           "model": {"name": "toy"}, "reward": {"name": reward}, "train": {"steps": STEPS[-1], "progress": False}}
    OmegaConf.save(OmegaConf.create(cfg), d / "config.yaml")
    with open(d / "metrics.jsonl", "w") as fh:
        for step in range(last_step + 1):
            row = {"step": step, "loss": 1.0}
            if step in STEPS:
                row.update(_metrics(delta, seed, step, reward))
            fh.write(json.dumps(row) + "\n")
    if finished:
        (d / "samples_final.pt").write_bytes(b"x")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for name, (algo, beta, reward, delta) in GROUPS.items():
        for seed in SEEDS:
            unfinished = (name, seed) in UNFINISHED
            _write_run(root, name, algo, beta, reward, seed, delta, last_step=5 if unfinished else STEPS[-1],
                       finished=not unfinished)
    _write_run(root, "draftb", "draft", None, "r_b", 0, 1.0, last_step=7, finished=False)  # nothing finished
    assert main([str(root)]) == 0
    return root


def _final(delta, seed, reward, key):
    if key == "eval/diversity_rel":   # final diversity / the same run's step-0 diversity
        return (_metrics(delta, seed, STEPS[-1], reward)["eval/diversity"]
                / _metrics(delta, seed, 0, reward)["eval/diversity"])
    return _metrics(delta, seed, STEPS[-1], reward)[key]


def _expected(name, key):
    algo, beta, reward, delta = GROUPS[name]
    vals = [_final(delta, s, reward, key) for s in SEEDS if (name, s) not in UNFINISHED]
    return statistics.mean(vals), statistics.stdev(vals), len(vals)


def _base(reward, key):
    vals = [1.0 if key == "eval/diversity_rel" else _metrics(0.0, s, 0, reward)[key] for s in SEEDS]
    return statistics.mean(vals), statistics.stdev(vals)


ROWS = {"VGG-Flow, β=1": {"r_a": "vgg1", "r_b": "vgg1b"}, "VGG-Flow, β=2": {"r_a": "vgg2"},
        "ReFL": {"r_a": "refl", "r_b": "reflb"}}
REL = ("diversity ÷ base", "eval/diversity_rel", max)
COLUMNS = {"r_a": [("reward", "eval/reward", max), ("diversity", "eval/diversity", max), REL, ("FID", "eval/fid", min)],
           "r_b": [("reward", "eval/reward", max), ("diversity", "eval/diversity", max), REL]}


def _best(facet, key, better):
    return better(_expected(g[facet], key)[0] for g in ROWS.values() if facet in g)


def _md_tables(path):
    """{facet: (header, {row: {column: cell}})} of every ``## <facet>`` table in table.md."""
    tables, facet = {}, None
    for ln in open(path, encoding="utf-8").read().splitlines():
        if ln.startswith("## "):
            facet, header = ln[3:], None
            tables[facet] = (header, {})
        elif ln.startswith("|") and facet is not None:
            cells = [c.strip() for c in ln.strip("|").split("|")]
            if tables[facet][0] is None:
                tables[facet] = (cells, {})
            elif not cells[0].startswith("---"):
                tables[facet][1][cells[0]] = dict(zip(tables[facet][0][1:], cells[1:]))
    return tables


def _column(name, better):
    return f"{name} {'↓' if better is min else '↑'}"


def test_markdown_tables_numbers_and_best_marking(sweep):
    tables = _md_tables(sweep / "report" / "table.md")
    assert list(tables) == ["r_a", "r_b"]                                  # one table per reward
    assert tables["r_a"][0] == ["Method", "reward ↑", "diversity ↑", "diversity ÷ base ↑", "FID ↓"]
    assert tables["r_b"][0] == ["Method", "reward ↑", "diversity ↑", "diversity ÷ base ↑"]
    assert list(tables["r_a"][1]) == ["Base", "ReFL", "VGG-Flow, β=1", "VGG-Flow, β=2"]   # the paper's order
    assert list(tables["r_b"][1]) == ["Base", "ReFL", "DRaFT", "VGG-Flow, β=1"]
    for label, facets in ROWS.items():
        for facet, group in facets.items():
            for name, key, better in COLUMNS[facet]:
                cell = tables[facet][1][label][_column(name, better)]
                mean, std, n = _expected(group, key)
                text = format_mean_std(mean, std)
                best = mean == _best(facet, key, better)
                assert cell == (f"**{text}**" if best else text) + (" (n=2)" if n == 2 else ""), (label, facet, name)
    for facet, cols in COLUMNS.items():       # Base: the step-0 evaluation, never marked best
        for name, key, better in cols:
            assert tables[facet][1]["Base"][_column(name, better)] == format_mean_std(*_base(facet, key))
    # by hand: rewards 1.5, 1.63, 1.82 (std 0.161); 2.0, 2.13, 2.32; 1.3, 1.43, 1.62; 1.8, 1.93, 2.12 (best)
    assert tables["r_a"][1]["VGG-Flow, β=1"]["reward ↑"] == "1.65 ± 0.16"
    assert tables["r_a"][1]["VGG-Flow, β=2"]["reward ↑"] == "2.15 ± 0.16"
    assert tables["r_b"][1]["VGG-Flow, β=1"]["reward ↑"] == "1.45 ± 0.16"
    assert tables["r_b"][1]["ReFL"]["reward ↑"] == "**1.95 ± 0.16**"
    assert tables["r_a"][1]["Base"]["FID ↓"] == "0 ± 0"
    assert tables["r_b"][1]["DRaFT"]["reward ↑"] == "unfinished (step 7/10)"
    text = open(sweep / "report" / "table.md", encoding="utf-8").read()
    assert "ddof = 1" in text and "Unfinished runs (2)" in text
    assert str(sweep / "refl" / "seed=2") in text and str(sweep / "draftb" / "seed=0") in text


def test_csv_table_exact(sweep):
    with open(sweep / "report" / "table.csv", newline="") as fh:
        rows = {(r["reward"], r["method"]): r for r in csv.DictReader(fh)}
    assert list(rows) == [("r_a", "Base"), ("r_a", "ReFL"), ("r_a", "VGG-Flow, β=1"), ("r_a", "VGG-Flow, β=2"),
                          ("r_b", "Base"), ("r_b", "ReFL"), ("r_b", "DRaFT"), ("r_b", "VGG-Flow, β=1")]
    for label, facets in ROWS.items():
        for facet, name_group in facets.items():
            for name, key, better in COLUMNS[facet]:
                mean, std, n = _expected(name_group, key)
                r = rows[(facet, label)]
                assert float(r[f"{name}_mean"]) == pytest.approx(mean, rel=1e-12, abs=1e-12)
                assert float(r[f"{name}_std"]) == pytest.approx(std, rel=1e-12)
                assert int(r[f"{name}_n"]) == n
                assert int(r[f"{name}_best"]) == int(mean == _best(facet, key, better))
    assert rows[("r_a", "ReFL")]["unfinished"] == "1" and rows[("r_b", "DRaFT")]["unfinished"] == "1"
    assert rows[("r_b", "DRaFT")]["reward_mean"] == "" and rows[("r_b", "ReFL")]["FID_mean"] == ""
    assert float(rows[("r_a", "Base")]["FID_mean"]) == 0.0


def test_every_figure_is_written(sweep):
    out = sweep / "report"
    for stem in ("convergence_r_a", "convergence_r_b", "pareto_r_a", "pareto_r_b", "temperature_vggflow_r_a"):
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000, stem
    assert not list(out.glob("temperature_refl*")) and not list(out.glob("temperature_*r_b*"))


def test_sample_std_is_ddof_1():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, None)


@pytest.mark.parametrize("mean,std,text", [
    (3.678, 0.05539, "3.68 ± 0.06"),          # one significant digit of the std, the mean to the same place
    (12.3456, 1.234, "12.3 ± 1.2"),           # two when the std starts with 1
    (0.0012345, 0.000234, "0.0012 ± 0.0002"),
    (345.67, 12.3, "346 ± 12"),
    (1234.5, 234.0, "1200 ± 200"),
    (0.9917, 0.0952, "1.0 ± 0.1"),            # the std rounds up to 0.1: one digit, at the tenths
    (-0.0241, 0.00627, "-0.024 ± 0.006"),
    (-0.0004, 0.006, "0.000 ± 0.006"),        # no "-0.000"
    (1.0, 0.0, "1 ± 0"),                      # no spread: the mean to 4 significant digits
    (3.678123, None, "3.678"),                # a single run: 4 significant digits
    (12345.678, None, "1.235e+04"),
])
def test_mean_is_rounded_to_the_std_precision(mean, std, text):
    assert format_mean_std(mean, std) == text


def test_pareto_front_on_a_hand_made_set():
    # reward (max) vs diversity (max): (1, 5) (2, 4) (3, 1) are non-dominated; (1.5, 3) by (2, 4);
    # (3, 0.5) by (3, 1); (2, 4) twice: equal points do not dominate each other.
    xs = [1.0, 1.5, 2.0, 3.0, 3.0, 2.0, math.nan]
    ys = [5.0, 3.0, 4.0, 1.0, 0.5, 4.0, 9.0]
    assert pareto_front(xs, ys) == [0, 2, 5, 3]
    # reward (max) vs FID (min): (1, 1) (2, 3) (3, 10) non-dominated; (1.5, 4) by (2, 3); (0.5, 1) by (1, 1).
    xs, ys = [1.0, 2.0, 3.0, 1.5, 0.5], [1.0, 3.0, 10.0, 4.0, 1.0]
    assert pareto_front(xs, ys, maximize_y=False) == [0, 1, 2]


def test_cosine_diversity_column_and_old_runs_group_with_paired_fid(tmp_path):
    """eval/diversity_cos (the paper's ×10⁻² unit) gets its own column and curve when logged; a run saved before
    eval.fid_reference existed (paired FID) is averaged with runs that say fid_reference=paired."""
    cos = {0: [23.0, 25.0], 1: [20.0, 24.0]}          # [step-0, final] per seed
    for seed in (0, 1):
        d = tmp_path / f"seed={seed}"
        d.mkdir()
        cfg = {"seed": seed, "run_dir": str(d), "algo": {"name": "vggflow", "lr": 1e-4}, "model": {"name": "toy"},
               "reward": {"name": "r"}, "train": {"steps": 10}, "eval": {"every": 10}}
        if seed == 1:                                   # written after the key was added
            cfg["eval"]["fid_reference"] = "paired"
            cfg["model"]["fid_reference"] = "paired"
        OmegaConf.save(OmegaConf.create(cfg), d / "config.yaml")
        with open(d / "metrics.jsonl", "w") as fh:
            for step, c in zip((0, 10), cos[seed]):
                fh.write(json.dumps({"step": step, "eval/reward": 1.0 + step, "eval/diversity": 0.5,
                                     "eval/diversity_cos": c, "eval/fid": float(step)}) + "\n")
        (d / "samples_final.pt").write_bytes(b"x")
    assert main([str(tmp_path)]) == 0
    header, table = _md_tables(tmp_path / "report" / "table.md")["r"]
    col = "diversity (1 − cos, ×10⁻²) ↑"
    assert col in header and list(table) == ["Base", "VGG-Flow"]      # one group, not two
    assert table["VGG-Flow"][col] == "**24.5 ± 0.7**"               # mean 24.5, std 0.707
    assert table["Base"][col] == "22 ± 2"                            # mean 21.5, std 2.12
    assert (tmp_path / "report" / "convergence_r.png").stat().st_size > 1000
