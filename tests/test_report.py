"""align.report on synthetic run directories with known metrics: every number of the tables (one per reward,
rounded to the standard deviation's precision), the best marking, unfinished runs, a missing metric, and that
every figure is written."""
import csv
import json
import math
import statistics

import pytest
from omegaconf import OmegaConf

from align.report.cli import main
from align.report.data import mean_std
from align.report.plots import pareto_front
from align.report.tables import format_mean_std

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


# ---- compute columns and vs-compute figures, held-out rewards ------------------------------------------------
# group: (algo, beta, velocity rows per update as a function of the seed, reward-gradient rows per update,
# step from which the run logs compute/ (None: never; > 0: resumed from a checkpoint older than compute accounting))
COMPUTE_GROUPS = {
    "cheap": ("refl", None, lambda seed: 10, 2, 0),
    "dear": ("vggflow", 1.0, lambda seed: 40 + seed, 8, 0),
    "old": ("draft", None, lambda seed: 20, 1, 5),
}
C_STEPS = (0, 5, 10)


def _compute_metrics(name, seed, step):
    """Trained reward rises; the held-out classifier falls for ReFL (hacking) and stays for VGG-Flow."""
    frac = step / C_STEPS[-1]
    slope = {"cheap": 2.0, "dear": 1.0, "old": 0.5}[name]
    drop = {"cheap": 0.6, "dear": 0.05, "old": 0.2}[name]
    return {"eval/reward": 1.0 + slope * frac + 0.1 * seed, "eval/diversity": 0.5 - 0.1 * frac + 0.01 * seed,
            "eval/heldout/classifier": 0.9 - drop * frac + 0.02 * seed, "eval/heldout/classifier_std": 0.1,
            "eval/reward/ink": 2.0 * slope * frac + 0.05 * seed}


@pytest.fixture(scope="module")
def compute_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("compute_sweep")
    for name, (algo, beta, per_update, rgrad, since) in COMPUTE_GROUPS.items():
        for seed in SEEDS:
            d = root / name / f"seed={seed}"
            d.mkdir(parents=True)
            algo_cfg = {"name": algo, "lr": 1e-4, **({"beta": beta} if beta is not None else {})}
            cfg = {"seed": seed, "run_dir": str(d), "algo": algo_cfg, "model": {"name": "toy"},
                   "reward": {"name": "r_c"}, "train": {"steps": C_STEPS[-1]}}
            OmegaConf.save(OmegaConf.create(cfg), d / "config.yaml")
            with open(d / "metrics.jsonl", "w") as fh:
                for step in range(C_STEPS[-1] + 1):
                    row = {"step": step, "loss": 1.0}
                    if step >= since:
                        k = step - since            # counted from the resume on
                        row.update({"compute/velocity": k * per_update(seed), "compute/reward_grad": k * rgrad})
                    if step in C_STEPS:
                        row.update(_compute_metrics(name, seed, step))
                    fh.write(json.dumps(row) + "\n")
            (d / "samples_final.pt").write_bytes(b"x")
    return root


@pytest.fixture(scope="module")
def compute_report(compute_sweep):
    """Run the report, keeping the data of every figure's lines and scatter points (not its pixels)."""
    from align.report import plots as report_plots

    figures = {}
    save = report_plots._save

    def recording(fig, out, stem):
        figures[stem] = [{"xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
                          "lines": {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.lines},
                          "points": [c.get_offsets().tolist() for c in ax.collections if hasattr(c, "get_offsets")]}
                         for ax in fig.axes]
        return save(fig, out, stem)

    mp = pytest.MonkeyPatch()
    mp.setattr(report_plots, "_save", recording)
    try:
        assert main([str(compute_sweep)]) == 0
    finally:
        mp.undo()
    return compute_sweep / "report", figures


LABELS = {"cheap": "ReFL", "dear": "VGG-Flow", "old": "DRaFT"}


def test_compute_columns_are_the_final_cumulative_counts(compute_report):
    out, _ = compute_report
    header, table = _md_tables(out / "table.md")["r_c"]
    assert header[-2:] == ["velocity evals", "reward-grad evals"]            # costs: no arrow, never bold
    # by hand: ReFL 10 rows per update × 10 updates on every seed; VGG-Flow (40 + seed) × 10 = 400, 410, 420
    assert table["ReFL"]["velocity evals"] == "100 ± 0" and table["ReFL"]["reward-grad evals"] == "20 ± 0"
    assert table["VGG-Flow"]["velocity evals"] == "410 ± 10" and table["VGG-Flow"]["reward-grad evals"] == "80 ± 0"
    # DRaFT's runs count only from step 5 (resumed from an older checkpoint): left out, and listed
    assert table["DRaFT"]["velocity evals"] == "–" and table["Base"]["velocity evals"] == "–"
    text = (out / "table.md").read_text(encoding="utf-8")
    assert "a CFG-combined velocity is one row although the network sees two" in text
    assert "Runs without compute accounting from step 0 (3)" in text and "old/seed=0" in text
    with open(out / "table.csv", newline="") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert float(rows["VGG-Flow"]["velocity evals_mean"]) == statistics.mean([400, 410, 420])
    assert float(rows["VGG-Flow"]["velocity evals_std"]) == statistics.stdev([400, 410, 420])
    assert rows["DRaFT"]["velocity evals_mean"] == "" and rows["ReFL"]["velocity evals_best"] == "0"


def _mean_over_seeds(fn):
    return [statistics.mean(fn(seed, step) for seed in SEEDS) for step in C_STEPS]


def test_vs_compute_figures_plot_against_the_mean_cumulative_velocity_evaluations(compute_report):
    out, figures = compute_report
    for stem in ("convergence_r_c_vs_compute", "heldout_r_c_vs_compute"):
        assert (out / f"{stem}.png").stat().st_size > 1000 and (out / f"{stem}.pdf").exists()
    reward_panel = figures["convergence_r_c_vs_compute"][0]
    assert reward_panel["xlabel"].startswith("cumulative velocity evaluations")
    for name in ("cheap", "dear"):
        per_update = COMPUTE_GROUPS[name][2]
        xs, ys = reward_panel["lines"][f"{LABELS[name]} (n=3)"]
        assert xs == pytest.approx(_mean_over_seeds(lambda seed, step: step * per_update(seed)), rel=1e-12)
        assert ys == pytest.approx(_mean_over_seeds(lambda s, k: _compute_metrics(name, s, k)["eval/reward"]),
                                   rel=1e-12)
    assert not any(label.startswith("DRaFT") for label in reward_panel["lines"])      # no compute from step 0
    by_step = figures["convergence_r_c"][0]                                           # the update-step figure
    assert by_step["xlabel"] == "update step" and by_step["lines"]["DRaFT (n=3)"][0] == list(C_STEPS)


def test_heldout_columns_curves_and_pareto_fronts(compute_report):
    out, figures = compute_report
    header, table = _md_tables(out / "table.md")["r_c"]
    assert "held-out: classifier ↑" in header and "reward part: ink ↑" in header
    assert not any("classifier_std" in h for h in header)
    for col, key in (("held-out: classifier ↑", "eval/heldout/classifier"), ("reward part: ink ↑", "eval/reward/ink")):
        finals = {n: [_compute_metrics(n, s, C_STEPS[-1])[key] for s in SEEDS] for n in COMPUTE_GROUPS}
        best = max(statistics.mean(v) for v in finals.values())
        for name, vals in finals.items():
            text = format_mean_std(statistics.mean(vals), statistics.stdev(vals))
            assert table[LABELS[name]][col] == (f"**{text}**" if statistics.mean(vals) == best else text), (col, name)
        base = [_compute_metrics("cheap", s, 0)[key] for s in SEEDS]
        assert table["Base"][col] == format_mean_std(statistics.mean(base), statistics.stdev(base))
    assert table["VGG-Flow"]["held-out: classifier ↑"].startswith("**")     # ReFL hacked the trained reward
    assert "evaluation-only reward" in (out / "table.md").read_text(encoding="utf-8")

    # curves: the trained reward, then the held-out reward, then the mix part, against steps and compute
    panels = figures["heldout_r_c"]
    assert [p["ylabel"] for p in panels] == ["reward ↑", "held-out: classifier ↑", "reward part: ink ↑"]
    xs, ys = panels[1]["lines"]["ReFL (n=3)"]
    assert xs == list(C_STEPS)
    assert ys == pytest.approx(_mean_over_seeds(lambda s, k: _compute_metrics("cheap", s, k)["eval/heldout/classifier"]))
    assert ys[-1] < ys[0] and panels[0]["lines"]["ReFL (n=3)"][1][-1] > panels[0]["lines"]["ReFL (n=3)"][1][0]

    # Pareto: every checkpoint's (mean trained reward, mean held-out reward) is a point
    (classifier, ink) = figures["pareto_heldout_r_c"]
    assert classifier["ylabel"] == "held-out: classifier (higher is better)"
    expected = [v for pair in zip(
        _mean_over_seeds(lambda s, k: _compute_metrics("dear", s, k)["eval/reward"]),
        _mean_over_seeds(lambda s, k: _compute_metrics("dear", s, k)["eval/heldout/classifier"])) for v in pair]
    assert any([v for pt in p for v in pt] == pytest.approx(expected, rel=1e-12) for p in classifier["points"])
    assert ink["ylabel"] == "reward part: ink (higher is better)"


def test_a_sweep_without_compute_keys_reports_without_them_and_says_so(sweep, capsys):
    out = sweep / "report"
    assert not list(out.glob("*_vs_compute*")) and not list(out.glob("heldout_*"))
    header, _ = _md_tables(out / "table.md")["r_a"]
    assert "velocity evals" not in header
    assert "No compute columns and no vs-compute figures" in (out / "table.md").read_text(encoding="utf-8")
    assert main([str(sweep)]) == 0
    printed = capsys.readouterr().out
    assert "align.report: No compute columns and no vs-compute figures" in printed
