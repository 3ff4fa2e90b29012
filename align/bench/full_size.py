"""``python -m align.bench --random-weights``: what every algorithm costs on SD3 / SD3.5 / FLUX at full size.

    python -m align.bench --random-weights --model sd3 --device cuda [--quick]
    python -m align.bench --random-weights --model flux --resolutions 1024 --checkpointing on --decoders default
    python -m align.bench --random-weights --model sd3 --tiny --device cpu      # the same code, shrunk (CI)

The transformer is built from the published config shipped in align/bench/configs/ (SD3-medium, SD3.5-medium,
FLUX.1-dev) in bf16 with the run's LoRA, random weights; the text encoders are stood in for by random prompt
embeddings of the real shapes (they encode the prompt set once and are freed before training, so they take no
training memory); the decoders (TAESD3 / TAEF1 and the VAE) and the reward tower (aesthetic: CLIP ViT-L/14 and its
head, or with ``--reward hpsv2`` HPSv2's ViT-H-14) are built from their configs with random weights. Each row (algorithm × resolution × checkpointing ×
decoder; with ``--tiny`` all in this process, so CI pays for one start-up) runs in its own process at micro-batch 1 (``train.batch_size=1``; GRPO and NFT: one group,
``algo.group_size`` rows, the column ``batch``): ``--warmup`` updates, then
``--updates`` timed pairs of one update and one no-grad sampling of the same batch. Columns: peak CUDA memory
(``torch.cuda.max_memory_allocated``, GB = 1e9 B) beside experiments/memory_slice.py's estimate for the same
algorithm, decoder and checkpointing (``--estimate`` its ``--what all --json`` file per resolution), seconds per update, seconds per sampling, their ratio, and whether the
updates changed the LoRA. An out-of-memory row says OOM.

``--quick`` (SD3-medium, 512² and 1024², checkpointing on, the default decoder, every algorithm: 16 rows, 1 warm-up
+ 2 timed updates): about 5 minutes on one 80 GB GPU, estimated as follows. One SD3-medium transformer forward
is ≈ 2 · 2.0e9 parameters · tokens FLOPs, tokens = (res/16)² + 333 text tokens: 1357 at 1024² (≈ 11 TFLOP), 1357/4
+ 333 ≈ 590 at 512² (≈ 4.7 TFLOP). An update costs at most the 20-step CFG rollout (40 forwards) plus ≤ 20 states
trained with grad (forward + backward + the checkpointing recompute ≈ 4 forwards each, ×2 for CFG's
unconditional branch): ≤ 200 forwards; each timed update is followed by one sampling (40 forwards). So ≤ 3 · 240
= 720 forwards per row (≈ 8 PFLOP at 1024², 3.4 at 512²), at an assumed sustained 300 TFLOP/s in bf16 (H100;
≈ 150 on an A100, twice the time): ≤ 27 s per 1024² row and ≤ 11 s per 512² row; most algorithms train far fewer
states (ReFL 1, DRaFT-K 1, VGG-Flow 6, adjoint matching 10), so 8 × (27 + 11) ≈ 5 minutes is the upper end, plus
≈ 10 s per row to build the model.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any, Callable

QUICK = {"model": "sd3", "resolutions": "512,1024", "checkpointing": "on", "decoders": "default", "warmup": 1,
         "updates": 2}
TINY_OVERRIDES = ["sampler.steps=6", "eval.every=0"]   # 6 ≥ VGG-Flow's 5 bins
GB = 1e9      # as experiments/memory_slice.py
COLUMNS = [   # (header, cell over a measured row)
    ("peak CUDA memory (GB)", lambda r: f"{r['cuda_peak_mb'] * 2 ** 20 / GB:.2f}" if "cuda_peak_mb" in r
     else "n/a (CPU)"),
    ("memory_slice estimate (GB)", lambda r: f"{r['estimate_gb']:.1f}" if r.get("estimate_gb") else "—"),
    ("s / update", lambda r: f"{r['s_median']:.3f}"),
    ("s / sampling", lambda r: f"{r['sampling_s_median']:.3f}"),
    ("update ÷ sampling", lambda r: f"{r['ratio_median']:.2f}"),
    ("LoRA changed", lambda r: "yes" if r["params_changed"] else "NO"),
]
HEADER = ["algorithm", "model", "resolution", "checkpointing", "decoder", "batch"]


def settings(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows' settings other than the algorithm: resolution × checkpointing × decoder."""
    resolutions = [32] if args.tiny else [int(r) for r in args.resolutions.split(",") if r]
    return [{"resolution": r, "checkpointing": c, "decoder": d}
            for r in resolutions for c in args.checkpointing.split(",") if c
            for d in args.decoders.split(",") if d]


def micro_batch(algo: str, backend: str) -> int:
    """1, or the algorithm's group size (GRPO / NFT: the rows of a group share a prompt, an update needs one group)."""
    from align.setup.compose import compose_config

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_config([f"algo={algo}", f"model={backend}"], run_dir)
    return int(cfg.algo.get("group_size") or 1)


def row_overrides(model: str, s: dict[str, Any], tiny: bool) -> list[str]:
    """The Hydra overrides of one setting (the decoder's default name is the backend's tiny decoder)."""
    decoder = s["decoder"] if s["decoder"] == "vae" else ("taesd3" if model != "flux" else "taef1")
    out = [f"model.gradient_checkpointing={s['checkpointing'] == 'on'}", f"model.decoder={decoder}"]
    return out if tiny else out + [f"model.resolution={s['resolution']}"]


def load_estimates(paths: list[str]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """experiments/memory_slice.py's per-algorithm estimates (its ``--json`` files, ``--what all``) by (kind,
    resolution)."""
    import json

    out = {}
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        for kind in ("flux", "sd3"):
            if f"estimates_{kind}" in res:
                out[(kind, int(res["resolution"]))] = res[f"estimates_{kind}"]
    return out


def estimate_gb(estimates: dict[tuple[str, int], list[dict[str, Any]]], model: str, algo: str,
                s: dict[str, Any]) -> float | None:
    """The memory_slice estimate for a row: its algorithm's row (the default variant where it lists several; DRaFT:
    LV), decoder (the tiny decoder's is TAEF1's, which TAESD3 shares) and checkpointing; None when absent."""
    rows = estimates.get(("flux" if model == "flux" else "sd3", int(s["resolution"])), [])
    decoder = "vae" if s["decoder"] == "vae" else "taef1"
    named = [r for r in rows if r["algorithm"].split(" ")[0] == algo and r["decoder"] in (decoder, "—")]
    named.sort(key=lambda r: (r["algorithm"] != algo, "default" not in r["algorithm"], "LV" not in r["algorithm"]))
    if not named:
        return None
    return named[0]["ckpt" if s["checkpointing"] == "on" else "no_ckpt"]


def format_table(rows: list[dict[str, Any]]) -> str:
    """One Markdown table: a row per measurement; OOM and failed rows say so in every column."""
    lines = ["| " + " | ".join(HEADER + [h for h, _ in COLUMNS]) + " |", "|---" * (len(HEADER) + len(COLUMNS)) + "|"]
    for r in rows:
        if r.get("oom"):
            cells = ["OOM"] * len(COLUMNS)
        elif "skipped" in r:
            cells = [r["skipped"][:80]] + ["—"] * (len(COLUMNS) - 1)
        else:
            cells = [cell(r) for _, cell in COLUMNS]
        lines.append("| " + " | ".join([str(r[h]) for h in HEADER] + cells) + " |")
    return "\n".join(lines)


def option_problem(args: argparse.Namespace, models: dict[str, Any]) -> str | None:
    """What is wrong with the --random-weights options, before anything is built; None when nothing."""
    if args.model not in models:
        return f"--random-weights --model {args.model}: choose one of {', '.join(models)}"
    if args.reward not in ("aesthetic", "hpsv2"):
        return f"--random-weights --reward {args.reward}: choose aesthetic (CLIP ViT-L/14) or hpsv2 (ViT-H-14)"
    if not all(r.isdigit() for r in args.resolutions.split(",") if r):
        return f"--resolutions {args.resolutions}: expected pixels, e.g. 512,1024"
    if not set(args.checkpointing.split(",")) <= {"on", "off"}:
        return f"--checkpointing {args.checkpointing}: expected on, off or on,off"
    if not set(args.decoders.split(",")) <= {"default", "vae"}:
        return f"--decoders {args.decoders}: expected default, vae or default,vae"
    missing = [path for path in args.estimate if not os.path.isfile(path)]
    if missing:
        return (f"--estimate {missing[0]}: no such file; write it with `python experiments/memory_slice.py "
                "--what all --resolution R --json PATH`")
    return None


def run_full_size(p: argparse.ArgumentParser, args: argparse.Namespace, measure: Callable[..., dict[str, Any]],
                  all_algorithms: Callable[[], list[str]]) -> list[dict[str, Any]]:
    """Every row measured (``measure``: align.bench's, in its own process unless ``--tiny``), then the table (and
    ``--json``); no ``--algos``: ``all_algorithms()``."""
    import json

    import torch

    from align.bench.random_weights import MODELS, write_checkpoint

    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    problem = option_problem(args, MODELS)
    if problem:
        p.error(problem)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    algos = [a for a in args.algos.split(",") if a] or all_algorithms()
    backend = MODELS[args.model][0]
    batches = {algo: micro_batch(algo, backend) for algo in algos}
    estimates = load_estimates(args.estimate)
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        base = write_checkpoint(args.model, args.tiny, directory, args.reward) + [f"device={device}"]
        base += TINY_OVERRIDES if args.tiny else []
        for s in settings(args):
            for algo, batch in batches.items():
                row = measure(algo, backend, base + row_overrides(args.model, s, args.tiny)
                              + [f"train.batch_size={batch}", *args.overrides],
                              args.warmup, args.updates, args.threads, random_weights=True, in_process=args.tiny)
                rows.append({**row, "algorithm": algo, "model": args.model + (" (tiny)" if args.tiny else ""),
                             "batch": batch, "estimate_gb": estimate_gb(estimates, args.model, algo, s), **s})
    print(format_table(rows), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "tiny": args.tiny, "device": device, "rows": rows}, f, indent=1)
    return rows
