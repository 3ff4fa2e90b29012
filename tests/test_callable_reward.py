"""reward=callable: a function in a user file, the module:function and dotted forms, a class with kwargs, a
factory; its output checked (shape, finite, gradient when declared differentiable); bad targets named up front."""
import sys
import textwrap

import pytest
import torch
from omegaconf import open_dict

from align.setup.build import _kwargs
from align.setup.overrides import ConfigProblem, check_overrides
from align.setup.compose import CONF_DIR, compose_config
from align.core.registry import REWARDS

USER_CODE = textwrap.dedent('''
    import torch

    def ink(images, prompts):
        return 2.0 * images.flatten(1).sum(1)

    def as_list(images, prompts):
        return [float(v) for v in images.flatten(1).max(1).values]

    def wrong_shape(images, prompts):
        return images.flatten(1)[:, :2]

    def not_finite(images, prompts):
        out = images.flatten(1).sum(1)
        out[-1] = float("nan")
        return out

    def detached(images, prompts):
        return images.flatten(1).sum(1).detach()

    def scaled(factor):
        return lambda images, prompts: factor * images.flatten(1).sum(1)

    class Offset:
        def __init__(self, offset, direction=(1.0, 0.0)):
            self.offset, self.direction = offset, torch.tensor(direction)

        def __call__(self, images, prompts):
            return self.offset + images @ self.direction

    NOT_CALLABLE = 3
''')
GMM = ["model=gmm", "reward=callable", "reward.domain=gmm"]


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_CODE)
    return path


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """The same code as an importable module ``h3_user_rewards`` (on sys.path for this test only)."""
    (tmp_path / "h3_user_rewards.py").write_text(USER_CODE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "h3_user_rewards"
    sys.modules.pop("h3_user_rewards", None)


def _reward(overrides):
    """The callable reward of a composed (and so checked) config; ReFL accepts it as declared differentiable."""
    cfg = compose_config(["algo=refl", *overrides, "reward.differentiable=true"])
    return REWARDS.get("callable")(**_kwargs(cfg.reward)), cfg


X = torch.tensor([[1.0, 2.0], [-0.5, 0.25], [3.0, -1.0]])


def test_a_function_in_a_user_file(user_file):
    reward, cfg = _reward([*GMM, f"reward.target={user_file}:ink"])
    assert cfg.model.name == "gmm" and reward.differentiable is True
    torch.testing.assert_close(reward(X, ["a"] * 3), torch.tensor([6.0, -0.5, 4.0]), rtol=0, atol=0)


def test_the_module_and_dotted_forms_and_a_sequence_output(user_module):
    for target in (f"{user_module}:as_list", f"{user_module}.as_list"):
        reward, _ = _reward([*GMM, f"reward.target={target}"])
        r = reward(X, ["a"] * 3)
        assert r.dtype == torch.float32 and r.tolist() == [2.0, 0.25, 3.0]


def test_a_class_with_kwargs_and_a_factory(user_module):
    reward, _ = _reward([*GMM, f"reward.target={user_module}.Offset", "reward.kwargs={offset: 10.0, "
                                                                          "direction: [0.0, 1.0]}"])
    assert reward(X, ["a"] * 3).tolist() == [12.0, 10.25, 9.0]
    reward, _ = _reward([*GMM, f"reward.target={user_module}:scaled", "reward.kwargs={factor: -1.0}"])
    assert reward(X, ["a"] * 3).tolist() == [-3.0, 0.25, -2.0]


def test_the_model_defaults_to_the_callables_domain(user_file):
    assert check_overrides(["algo=refl", "reward=callable", f"reward.target={user_file}:ink",
                            "reward.differentiable=true"], CONF_DIR)[-1] == "model=digits"   # any: the default
    assert check_overrides(["algo=refl", *GMM[1:], f"reward.target={user_file}:ink",
                            "reward.differentiable=true"], CONF_DIR)[-1] == "model=gmm"
    with pytest.raises(ConfigProblem, match="scores the 'gmm' domain but model=digits"):
        check_overrides(["algo=refl", "model=digits", *GMM[1:], f"reward.target={user_file}:ink",
                         "reward.differentiable=true"], CONF_DIR)


@pytest.mark.parametrize("target, needles", [
    (None, ["reward=callable needs reward.target", "path/to/file.py:function"]),
    ("h3_no_such_module:fn", ["reward.target=h3_no_such_module:fn", "cannot import h3_no_such_module",
                              "module not found"]),
    ("h3_no_such_module.fn", ["reward.target=h3_no_such_module.fn", "no module 'h3_no_such_module'",
                              "module not found"]),
    ("{module}:nope", ["has no attribute 'nope'", "ink", "Offset"]),
    ("{module}.nope", ["has no attribute 'nope'"]),
    ("{module}:NOT_CALLABLE", ["NOT_CALLABLE is a int, not a callable"]),
    ("{dir}/missing.py:ink", ["no such file", "missing.py"]),
    ("{file}:nope", ["the file", "has no attribute 'nope'"]),
    ("{file}", ["a file needs the name of its callable"]),
])
def test_bad_targets_are_named_before_any_work(target, needles, user_file, user_module, tmp_path):
    over = [] if target is None else [
        "reward.target=" + target.format(module=user_module, file=user_file, dir=tmp_path)]
    with pytest.raises(ConfigProblem) as err:
        check_overrides(["algo=refl", *GMM, "reward.differentiable=true", *over], CONF_DIR)
    msg = str(err.value)
    assert len(msg.splitlines()) == 1, msg
    for n in needles:
        assert n in msg, msg


def test_bad_kwargs_and_a_bad_domain_are_named(user_module):
    with pytest.raises(ConfigProblem, match=r"Offset cannot be called with reward.kwargs=\{'offzet': 1\}: "
                                            r"missing a required argument: 'offset'"):
        _reward([*GMM, f"reward.target={user_module}.Offset", "reward.kwargs={offzet: 1}"])
    with pytest.raises(ConfigProblem, match=r"reward.kwargs must be a mapping"):
        _reward([*GMM, f"reward.target={user_module}.Offset", "reward.kwargs=3"])
    with pytest.raises(ConfigProblem,
                       match="reward.domain=mars is not a model; valid choices: any, digits, flux, gmm, sd3$"):
        check_overrides(["algo=refl", "reward=callable", "reward.domain=mars", f"reward.target={user_module}.ink",
                         "reward.differentiable=true"], CONF_DIR)


def test_black_box_by_default(user_file):
    with pytest.raises(ConfigProblem, match=r"algo=refl differentiates the reward, but reward=callable "
                                            r"\(reward.target=.*:ink, reward.differentiable=false\)"):
        check_overrides(["algo=refl", *GMM, f"reward.target={user_file}:ink"], CONF_DIR)
    cfg = compose_config(["algo=refl", *GMM, f"reward.target={user_file}:ink", "reward.differentiable=true"])
    with open_dict(cfg):
        cfg.reward.differentiable = False
    reward = REWARDS.get("callable")(**_kwargs(cfg.reward))
    x = X.clone().requires_grad_(True)
    assert not reward(x, ["a"] * 3).requires_grad          # a black box: no graph even if the function has one


@pytest.mark.parametrize("fn, needle", [("wrong_shape", r"returned shape \(2, 2\) for 2 images"),
                                        ("not_finite", r"returned non-finite values at rows \[1\]")])
def test_a_bad_output_stops_at_the_trainers_preflight(fn, needle, user_file, tmp_path):
    from align.setup.assemble import build_trainer

    run_dir = str(tmp_path / "run")
    cfg = compose_config(["algo=refl", *GMM, f"reward.target={user_file}:{fn}", "reward.differentiable=true",
                          "train.steps=1", "device=cpu"], run_dir=run_dir)
    with pytest.raises(ValueError, match=needle):
        build_trainer(cfg, run_dir)
    assert not (tmp_path / "run").exists()


def test_declared_differentiable_needs_a_graph(user_file):
    cfg = compose_config(["algo=refl", *GMM, f"reward.target={user_file}:detached", "reward.differentiable=true"])
    reward = REWARDS.get("callable")(**_kwargs(cfg.reward))
    with pytest.raises(ValueError, match="reward.differentiable=true but its output holds no gradient"):
        reward(X.clone().requires_grad_(True), ["a"] * 3)
    with torch.no_grad():
        assert reward(X, ["a"] * 3).tolist() == [3.0, -0.25, 2.0]   # fine where no gradient is asked for


def test_a_user_file_reward_trains_two_updates(user_file, tmp_path):
    """ReFL on gmm with r(x) = 2·(x₁ + x₂) from the user file (declared differentiable): the gradient reaches the
    flow (parameters move), and the logged reward is the function's value on the evaluator's samples."""
    from align.setup.assemble import build_trainer
    from align.core.run_dir import read_metrics

    run_dir = str(tmp_path / "run")
    cfg = compose_config(["algo=refl", *GMM, f"reward.target={user_file}:ink", "reward.differentiable=true",
                          "model.hidden=16", "sampler.steps=4", "train.steps=2", "train.batch_size=4",
                          "eval.every=1", "eval.n_samples=8", "eval.group_size=4", "eval.final_samples=4",
                          "train.progress=false", "device=cpu"], run_dir=run_dir)
    trainer = build_trainer(cfg, run_dir)
    before = [p.detach().clone() for p in trainer.model.trainable_parameters()]
    trainer.train()
    rows = [r for r in read_metrics(run_dir) if "eval/reward" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    moved = sum((p.detach() - b).abs().sum().item() for p, b in zip(trainer.model.trainable_parameters(), before))
    assert moved > 0
    _, x1 = trainer.evaluator()
    by_hand = (2.0 * (x1[:, 0] + x1[:, 1])).mean().item()
    assert rows[-1]["eval/reward"] == pytest.approx(by_hand, rel=1e-6, abs=1e-6)   # fp32 summation order
