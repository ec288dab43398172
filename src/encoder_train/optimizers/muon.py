"""`muon`: PyTorch's Muon (Jordan et al. 2024; PyTorch 2.9 or later) for the encoder's weight matrices, AdamW (as
`adamw`) for every other parameter, as one optimizer (`MuonWithAdamW`). Its parameter groups, which `sync` relies
on: [Muon: the matrices of `matrices`], then AdamW's two groups over the rest.

Which parameters are Muon's is one rule, written twice side by side: `matrices` picks them in a model (the
builder), `matrix_parameters` counts them from the shape alone (the memory estimate, which builds nothing);
tests/test_optimizers.py holds the two to agreement on both families."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from encoder_train.errors import UserError
from encoder_train.optimizers import adamw
from encoder_train.optimizers.spec import OptimizerSpec, Settings, weight_decay_groups

if TYPE_CHECKING:
    import torch
    from torch import nn

    from encoder_train.model import ModelDims
    from encoder_train.optimizers.muon_with_adamw import MuonWithAdamW

# fp32 weights and their gradients (4 + 4), plus one momentum buffer (4); the rest is AdamW's.
BYTES_PER_PARAMETER = 12


class MuonSettings(Settings, Protocol):
    muon_momentum: float


def require_muon() -> None:
    import torch

    if not hasattr(torch.optim, "Muon"):
        raise UserError(f"training.optimizer muon needs torch.optim.Muon, new in PyTorch 2.9, and this is PyTorch "
                        f"{torch.__version__}; upgrade torch, or choose adamw or stable_adamw.")


def matrices(model: nn.Module) -> list[nn.Parameter]:
    """The parameters Muon updates, chosen by their role: the weight of every linear layer inside the encoder's
    layers (attention query, key, value and output; feed-forward up and down, GeGLU's up with its value and gate
    halves stacked as one (2 x intermediate, H) matrix) and the MLM head's dense layer (H, H), a hidden-to-hidden
    layer too. Not the embeddings: the word embedding is also the MLM decoder (tied), an input and an output layer,
    which Muon's authors leave to AdamW; nor norms and biases (not matrices)."""
    from torch import nn

    from encoder_train import distributed

    encoder = distributed.unwrap(model)  # DDP's wrapper shares the parameters
    linears = [m for m in encoder.encoder.layers.modules() if isinstance(m, nn.Linear)] + [encoder.head.dense]
    return [m.weight for m in linears if m.weight.requires_grad]


def matrix_parameters(dims: ModelDims) -> int:
    """How many parameters `matrices` picks, from the shape alone: each layer's query, key, value and attention
    output (4 x H x H), feed-forward up (H x I, or H x 2I with GeGLU) and down (I x H), and the MLM head's dense
    layer (H x H)."""
    h, i = dims.hidden_size, dims.intermediate_size
    up = 2 * h * i if dims.feed_forward == "geglu" else h * i
    return dims.num_layers * (4 * h * h + up + i * h) + h * h


def build(model: nn.Module, cfg: MuonSettings, device: torch.device) -> MuonWithAdamW:
    """Muon for `matrices`, AdamW for every other parameter.

    Learning rate: adjust_lr_fn="match_rms_adamw" (Moonshot, "Muon is Scalable for LLM Training", 2025) scales
    each matrix's orthogonalised update by 0.2 x sqrt(max(rows, columns)), to the RMS an AdamW update has, so Muon
    takes training.learning_rate and its schedule as AdamW does, and training.weight_decay with the same meaning
    (weights x (1 - lr x weight_decay)). Momentum: training.muon_momentum (0.95, Nesterov), 5 Newton-Schulz steps
    in bf16, as its authors advise."""
    import torch

    from encoder_train.optimizers.muon_with_adamw import MuonWithAdamW

    require_muon()
    chosen = matrices(model)
    ids = {id(p) for p in chosen}
    rest = [p for p in model.parameters() if id(p) not in ids]
    muon = torch.optim.Muon([{"params": chosen, "weight_decay": cfg.weight_decay}], lr=cfg.learning_rate,
                            momentum=cfg.muon_momentum, nesterov=True, adjust_lr_fn="match_rms_adamw")
    return MuonWithAdamW(muon, adamw.build_adamw(weight_decay_groups(rest, cfg.weight_decay), cfg, device))


def sync(optimizer: MuonWithAdamW, cfg: MuonSettings) -> None:
    for group in optimizer.muon.param_groups:
        group["momentum"] = cfg.muon_momentum
        group["weight_decay"] = cfg.weight_decay
    adamw.sync_groups(optimizer.adamw.param_groups, cfg)


SPEC = OptimizerSpec(
    "muon", build, sync, BYTES_PER_PARAMETER, own_parameters=matrix_parameters,
    rest_bytes_per_parameter=adamw.BYTES_PER_PARAMETER,
    not_with_fsdp="PyTorch's Muon orthogonalises whole matrices, which FSDP splits between processes",
    require=require_muon,
)
