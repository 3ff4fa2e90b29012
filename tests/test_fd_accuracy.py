"""VGG-Flow's consistency residual on the digits flow in fp32 against float64 autograd
(experiments/fd_accuracy.py): at the default steps (3e-5) every variant is within a few per cent, the central
scheme within 1 %, and the earlier 1e-3 steps are off by far more (the timestep embedding's curvature)."""
import torch

from experiments.fd_accuracy import main, measure

torch.set_num_threads(1)


def test_default_steps_are_accurate_and_1e_3_is_not():
    default = {(r["terms"], r["scheme"]): r["total"] for r in measure([], n_states=4)}
    assert default[("spacetime", "forward")] < 0.05 and default[("spacetime", "central")] < 0.01, default
    assert default[("spacetime", "central")] < default[("spacetime", "forward")]
    coarse = {(r["terms"], r["scheme"]): r["total"] for r in measure(["algo.fd_eps=1e-3", "algo.fd_delta=1e-3"],
                                                                      n_states=4)}
    assert min(coarse.values()) > 0.03 and coarse[("spacetime", "forward")] > 0.1, coarse


def test_prints_a_markdown_table(capsys):
    main(["--states", "2"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert len(lines) == 5 and lines[0].startswith("| algo.fd_terms")
