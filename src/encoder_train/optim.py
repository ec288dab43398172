"""The optimizer a run chose (training.optimizer), with BERT's weight-decay groups, and the warmup-then-decay
learning-rate schedule.

    adamw         PyTorch's AdamW (fused on CUDA and the CPU)
    stable_adamw  StableAdamW from torch-optimi, as ModernBERT trained with (the `stable-adamw` extra)
    muon          PyTorch's Muon for the encoder's weight matrices, AdamW for the rest: one `MuonWithAdamW`

Each is one `torch.optim.Optimizer` (one schedule, one state dict). Their parameter groups, in this order, which
`apply_hyperparameters` relies on:

    adamw, stable_adamw   [decayed: parameters of 2+ dims], [not decayed: biases, norms, other 1-D parameters]
    muon                  [Muon: the matrices of `muon_matrices`], then AdamW's two groups above over the rest
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from encoder_train import distributed
from encoder_train.config import TrainingConfig
from encoder_train.errors import UserError, require


def build_optimizer(model: nn.Module, cfg: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    """`cfg.optimizer` over the model's trainable parameters, at `cfg.learning_rate` (the schedule scales it)."""
    if cfg.optimizer == "muon":
        return build_muon(model, cfg, device)
    groups = weight_decay_groups(model.parameters(), cfg.weight_decay)
    if cfg.optimizer == "stable_adamw":
        return build_stable_adamw(groups, cfg, device)
    return build_adamw(groups, cfg, device)


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


def build_adamw(groups: list[dict], cfg: TrainingConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; biases, LayerNorm weights and other 1-D parameters are not decayed."""
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


def build_stable_adamw(groups: list[dict], cfg: TrainingConfig, device: torch.device) -> torch.optim.Optimizer:
    """StableAdamW (Wortsman et al. 2023, in torch-optimi), ModernBERT's optimizer: AdamW whose step size is divided,
    per tensor, by the RMS of grad / sqrt(v) when that exceeds 1 (Adafactor's update clipping), so a rare large
    gradient does not make a large step. It has no bias correction terms: its betas are debiased instead.

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
    on_cuda = device.type == "cuda"
    return optimi.StableAdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                              eps=cfg.adam_eps, weight_decay=cfg.weight_decay, decouple_lr=False,
                              triton=None if on_cuda else False, foreach=None if on_cuda else False)


def require_optimi():
    return require("optimi", "stable-adamw", "training.optimizer stable_adamw")


def require_muon() -> None:
    if not hasattr(torch.optim, "Muon"):
        raise UserError(f"training.optimizer muon needs torch.optim.Muon, new in PyTorch 2.9, and this is PyTorch "
                        f"{torch.__version__}; upgrade torch, or choose adamw or stable_adamw.")


# What an optimizer needs beyond the core install, checked before a run starts (--dry_run too): a missing package
# is one sentence naming what installs it, not a failure after the model is built.
OPTIMIZER_NEEDS = {"stable_adamw": require_optimi, "muon": require_muon}


def require_optimizer(cfg: TrainingConfig) -> None:
    OPTIMIZER_NEEDS.get(cfg.optimizer, lambda: None)()


def muon_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The parameters Muon updates, chosen by their role: the weight of every linear layer inside the encoder's
    layers (attention query, key, value and output; feed-forward up and down, GeGLU's up with its value and gate
    halves stacked as one (2 x intermediate, H) matrix) and the MLM head's dense layer (H, H), a hidden-to-hidden
    layer too. Not the embeddings: the word embedding is also the MLM decoder (tied), an input and an output layer,
    which Muon's authors leave to AdamW; nor norms and biases (not matrices)."""
    encoder = distributed.unwrap(model)  # DDP's wrapper shares the parameters
    linears = [m for m in encoder.encoder.layers.modules() if isinstance(m, nn.Linear)] + [encoder.head.dense]
    return [m.weight for m in linears if m.weight.requires_grad]


def build_muon(model: nn.Module, cfg: TrainingConfig, device: torch.device) -> MuonWithAdamW:
    """Muon (Jordan et al. 2024, PyTorch's) for `muon_matrices`, AdamW (as `adamw`) for every other parameter.

    Learning rate: adjust_lr_fn="match_rms_adamw" (Moonshot, "Muon is Scalable for LLM Training", 2025) scales
    each matrix's orthogonalised update by 0.2 x sqrt(max(rows, columns)), to the RMS an AdamW update has, so Muon
    takes training.learning_rate and its schedule as AdamW does, and training.weight_decay with the same meaning
    (weights x (1 - lr x weight_decay)). Momentum: training.muon_momentum (0.95, Nesterov), 5 Newton-Schulz steps
    in bf16, as its authors advise."""
    require_muon()
    matrices = muon_matrices(model)
    chosen = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if id(p) not in chosen]
    muon = torch.optim.Muon([{"params": matrices, "weight_decay": cfg.weight_decay}], lr=cfg.learning_rate,
                            momentum=cfg.muon_momentum, nesterov=True, adjust_lr_fn="match_rms_adamw")
    return MuonWithAdamW(muon, build_adamw(weight_decay_groups(rest, cfg.weight_decay), cfg, device))


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon and AdamW as one optimizer. Its param_groups are Muon's groups then AdamW's, the very same dicts, so the
    schedule and `apply_hyperparameters` reach both; its state is one dict that both update (their parameters are
    disjoint), so `state_dict` and `load_state_dict` are torch's own, over all the groups in that order."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        super().__init__([*muon.param_groups, *adamw.param_groups], {})
        self._share()

    def _share(self) -> None:
        """Point the two optimizers at this one's groups and state (again after `load_state_dict` replaced them)."""
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()


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

    A restored optimizer and scheduler carry the checkpoint's peak learning rate, betas, epsilon, weight decay and
    (Muon) momentum; the config the user passed now must win. The learning rate of the next update is set as the
    schedule gives it at `step` (LambdaLR would only apply a changed `max_steps` one step late). The optimizer is
    the one the checkpoint was trained with (`state.check_resumable` refuses another).
    """
    lr = cfg.learning_rate * lr_factor(step, cfg)
    adam_groups = optimizer.param_groups
    if isinstance(optimizer, MuonWithAdamW):
        for group in optimizer.muon.param_groups:
            group["momentum"] = cfg.muon_momentum
            group["weight_decay"] = cfg.weight_decay
        adam_groups = optimizer.adamw.param_groups
    for i, group in enumerate(adam_groups):
        if "beta1" in group:  # optimi's StableAdamW names them apart, and keeps eps squared in each tensor's state
            group["beta1"], group["beta2"] = cfg.adam_beta1, cfg.adam_beta2
            for p in group["params"]:
                if "eps_sq" in optimizer.state.get(p, {}):
                    optimizer.state[p]["eps_sq"].fill_(cfg.adam_eps**2)
        else:
            group["betas"] = (cfg.adam_beta1, cfg.adam_beta2)
        group["eps"] = cfg.adam_eps
        group["weight_decay"] = cfg.weight_decay if i == 0 else 0.0  # group 1: biases and norms, never decayed
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.learning_rate
        group["lr"] = lr
    scheduler.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)
    scheduler._last_lr = [lr] * len(optimizer.param_groups)
