"""The task kinds: one module each, registered here by name (a new kind is one file plus one line).

Modules are imported when a suite names their kind, so `eval` of an mlm-only suite never imports
sentence-transformers."""

from __future__ import annotations

import importlib
from types import ModuleType

KINDS = {
    "mlm": "encoder_train.evaluation.kinds.mlm",
    "classification": "encoder_train.evaluation.kinds.classification",
    "retrieval": "encoder_train.evaluation.kinds.retrieval",
    "sts": "encoder_train.evaluation.kinds.sts",
}


def kind_module(name: str) -> ModuleType:
    """The module of kind `name` (its Settings, check and run: spec.Kind). The suite checks the name first."""
    return importlib.import_module(KINDS[name])
