"""A finished tiny SD3 / FLUX run's samples_final.pt, checked against diffusers itself (CPU, offline).

The regeneration snippets of docs/sd3.md and docs/flux.md ("Regenerating a run's samples with diffusers") are
executed as written (only their settings line points at the tiny run, on the CPU in float32): the plain pipeline
with the run's exported LoRA and samples_final.pt's noise gives samples_final.pt's latents. ``align.evaluate
<run_dir> --images`` writes PNGs whose pixels are diffusers' own ``AutoencoderKL`` decode of the saved latents,
rounded to 8 bits (to float32's precision); and it refuses what it cannot do in one line, exit 2, before any work.
"""
from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from align.core.run_dir import CONFIG_FILE
from helpers.cli import run_main
from helpers.tiny_sd3 import RESOLUTION, build_tiny_sd3, tiny_reward_registered
from helpers.tiny_flux import build_tiny_flux

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
SECTION = "## Regenerating a run's samples with diffusers"
SETTINGS_LINE = re.compile(r"^run, device, dtype = .*$", re.M)
FINAL_SAMPLES = 3


@pytest.fixture(scope="module")
def tiny_reward():
    with tiny_reward_registered() as name:
        yield name


def _train_tiny_run(run_dir: str, model: str, pretrained: str, reward: str, extra: list[str]) -> str:
    """Two ReFL updates on a tiny checkpoint through the real trainer, with a final export and samples_final.pt."""
    from omegaconf import open_dict

    from align.setup.assemble import build_trainer
    from align.setup.compose import compose_config

    overrides = ["algo=refl", f"model={model}", "reward=aesthetic", f"model.pretrained={pretrained}",
                 "model.dtype=float32", f"model.resolution={RESOLUTION}", "model.decoder=vae",
                 "model.features.kind=pixels", "prompts=hpdv2", "sampler.steps=4", "train.steps=2",
                 "train.batch_size=2", "train.lr=3e-2", "train.progress=false", "eval.every=0", "eval.n_samples=4",
                 "eval.group_size=2", f"eval.final_samples={FINAL_SAMPLES}", "device=cpu", *extra]
    cfg = compose_config(overrides, run_dir=run_dir)
    with open_dict(cfg):
        cfg.reward = {"name": reward}
    build_trainer(cfg, run_dir).train()
    return run_dir


def _tiny_backend_run(tmp_path_factory, backend: str, build, tiny_reward) -> tuple[str, str]:
    """A tiny diffusers folder of ``backend`` (built by ``build``) and a short run trained on it."""
    folder = build(str(tmp_path_factory.mktemp(backend)))
    run_dir = _train_tiny_run(str(tmp_path_factory.mktemp(f"{backend}_run") / "run"), backend, folder, tiny_reward,
                              ["model.max_sequence_length=16"])
    return folder, run_dir


@pytest.fixture(scope="module")
def sd3_run(tmp_path_factory, tiny_reward) -> tuple[str, str]:
    return _tiny_backend_run(tmp_path_factory, "sd3", build_tiny_sd3, tiny_reward)


@pytest.fixture(scope="module")
def flux_run(tmp_path_factory, tiny_reward) -> tuple[str, str]:
    return _tiny_backend_run(tmp_path_factory, "flux", build_tiny_flux, tiny_reward)


def _doc_snippet(doc: str) -> str:
    """The python block of the doc's regeneration section."""
    with open(os.path.join(DOCS, doc), encoding="utf-8") as fh:
        text = fh.read()
    assert text.count(SECTION) == 1, f"docs/{doc} lacks the section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, f"docs/{doc} {SECTION!r}: expected one python block, found {len(blocks)}"
    return blocks[0]


def _run_snippet(doc: str, run_dir: str) -> dict:
    """Execute the doc's block as written, its settings line pointed at ``run_dir`` on the CPU in float32."""
    code = _doc_snippet(doc)
    assert len(SETTINGS_LINE.findall(code)) == 1, f"docs/{doc}: the block's settings line changed"
    code = SETTINGS_LINE.sub(f"run, device, dtype = {run_dir!r}, 'cpu', torch.float32", code)
    namespace: dict = {}
    with torch.no_grad():
        exec(compile(code, f"docs/{doc}", "exec"), namespace)   # noqa: S102 - the documented snippet itself
    return namespace


def _final_samples(run_dir: str) -> dict:
    return torch.load(os.path.join(run_dir, "samples_final.pt"), weights_only=True)


@pytest.mark.parametrize("doc, run", [("sd3.md", "sd3_run"), ("flux.md", "flux_run")])
def test_docs_snippet_regenerates_the_final_samples_with_the_exported_lora(doc, run, request):
    """The documented block, run on the tiny run: its x1 is samples_final.pt's (≤ 1e-5), and the LoRA mattered
    (the same pipeline without it is farther off than that)."""
    _, run_dir = request.getfixturevalue(run)
    ns = _run_snippet(doc, run_dir)
    saved = _final_samples(run_dir)["x1"][:4]
    assert ns["x1"].shape == saved.shape == (FINAL_SAMPLES, 16, RESOLUTION // 8, RESOLUTION // 8)
    assert (ns["x1"].float() - saved).abs().max() <= 1e-5
    pipe = ns["pipe"]
    pipe.unload_lora_weights()
    kw = dict(num_inference_steps=4, height=RESOLUTION, width=RESOLUTION, max_sequence_length=16,
              output_type="latent")
    prompts, x0 = _final_samples(run_dir)["prompts"], _final_samples(run_dir)["x0"]
    with torch.no_grad():
        if doc == "flux.md":
            from align.models.flux import pack_latents, unpack_latents

            base = unpack_latents(pipe(prompts, latents=pack_latents(x0), **kw).images,
                                  RESOLUTION // 8, RESOLUTION // 8)
        else:
            base = pipe(prompts, latents=x0, **kw).images
    assert (base - saved).abs().max() > 1e-3


def _read_png(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def _vae_levels(checkpoint: str, latents: torch.Tensor) -> np.ndarray:
    """diffusers' AutoencoderKL decode of the latents as its pipelines do (÷ scaling + shift, [−1, 1] → [0, 1]),
    on the 8-bit scale before rounding ([N, H, W, 3], float64 values in [0, 255])."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(checkpoint, subfolder="vae").eval()
    with torch.no_grad():
        images = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    unit = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).double().numpy()
    return unit * 255


# Two float32 decodes of the same latents (ours chunked by decode_batch_size, this one in one batch; different
# kernels and summation orders) agree to a few ulps: seen 1 ulp, 1.5e-5 on the 8-bit scale. 255·1e-4 allows ~200
# ulps at 0.5 and stays 40× below one level, so a pixel may round the other way only where diffusers' value lies
# within 0.026 of a half level; a decode off by a level, a truncating quantisation or another scaling still fails.
DECODE_SLACK = 255 * 1e-4


@pytest.mark.parametrize("run", ["sd3_run", "flux_run"])
def test_images_writes_pngs_of_the_vae_decode_of_the_saved_latents(run, request, tmp_path):
    from align.evaluate import main

    checkpoint, run_dir = request.getfixturevalue(run)
    out = str(tmp_path / "png")
    result = run_main(main, [run_dir, "--images", "--out", out])
    assert result.returncode == 0, result.stderr
    assert f"{FINAL_SAMPLES} images" in result.stdout and out in result.stdout
    saved = _final_samples(run_dir)
    names = sorted(n for n in os.listdir(out) if n.endswith(".png"))
    assert names == [f"{i:05d}.png" for i in range(FINAL_SAMPLES)]
    written = np.stack([_read_png(os.path.join(out, n)) for n in names])
    levels = _vae_levels(checkpoint, saved["x1"])
    assert written.shape == levels.shape == (FINAL_SAMPLES, RESOLUTION, RESOLUTION, 3)
    off = np.abs(written - levels).max()
    assert off <= 0.5 + DECODE_SLACK, f"a pixel is {off:.4f} levels from diffusers' decode (rounding: ≤ 0.5)"
    assert written.std() > 0
    with open(os.path.join(out, "prompts.json"), encoding="utf-8") as fh:
        assert json.load(fh) == saved["prompts"]


def test_images_default_folder_is_inside_the_run(sd3_run, tmp_path):
    from align.evaluate import main

    _, run_dir = sd3_run
    copy = str(tmp_path / "run")
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    result = run_main(main, [copy, "--images"])
    assert result.returncode == 0, result.stderr
    folder = os.path.join(copy, "evaluate", "samples_final")
    assert sorted(os.listdir(folder)) == ["00000.png", "00001.png", "00002.png", "prompts.json"]


def _refusal(argv: list[str]) -> str:
    from align.evaluate import main

    result = run_main(main, argv)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("align.evaluate: ") and "Traceback" not in result.stderr
    return lines[0]


def test_images_of_an_unfinished_run_is_refused_naming_the_file(sd3_run, tmp_path):
    _, run_dir = sd3_run
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(os.path.join(run_dir, CONFIG_FILE), unfinished / CONFIG_FILE)
    line = _refusal([str(unfinished), "--images", "--out", str(tmp_path / "out")])
    assert "samples_final.pt does not exist" in line and "resume=" in line
    assert not (tmp_path / "out").exists()


def test_images_refuses_step_samples_and_overrides(sd3_run):
    _, run_dir = sd3_run
    assert "drop --step" in _refusal([run_dir, "--images", "--step", "2"])
    assert "drop --step / --samples" in _refusal([run_dir, "--images", "--samples", "2"])
    assert "one run directory" in _refusal(["model=sd3", "--images"])


def test_images_of_a_model_without_images_is_refused(tmp_path):
    from align.run import main as run

    run_dir = str(tmp_path / "gmm")
    result = run_main(run, ["model=gmm", "reward=linear", "algo=refl", f"run_dir={run_dir}", "train.steps=1",
                            "train.batch_size=4", "eval.every=0", "eval.n_samples=8", "eval.final_samples=4",
                            "train.progress=false", "sampler.steps=4"])
    assert result.returncode == 0, result.stderr
    line = _refusal([run_dir, "--images", "--out", str(tmp_path / "out")])
    assert "model=gmm samples are not images" in line and "digits, sd3, flux" in line
    assert not (tmp_path / "out").exists()


def test_pack_and_unpack_are_the_flux_pipelines_at_full_size():
    """The public pack_latents / unpack_latents at FLUX.1's 1024² latents (16 × 128 × 128) and a non-square
    720 × 1024 one equal FluxPipeline's own _pack_latents / _unpack_latents (VAE factor 8)."""
    from diffusers import FluxPipeline

    from align.models.flux import pack_latents, unpack_latents

    for h, w in ((128, 128), (90, 128)):
        x = torch.randn(2, 16, h, w, generator=torch.Generator().manual_seed(h))
        tokens = FluxPipeline._pack_latents(x, 2, 16, h, w)
        assert tokens.shape == (2, (h // 2) * (w // 2), 64)
        assert torch.equal(pack_latents(x), tokens)
        assert torch.equal(unpack_latents(tokens, h, w), FluxPipeline._unpack_latents(tokens, h * 8, w * 8, 8))
