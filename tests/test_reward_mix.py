"""reward=mix: Σ w_i r_i equals the parts computed separately; per-part values and the evaluator's per-part
metrics; the domain and differentiability rules; bad parts refused up front; a two-update training on digits."""
import pytest
import torch

from align.setup.build import _kwargs
from align.setup.overrides import ConfigProblem, check_overrides
from align.setup.compose import CONF_DIR, compose_config
from align.core.registry import REWARDS
from align.core.reward_mix import MixReward

PARTS = "reward.parts=[{name: digits_thickness, weight: 1.5, scale: 4.0}, {name: digits_classifier, weight: -0.5}, " \
        "{name: digits_classifier, weight: 0.25, target: seven, label: seven}]"


def _images(n=6, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_the_mix_is_the_weighted_sum_of_its_parts_computed_separately():
    from rewards.digits import DigitsClassifier, DigitsThickness

    cfg = compose_config(["algo=refl", "reward=mix", PARTS])
    assert cfg.model.name == "digits"                         # the parts' domain
    mix = REWARDS.get("mix")(**_kwargs(cfg.reward))
    x, prompts = _images(), ["zero", "one", "two", "three", "four", "seven"]
    thick = DigitsThickness(scale=4.0)(x, prompts)
    cls = DigitsClassifier()(x, prompts)
    seven = DigitsClassifier(target="seven")(x, prompts)
    assert not torch.equal(cls, seven)                          # the two classifier parts differ
    parts = mix.part_values(x, prompts)
    assert list(parts) == ["digits_thickness", "digits_classifier", "seven"]
    for got, want in zip(parts.values(), (thick, cls, seven)):
        assert torch.equal(got, want)                          # each part unweighted, in its own units
    # the same fp32 operations in the same order: exact
    assert torch.equal(mix(x, prompts), 1.5 * thick + (-0.5) * cls + 0.25 * seven)
    assert mix.differentiable is True and mix.domain == "digits"


def test_the_mix_is_differentiable_through_every_part():
    cfg = compose_config(["algo=refl", "reward=mix", PARTS])
    mix = REWARDS.get("mix")(**_kwargs(cfg.reward))
    x = _images(2).requires_grad_(True)
    (g,) = torch.autograd.grad(mix(x, ["three", "nine"]).sum(), x)
    parts = {label: torch.autograd.grad(v.sum(), x, retain_graph=True)[0]
             for label, v in mix.part_values(x, ["three", "nine"]).items()}
    torch.testing.assert_close(g, 1.5 * parts["digits_thickness"] - 0.5 * parts["digits_classifier"]
                               + 0.25 * parts["seven"], rtol=1e-6, atol=1e-7)   # linearity of the gradient, fp32


def test_domain_and_differentiability_rules(tmp_path):
    call = tmp_path / "any_reward.py"
    call.write_text("def r(images, prompts):\n    return images.flatten(1).mean(1)\n")
    cls = REWARDS.get("mix")
    both = [{"name": "digits_thickness", "weight": 1.0}, {"name": "callable", "weight": 1.0, "target": f"{call}:r"}]
    assert cls.domain_of({"parts": both}) == "digits"               # an 'any' part fits the digits part
    assert cls.domain_of({"parts": both[1:]}) == "any"
    assert cls.is_differentiable({"parts": both[:1]}) is True
    assert cls.is_differentiable({"parts": both}) is False          # a callable is a black box unless declared
    both[1]["differentiable"] = True
    assert cls.is_differentiable({"parts": both}) is True
    mixed = [{"name": "digits_thickness", "weight": 1.0}, {"name": "digits_correct", "weight": 1.0}]
    assert cls.is_differentiable({"parts": mixed}) is False
    assert MixReward(parts=mixed).differentiable is False
    with pytest.raises(ConfigProblem, match=r"algo=draft differentiates the reward, but reward=mix \(its part "
                                            r"digits_correct\) is not differentiable"):
        check_overrides(["algo=draft", "reward=mix", "reward.parts=[{name: digits_thickness, weight: 1.0}, "
                                                     "{name: digits_correct, weight: 1.0}]"], CONF_DIR)
    with pytest.raises(ConfigProblem, match=r"reward.parts score different domains: digits_thickness \(digits\), "
                                            r"linear \(gmm\)"):
        check_overrides(["algo=refl", "reward=mix", "reward.parts=[{name: digits_thickness, weight: 1.0}, "
                                                    "{name: linear, weight: 1.0}]"], CONF_DIR)
    assert check_overrides(["algo=refl", "reward=mix", "reward.parts=[{name: linear, weight: 1.0}, "
                            "{name: quadratic, weight: 2.0}]"], CONF_DIR)[-1] == "model=gmm"
    with pytest.raises(ConfigProblem, match="reward=mix scores the 'gmm' domain but model=digits"):
        check_overrides(["algo=refl", "model=digits", "reward=mix", "reward.parts=[{name: linear, weight: 1.0}]"],
                        CONF_DIR)


@pytest.mark.parametrize("parts, needle", [
    ("[]", "reward.parts must list at least one reward"),
    ("[{name: digits_thicknes, weight: 1.0}]", "reward.parts[0].name=digits_thicknes is not a reward; valid "
                                                "choices: "),
    ("[{name: digits_thickness, weight: 1.0}, {name: digits_thickness, weight: 2.0, scal: 1.0}]",
     "reward.parts[1]: reward digits_thickness has no key 'scal'; its keys: scale"),
    ("[{name: digits_thickness, weight: 1.0, scale: big}]", "reward.parts[0].scale (digits_thickness): Value 'big'"),
    ("[{name: digits_thickness}]", "reward.parts[0].weight must be a finite number"),
    ("[{name: digits_thickness, weight: .nan}]", "reward.parts[0].weight must be a finite number"),
    ("[{name: digits_thickness, weight: 1.0}, {name: digits_thickness, weight: 2.0}]",
     "reward.parts[0] and reward.parts[1] are both labelled 'digits_thickness'"),
    ("[{name: digits_thickness, weight: 1.0, label: a/b}]", "reward.parts[0].label must be a name"),
    ("[{name: mix, weight: 1.0, parts: []}]", "reward.parts[0].name=mix: a mix cannot hold a mix"),
    ("[{name: digits_classifier, weight: 1.0, target: [1]}]", "reward.parts[0].target (digits_classifier): "),
    ("[3]", "bad value for reward.parts: it is a list of mappings"),
])
def test_bad_parts_are_refused_before_any_work(parts, needle):
    with pytest.raises(ConfigProblem) as err:
        check_overrides(["algo=refl", "model=digits", "reward=mix", f"reward.parts={parts}"], CONF_DIR)
    assert needle in str(err.value) and len(str(err.value).splitlines()) == 1, str(err.value)


def test_the_evaluator_reports_each_part_beside_the_total():
    from align.setup.assemble import build_parts
    from align.train.evaluation import Evaluator
    from rewards.digits import DigitsClassifier, DigitsThickness

    cfg = compose_config(["algo=refl", "reward=mix", PARTS, "sampler.steps=4"])
    parts = build_parts(cfg)
    ev = Evaluator(parts.model, parts.reward, parts.grid, parts.prompts, n_samples=8, group_size=4, seed=0,
                   batch_size=3)                                # chunks of 3 rows: 3 + 3 + 2
    metrics, x1 = ev()
    images = parts.model.decode(x1).float()
    with torch.no_grad():
        values = {"digits_thickness": DigitsThickness(scale=4.0)(images, ev.prompts),
                  "digits_classifier": DigitsClassifier()(images, ev.prompts),
                  "seven": DigitsClassifier(target="seven")(images, ev.prompts)}
    for label, v in values.items():     # the batch splits differ (3-row chunks vs one batch): fp32 rounding only
        assert metrics[f"eval/reward/{label}"] == pytest.approx(v.mean().item(), rel=1e-5, abs=1e-6)
    total = 1.5 * values["digits_thickness"] - 0.5 * values["digits_classifier"] + 0.25 * values["seven"]
    assert metrics["eval/reward"] == pytest.approx(total.mean().item(), rel=1e-5, abs=1e-6)
    assert not any(k.startswith("eval/heldout/") for k in metrics)


def test_a_mix_trains_two_updates_on_digits(tmp_path):
    """ReFL on digits with ink mass + the classifier: the trained reward is the mix; each part is logged."""
    from align.setup.assemble import build_trainer
    from align.core.run_dir import read_metrics

    run_dir = str(tmp_path / "run")
    cfg = compose_config(["algo=refl", "reward=mix", "reward.parts=[{name: digits_thickness, weight: 1.0}, "
                          "{name: digits_classifier, weight: 0.5}]", "sampler.steps=4", "train.steps=2",
                          "train.batch_size=2", "eval.every=1", "eval.n_samples=4", "eval.group_size=2",
                          "eval.final_samples=2", "train.progress=false", "device=cpu"], run_dir=run_dir)
    trainer = build_trainer(cfg, run_dir)
    before = [p.detach().clone() for p in trainer.model.trainable_parameters()]
    trainer.train()
    rows = [r for r in read_metrics(run_dir) if "eval/reward" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for r in rows:
        # Σ w_i · mean(r_i) = mean(Σ w_i r_i): fp32 rounding of 4-sample means
        assert r["eval/reward"] == pytest.approx(r["eval/reward/digits_thickness"]
                                                 + 0.5 * r["eval/reward/digits_classifier"], rel=1e-5, abs=1e-6)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in read_metrics(run_dir)[1:])
    moved = sum((p.detach() - b).abs().sum().item() for p, b in zip(trainer.model.trainable_parameters(), before))
    assert moved > 0
