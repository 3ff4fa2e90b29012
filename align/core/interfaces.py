"""The three interfaces every part plugs into: FlowModel (backends), Reward, Algorithm.

Convention everywhere: t in [0, 1], t = 0 noise, t = 1 data, dx/dt = v(x, t). Backends translate
their own conventions (SD3's σ = 1 − t, u = −v) inside ``velocity``/``base_velocity``.
"""
from __future__ import annotations

import abc
from typing import Any, Callable

import torch
from torch import nn

from align.core.schema import config_object
from samplers import Trajectory, euler_integrate


class FlowModel(nn.Module, abc.ABC):
    """A pretrained flow prior plus its finetuned part.

    velocity(x, t, cond): v_θ of the finetuned model (CFG-combined where the domain uses CFG; in
    training the unconditional branch is detached). base_velocity: v_base of the frozen prior.
    decode(x): the reward's input space, differentiable.
    """

    name: str = "flow"
    data_shape: tuple[int, ...] = ()

    @abc.abstractmethod
    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor: ...

    @abc.abstractmethod
    def base_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor: ...

    @abc.abstractmethod
    def trainable_parameters(self) -> list[nn.Parameter]: ...

    def encode(self, prompts: list[str]) -> Any:
        """Conditioning for a batch of prompts (None for unconditional domains)."""
        return None

    def default_prompts(self) -> list[str]:
        """The domain's prompt set (used when no ``prompts=`` is configured)."""
        return [""]

    @classmethod
    def check_prompts(cls, prompts: list[str]) -> None:
        """Raise ValueError naming a prompt this model cannot condition on (default: every prompt is accepted).
        A classmethod, so the command line checks ``prompts=`` before building anything."""

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample features [B, F] for diversity and prior-preservation metrics."""
        return x.flatten(1)

    # ---- optional hooks (the defaults are what a domain without them gets) --------------------------------
    def prepare(self, prompts: list[str], grid: str, shift: float) -> None:
        """Called once before training with the run's prompt set and the sampler's grid (``sampler.grid``,
        ``sampler.shift``): check the grid against the checkpoint, encode the prompts once (SD3)."""

    def preview_grid(self, x: torch.Tensor) -> torch.Tensor | None:
        """An image grid [3, H, W] in [0, 1] of samples ``x`` for the run's sample PNGs and trackers
        (None: the domain has no picture)."""
        return None

    def make_value_network(self) -> nn.Module:
        """VGG-Flow's value-gradient network ν_φ(x, t, cond) sized for this domain, output shaped like x."""
        raise NotImplementedError(f"model={self.name} defines no value network, which VGG-Flow needs "
                                  "(FlowModel.make_value_network); use algo.learn_value=false or add one")

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def sample_noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """x_0 ~ N(0, I), drawn on the CPU from ``generator`` so runs are reproducible across devices."""
        x0 = torch.randn((n, *self.data_shape), generator=generator, dtype=torch.float32)
        return x0.to(self.device, self.dtype)

    def finetune_state_dict(self) -> dict[str, torch.Tensor]:
        """The finetuned part only (what checkpoints store)."""
        names = {id(p) for p in self.trainable_parameters()}
        return {k: v.detach().clone() for k, v in self.named_parameters() if id(v) in names}

    def load_finetune_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        missing = [k for k in state if k not in params]
        if missing:
            raise KeyError(f"checkpoint has parameters this model lacks: {missing[:5]}")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)

    def save_finetuned(self, directory: str) -> None:
        """Export the finetuned part for inference (backends with LoRA write the diffusers format)."""
        import os

        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.finetune_state_dict().items()},
                  os.path.join(directory, "finetuned.safetensors"))


class RewardError(ValueError):
    """A reward's output that cannot be used: the wrong shape or type, or no gradient where one was declared. (A
    non-finite value is not one: training skips the update it came in, evaluation reports it.)"""


class Reward(nn.Module, abc.ABC):
    """r(images, prompts) -> Tensor[B], differentiable, fp32. ``domain`` names the model it scores."""

    name: str = "reward"
    domain: str = ""
    # False: a black-box score (no useful gradient); algorithms that differentiate the reward refuse it up front
    differentiable: bool = True

    @abc.abstractmethod
    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...

    def description(self) -> str:
        """How messages name this reward: ``reward=<name>`` (a reward configured by more than its name adds what
        tells it apart, e.g. a callable's target)."""
        return f"reward={self.name}"


class Algorithm(nn.Module, abc.ABC):
    """One alignment algorithm: its own networks, its parameter groups, its rollout and its loss.

    The model is held by reference (not a submodule), so ``state_dict()`` holds only the
    algorithm's own networks (e.g. VGG-Flow's value-gradient network).
    """

    name: str = "algorithm"
    # True: the trainer rolls out every micro-batch of an update before any loss and calls ``prepare`` with all
    # of them (statistics over the whole update, e.g. VGG-Flow's clip threshold). Rollouts must then hold no graph.
    update_wide: bool = False
    # True: a group of ``group_size`` rows may be larger than a micro-batch or straddle two (G ∤ batch_size /
    # grad_accum): the trainer draws the update's prompts in groups, rolls out every micro-batch first and
    # ``prepare`` computes the group statistics over all of them (so one trajectory per micro-batch fits G = 24)
    groups_span_micro_batches: bool = False
    # True: the loss differentiates the reward (∇r); such an algorithm refuses a reward that is not differentiable
    uses_reward_gradient: bool = True

    # the config dataclass (set by ``@register_algorithm(name, config=...)``): ``self.cfg`` is an instance of it. An
    # instance given as ``cfg`` is taken as it is (build_algorithm's, checked by the refusal pass); a DictConfig (e.g.
    # a resumed run's config.yaml section) or a dict is merged onto it and checked, and a key it has no field for
    # raises TypeError (``align.core.schema.config_object``)
    config_class: type | None = None

    def __init__(self, cfg: Any, model: FlowModel, reward: Reward, ts: torch.Tensor):
        super().__init__()
        if self.config_class is not None:
            cfg = config_object(self.config_class, cfg, owner=f"algo={self.name}")
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "reward", reward)
        self.cfg = cfg
        self.ts = ts

    @property
    def group_size(self) -> int:
        """G: the trainer draws prompts in groups of G consecutive rows sharing one prompt (the policy-gradient
        methods' groups; 1: every row its own prompt), within each micro-batch or, with
        ``groups_span_micro_batches``, over the update's micro-batches taken in order. The refusal pass checks the
        groups before anything is built, reading G from the config's ``algo.group_size`` (1 without one): an
        algorithm with groups returns that value."""
        return 1

    def param_groups(self) -> list[dict[str, Any]]:
        """Optimizer groups: dicts with ``name``, ``params`` and optional ``lr``/``weight_decay``."""
        return [{"name": "theta", "params": list(self.model.trainable_parameters())}]

    def rollout(self, x0: torch.Tensor, prompts: list[str], cond: Any, generator: torch.Generator) -> Trajectory:
        """Default: the Euler ODE with the current v_θ on the grid, no grad, all states recorded."""
        xs = euler_integrate(lambda x, t: self.model.velocity(x, t, cond), x0, self.ts)
        return Trajectory(xs=xs, ts=self.ts, cond=cond, prompts=prompts)

    def prepare(self, trajs: list[Trajectory], generator: torch.Generator,
                gather: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Called once per update with all its micro-batches (when ``update_wide``), before their losses.

        ``gather(tensor)`` concatenates a tensor over all processes (identity with one process).
        """

    def after_step(self) -> None:
        """Called once after each optimizer step that was taken (not after a skipped one): e.g. DiffusionNFT's
        soft update of its old policy. Whatever it changes must live in ``state_dict()`` for exact resume."""

    @abc.abstractmethod
    def loss(self, traj: Trajectory, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        """Scalar loss to minimise for this batch and a dict of scalars to log."""
