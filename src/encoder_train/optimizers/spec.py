"""What a run may ask of an optimizer, in one typed record (`OptimizerSpec`), and the weight-decay groups every
optimizer here starts from. Nothing here imports torch (config.py reads the registry; see the package)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from torch import nn

    from encoder_train.model import ModelDims


class Settings(Protocol):
    """What an optimizer reads of the config (`config.TrainingConfig` has it; a member may ask for more)."""

    learning_rate: float
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    weight_decay: float


def never(optimizer: torch.optim.Optimizer) -> bool:
    return False


def nothing_needed() -> None:
    return None


@dataclass(frozen=True)
class OptimizerSpec:
    """One optimizer: how it is built, and what the rest of the program asks about it."""

    name: str
    """The value of training.optimizer."""
    build: Callable[[nn.Module, Settings, torch.device], torch.optim.Optimizer]
    """The optimizer over the model's trainable parameters, at training.learning_rate (the schedule scales it)."""
    sync: Callable[[torch.optim.Optimizer, Settings], None]
    """Put the config's hyper-parameters (betas, epsilon, weight decay, momentum, ...) in force in an optimizer
    restored from a checkpoint, when a resume changed them. Not the learning rate: the plan sets that
    (phases.Plan.learning_rate)."""
    bytes_per_parameter: int
    """Training bytes of each parameter it updates: the fp32 weight and gradient (4 + 4) and its state."""
    own_parameters: Callable[[ModelDims], int] | None = None
    """For an optimizer that updates some parameters and leaves the rest to AdamW: how many it takes, from the
    model's shape alone (nothing is built); None: it updates them all."""
    rest_bytes_per_parameter: int = 0
    """Training bytes of each parameter it leaves to another optimizer (with `own_parameters`)."""
    not_with_fsdp: str | None = None
    """Why it cannot run under training.data_parallel fsdp (the config is refused when read); None: it can."""
    skips_on_device: Callable[[torch.optim.Optimizer], bool] = never
    """Whether the optimizer, as built, skips an update itself when its `found_inf` is set, so that the host need not
    wait for the device to read whether a step was finite (step.apply_update)."""
    require: Callable[[], object] = nothing_needed
    """Stop, in one sentence naming what installs it, when a package it needs is missing: checked before a run
    starts (--dry_run too), not after the model is built."""

    def training_bytes(self, dims: ModelDims, parameters: int) -> int:
        """Bytes of weights, gradients and optimizer state for a model of `parameters` parameters and shape
        `dims` (devices.training_memory: the floor below which training cannot start)."""
        own = parameters if self.own_parameters is None else min(parameters, self.own_parameters(dims))
        return self.bytes_per_parameter * own + self.rest_bytes_per_parameter * (parameters - own)


def weight_decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """[decayed: parameters of 2+ dims (matrices, embeddings)], [not decayed: biases, norms, other 1-D ones]."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
