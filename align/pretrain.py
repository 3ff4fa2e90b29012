"""``python -m align.pretrain model=digits [steps=3000] [seed=0] [out=<dir>]``: regenerate the shipped digits checkpoints.

1. A small CNN classifier on 80 % of scikit-learn's digits (the rest measures its accuracy), written to
   ``digits_classifier.safetensors``; it is the domain's feature extractor and the classifier reward.
2. The class-conditional SD3-architecture transformer, trained by rectified flow on all 1,797 digits:
   x_t = t x_1 + (1 − t) x_0 with the regression target x_1 − x_0 = v, which the network learns in SD3's
   convention u = −v = x_0 − x_1 at σ = 1 − t (τ = 1000σ); 10 % of the prompts are replaced by the null prompt
   so that classifier-free guidance works. An EMA of the weights is what is saved, with the learned prompt
   embeddings, to ``digits_flow.safetensors`` and its architecture and sample statistics to ``digits_flow.json``.
3. The check: 1,000 samples (100 per class, Euler ODE on the default grid, default guidance) are labelled by
   the classifier; the accuracy and the mean pixel value on a fixed seed are stored in the JSON and
   reproduced by ``tests/test_digits.py``.

Deterministic for a given seed and torch version, on one CPU thread; about 5 minutes.
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from typing import Any

import torch
from torch.nn import functional as F

from align.metrics.digits_classifier import CLASSIFIER_WEIGHTS, DIGIT_NAMES, NULL_INDEX, DigitClassifier
from align.models.digits import (FLOW_WEIGHTS, PROMPT_TOKENS, TRANSFORMER_CONFIG, DigitsFlow, PromptEmbedding,
                                 build_transformer, load_digits_data, to_image)
from align.models.flow_transformer import sigma_to_timestep
from samplers import euler_integrate, make_grid

DEFAULTS: dict[str, Any] = dict(model="digits", steps=3000, batch_size=128, lr=1e-3, ema=0.999, seed=0,
                                classifier_epochs=40, guidance_scale=2.0, grid="sd3", sample_steps=20,
                                prompt_dropout=0.1, out=None, stats_only=0)


def _shift(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random translation by up to one pixel (classifier augmentation)."""
    padded = F.pad(images, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2,), generator=gen).tolist()
    return padded[..., dy:dy + 8, dx:dx + 8]


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> tuple[DigitClassifier, float]:
    """Train on a fixed 80 % split; return the model and its accuracy on the held-out 20 %."""
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=gen)
    n_train = int(0.8 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    img = (x + 1.0) * 0.5                      # the real pixels /16, exactly in [0, 1]
    clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * math.ceil(n_train / 64))
    for _ in range(epochs):
        order = tr[torch.randperm(n_train, generator=gen)]
        for i in range(0, n_train, 64):
            idx = order[i:i + 64]
            xb = _shift(img[idx], gen)
            xb = (xb + 0.05 * torch.randn(xb.shape, generator=gen)).clamp(0, 1)
            loss = F.cross_entropy(clf(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    clf.eval()
    with torch.no_grad():
        acc = (clf(img[te]).argmax(1) == y[te]).float().mean().item()
    return clf.requires_grad_(False), acc


def train_flow(x: torch.Tensor, y: torch.Tensor, steps: int, batch_size: int, lr: float, ema_decay: float,
               prompt_dropout: float, seed: int) -> tuple[torch.nn.Module, PromptEmbedding]:
    """Rectified flow in SD3's convention; returns the EMA transformer and prompt embeddings."""
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 1)
    net = build_transformer(TRANSFORMER_CONFIG)
    emb = PromptEmbedding(PROMPT_TOKENS, TRANSFORMER_CONFIG["joint_attention_dim"],
                          TRANSFORMER_CONFIG["pooled_projection_dim"])
    params = list(net.parameters()) + list(emb.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    ema_net, ema_emb = copy.deepcopy(net).requires_grad_(False), copy.deepcopy(emb).requires_grad_(False)
    t0 = time.time()
    for step in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=gen)
        x1, labels = x[idx], y[idx].clone()
        labels[torch.rand(batch_size, generator=gen) < prompt_dropout] = NULL_INDEX
        x0 = torch.randn(x1.shape, generator=gen)
        t = torch.rand(batch_size, generator=gen)
        tb = t.reshape(-1, 1, 1, 1)
        xt = tb * x1 + (1 - tb) * x0
        sigma = 1.0 - t
        cond = emb(labels)
        u = net(hidden_states=xt, encoder_hidden_states=cond["encoder_hidden_states"],
                pooled_projections=cond["pooled_projections"], timestep=sigma_to_timestep(sigma),
                return_dict=False)[0]
        loss = F.mse_loss(u, x0 - x1)             # u = ε − x_data = −(x_1 − x_0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(ema_decay, (1 + step) / (10 + step))
            for src, dst in ((net, ema_net), (emb, ema_emb)):
                for p, q in zip(src.parameters(), dst.parameters()):
                    q.lerp_(p, 1 - d)
        if step % 250 == 0 or step == steps - 1:
            print(f"  flow step {step:5d}/{steps}  loss {loss.item():.4f}  {time.time() - t0:.0f}s", flush=True)
    return ema_net, ema_emb


@torch.no_grad()
def sample_stats(model: DigitsFlow, n_per_class: int, guidance_scale: float, grid: str, steps: int,
                 seed: int) -> dict[str, float]:
    """Classifier accuracy on n_per_class samples of each class and their mean pixel value in [0, 1]."""
    prompts = [DIGIT_NAMES[c] for c in range(10) for _ in range(n_per_class)]
    gen = torch.Generator().manual_seed(seed)
    x0 = model.sample_noise(len(prompts), gen)
    cond = model.encode(prompts)
    ts = make_grid(grid, steps)
    x1 = euler_integrate(lambda x, t: model.base_velocity(x, t, cond, guidance_scale), x0, ts, record=False)
    img = model.decode(x1)
    labels = torch.arange(10).repeat_interleave(n_per_class)
    acc = (model.classifier(img).argmax(1) == labels).float().mean().item()
    return {"accuracy": acc, "mean_pixel": img.mean().item(), "n": len(prompts), "seed": seed,
            "guidance_scale": guidance_scale, "grid": grid, "steps": steps}


def _parse(argv: list[str]) -> dict[str, Any]:
    opts = dict(DEFAULTS)
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"align.pretrain: expected key=value arguments, got {arg!r}; keys: {', '.join(opts)}")
        k, v = arg.split("=", 1)
        k = k.lstrip("-")
        if k not in opts:
            raise SystemExit(f"align.pretrain: unknown key {k!r}; valid keys: {', '.join(opts)}")
        opts[k] = v if opts[k] is None or isinstance(opts[k], str) else type(opts[k])(v)
    if opts["model"] != "digits":
        raise SystemExit(f"align.pretrain: only model=digits has a pretraining recipe here (got {opts['model']!r})")
    return opts


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import save_file

    opts = _parse(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    torch.manual_seed(opts["seed"])
    out = opts["out"] or os.path.dirname(FLOW_WEIGHTS)
    os.makedirs(out, exist_ok=True)
    flow_path = os.path.join(out, os.path.basename(FLOW_WEIGHTS))
    clf_path = os.path.join(out, os.path.basename(CLASSIFIER_WEIGHTS))
    x, y = load_digits_data()
    start = time.time()
    json_path = os.path.splitext(flow_path)[0] + ".json"
    if opts["stats_only"]:        # recompute the sample statistics of existing weights (e.g. another guidance)
        with open(json_path, encoding="utf-8") as fh:
            config = json.load(fh)
        config["pretraining"]["guidance_scale"] = opts["guidance_scale"]
        _check(config, json_path, flow_path, clf_path, opts, x, start)
        return

    clf, clf_acc = train_classifier(x, y, opts["classifier_epochs"], opts["seed"])
    save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, clf_path)
    t_clf = time.time() - start
    print(f"classifier: held-out accuracy on real digits {clf_acc:.4f} ({t_clf:.0f}s) -> {clf_path}", flush=True)

    net, emb = train_flow(x, y, opts["steps"], opts["batch_size"], opts["lr"], opts["ema"], opts["prompt_dropout"],
                          opts["seed"])
    state = {f"transformer.{k}": v.contiguous() for k, v in net.state_dict().items()}
    state.update({f"prompt_embedding.{k}": v.contiguous() for k, v in emb.state_dict().items()})
    save_file(state, flow_path)
    t_flow = time.time() - start - t_clf
    config: dict[str, Any] = {
        "transformer": TRANSFORMER_CONFIG, "prompt_tokens": PROMPT_TOKENS, "prompts": list(DIGIT_NAMES),
        "null_prompt": "", "data": "sklearn.datasets.load_digits, x = pixel/8 - 1 in [-1, 1]",
        "convention": "SD3: u = eps - x_data at sigma = 1 - t, timestep = 1000 sigma",
        "pretraining": {k: v for k, v in opts.items() if k not in ("out", "stats_only")} | {
            "classifier_heldout_accuracy": clf_acc, "classifier_seconds": round(t_clf, 1),
            "flow_seconds": round(t_flow, 1), "torch": torch.__version__},
    }
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    _check(config, json_path, flow_path, clf_path, opts, x, start)


def _check(config: dict[str, Any], json_path: str, flow_path: str, clf_path: str, opts: dict[str, Any],
           x: torch.Tensor, start: float) -> None:
    # The check, through the same loading path as the runner.
    model = DigitsFlow(weights=flow_path, classifier_weights=clf_path, guidance_scale=opts["guidance_scale"])
    stats = sample_stats(model, 100, opts["guidance_scale"], opts["grid"], opts["sample_steps"], seed=0)
    print(f"generated: classifier labels {stats['accuracy']:.4f} of {stats['n']} samples as the prompted class "
          f"(guidance {opts['guidance_scale']}, {opts['grid']} grid, {opts['sample_steps']} steps); "
          f"mean pixel {stats['mean_pixel']:.4f}", flush=True)
    for w in (1.0, 1.5, 3.0, 5.0):
        s = sample_stats(model, 20, w, opts["grid"], opts["sample_steps"], seed=1)
        print(f"  guidance {w}: accuracy {s['accuracy']:.3f} on 200 samples", flush=True)
    small = sample_stats(model, 4, opts["guidance_scale"], opts["grid"], opts["sample_steps"], seed=123)
    config["stats"] = {"generated_1000": stats, "test_fixture": small, "real_mean_pixel": to_image(x).mean().item(),
                       "decode": "softplus_k(z) - softplus_k(z - 1), z = (x + 1)/2, k = 50"}
    with open(json_path, "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2)
    if stats["accuracy"] < 0.9:
        print("WARNING: fewer than 90 % of generated samples are recognised; train longer (steps=...)", flush=True)
    print(f"done in {time.time() - start:.0f}s: {flow_path} ({os.path.getsize(flow_path) / 1e6:.2f} MB), "
          f"{json_path}, {clf_path} ({os.path.getsize(clf_path) / 1e6:.2f} MB)", flush=True)


if __name__ == "__main__":
    main()
