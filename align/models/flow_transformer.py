"""The code paths every SD3-architecture backend shares: a diffusers ``SD3Transformer2DModel`` in the paper's convention.

SD3 / diffusers speak σ ∈ [0, 1] (σ = 1 noise, σ = 0 data), x_σ = (1 − σ) x_data + σ ε, and the transformer
predicts u(x, σ, c) = ε − x_data = dx/dσ at timestep τ = 1000σ. The paper (and every algorithm here) speaks
t = 1 − σ and v = dx/dt = −u. This module owns that translation, one function per direction:

    t_to_sigma / sigma_to_t,   v_to_u / u_to_v,   sigma_to_timestep (τ = 1000σ).

``FlowTransformerModel`` adds the rest of the SD3 recipe (reference §0, §1.8):
  * classifier-free guidance inside ``velocity``: v = v_uncond + w (v_cond − v_uncond); when grad is enabled
    the unconditional branch is detached from θ (the LoRA weights), as in the authors' training code, but
    not from x: ∂v/∂x = w J_cond + (1 − w) J_uncond, which VGG-Flow-PMP's costate and DRaFT-K's x-chain
    need (``guided_u``);
  * peft LoRA (rank 8, α 8, gaussian init, on to_q/to_k/to_v/to_out.0) injected into the transformer;
    the LoRA parameters are the only trainable parameters;
  * ``base_velocity`` = the same network with the adapter disabled (no second copy), no parameter grads,
    differentiable in x;
  * ``save_finetuned`` writes the adapter in diffusers' SD3 LoRA format (``pytorch_lora_weights.safetensors``).

Conditioning is a dict of the transformer's own keyword arguments, batch first:
``{"encoder_hidden_states": [B, L, D], "pooled_projections": [B, P]}``; subclasses provide
``negative_cond(batch_size)`` (SD3: the empty prompt; digits: the learned null prompt).
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Sequence

import torch
import torch.utils.checkpoint
from torch import nn
from torch.autograd.function import once_differentiable

from align.core.interfaces import FlowModel
from align.core.params import held_constant

LORA_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
TIMESTEP_SCALE = 1000.0


# ---- the convention, one function per direction ---------------------------------------------------------
def t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """σ = 1 − t (paper time → SD3 noise level)."""
    return 1.0 - t


def sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """t = 1 − σ (SD3 noise level → paper time)."""
    return 1.0 - sigma


def u_to_v(u: torch.Tensor) -> torch.Tensor:
    """v = dx/dt = −dx/dσ = −u (the transformer's output → the paper's velocity)."""
    return -u


def v_to_u(v: torch.Tensor) -> torch.Tensor:
    """u = dx/dσ = −v (the paper's velocity → the transformer's output)."""
    return -v


def sigma_to_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """τ = 1000σ, the timestep the SD3 transformer is fed."""
    return TIMESTEP_SCALE * sigma


def cfg_combine(cond_out: torch.Tensor, uncond_out: torch.Tensor, scale: float) -> torch.Tensor:
    """out_uncond + w (out_cond − out_uncond). Linear, so it commutes with u ↔ v."""
    return uncond_out + scale * (cond_out - uncond_out)


# ---- LoRA ------------------------------------------------------------------------------------------------
def lora_config(rank: int = 8, alpha: float = 8.0, target_modules: Sequence[str] = LORA_TARGET_MODULES):
    """The paper's LoRA (reference §1.8): r = 8, lora_alpha = 8, gaussian init, attention projections only."""
    from peft import LoraConfig

    return LoraConfig(r=int(rank), lora_alpha=float(alpha), init_lora_weights="gaussian",
                      target_modules=list(target_modules))


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The injected LoRA parameters (``lora_A``/``lora_B`` of every adapted layer)."""
    return [p for n, p in module.named_parameters() if "lora_" in n]


@contextlib.contextmanager
def adapters_disabled(transformer: nn.Module) -> Iterator[None]:
    """Run ``transformer`` without its LoRA adapters (diffusers ``disable_adapters``/``enable_adapters``).

    peft's toggle also rewrites ``requires_grad`` of the adapter weights; the flags are restored on exit
    so that a frozen adapter stays frozen and a trainable one stays trainable.
    """
    if getattr(transformer, "is_gradient_checkpointing", False) and not _adapter_aware(transformer):
        enable_gradient_checkpointing(transformer)     # enabled by someone else: recompute with the right state
    flags = [(p, p.requires_grad) for p in lora_parameters(transformer)]
    transformer.disable_adapters()
    try:
        yield
    finally:
        transformer.enable_adapters()
        for p, flag in flags:
            p.requires_grad_(flag)


# ---- gradient checkpointing that recomputes with the forward's adapter state ---------------------------------
def _tuner_layers(module: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def _adapters_state(layers: Sequence[nn.Module], disabled: Sequence[bool]) -> Iterator[None]:
    """Set each peft layer's adapters disabled / enabled as ``disabled`` says (``requires_grad`` untouched)."""
    before = [bool(m._disable_adapters) for m in layers]
    for m, d in zip(layers, disabled):
        m._disable_adapters = d
    try:
        yield
    finally:
        for m, d in zip(layers, before):
            m._disable_adapters = d


def adapter_aware_checkpoint(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """diffusers' ``gradient_checkpointing_func``: torch's non-reentrant checkpoint of ``module`` (as diffusers'
    default), whose recomputation in backward runs with the adapter state (LoRA enabled or disabled, per peft
    layer) that the forward had. Without it, ``base_velocity`` (LoRA off) returns a graph whose blocks backward
    recomputes with LoRA on: other tensors, ``CheckpointError: ... different metadata`` (or, worse, a silently
    wrong Jacobian). Costs nothing when the state did not change."""
    layers = _tuner_layers(module)
    state = [bool(m._disable_adapters) for m in layers]

    def run(*a: Any, **kw: Any) -> Any:
        with _adapters_state(layers, state):
            return module(*a, **kw)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)


def _adapter_aware(transformer: nn.Module) -> bool:
    return all(getattr(m, "_gradient_checkpointing_func", adapter_aware_checkpoint) is adapter_aware_checkpoint
               for m in transformer.modules() if getattr(m, "gradient_checkpointing", False))


def enable_gradient_checkpointing(transformer: nn.Module) -> None:
    """Checkpoint the transformer's blocks with ``adapter_aware_checkpoint`` (diffusers ≥ 0.33's hook)."""
    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=adapter_aware_checkpoint)


# ---- CFG: the unconditional branch differentiable in x, detached from θ -----------------------------------
def _adapter_flags(module: nn.Module) -> tuple[bool, ...]:
    """Which peft layers have their adapters disabled (the recomputation must see the same network)."""
    return tuple(bool(m._disable_adapters) for m in _tuner_layers(module))


class _ThetaDetached(torch.autograd.Function):
    """y = run(x) with gradients to x only: every parameter (θ = the LoRA weights) is treated as a constant.

    Forward runs without a graph, exactly like the former ``no_grad`` branch. Backward recomputes ``run`` with
    the network's trainable parameters' ``requires_grad`` switched off, so the recomputation builds a graph to
    x alone, and back-propagates the incoming gradient through it. Because everything happens inside this
    backward, it is also right under gradient checkpointing, reentrant or not: a checkpoint recomputes within
    the same window, where θ does not require grad, so θ-gradients cannot leak into the unconditional branch.
    Cost: one extra forward of the branch per backward (as checkpointing), no activations kept in between.
    Not twice differentiable (``once_differentiable``); the parameters must not change before the backward.
    """

    @staticmethod
    def forward(ctx, x, run, network, params):
        ctx.run, ctx.network, ctx.params = run, network, params
        ctx.state = ([p._version for p in params], _adapter_flags(network))
        ctx.save_for_backward(x)
        return run(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if ([p._version for p in ctx.params], _adapter_flags(ctx.network)) != ctx.state:
            raise RuntimeError("CFG unconditional branch: the LoRA weights or the adapter state changed between "
                               "the forward and the backward pass; call backward before updating the model")
        with torch.enable_grad(), held_constant(ctx.params):
            xd = x.detach().requires_grad_(True)
            torch.autograd.backward(ctx.run(xd), grad)
        return xd.grad, None, None, None


# ---- the backend -----------------------------------------------------------------------------------------
class FlowTransformerModel(FlowModel):
    """A frozen SD3-architecture transformer + peft LoRA, exposed as v(x, t, cond) with CFG.

    Subclasses set ``data_shape``, implement ``encode``/``negative_cond`` and ``decode``.
    """

    def __init__(self, transformer: nn.Module, guidance_scale: float = 5.0, lora_rank: int = 8,
                 lora_alpha: float = 8.0, lora_target_modules: Sequence[str] = LORA_TARGET_MODULES):
        super().__init__()
        transformer.requires_grad_(False)
        transformer.add_adapter(lora_config(lora_rank, lora_alpha, lora_target_modules))
        self.transformer = transformer
        self.guidance_scale = float(guidance_scale)
        for p in lora_parameters(transformer):   # LoRA weights in fp32 whatever the base dtype (reference §1.8)
            p.data = p.data.float()
            p.requires_grad_(True)

    # -- subclass hooks
    def negative_cond(self, batch_size: int) -> dict[str, torch.Tensor]:
        """The unconditional (null / empty prompt) conditioning for a batch."""
        raise NotImplementedError

    # -- the raw network, SD3 convention
    def transformer_u(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """u(x, σ, c) = the transformer's prediction of ε − x_data at τ = 1000σ, returned in x's dtype.

        τ goes in at least fp32 whatever the network's dtype, as the diffusers pipeline passes the scheduler's fp32
        timesteps (the time embedding computes its sinusoids in fp32): in bf16, τ above 512 would be rounded to
        multiples of 4, so the grid's times and t ± δ of a finite difference would collide."""
        net_dtype = self.transformer.dtype
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        tau = sigma_to_timestep(sigma.to(torch.promote_types(sigma.dtype, torch.float32)))
        out = self.transformer(hidden_states=x.to(net_dtype),
                               encoder_hidden_states=cond["encoder_hidden_states"].to(net_dtype),
                               pooled_projections=cond["pooled_projections"].to(net_dtype),
                               timestep=tau, return_dict=False)[0]
        return out.to(x.dtype)

    def guided_u(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, torch.Tensor],
                 guidance_scale: float | None = None, detach_uncond: bool | None = None) -> torch.Tensor:
        """CFG in the SD3 convention: u_uncond + w (u_cond − u_uncond).

        ``detach_uncond`` (default: whenever grad is enabled) detaches the unconditional branch from the
        network's parameters (θ), as in the authors' training code: θ-gradients are w·∂u_cond/∂θ. It stays
        differentiable in x, so ∂u/∂x = w J_cond + (1 − w) J_uncond (``_ThetaDetached``). When x does not
        require grad the branch runs under ``no_grad`` (no graph, nothing more than a plain forward).
        ``detach_uncond=False`` differentiates both branches in everything. With grad disabled both branches
        run as one batch of 2B.
        """
        w = self.guidance_scale if guidance_scale is None else float(guidance_scale)
        if w == 1.0:
            return self.transformer_u(x, sigma, cond)
        B = x.shape[0]
        neg = self.negative_cond(B)
        detach = torch.is_grad_enabled() if detach_uncond is None else detach_uncond
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(B)
        if not torch.is_grad_enabled():
            both = {k: torch.cat([cond[k], neg[k].to(cond[k])]) for k in ("encoder_hidden_states", "pooled_projections")}
            u = self.transformer_u(torch.cat([x, x]), torch.cat([sigma, sigma]), both)
            u_cond, u_uncond = u[:B], u[B:]
        else:
            u_cond = self.transformer_u(x, sigma, cond)
            if not detach:
                u_uncond = self.transformer_u(x, sigma, neg)
            else:
                u_uncond = self._uncond_theta_detached(x, sigma, neg)
        return cfg_combine(u_cond, u_uncond, w)

    def _uncond_theta_detached(self, x: torch.Tensor, sigma: torch.Tensor, neg: dict[str, torch.Tensor]
                               ) -> torch.Tensor:
        """u(x, σ, c_neg) without θ-gradients; differentiable in x when x requires grad."""
        if not x.requires_grad:
            with torch.no_grad():
                return self.transformer_u(x, sigma, neg)
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        if not params:                              # nothing to detach: the plain graph is exact
            return self.transformer_u(x, sigma, neg)
        sigma = sigma.detach()
        neg = {k: v.detach() for k, v in neg.items()}
        return _ThetaDetached.apply(x, lambda z: self.transformer_u(z, sigma, neg), self.transformer, params)

    # -- the paper's convention
    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Any, guidance_scale: float | None = None
                 ) -> torch.Tensor:
        """v_θ(x, t, c) = −u_θ^cfg(x, σ = 1 − t, c), LoRA on (under grad the unconditional branch is detached from
        θ but differentiable in x, see ``guided_u``)."""
        return u_to_v(self.guided_u(x, t_to_sigma(t), cond, guidance_scale))

    def base_velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Any, guidance_scale: float | None = None
                      ) -> torch.Tensor:
        """v_base(x, t, c): the same network with the LoRA adapter disabled; differentiable in x only."""
        with adapters_disabled(self.transformer):
            return u_to_v(self.guided_u(x, t_to_sigma(t), cond, guidance_scale, detach_uncond=False))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return lora_parameters(self.transformer)

    # -- export of the finetuned part
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter as peft names it (``transformer_blocks.0.attn.to_q.lora_A.weight``, ...)."""
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.transformer).items()}

    def lora_adapter_metadata(self) -> dict[str, Any]:
        """The LoRA config a pipeline's ``load_lora_weights`` needs to rebuild the same scale α/r on the same
        modules: only keys every peft version knows (a full ``to_dict()`` carries fields older peft rejects)."""
        cfg = self.transformer.peft_config["default"]
        targets = cfg.target_modules if isinstance(cfg.target_modules, str) else sorted(cfg.target_modules)
        return {"r": int(cfg.r), "lora_alpha": float(cfg.lora_alpha), "target_modules": targets}

    def save_finetuned(self, directory: str) -> None:
        """Write the LoRA adapter in diffusers' SD3 format: ``<dir>/pytorch_lora_weights.safetensors``
        with keys ``transformer.<module>.lora_{A,B}.weight`` (loadable by
        ``StableDiffusion3Pipeline.load_lora_weights`` for the SD3 backend)."""
        from diffusers.loaders import SD3LoraLoaderMixin

        os.makedirs(directory, exist_ok=True)
        SD3LoraLoaderMixin.save_lora_weights(directory, transformer_lora_layers=self.lora_state_dict(),
                                             weight_name=LORA_WEIGHT_NAME)

    def load_finetuned(self, directory: str) -> None:
        """Load an adapter written by ``save_finetuned`` back into the injected LoRA layers."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = os.path.join(directory, LORA_WEIGHT_NAME)
        state = load_file(path)
        prefix = "transformer."
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(self.transformer, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise KeyError(f"{path}: adapter keys this model lacks: {unexpected[:5]}")
