"""What a run is about to do, checked before it starts: a refusal for what cannot run, a warning for what runs but
makes no sense. A real run's start and --dry_run ask the same questions, so a dry run's verdict is the run's.

    cannot run      a package the config needs is not installed (the optimizer's, --wandb's, --tensorboard's)
    makes no sense  a vocabulary far larger than the tokenizer's; a source read many epochs over; rows far
                    shorter than the model's positions (phases.Plan.warnings)
"""

from __future__ import annotations

import math
from collections.abc import Callable

from encoder_train.config import Config
from encoder_train.errors import require
from encoder_train.model import ModelDims
from encoder_train.optimizers import require_optimizer
from encoder_train.phases import Plan

# Optional packages a config may need besides its optimizer's: (whether it needs it, module, extra, what needs it).
PACKAGES: list[tuple[Callable[[Config], bool], str, str, str]] = [
    (lambda c: c.wandb.enabled, "wandb", "wandb", "--wandb"),
    (lambda c: c.tensorboard.enabled, "tensorboard", "tensorboard", "--tensorboard"),
]


def check_can_run(config: Config) -> None:
    """Refuse, in one sentence naming the pip command that installs it, a package the config needs that is
    missing, before any time is spent."""
    require_optimizer(config.training)
    for needed, module, extra, feature in PACKAGES:
        if needed(config):
            require(module, extra, feature)


def warnings(config: Config, dims: ModelDims, tokenizer_vocab: int, plan: Plan | None) -> list[str]:
    """One sentence for each thing the run would do that makes no sense (it runs all the same)."""
    lines = vocabulary_warnings(config, dims, tokenizer_vocab)
    return lines + (plan.warnings(dims.max_tokens) if plan is not None else [])


def vocabulary_warnings(config: Config, dims: ModelDims, tokenizer_vocab: int) -> list[str]:
    """An embedding of more than twice the rows the tokenizer needs: more than half of it never trains."""
    needed = math.ceil(tokenizer_vocab / config.model.pad_vocab_multiple) * config.model.pad_vocab_multiple
    if dims.vocab_size <= 2 * needed:
        return []
    unused = dims.vocab_size - tokenizer_vocab
    return [f"model.vocab_size {dims.vocab_size:,} is {dims.vocab_size / tokenizer_vocab:.1f}x the tokenizer's "
            f"{tokenizer_vocab:,} tokens: {unused:,} embedding rows ({unused * dims.hidden_size:,} parameters) are "
            "never trained; remove model.vocab_size to take the tokenizer's size."]
