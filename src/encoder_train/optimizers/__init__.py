"""The optimizers a run may choose (training.optimizer): one module each, holding its `OptimizerSpec`, and the
registry below that maps a name to it.

    adamw.py          PyTorch's AdamW (fused on CUDA and the CPU)
    stable_adamw.py   StableAdamW from torch-optimi, as ModernBERT trained with (the `stable-adamw` extra)
    muon.py           PyTorch's Muon for the encoder's weight matrices, AdamW for the rest (muon_with_adamw.py)

A spec (spec.py) is everything the program asks of its optimizer: how to build it, which settings a resume puts in
force, the bytes of state a parameter costs (devices.py's memory check), whether it works under FSDP (config.py's
check), whether it skips a non-finite step on the device (step.py), and the package it needs (preflight.py). A new
optimizer (Lion, SOAP) is one module with its SPEC, a line in OPTIMIZERS, and its settings in config.py's
TrainingConfig; `training.optimizer` accepts the registry's names.

config.py reads this registry, so nothing here imports torch until an optimizer is built or asked about: reading a
config (and `--help`) stays quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from encoder_train.optimizers import adamw, muon, stable_adamw
from encoder_train.optimizers.spec import OptimizerSpec, Settings

if TYPE_CHECKING:
    import torch
    from torch import nn

OPTIMIZERS: dict[str, OptimizerSpec] = {spec.name: spec for spec in (adamw.SPEC, stable_adamw.SPEC, muon.SPEC)}


class Chosen(Settings, Protocol):
    optimizer: str


def build_optimizer(model: nn.Module, cfg: Chosen, device: torch.device) -> torch.optim.Optimizer:
    """`cfg.optimizer` over the model's trainable parameters, at `cfg.learning_rate` (the schedule scales it)."""
    return OPTIMIZERS[cfg.optimizer].build(model, cfg, device)


def sync_hyperparameters(optimizer: torch.optim.Optimizer, cfg: Chosen) -> None:
    """After a resume with changed settings, make the config's values the ones in force (a restored optimizer
    carries the checkpoint's). The optimizer is the one the checkpoint was trained with (`state.check_resumable`
    refuses another); its learning rate is the plan's to set."""
    OPTIMIZERS[cfg.optimizer].sync(optimizer, cfg)


def require_optimizer(cfg: Chosen) -> None:
    """A package the chosen optimizer needs beyond the core install, checked before a run starts."""
    OPTIMIZERS[cfg.optimizer].require()


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer` skips a step itself when its `found_inf` is set, as its spec says."""
    return any(spec.skips_on_device(optimizer) for spec in OPTIMIZERS.values())
