"""Evaluate and sample without training.

    python -m align.evaluate <run_dir> [--step N] [--samples K] [--out DIR]     a run's checkpoint (default: the
                                                                                 newest intact one)
    python -m align.evaluate model=… reward=… [overrides] [--samples K] [--out DIR]   the base model
    python -m align.evaluate <run_dir> --images [--out DIR]                     PNGs of a run's final samples

Both write what a run's evaluation writes, from the same parts (``align.setup.assemble.build_parts``), the same
``Evaluator`` and so the same fixed noise and prompts for the same seed and ``eval.*`` settings: the step-N
evaluation of a run equals its metrics.jsonl eval row at step N, and the base model's equals a run's step-0 row.
Into ``--out`` (default ``<run_dir>/evaluate/step_XXXXXXX/``, or ``evaluations/<date>-<time>_<model>_<reward>/``
for the base model): ``metrics.json`` ({"step", "eval/*"}), ``samples.png`` (the sample grid) and, with
``--samples K``, ``samples.pt`` in samples_final.pt's format ({"x1", "x0", "prompts"}: K samples from the final
samples' noise). It only reads the run directory: no lock, nothing written to its metrics.jsonl or checkpoints.

``--images`` decodes a finished run's samples_final.pt instead (no evaluation): its ``x1`` through the run's own
decoder (``model.decode``: for SD3 and FLUX the VAE or the tiny decoder of ``model.decoder``, with the latent
scaling and shift the diffusers pipeline applies), each image written as ``NNNNN.png`` (8 bits, as torchvision's
``save_image`` rounds) beside ``prompts.json`` (the prompt of each file, in order), into ``--out`` (default
``<run_dir>/evaluate/samples_final/``). It builds the model from config.yaml (so it needs the run's weights) but
loads no checkpoint: the decoder is frozen, the same at every step.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from align.setup.assemble import build_parts
from align.setup.checks import ConfigError, check_config, checked_config, read_saved_config, unwritable
from align.train.checkpoint import check_fits, state_file
from align.train.evaluation import Evaluator
from align.core.run_dir import CONFIG_FILE, FINISHED_FILE, list_checkpoints, read_config
from align.train.trainer import preview_order

METRICS_NAME, GRID_NAME, SAMPLES_NAME = "metrics.json", "samples.png", "samples.pt"
IMAGES_DIR, PROMPTS_NAME = "samples_final", "prompts.json"


class EvaluateError(ValueError):
    """A problem with the arguments, found before any work; the message says which."""


def evaluate(cfg: DictConfig, out: str, state: dict[str, Any] | None = None, samples: int = 0) -> dict[str, Any]:
    """Build ``cfg``'s parts, load the checkpoint ``state`` (None: the base model), evaluate as the trainer does
    and write metrics.json, samples.png and (``samples`` > 0) samples.pt into ``out``; returns the metrics row."""
    checked = checked_config(cfg, training=False)
    ev = checked.evaluation
    parts = build_parts(cfg, training=False, checked=checked)
    device = "cuda" if str(cfg.device) != "cpu" and torch.cuda.is_available() else "cpu"
    parts.model.to(device)
    for reward in (parts.reward, *parts.eval_rewards.values()):
        reward.to(device).requires_grad_(False).eval()
    step = 0
    if state is not None:
        step = int(state["step"])
        check_fits(parts.model.finetune_state_dict(), state["model"], "model", f"the checkpoint of step {step}")
        parts.model.load_finetune_state_dict(state["model"])
    evaluator = Evaluator(parts.model, parts.reward, parts.grid, parts.prompts, ev.n_samples, ev.group_size,
                          int(cfg.seed), batch_size=ev.batch_size, fid_reference=ev.fid_reference,
                          extra_rewards=parts.eval_rewards)
    metrics, x1 = evaluator()
    row = {"step": step, **metrics}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, METRICS_NAME), "w", encoding="utf-8") as fh:
        json.dump(row, fh, indent=1)
    grid = parts.model.preview_grid(x1[preview_order(evaluator.prompts)])
    if grid is not None:
        from torchvision.utils import save_image

        save_image(grid.float().clamp(0, 1).cpu(), os.path.join(out, GRID_NAME))
    if samples > 0:
        torch.save(evaluator.final_samples(samples), os.path.join(out, SAMPLES_NAME))
    return row


def load_run(run_dir: str, step: int | None) -> tuple[DictConfig, dict[str, Any]]:
    """A run's typed config.yaml (through the refusal pass, as for evaluation) and the state of its checkpoint
    ``step`` (None: the newest intact one), unpickled with weights_only=True; refused (EvaluateError or
    CheckpointError, naming the file) if it is not a checkpoint or config.yaml was edited since it was written."""
    from align.train.checkpoint import EVALUATE_KEYS, CheckpointError, check_same_config, load_latest, load_step

    cfg = run_config(run_dir)
    steps = list_checkpoints(run_dir)
    if step is None:
        loaded = load_latest(run_dir, needs=EVALUATE_KEYS)
        if loaded is None:
            raise EvaluateError(f"{run_dir} has no checkpoint yet")
        step, state = loaded
    elif step not in steps:
        raise EvaluateError(f"--step {step}: {run_dir} has no checkpoint of that step; it has "
                            f"{', '.join(map(str, steps)) or 'none'}")
    else:
        try:
            state = load_step(run_dir, step, needs=EVALUATE_KEYS)
        except CheckpointError as err:
            raise EvaluateError(f"--step {step}: {err}") from None
    check_same_config(state, read_config(run_dir), run_dir, state_file(run_dir, step))
    return cfg, state


def run_config(run_dir: str) -> DictConfig:
    """A run's config.yaml, typed and through the refusal pass as for evaluation; EvaluateError naming the file."""
    saved = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(saved):
        raise EvaluateError(f"{run_dir}: no {CONFIG_FILE} (is this a run directory?)")
    return check_config(OmegaConf.load(saved), training=False,
                        bad_value=lambda err: EvaluateError(f"{saved}: {err}")).cfg


def read_final_samples(run_dir: str) -> dict[str, Any]:
    """A run's samples_final.pt ({"x1", "x0", "prompts"}), unpickled with weights_only=True; EvaluateError naming
    the file if the run has none (not finished) or it is not in that format."""
    path = os.path.join(run_dir, FINISHED_FILE)
    if not os.path.isfile(path):
        raise EvaluateError(f"{path} does not exist: the run has not finished (resume it with `python -m align.run "
                            f"resume={run_dir}`), or use --samples K for samples of a checkpoint")
    try:
        samples = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means the same: not a samples file
        raise EvaluateError(f"{path} cannot be read ({type(err).__name__}); it is not a samples_final.pt") from None
    if not (isinstance(samples, dict) and isinstance(samples.get("x1"), torch.Tensor)
            and isinstance(samples.get("prompts"), list)):
        raise EvaluateError(f"{path} is not a samples_final.pt: it lacks the tensor 'x1' or the list 'prompts'")
    return samples


def _decoded_images(model: Any, x: torch.Tensor, name: str) -> torch.Tensor:
    """``model.decode(x)`` as [B, C, H, W] in [0, 1] on the CPU; EvaluateError if the model's decode gives no images
    (C of 1 or 3), as for the point clouds of gmm, whose decode is the identity."""
    images = model.decode(x).float()
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise EvaluateError(f"model={name} samples are not images (its decode gives shape {tuple(images.shape)}): "
                            "--images needs an image model (digits, sd3, flux)")
    return images.clamp(0, 1).cpu()


def write_images(cfg: DictConfig, samples: dict[str, Any], out: str) -> int:
    """Decode ``samples["x1"]`` with the model ``cfg`` builds (its ``decode``) and write NNNNN.png per sample and
    prompts.json into ``out``; returns the number of images. EvaluateError, before anything is written, if the
    model's samples are no images."""
    from torchvision.utils import save_image

    from align.setup.build import build_model

    model = build_model(cfg)
    device = "cuda" if str(cfg.device) != "cpu" and torch.cuda.is_available() else "cpu"
    model.to(device)
    x1 = samples["x1"]
    chunk = max(1, int(getattr(model, "decode_batch_size", 16)))
    with torch.no_grad():
        for start in range(0, x1.shape[0], chunk):
            images = _decoded_images(model, x1[start:start + chunk].to(device), str(cfg.model.name))
            os.makedirs(out, exist_ok=True)
            for i, image in enumerate(images, start):
                save_image(image, os.path.join(out, f"{i:05d}.png"))
    with open(os.path.join(out, PROMPTS_NAME), "w", encoding="utf-8") as fh:
        json.dump(list(samples["prompts"]), fh, indent=1)
    return int(x1.shape[0])


def _images(run_dir: str, given_out: str | None) -> tuple[int, str]:
    """``--images``: the checks (config, samples_final.pt, output folder) before any work, then ``write_images``."""
    _check_saved_config(run_dir)
    cfg = run_config(run_dir)
    samples = read_final_samples(run_dir)
    out = given_out or os.path.join(run_dir, "evaluate", IMAGES_DIR)
    _check_out(out, given_out, run_dir)
    return write_images(cfg, samples, out), out


def _base_config(overrides: list[str]) -> DictConfig:
    """``align.setup.compose.compose_config``'s config, checked as for evaluation (no algorithm runs: a black-box reward
    is not refused for the default one)."""
    from align.setup.compose import compose_config
    from align.setup.overrides import ConfigProblem

    try:
        return compose_config(list(overrides), training=False)
    except ConfigProblem as err:
        raise EvaluateError(str(err)) from None


def _is_run_dir(target: str) -> bool:
    """The first argument names a run directory: an existing folder (sweep runs' names hold '='), or no override."""
    return os.path.isdir(target) or "=" not in target


def _check_saved_config(run_dir: str) -> None:
    """EvaluateError naming the file (and the line of a YAML syntax error) if the run's config.yaml exists but is
    not a readable YAML mapping (``load_run`` reports a missing one)."""
    saved = os.path.join(run_dir, CONFIG_FILE)
    if os.path.isfile(saved):
        try:
            read_saved_config(saved)
        except ConfigError as err:
            raise EvaluateError(str(err)) from None


def _check_out(out: str, given: str | None, run_dir: str | None = None) -> None:
    """EvaluateError before any work if the output folder cannot be written; for a run's default one (inside the
    run directory, which evaluation otherwise only reads), say so and suggest ``--out``."""
    problem = unwritable(out)
    if problem is None:
        return
    if given is not None:
        raise EvaluateError(f"--out {out} {problem}; give a writable folder")
    why = ": align.evaluate only reads the run, but writes its results there by default" if run_dir else ""
    raise EvaluateError(f"{out} {problem}{why}; give --out <a writable folder>")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m align.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("target", nargs="*", help="a run directory, or key=value overrides (the base model)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest intact)")
    p.add_argument("--samples", type=int, default=0, help="also write K samples to samples.pt")
    p.add_argument("--images", action="store_true",
                   help="write the run's samples_final.pt as PNGs, decoded by its model (no evaluation)")
    p.add_argument("--out", default=None, help="output folder")
    a = p.parse_intermixed_args(argv)
    try:
        if a.samples < 0:
            raise EvaluateError(f"--samples must be >= 0, got {a.samples}")
        if a.images:
            return _images_main(a.target, a.step, a.samples, a.out)
        if a.target and _is_run_dir(a.target[0]):
            run_dir, *rest = a.target
            if rest:
                raise EvaluateError(f"a run is evaluated with its own config.yaml; drop {' '.join(rest)}")
            _check_saved_config(run_dir)
            cfg, state = load_run(run_dir, a.step)
            out = a.out or os.path.join(run_dir, "evaluate", f"step_{int(state['step']):07d}")
            _check_out(out, a.out, run_dir)
        else:
            if a.step is not None:
                raise EvaluateError("--step needs a run directory")
            cfg, state = _base_config(a.target), None
            out = a.out or os.path.join("evaluations",
                                        f"{datetime.now():%Y%m%d-%H%M%S}_{cfg.model.name}_{cfg.reward.name}")
            _check_out(out, a.out)
        row = evaluate(cfg, out, state, a.samples)
    except (EvaluateError, ConfigError, ValueError, OSError) as err:
        print(f"align.evaluate: {str(err).strip(chr(39) + chr(34))}", file=sys.stderr)
        return 2
    heldout = "".join(f", {k[len('eval/heldout/'):]} {v:.4g}" for k, v in row.items()
                      if k.startswith("eval/heldout/"))
    print(f"align.evaluate: step {row['step']}: eval reward {row['eval/reward']:.4g}, diversity "
          f"{row['eval/diversity']:.4g}, FID vs base {row['eval/fid']:.4g}{heldout}\n       written to {out}",
          flush=True)
    return 0


def _images_main(target: list[str], step: int | None, samples: int, out: str | None) -> int:
    """``--images``: refuse what it does not take, write the PNGs, say where."""
    if len(target) != 1 or not _is_run_dir(target[0]):
        raise EvaluateError("--images takes one run directory (it decodes that run's samples_final.pt)")
    if step is not None or samples:
        raise EvaluateError("--images decodes samples_final.pt, the final model's samples: drop --step / --samples "
                            "(for a checkpoint's samples, run --samples K without --images)")
    n, out = _images(target[0], out)
    print(f"align.evaluate: {n} images of {os.path.join(target[0], FINISHED_FILE)} written to {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
