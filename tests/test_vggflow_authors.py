"""``algo=vggflow_authors`` against an independent transcription of the authors' training loss from their file
(experiments/authors_vggflow.py: lzzcd001/vggflow train_vggflow.py at 978f1fb, line by line in SD3's σ/τ/u
variables), on a float64 Gaussian-mixture flow with a quadratic reward: the loss terms and the θ- and φ-gradients
are equal once the transcription takes the two things ``algo=vggflow`` does differently on purpose our way; with
them taken the code's way, they are not (what docs/vggflow.md reports). And ``algo=vggflow_authors`` is
``algo=vggflow`` with exactly the options docs/vggflow.md lists.

Tolerance (float64): the two implementations evaluate the same arithmetic at times that differ by rounding (t = 1 −
τ/1000 recovered from τ: ≤ 2.2e-16) and difference it at the code's steps (δτ = 1e-4, i.e. δt = 1e-7; x-steps
1e-4·‖direction‖), which divides rounding by ≤ 1e-7: ≤ 1e-8 relative on a term. The code's clip divides by
‖∇r‖ + 1e-8 where ours divides by ‖∇r‖ (a relative 1e-8/‖∇r‖, ‖∇r‖ ≥ 0.05 here: 2e-7), and its boundary divides
each column's sum by Σ mask + 1e-6 where ours takes the mean (a relative 1e-6/Σ mask: 1e-6 in a column where one
trajectory drew x_{N−1} in the last bin; the boundary is at most the whole loss). Together ≤ 1.3e-6: rtol 2e-6
(measured: ≤ 6.4e-7)."""
import os
import re

import pytest
import torch

from align.setup.compose import compose_config
from align.core.registry import ALGORITHMS
from experiments.authors_vggflow import _grads, _setup, authors_loss

RTOL = 2e-6
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = RTOL) -> None:
    """Equal to ``rtol`` of the larger's size (vectors: of their norm)."""
    scale = max(a.abs().max().item(), b.abs().max().item())
    assert (a - b).abs().max().item() <= rtol * scale, ((a - b).abs().max().item(), scale)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_preset_equals_the_authors_loss_term_by_term_with_our_two_departures(seed):
    model, reward, algo, traj = _setup(seed)
    theta, phi = list(model.trainable_parameters()), list(algo.value_net.parameters())
    gen = torch.Generator().manual_seed(0)
    loss, logs = algo.loss(traj, gen)
    ours_theta, ours_phi = _grads(loss, theta + phi).split([sum(p.numel() for p in theta),
                                                            sum(p.numel() for p in phi)])
    ref = authors_loss(model, reward, algo.value_net, traj.xs, traj.ts, traj.extras["vgg_idx"], algo.beta,
                       algo.alpha, threshold=1.0, eta_mode="linear", code_reward_gradients=False,
                       detach_fd1_direction=True)
    M = len(ref.raw)
    _close(torch.tensor(logs["loss_match"]), sum(ref.raw).detach() / M)
    _close(torch.tensor(logs["loss_cons"]), sum(ref.consistency).detach() / M)
    _close(torch.tensor(logs["loss_bnd"]), sum(ref.terminal).detach() / M)
    _close(loss.detach(), ref.total.detach())
    ref_theta, ref_phi = _grads(ref.total, theta + phi).split([len(ours_theta), len(ours_phi)])
    _close(ours_theta, ref_theta)
    _close(ours_phi, ref_phi)
    # not vacuous: every term and both gradients are far from zero, and the boundary sits in two columns for some
    # trajectories (the last bin drew x_{N−1}) or one for all
    assert min(logs["loss_match"], logs["loss_cons"], logs["loss_bnd"]) > 1e-4
    assert ours_theta.norm() > 1e-3 and ours_phi.norm() > 1e-3
    assert (traj.extras["vgg_idx"][:, 0] == traj.n_steps - 1).all()


def test_the_code_s_reward_gradients_and_undetached_step_change_the_consistency_loss():
    """The two departures, each alone, change L_cons and φ's gradient far beyond the tolerance (their sizes are
    docs/vggflow.md's, from ``python -m experiments.authors_vggflow``)."""
    model, reward, algo, traj = _setup(0)
    phi = list(algo.value_net.parameters())
    args = (model, reward, algo.value_net, traj.xs, traj.ts, traj.extras["vgg_idx"], algo.beta, algo.alpha)
    ours = authors_loss(*args, code_reward_gradients=False, detach_fd1_direction=True)
    ours_cons, ours_phi = sum(ours.consistency).detach(), _grads(sum(ours.consistency), phi)
    for flags in (dict(code_reward_gradients=True, detach_fd1_direction=True),
                  dict(code_reward_gradients=False, detach_fd1_direction=False)):
        theirs = authors_loss(*args, **flags)
        cons, grad = sum(theirs.consistency).detach(), _grads(sum(theirs.consistency), phi)
        if flags["code_reward_gradients"]:
            assert abs(float(cons / ours_cons) - 1) > 1e-3, flags
        assert (grad - ours_phi).norm() > 1e-3 * ours_phi.norm(), flags
        # θ's matching term does not see either
        _close(sum(theirs.raw).detach(), sum(ours.raw).detach())


def _documented_options() -> list[str]:
    """The `algo.key=value` options of docs/vggflow.md's table of differences (its last column)."""
    text = open(os.path.join(ROOT, "docs", "vggflow.md"), encoding="utf-8").read()
    section = text.split("## The paper, the authors' code and algo=vggflow", 1)[1]
    lines = section[section.index("| what | paper |"):].split("\n\n", 1)[0].splitlines()
    options = []
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        options += re.findall(r"`(algo\.[\w.]+=[^`]+)`", cells[-1])
    return options


def test_the_preset_is_vggflow_with_exactly_the_documented_options():
    options = _documented_options()
    assert len(options) >= 10, options
    with_options = compose_config(["algo=vggflow", *options, "model=digits"]).algo
    authors = compose_config(["algo=vggflow_authors", "model=digits"]).algo
    a = {k: v for k, v in dict(with_options).items() if k != "name"}
    b = {k: v for k, v in dict(authors).items() if k != "name"}
    assert a == b, {k: (a[k], b[k]) for k in a if a[k] != b[k]}
    assert ALGORITHMS.get("vggflow_authors").config_class is ALGORITHMS.get("vggflow").config_class


@pytest.mark.parametrize("model", ["gmm", "digits"])
def test_algo_vggflow_authors_runs(tmp_path, model):
    from align.setup.assemble import build_trainer
    from align.core.run_dir import read_metrics

    overrides = ["algo=vggflow_authors", f"model={model}", "train.steps=2", "train.batch_size=2",
                 "sampler.steps=4", "algo.subsample_bins=2", "eval.every=0", "eval.n_samples=4",
                 "eval.group_size=2", "eval.final_samples=2", "train.progress=false", "device=cpu"]
    cfg = compose_config(overrides, run_dir=str(tmp_path))
    trainer = build_trainer(cfg, str(tmp_path))
    trainer.train()
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert all(r["skipped"] == 0 and r["rgrad_tau"] == 1.0 for r in rows[1:])
