"""``python -m align.bench``: seconds per update, peak memory and velocity evaluations of every algorithm.

Each algorithm with a config in align/conf/algo/ runs in its own subprocess (so peak RSS is its own):
the Trainer is built from the composed config exactly as ``align.run`` builds it (model=gmm unless
``--model``), then ``--warmup`` updates and ``--updates`` timed updates run. Prints a Markdown table.

    python -m align.bench [--algos refl,draft] [--model gmm] [--updates 5] [--warmup 2] [key=value ...]

Columns: median (min–max) wall seconds per ``Trainer.update``; peak RSS of the process and its rise
over the RSS before the first update; v_θ and v_base evaluations per trajectory per update (rows
evaluated / batch size), v_θ split into no-grad + with-grad. v_base counts only calls made outside
v_θ (a backend's v_θ = v_base + residual is one v_θ evaluation).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from align.config import CONF_DIR, compose_config


def algorithm_configs() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, "algo")) if f.endswith(".yaml"))


# ---- counting velocity evaluations --------------------------------------------------------------------
class VelocityCounter:
    """Wraps model.velocity / model.base_velocity on the instance and counts evaluated rows."""

    def __init__(self, model: Any):
        self.inside = False
        self.reset()
        vel, base = model.velocity, model.base_velocity

        def velocity(x, t, cond=None):
            import torch

            key = "v_grad" if torch.is_grad_enabled() else "v_nograd"
            self.rows[key] += x.shape[0]
            outer, self.inside = self.inside, True
            try:
                return vel(x, t, cond)
            finally:
                self.inside = outer

        def base_velocity(x, t, cond=None):
            if not self.inside:
                self.rows["v_base"] += x.shape[0]
            return base(x, t, cond)

        model.velocity, model.base_velocity = velocity, base_velocity

    def reset(self) -> None:
        self.rows = {"v_nograd": 0, "v_grad": 0, "v_base": 0}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def bench_one(algo: str, model: str, overrides: list[str], warmup: int, updates: int) -> dict[str, Any]:
    import torch

    from align.registry import ALGORITHMS
    from align.assemble import build_trainer

    try:
        ALGORITHMS.get(algo)
    except Exception as err:  # noqa: BLE001 — not written yet, or being edited
        return {"algo": algo, "skipped": f"not available ({type(err).__name__}: {str(err)[:120]})"}
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_config([f"algo={algo}", f"model={model}", "train.progress=false", *overrides], run_dir)
        trainer = build_trainer(cfg, run_dir)
        counter = VelocityCounter(trainer.model)
        rss0 = _rss_mb()
        for _ in range(warmup):
            trainer.update()
        counter.reset()
        times = []
        for _ in range(updates):
            t0 = time.perf_counter()
            trainer.update()
            times.append(time.perf_counter() - t0)
        per_traj = updates * int(cfg.train.batch_size)
        out = {"algo": algo, "s_median": statistics.median(times), "s_min": min(times), "s_max": max(times),
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "rss_rise_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss0,
               **{k: v / per_traj for k, v in counter.rows.items()}}
        if torch.cuda.is_available():
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        return out


def table(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "",
             "| algorithm | s / update (median) | min–max | peak RSS (MB) | RSS rise (MB) "
             "| v_θ evals / traj (no-grad + grad) | v_base evals / traj |",
             "|---|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        if "skipped" in r:
            notes.append(f"* {r['algo']}: skipped, {r['skipped']}")
            continue
        lines.append(f"| {r['algo']} | {r['s_median']:.4f} | {r['s_min']:.4f}–{r['s_max']:.4f} "
                     f"| {r['peak_rss_mb']:.0f} | {r['rss_rise_mb']:.1f} "
                     f"| {r['v_nograd']:.4g} + {r['v_grad']:.4g} | {r['v_base']:.4g} |")
    return "\n".join(lines + ([""] + notes if notes else []))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m align.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--algos", default="", help="comma-separated (default: every align/conf/algo/*.yaml)")
    p.add_argument("--model", default="gmm")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--updates", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per benchmark process")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.batch_size=16 sampler.steps=10")
    args = p.parse_args(argv)

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(bench_one(args.child, args.model, args.overrides, args.warmup, args.updates)))
        return

    algos = [a for a in args.algos.split(",") if a] or algorithm_configs()
    rows = []
    for algo in algos:   # one process at a time
        cmd = [sys.executable, "-m", "align.bench", "--child", algo, "--model", args.model, "--warmup",
               str(args.warmup), "--updates", str(args.updates), "--threads", str(args.threads), *args.overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        try:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        except (IndexError, json.JSONDecodeError):
            err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"algo": algo, "skipped": f"failed (exit {proc.returncode}): {err[:200]}"})
    header = (f"model={args.model}, {args.updates} timed updates after {args.warmup} warm-up, "
              f"{args.threads} torch thread(s), overrides: {' '.join(args.overrides) or 'none'}")
    print(table(rows, header))


if __name__ == "__main__":
    main()
