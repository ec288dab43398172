"""The warmup-then-decay learning-rate schedule of one TrainingConfig, as a multiplier of its peak: the shape each
phase of a pretraining run follows (phases.Plan.learning_rate, the run's rate at a step, is built on it) and the
schedule of a fine-tuning run."""

from __future__ import annotations

import math

import torch

from encoder_train.config import TrainingConfig


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
