"""``python -m align.bench``: cost of one update of every algorithm as a ratio to sampling, and its evaluations.

Each algorithm with a config in align/conf/algo/ runs in its own subprocess (so peak RSS is its own):
the Trainer is built from the composed config exactly as ``align.run`` builds it (model=gmm unless
``--model``), then ``--warmup`` and ``--updates`` timed pairs run: one ``Trainer.update``, then the no-grad
sampling of a batch of the same size (``train.batch_size`` fresh prompts and noise, the Euler ODE of the
current v_θ on the trainer's grid; not counted below). Prints one Markdown table per ``--vary`` value.

    python -m align.bench [--algos refl,draft] [--model gmm] [--updates 5] [--warmup 2]
                          [--vary train.batch_size=4,8,16] [--json PATH] [key=value ...]

Columns: median (min–max) wall seconds per update; the median sampling seconds; update ÷ sampling, the median
over the pairs of each pair's ratio (the figure to quote: absolute times are not comparable between
machines); peak RSS of the process and its rise over the RSS before the first update. Then evaluations per
trajectory per update (rows evaluated / batch size): the rollout's v_θ (+ v_base), all v_θ (no-grad + grad),
v_base outside v_θ (a backend's v_θ = v_base + residual is one v_θ evaluation), reward (plain + gradient).
A trained state is a row of v_θ evaluated with grad that the update's backward reaches (rows differentiated
only inside the algorithm, e.g. the costate sweep's products in x, are not); per trained state: the velocity
evaluations (v_θ + v_base) outside the rollout and the reward-gradient evaluations. Rows as align/train/compute.py
defines them (a CFG-combined v_θ is one row); unlike a run's ``compute/*`` keys, the trainer's scoring of r(x_1)
for its log is counted here (it is part of what an update costs in this benchmark).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from align.train.compute import KEYS, VELOCITY, EvalCounter
from align.setup.compose import CONF_DIR, compose_config

SAMPLING_SEED = 12345   # the sampling's own stream: the updates draw what they would draw without it


def algorithm_configs() -> list[str]:
    return sorted(f[:-5] for f in os.listdir(os.path.join(CONF_DIR, "algo")) if f.endswith(".yaml"))


# ---- counting evaluations (align/train/compute.py's EvalCounter) ------------------------------------------------
def per_trajectory(counter: EvalCounter, n: int) -> dict[str, float]:
    """Rows per trajectory for ``n`` trajectories, and the evaluations outside the rollout per trained state."""
    rollout, update = counter.rows["rollout"], counter.rows["update"]

    def per_state(rows: int) -> float:
        return rows / counter.trained if counter.trained else math.nan

    return {**{k: (rollout[k] + update[k]) / n for k in KEYS},
            "rollout_v": (rollout["v_nograd"] + rollout["v_grad"]) / n, "rollout_v_base": rollout["v_base"] / n,
            "trained": counter.trained / n,
            "velocity_per_trained": per_state(sum(update[k] for k in VELOCITY)),
            "reward_grad_per_trained": per_state(update["reward_grad"])}


def sample_batch(trainer: Any, n: int, generator: Any) -> Any:
    """x_1 of ``n`` fresh prompts and noise draws: the no-grad Euler ODE of the current v_θ on the trainer's grid."""
    import torch

    from samplers import euler_integrate

    model, prompt_set = trainer.model, trainer.prompt_set
    prompts = [prompt_set[i] for i in torch.randint(len(prompt_set), (n,), generator=generator).tolist()]
    x0 = model.sample_noise(n, generator)
    with torch.no_grad():
        cond = model.encode(prompts)
        return euler_integrate(lambda x, t: model.velocity(x, t, cond), x0, trainer.ts, record=False)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def _seconds(fn, *args) -> float:
    import torch

    t0 = time.perf_counter()
    fn(*args)
    if torch.cuda.is_available():
        torch.cuda.synchronize()          # the sampling's kernels are asynchronous (an update ends in .item())
    return time.perf_counter() - t0


def trainable_state(trainer: Any) -> dict[str, Any]:
    """Copies of the model's trained parameters (the LoRA of a latent-image model)."""
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


def bench_one(algo: str, model: str, overrides: list[str], warmup: int, updates: int,
              sample: bool = True, track_params: bool = False) -> dict[str, Any]:
    """One row: times and evaluation counts of ``updates`` updates after ``warmup``; ``sample=False`` skips the
    sampling after each update (and its columns); ``track_params`` adds whether the updates changed the trained
    parameters."""
    import torch

    from align.core.registry import ALGORITHMS
    from align.setup.assemble import build_trainer

    try:
        ALGORITHMS.get(algo)
    except Exception as err:  # noqa: BLE001 — not written yet, or being edited
        return {"algo": algo, "skipped": f"not available ({type(err).__name__}: {str(err)[:120]})"}
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_config([f"algo={algo}", f"model={model}", "train.progress=false", *overrides], run_dir)
        trainer = build_trainer(cfg, run_dir)
        # its own counter over the trainer's (which pauses for the log's scoring of r(x_1); this one counts it)
        counter = EvalCounter(trainer.model, trainer.reward, trainer.algo, track_trained=True)
        batch, generator = int(cfg.train.batch_size), torch.Generator().manual_seed(SAMPLING_SEED)

        def sampling() -> float:
            with counter.paused():
                return _seconds(sample_batch, trainer, batch, generator)

        before = trainable_state(trainer) if track_params else None
        rss0 = _rss_mb()
        for _ in range(warmup):
            trainer.update()
            if sample:
                sampling()
        counter.reset()
        times, sampled = [], []
        for _ in range(updates):   # interleaved: update, sampling, update, sampling, ...
            times.append(_seconds(trainer.update))
            if sample:
                sampled.append(sampling())
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        out = {"algo": algo, "s_median": statistics.median(times), "s_min": min(times), "s_max": max(times),
               "peak_rss_mb": peak, "rss_rise_mb": peak - rss0, **per_trajectory(counter, updates * batch)}
        if sample:
            out.update(sampling_s_median=statistics.median(sampled),
                       ratio_median=statistics.median(u / s for u, s in zip(times, sampled)))
        if before is not None:
            after = trainable_state(trainer)
            out["params_changed"] = bool(before) and any(not torch.equal(before[k], after[k]) for k in before)
        if torch.cuda.is_available():
            out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2 ** 20
        return out


# ---- the table ---------------------------------------------------------------------------------------------
COLUMNS = [   # (header, cell as a format string over the row)
    ("s / update (median)", "{s_median:.4f}"), ("min–max", "{s_min:.4f}–{s_max:.4f}"),
    ("s / sampling (median)", "{sampling_s_median:.4f}"), ("update ÷ sampling", "{ratio_median:.2f}"),
    ("peak RSS (MB)", "{peak_rss_mb:.0f}"), ("RSS rise (MB)", "{rss_rise_mb:.1f}"),
    ("rollout v_θ (+ v_base) / traj", "{rollout_v:.4g} + {rollout_v_base:.4g}"),
    ("v_θ / traj (no-grad + grad)", "{v_nograd:.4g} + {v_grad:.4g}"), ("v_base / traj", "{v_base:.4g}"),
    ("reward / traj (plain + grad)", "{reward:.4g} + {reward_grad:.4g}"), ("trained states / traj", "{trained:.4g}"),
    ("velocity evals / trained state (update only)", "{velocity_per_trained:.3g}"),
    ("reward-grad evals / trained state", "{reward_grad_per_trained:.3g}"),
]


def table(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| algorithm | " + " | ".join(name for name, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    notes = []
    for r in rows:
        if "skipped" in r:
            notes.append(f"* {r['algo']}: skipped, {r['skipped']}")
        else:
            lines.append(f"| {r['algo']} | " + " | ".join(cell.format(**r) for _, cell in COLUMNS) + " |")
    return "\n".join(lines + ([""] + notes if notes else []))


# ---- the command line --------------------------------------------------------------------------------------
def parse_vary(text: str | None, overrides: list[str]) -> tuple[str | None, list[str]]:
    """``KEY=V1,V2,...`` → (KEY, [V1, V2, ...]); no ``--vary`` → (None, [])."""
    if text is None:
        return None, []
    key, _, values = text.partition("=")
    vals = [v for v in values.split(",") if v]
    if not key or not vals:
        raise ValueError(f"--vary {text!r}: expected KEY=V1,V2,... (e.g. train.batch_size=4,8,16)")
    if key in ("algo", "model"):
        raise ValueError(f"--vary {key}=...: use --algos / --model")
    if any(o.partition("=")[0] == key for o in overrides):
        raise ValueError(f"--vary {key}=... and the override {key}= both set {key}; give one")
    return key, vals


def measure(algo: str, model: str, overrides: list[str], warmup: int, updates: int, threads: int,
            random_weights: bool = False, in_process: bool = False) -> dict[str, Any]:
    """``bench_one`` in its own process (so its peak RSS is its own); a failure is a skipped row. ``in_process``:
    in this process instead (``--random-weights --tiny``: no process start-up per row; its memory is not a row's)."""
    if in_process:
        child = argparse.Namespace(child=algo, model=model, overrides=overrides, warmup=warmup, updates=updates,
                                   random_weights=random_weights)
        try:
            return child_row(child)
        except Exception as err:   # as a child's failure: a skipped row naming it
            return {"algo": algo, "skipped": f"failed: {type(err).__name__}: {str(err)[:200]}"}
    cmd = [sys.executable, "-m", "align.bench", "--child", algo, "--model", model, "--warmup", str(warmup),
           "--updates", str(updates), "--threads", str(threads), *(["--random-weights"] if random_weights else []),
           *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"algo": algo, "skipped": f"failed (exit {proc.returncode}): {err[:200]}"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m align.bench", description=__doc__.split("\n\n")[0],
        epilog="Full size on a GPU, no weights download (random weights from the published configs; random prompt "
               "embeddings of the real shapes stand in for the text encoders, which are freed before training): "
               "python -m align.bench --random-weights --model sd3|sd35|flux --device cuda [--quick] "
               "[--resolutions 512,1024] [--checkpointing on,off] [--decoders default,vae] "
               "[--estimate memory_slice.json]; --tiny: the same code shrunk, on CPU.")
    p.add_argument("--algos", default="", help="comma-separated (default: every align/conf/algo/*.yaml)")
    p.add_argument("--model", default="gmm")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--updates", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per benchmark process")
    p.add_argument("--vary", default=None, metavar="KEY=V1,V2,...",
                   help="repeat the measurement for each value of KEY (one table per value)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows to PATH")
    p.add_argument("--random-weights", action="store_true",
                   help="SD3 / SD3.5 / FLUX at their published sizes with random weights, no download (--model "
                        "sd3 | sd35 | flux): see align/bench/full_size.py")
    p.add_argument("--tiny", action="store_true", help="with --random-weights: every config shrunk (CPU, CI)")
    p.add_argument("--quick", action="store_true",
                   help="with --random-weights: SD3-medium, 512² and 1024², checkpointing on, every algorithm")
    p.add_argument("--resolutions", default="512,1024", help="with --random-weights: comma-separated pixels")
    p.add_argument("--checkpointing", default="on,off", help="with --random-weights: on, off or on,off")
    p.add_argument("--decoders", default="default,vae", help="with --random-weights: default (the tiny decoder), vae")
    p.add_argument("--estimate", action="append", default=[], metavar="JSON",
                   help="with --random-weights: experiments/memory_slice.py --what all --json output (one per "
                        "resolution), shown beside the measured memory")
    p.add_argument("--reward", default="aesthetic",
                   help="with --random-weights: aesthetic (CLIP ViT-L/14 + head) or hpsv2 (ViT-H-14), random weights")
    p.add_argument("--device", default=None, help="with --random-weights: cuda (default when available) or cpu")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. train.batch_size=16 sampler.steps=10")
    args = p.parse_args(argv)

    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child_row(args)))
        return
    if args.random_weights:
        return random_weights_table(p, args)
    if args.tiny or args.quick or args.estimate:
        p.error("--tiny, --quick and --estimate go with --random-weights")

    from align.setup.overrides import ConfigProblem, check_overrides

    if args.warmup < 0 or args.updates < 1 or args.threads < 1:
        p.error(f"--warmup must be >= 0, --updates and --threads >= 1 (got {args.warmup}, {args.updates}, "
                f"{args.threads})")
    try:
        key, values = parse_vary(args.vary, args.overrides)
    except ValueError as err:
        p.error(str(err))
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: its directory does not exist")
    settings = [[f"{key}={v}"] for v in values] or [[]]
    algos = [a for a in args.algos.split(",") if a] or algorithm_configs()
    for setting in settings:   # every combination refused before any is measured
        for algo in algos:
            try:
                check_overrides([f"algo={algo}", f"model={args.model}", *args.overrides, *setting], CONF_DIR)
            except ConfigProblem as err:
                p.error(f"algo={algo} {' '.join(setting)}: {err}")

    tables = []
    for setting in settings:
        rows = [measure(algo, args.model, args.overrides + setting, args.warmup, args.updates, args.threads)
                for algo in algos]   # one process at a time
        header = (f"model={args.model}, {args.updates} timed updates after {args.warmup} warm-up, "
                  f"{args.threads} torch thread(s), overrides: {' '.join(args.overrides + setting) or 'none'}")
        print(table(rows, header) + "\n", flush=True)
        tables.append({"value": setting[0].partition("=")[2] if setting else None, "rows": rows})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "updates": args.updates, "warmup": args.warmup, "threads": args.threads,
                       "overrides": args.overrides, "vary": key, "tables": tables}, f, indent=1)


def child_row(args: argparse.Namespace) -> dict[str, Any]:
    """The child process's row: random-weight components when asked, an out-of-memory update a row saying so."""
    import torch

    if not args.random_weights:
        return bench_one(args.child, args.model, args.overrides, args.warmup, args.updates)
    from align.bench.random_weights import random_components

    try:
        with random_components():
            return bench_one(args.child, args.model, args.overrides, args.warmup, args.updates, track_params=True)
    except torch.cuda.OutOfMemoryError:
        return {"algo": args.child, "oom": True}


def random_weights_table(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--random-weights``: align/bench/full_size.py."""
    from align.bench.full_size import run_full_size

    run_full_size(p, args, measure, algorithm_configs)
