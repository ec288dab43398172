"""`stable_adamw`: StableAdamW (Wortsman et al. 2023, in torch-optimi), ModernBERT's optimizer (the `stable-adamw`
extra). Its parameter groups are AdamW's (weight_decay_groups)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from encoder_train.errors import require
from encoder_train.optimizers.spec import OptimizerSpec, Settings, weight_decay_groups

if TYPE_CHECKING:
    import torch
    from torch import nn

# fp32 weights and their gradients (4 + 4), plus two moments (8), as AdamW.
BYTES_PER_PARAMETER = 16


def require_optimi():
    return require("optimi", "stable-adamw", "training.optimizer stable_adamw")


def build(model: nn.Module, cfg: Settings, device: torch.device) -> torch.optim.Optimizer:
    """AdamW whose step size is divided, per tensor, by the RMS of grad / sqrt(v) when that exceeds 1 (Adafactor's
    update clipping), so a rare large gradient does not make a large step. It has no bias correction terms: its
    betas are debiased instead.

    Weight decay: decouple_lr=False is optimi's "decoupled" decay, weights x (1 - lr x weight_decay) with the step's
    scheduled (and clipped) lr, which is what training.weight_decay means for AdamW. ModernBERT used the fully
    decoupled form (decouple_lr=True: x (1 - lr / peak lr x weight_decay), weight_decay 1e-5 at a peak lr of 8e-4):
    the same decay as training.weight_decay = 1e-5 / 8e-4 = 0.0125 here. Kahan summation is off (it only matters
    for bf16 weights; ours are fp32).

    Kernels: on CUDA optimi picks its Triton kernels where Triton is installed; elsewhere we pass triton=False and
    foreach=False (a loop over tensors). Left to optimi, any device gets them wherever triton imports: at a group's
    first step it asks whether all of the group's parameters suit Triton before it has listed them (torch-optimi
    0.3: all() of an empty list is True), so with PyPI's torch (which brings triton) a CPU run failed at its first
    step ("0 active drivers")."""
    optimi = require_optimi()
    groups = weight_decay_groups(model.parameters(), cfg.weight_decay)
    on_cuda = device.type == "cuda"
    return optimi.StableAdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                              eps=cfg.adam_eps, weight_decay=cfg.weight_decay, decouple_lr=False,
                              triton=None if on_cuda else False, foreach=None if on_cuda else False)


def sync(optimizer: torch.optim.Optimizer, cfg: Settings) -> None:
    """optimi names the betas apart, and keeps epsilon squared in each tensor's state as well as in the group."""
    for i, group in enumerate(optimizer.param_groups):
        group["beta1"], group["beta2"] = cfg.adam_beta1, cfg.adam_beta2
        for p in group["params"]:
            if "eps_sq" in optimizer.state.get(p, {}):
                optimizer.state[p]["eps_sq"].fill_(cfg.adam_eps**2)
        group["eps"] = cfg.adam_eps
        group["weight_decay"] = cfg.weight_decay if i == 0 else 0.0  # group 1: biases and norms, never decayed


SPEC = OptimizerSpec("stable_adamw", build, sync, BYTES_PER_PARAMETER, require=require_optimi)
