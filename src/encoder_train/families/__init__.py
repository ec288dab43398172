"""The model families: one module each (`roberta.py`, `modernbert.py`, `bert.py`), one registry line each below.

A new family (say a NeoBERT-style ModernBERT variant) is a new module describing it as a `Family` (spec.py) and
one line in `FAMILIES`; its architecture options, if new, are fields of `model.ModelDims` and keys of
`config.ModelConfig`. `config.py` takes `model.family`'s values and defaults from here, `hf.py` its Hugging Face
names both ways, `finetune/` its classification head and class.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from encoder_train.errors import UserError
from encoder_train.families import bert, modernbert, roberta
from encoder_train.families.spec import ConfigField, Family

if TYPE_CHECKING:  # the registry imports no torch: config.py reads it, and `--help` stays quick
    from encoder_train.model import ModelDims

FAMILIES: dict[str, Family] = {f.name: f for f in (
    roberta.FAMILY,
    modernbert.FAMILY,
    bert.FAMILY,
)}
NAMES: tuple[str, ...] = tuple(FAMILIES)

__all__ = ["FAMILIES", "NAMES", "ConfigField", "Family", "family_of", "for_model_type"]


def family_of(dims: ModelDims) -> Family:
    """The family whose layout (positions) `dims` follow: what it fine-tunes and exports as. It may still set
    options that family's Hugging Face class cannot express (`Family.check_expressible`)."""
    found = next((f for f in FAMILIES.values() if f.recognises(dims)), None)
    if found is None:
        raise UserError(f"no model family has model.position_embedding {dims.position_embedding!r} with "
                        f"model.position_start {dims.position_start!r}; use one of {', '.join(NAMES)}.")
    return found


def for_model_type(model_type: str, path: Path | str) -> Family:
    """The family that imports a Hugging Face config.json of this model_type; refuses others, naming the file."""
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    classes = ", ".join(f.masked_lm for f in FAMILIES.values())
    raise UserError(f"{path} describes a {model_type!r} model; only {classes} folders (model_type {known}) are "
                    "supported.")
