"""eval.rewards: held-out rewards scored on the evaluation samples beside the trained one (eval/heldout/<label>),
equal to the reward computed independently on the evaluator's samples at step 0 (the base) and later, also from
align.evaluate and with two processes; checked up front (domain, keys, labels); a two-update training on digits and
on the tiny SD3 with reward=mix and eval.rewards."""
import json
import os

import pytest
import torch
from omegaconf import open_dict

from align.setup.checks import ConfigError
from align.setup.overrides import ConfigProblem, check_overrides
from align.setup.compose import CONF_DIR, compose_config
from align.core.run_dir import BOOKKEEPING, read_metrics

HELD_OUT = "eval.rewards=[{name: digits_classifier}, {name: digits_correct, label: correct}]"
DIGITS = ["algo=refl", "reward=digits_thickness", HELD_OUT, "sampler.steps=4", "train.steps=2", "train.batch_size=2",
          "train.lr=1e-2", "eval.every=1", "eval.n_samples=6", "eval.group_size=2", "eval.batch_size=4",
          "eval.final_samples=2", "train.progress=false", "device=cpu"]


def _independent(images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """The two held-out rewards on decoded ``images`` by hand: log-softmax of the classifier at the prompted class,
    and the fraction of argmax hits (a fresh classifier, one batch: no chunking)."""
    from align.metrics.digits_classifier import load_digit_classifier, prompts_to_classes

    clf = load_digit_classifier()
    labels = prompts_to_classes(prompts)
    with torch.no_grad():
        logits = clf(images)
    logp = torch.log_softmax(logits, dim=1)[torch.arange(len(labels)), labels]
    return {"eval/heldout/digits_classifier": logp.mean().item(),
            "eval/heldout/correct": (logits.argmax(1) == labels).float().mean().item()}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from align.setup.assemble import build_trainer

    run_dir = str(tmp_path_factory.mktemp("heldout") / "run")
    trainer = build_trainer(compose_config(DIGITS, run_dir=run_dir), run_dir)
    before = [p.detach().clone() for p in trainer.model.trainable_parameters()]
    trainer.train()
    return trainer, run_dir, before


def test_held_out_rewards_equal_the_rewards_computed_on_the_evaluators_samples(digits_run):
    trainer, run_dir, before = digits_run
    rows = {r["step"]: r for r in read_metrics(run_dir) if "eval/reward" in r}
    assert sorted(rows) == [0, 1, 2]
    ev, model = trainer.evaluator, trainer.model
    moved = sum((p.detach() - b).abs().sum().item() for p, b in zip(model.trainable_parameters(), before))
    assert moved > 0                                        # steps 0 and 2 evaluate different models
    base = model.decode(ev.sample(model.base_velocity)).float()     # step 0 is the base model
    final = model.decode(ev.sample(model.velocity)).float()         # the trained model (step 2)
    for step, x in ((0, base), (2, final)):
        # the evaluator scores 4-row chunks, the reference one batch of 6: fp32 rounding of the mean only
        for key, value in _independent(x, ev.prompts).items():
            assert rows[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)
    assert rows[0]["eval/heldout/digits_classifier"] != rows[2]["eval/heldout/digits_classifier"]
    assert not any(k.startswith("eval/reward/") for k in rows[0])      # not a mix: no per-part columns


def test_align_evaluate_reports_them_for_the_base_and_a_checkpoint(digits_run, tmp_path):
    from align.evaluate import main as evaluate_main

    _, run_dir, _ = digits_run
    rows = {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")}
            for r in read_metrics(run_dir) if "eval/reward" in r}
    assert evaluate_main([run_dir, "--out", str(tmp_path / "ckpt")]) == 0
    with open(tmp_path / "ckpt" / "metrics.json", encoding="utf-8") as fh:
        assert {k: v for k, v in json.load(fh).items() if k != "step"} == rows[2]       # the same figures, exactly
    assert evaluate_main(DIGITS + ["--out", str(tmp_path / "base")]) == 0
    with open(tmp_path / "base" / "metrics.json", encoding="utf-8") as fh:
        assert {k: v for k, v in json.load(fh).items() if k != "step"} == rows[0]


def test_align_evaluate_scores_a_black_box_trained_reward_of_the_base_model(tmp_path):
    """No algorithm runs in align.evaluate: a black-box reward is not refused for the default (first-order) one."""
    from align.evaluate import main as evaluate_main

    args = ["algo=refl", "reward=digits_correct", "sampler.steps=4", "eval.n_samples=4", "eval.group_size=2", "device=cpu"]
    with pytest.raises(ConfigProblem, match="not differentiable"):
        check_overrides(args, CONF_DIR)
    assert evaluate_main(args + ["--out", str(tmp_path / "e")]) == 0


@pytest.mark.parametrize("entries, needle", [
    ("[{name: linear}]", "eval.rewards[0]: reward linear scores the 'gmm' domain but model=digits"),
    ("[{name: digits_classifier}, {name: digits_classifier, target: three}]",
     "eval.rewards[0] and eval.rewards[1] are both labelled 'digits_classifier'"),
    ("[{name: digits_classifier, targt: three}]", "eval.rewards[0]: reward digits_classifier has no key 'targt'"),
    ("[{name: digits_classifier, weight: 1.0}]", "eval.rewards[0].weight: a held-out reward has no weight"),
    ("[{name: nope}]", "eval.rewards[0].name=nope is not a reward; valid choices: "),
    ("[{label: x}]", "eval.rewards[0] must be a mapping with a reward's name"),
    ("[digits_classifier]", "bad value for eval.rewards: it is a list of mappings"),
    ("[{name: mix, parts: []}]", "eval.rewards[0].name=mix: a mix cannot hold a mix"),
])
def test_bad_held_out_rewards_are_refused_before_any_work(entries, needle):
    with pytest.raises(ConfigProblem) as err:
        check_overrides(["algo=refl", "reward=digits_thickness", f"eval.rewards={entries}"], CONF_DIR)
    assert needle in str(err.value) and len(str(err.value).splitlines()) == 1, str(err.value)


def test_build_trainer_checks_them_and_a_black_box_held_out_reward_is_fine(tmp_path):
    from align.setup.assemble import build_trainer

    run_dir = str(tmp_path / "run")
    # a held-out reward is never differentiated: a black-box one beside a first-order algorithm is accepted
    assert check_overrides(["algo=refl", "reward=digits_thickness", "eval.rewards=[{name: digits_correct}]"],
                           CONF_DIR)[-1] == "model=digits"
    cfg = compose_config(["algo=refl", "reward=digits_thickness", "train.steps=1", "device=cpu"], run_dir=run_dir)
    with open_dict(cfg):
        cfg.eval.rewards = [{"name": "quadratic"}]
    with pytest.raises(ConfigError, match="reward quadratic scores the 'gmm' domain but model=digits"):
        build_trainer(cfg, run_dir)
    assert not os.path.exists(run_dir)


def test_a_held_out_callable_with_a_bad_output_stops_before_sampling(tmp_path):
    from align.setup.assemble import build_trainer

    bad = tmp_path / "bad.py"
    bad.write_text("def r(images, prompts):\n    return [1.0]\n")
    run_dir = str(tmp_path / "run")
    cfg = compose_config(["algo=refl", "reward=digits_thickness", f"eval.rewards=[{{name: callable, target: '{bad}:r'}}]",
                          "train.steps=1", "device=cpu"], run_dir=run_dir)
    with pytest.raises(ValueError, match=r"returned shape \(1,\) for 2 images"):
        build_trainer(cfg, run_dir)
    assert not os.path.exists(run_dir)


def test_they_are_not_bookkeeping_keys():
    """A different eval.rewards is a different run (compared on re-run, part of a sweep's group and name)."""
    assert not [k for k in BOOKKEEPING if k.startswith("eval.rewards")]


# ---- two processes ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_give_the_one_process_figures_bitwise(two_process_probe):
    """The shared probe run (tests/helpers/torchrun.py PROBE): VGG-Flow on a mix (quadratic + linear) with two
    held-out rewards, evaluated at steps 0, 1 and 2 by two processes (40 rows in chunks of 32: one chunk each); one
    process re-evaluating the checkpoint and the base model gets the same mix parts and held-out figures exactly."""
    from helpers.dist_worker import BASE
    from helpers.torchrun import PROBE

    from align.evaluate import main as evaluate_main

    tmp, run, _ = two_process_probe
    rows = {r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")}
            for r in read_metrics(str(run)) if "eval/reward" in r}
    assert sorted(rows) == [0, 1, 2] and rows[0] != rows[2]
    columns = {"eval/reward/linear", "eval/reward/quadratic", "eval/heldout/gmm_region", "eval/heldout/q01"}
    assert columns <= set(rows[2])
    for argv, step in (([str(run)], 2), (BASE + PROBE + ["train.steps=2"], 0)):
        out = tmp / f"heldout_one{step}"
        assert evaluate_main(argv + ["--out", str(out)]) == 0
        with open(out / "metrics.json", encoding="utf-8") as fh:
            one = json.load(fh)
        assert {k: one[k] for k in columns} == {k: rows[step][k] for k in columns}, step


def _pil_jpeg_bytes(image: torch.Tensor) -> int:
    """DDPO's conversion and PIL's encoder at quality 95, in numpy (not the reward's code)."""
    import io

    import numpy as np
    from PIL import Image

    array = np.clip(np.rint(image.numpy().astype(np.float64) * 255), 0, 255).astype(np.uint8).transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return len(buf.getvalue())


# ---- the tiny SD3 ----------------------------------------------------------------------------------------------
def test_mix_and_held_out_rewards_train_two_updates_on_the_tiny_sd3(tmp_path):
    """ReFL on the tiny SD3 with a mix of the tiny aesthetic and PickScore rewards, HPSv2 and JPEG compressibility
    held out: every column is logged at steps 0 and 2; JPEG's equals PIL's sizes on the evaluator's images."""
    from helpers.tiny_clip import write_aesthetic_head, write_tiny_hf_clip, write_tiny_open_clip
    from helpers.tiny_sd3 import RESOLUTION, build_tiny_sd3

    from align.setup.assemble import build_trainer

    sd3 = build_tiny_sd3(str(tmp_path / "sd3"), t5=False)
    l14 = write_tiny_open_clip(tmp_path / "clip", name="h3-tiny-l14", seed=1, quick_gelu=True)
    hps = write_tiny_open_clip(tmp_path / "clip", name="h3-tiny-h14", seed=2, wrap_state_dict=True)
    head = write_aesthetic_head(tmp_path / "clip" / "head.pth")
    pick = write_tiny_hf_clip(tmp_path / "pick")
    parts = (f"reward.parts=[{{name: aesthetic, weight: 1.0, clip_model: '{l14[0]}', clip_weights: '{l14[1]}', "
             f"head_weights: '{head}'}}, {{name: pickscore, weight: 0.1, model: '{pick}', processor: '{pick}'}}]")
    held = (f"eval.rewards=[{{name: hpsv2, clip_model: '{hps[0]}', weights: '{hps[1]}'}}, "
            "{name: jpeg_compressibility, label: jpeg}]")
    run_dir = str(tmp_path / "run")
    cfg = compose_config(["algo=refl", "model=sd3", "reward=mix", parts, held, f"model.pretrained={sd3}",
                          "model.dtype=float32", f"model.resolution={RESOLUTION}", "model.decoder=vae",
                          "model.t5=false", "model.features.kind=pixels", "prompts=hpdv2", "sampler.steps=4",
                          "train.steps=2", "train.batch_size=2", "train.progress=false", "eval.every=0",
                          "eval.n_samples=4", "eval.group_size=2", "eval.final_samples=2", "device=cpu"],
                         run_dir=run_dir)
    trainer = build_trainer(cfg, run_dir)
    trainer.train()
    rows = {r["step"]: r for r in read_metrics(run_dir) if "eval/reward" in r}
    assert sorted(rows) == [0, 2]
    keys = ["eval/reward/aesthetic", "eval/reward/pickscore", "eval/heldout/hpsv2", "eval/heldout/jpeg"]
    for r in rows.values():
        assert all(k in r and torch.isfinite(torch.tensor(r[k])) for k in keys)
        # Σ w_i · mean(r_i) = mean(Σ w_i r_i), fp32 rounding of 4-sample means
        assert r["eval/reward"] == pytest.approx(r["eval/reward/aesthetic"] + 0.1 * r["eval/reward/pickscore"],
                                                 rel=1e-5, abs=1e-6)
    images = trainer.model.decode(trainer.evaluator.sample(trainer.model.velocity)).float()
    by_pil = sum(-_pil_jpeg_bytes(im) / 1000 for im in images) / len(images)
    assert rows[2]["eval/heldout/jpeg"] == pytest.approx(by_pil, rel=1e-6)     # fp32 of kB sizes
