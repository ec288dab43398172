"""AdamW with BERT's weight-decay groups, and the warmup-then-decay learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from encoder_train.config import TrainingConfig


def build_optimizer(model: nn.Module, cfg: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; biases, LayerNorm weights and other 1-D parameters are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused (one kernel per parameter group) on CUDA and on the CPU, where it is 3-4x faster than foreach
    # (small model, 2 cores: 2.8 ms against 10 ms a step); foreach elsewhere (one op per tensor list).
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(
        groups,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        fused=fused,
        foreach=None if fused else True,
    )


def lr_factor(step: int, cfg: TrainingConfig) -> float:
    """Multiplier of the peak learning rate for the update made at optimizer step `step` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "wsd":
        return wsd_factor(step, cfg)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress  # linear


def wsd_factor(step: int, cfg: TrainingConfig) -> float:
    """Warmup-stable-decay after warmup: the peak until the last `decay_steps` (or `decay_fraction` of
    max_steps), then down to 0 at max_steps in the chosen shape. A run's stable phase can be resumed and
    extended, and any point of it decayed, which fixed-length schedules cannot."""
    decay = cfg.decay_steps if cfg.decay_steps is not None else max(1, round(cfg.decay_fraction * cfg.max_steps))
    decay = min(decay, cfg.max_steps - cfg.warmup_steps) or 1
    progress = min(max((step - (cfg.max_steps - decay)) / decay, 0.0), 1.0)
    if cfg.decay_shape == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.decay_shape == "1-sqrt":
        return 1.0 - math.sqrt(progress)
    return 1.0 - progress


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def apply_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                          cfg: TrainingConfig, step: int) -> None:
    """After a resume with changed settings, make the config's values the ones in force.

    A restored optimizer and scheduler carry the checkpoint's peak learning rate, betas, epsilon and weight
    decay; the config the user passed now must win. The learning rate of the next update is set as the
    schedule gives it at `step` (LambdaLR would only apply a changed `max_steps` one step late).
    """
    lr = cfg.learning_rate * lr_factor(step, cfg)
    for i, group in enumerate(optimizer.param_groups):
        group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
        group["eps"] = cfg.adam_eps
        group["weight_decay"] = cfg.weight_decay if i == 0 else 0.0  # group 1: biases and norms, never decayed
        group["initial_lr"] = cfg.learning_rate
        group["lr"] = lr
    scheduler.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)
    scheduler._last_lr = [lr] * len(optimizer.param_groups)
