"""`--model NAME=PATH` -> the report's rows, and each row as a model loaded lazily in the form a kind asks for.

PATH is one of:
  - a checkpoint file, or a sharded checkpoint folder (`checkpoint_XXXXXXXX/`): one row, NAME;
  - a run's checkpoint folder (train's --checkpoint_dir): one row per phase-end checkpoint and one for the last,
    NAME@STEP. Which checkpoints end phases the run's last checkpoint says: its plan progress (phases.Plan.progress)
    lists every phase's length in steps, and a phase ends where their running sum falls; the run keeps those
    checkpoints through rotation (checkpointing.Saver), so they are still there;
  - a local Hugging Face folder (config.json and weights: an `export`, a released RoBERTa/BERT/ModernBERT, ...): one
    row, NAME, used as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from encoder_train import checkpoint
from encoder_train.errors import UserError, require
from encoder_train.evaluation.quiet import transformers_quietly
from encoder_train.evaluation.suite import PLAIN_NAME

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
EXPORTED = "exported_from.json"  # in an export under OUTPUT_DIR/models/: which checkpoint (and its fingerprint)
NOT_A_MODEL = ("pass a checkpoint file, a sharded checkpoint folder, a run's checkpoint folder or a Hugging Face "
               "folder (config.json and weights)")


@dataclass(frozen=True)
class ModelRow:
    """One row of the report."""

    name: str  # NAME, or NAME@STEP for a run folder's checkpoints
    path: Path  # the checkpoint file or folder, or the Hugging Face folder
    step: int | None  # the checkpoint's training step; None for a Hugging Face folder
    kind: str  # "checkpoint" (ours, a file or sharded) or "hf"
    group: str  # the NAME it was given under: a run folder's rows share it (one line of a plot)


def parse_models(specs: list[str]) -> list[tuple[str, Path]]:
    """`NAME=PATH` flags -> (name, path), each name given once."""
    found: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise UserError(f"--model {spec!r} is not NAME=PATH; pass e.g. --model base=runs/base/checkpoints.")
        if not PLAIN_NAME.match(name):
            raise UserError(f"--model {spec!r}: the name {name!r} is not a plain name; use letters, digits, '.', '_' "
                            "and '-' (it names the report's row and a folder).")
        if name in found:
            raise UserError(f"--model names {name!r} twice ({found[name]} and {path}); give each model its own name.")
        found[name] = Path(path)
    return list(found.items())


def model_rows(specs: list[str]) -> list[ModelRow]:
    return [row for name, path in parse_models(specs) for row in rows_for(name, path)]


def rows_for(name: str, path: Path) -> list[ModelRow]:
    """The rows of one `--model NAME=PATH` (see the module for what PATH may be)."""
    if not path.exists():
        raise UserError(f"--model {name}={path}: {path} does not exist; {NOT_A_MODEL}.")
    if path.is_file():
        return [ModelRow(name, path, _step_of(path, name), "checkpoint", name)]
    if not path.is_dir():
        raise UserError(f"--model {name}={path}: {path} is not a file or folder; {NOT_A_MODEL}.")
    if checkpoint.FOLDER.match(path.name) or (path / checkpoint.MARKER).exists() or (path / checkpoint.META).exists():
        return [ModelRow(name, path, _step_of(path, name), "checkpoint", name)]
    if (path / "config.json").is_file():
        if not any((path / w).is_file() for w in HF_WEIGHTS):
            raise UserError(f"--model {name}={path}: {path} has a config.json but no weights "
                            f"({', '.join(HF_WEIGHTS)}); pass a folder written by save_pretrained or `encoder-train "
                            "export`.")
        return [ModelRow(name, path, None, "hf", name)]
    return run_rows(name, path)


def run_rows(name: str, folder: Path) -> list[ModelRow]:
    """A run's checkpoint folder: its phase-end checkpoints and its last one, as NAME@STEP."""
    found = [(s, p) for s, p in checkpoint.list_checkpoints(folder) if checkpoint.is_complete(p)]
    if not found:
        raise UserError(f"--model {name}={folder}: {folder} is not a model (no checkpoint_XXXXXXXX.pt, no "
                        f"config.json); {NOT_A_MODEL}.")
    ends = phase_ends(_peek(found[-1][1], name).get("plan"))
    kept = [(s, p) for s, p in found if s in ends or p == found[-1][1]]
    return [ModelRow(f"{name}@{s}", p, s, "checkpoint", name) for s, p in kept]


def phase_ends(progress: dict[str, Any] | None) -> set[int]:
    """The steps at which the phases of a checkpoint's plan (phases.Plan.progress) end; none without phases (a run
    without `phases:` has one unnamed phase)."""
    phases = (progress or {}).get("phases") or []
    if not phases or not any(p.get("name") for p in phases):
        return set()
    ends, start = set(), 0
    for p in phases:
        start += int(p["length"])
        ends.add(start)
    return ends


def _peek(path: Path, name: str) -> dict[str, Any]:
    """A checkpoint's training state without reading its weights (a file is memory-mapped, a sharded folder's
    meta.pt read alone): its step and plan. The weights are verified when a kind loads them."""
    try:
        if path.is_dir():
            return checkpoint.load(path, flag="--model", weights=False, contents=False)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except checkpoint.Damaged as e:
        raise UserError(f"--model {name}={path}: {e}") from None
    except Exception:  # noqa: BLE001 - not a zip of tensors: anything fails somewhere in the unpickler
        raise UserError(f"--model {name}={path}: {path} is not a model (it does not load as a checkpoint); "
                        f"{NOT_A_MODEL}.") from None
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise UserError(f"--model {name}={path}: {path} is not an encoder-train checkpoint (no model and step "
                        f"inside); {NOT_A_MODEL}.")
    return state


def _step_of(path: Path, name: str) -> int:
    return int(_peek(path, name)["step"])


def fingerprint(path: Path) -> str:
    """What tells a changed model from the one a result was computed on: every file's size and modification time
    (a hash of them for a folder). Cheap: nothing is read."""
    if not path.exists():
        raise FileNotFoundError(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        stat = f.stat()
        h.update(f"{f.relative_to(path) if f != path else ''}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


@dataclass
class LoadedModel:
    """A row under evaluation (spec.EvalModel): each form is made on first use and kept."""

    row: ModelRow
    output_dir: Path  # the evaluation's: exports go to output_dir/models/<row name>/
    device: torch.device
    _folder: Path | None = None
    _sentence: dict[int, Any] = field(default_factory=dict)
    _trained: Any = None  # state.Trained, once loaded

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def step(self) -> int | None:
        return self.row.step

    def files_fingerprint(self) -> str:
        return fingerprint(self.row.path)

    def finetuned_dir(self) -> Path:
        return self.output_dir / "finetuned" / self.row.name

    def hf_folder(self) -> Path:
        if self._folder is None:
            self._folder = self.row.path if self.row.kind == "hf" else self._export()
        return self._folder

    def _export(self) -> Path:
        """Our checkpoint as a Hugging Face folder, once: written to a temporary folder and renamed, so a folder of
        that name is complete; reused while the checkpoint is unchanged (its fingerprint, in EXPORTED)."""
        from encoder_train.hf import export_checkpoint

        target = self.output_dir / "models" / self.row.name
        source = {"path": str(self.row.path), "fingerprint": fingerprint(self.row.path)}
        if (target / EXPORTED).is_file() and json.loads((target / EXPORTED).read_text()) == source:
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        for stale in target.parent.glob(f".{self.row.name}.*.tmp"):  # an export killed midway (the folder is locked)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{self.row.name}.", suffix=".tmp"))
        try:
            export_checkpoint(self.row.path, tmp, overwrite=True)
            (tmp / EXPORTED).write_text(json.dumps(source) + "\n")
            if target.exists():  # our own export of an earlier file of that path
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target

    def sentence_transformer(self, max_length: int) -> Any:
        if max_length not in self._sentence:
            modules = require("sentence_transformers.sentence_transformer.modules", "eval",
                              "embedding a text (the retrieval and sts kinds)")
            st = require("sentence_transformers", "eval", "embedding a text (the retrieval and sts kinds)")
            folder = self.hf_folder()
            # An export says how its masked-LM weights give token vectors (loaded whole, the last hidden states):
            # read as a bare encoder instead, its head would be reported as unexpected weights.
            config_file = folder / "sentence_bert_config.json"
            saved = json.loads(config_file.read_text()) if config_file.is_file() else {}
            how = {k: saved[k] for k in ("transformer_task", "modality_config", "module_output_name") if k in saved}
            with transformers_quietly():
                encoder = modules.Transformer(str(folder), **how)
            window = encoder.max_seq_length or max_length  # config and tokenizer's limits, as the package reads them
            encoder.max_seq_length = min(max_length, window)
            pooling = modules.Pooling(encoder.get_embedding_dimension(), "mean")
            self._sentence[max_length] = st.SentenceTransformer(modules=[encoder, pooling], device=str(self.device))
        return self._sentence[max_length]

    def masked_lm(self):
        if self._trained is None:
            self._trained = self._load_masked_lm()
        return self._trained

    def _load_masked_lm(self):
        from encoder_train.state import Trained, load_trained

        if self.row.kind == "checkpoint":
            return load_trained(self.row.path, self.device, flag="--model")
        from encoder_train.finetune.loop import source_from_hf
        from encoder_train.model import MaskedLM

        source = source_from_hf(self.row.path)  # refuses, in one sentence, a folder of a family we do not import
        model = MaskedLM(source.dims)
        model.load_state_dict(source.weights)
        return Trained(model.to(self.device).eval(), source.tokenizer, source.spec, {"step": None})

    def finetune_source(self):
        from encoder_train.finetune.loop import source_from_checkpoint, source_from_hf

        return source_from_checkpoint(self.row.path) if self.row.kind == "checkpoint" else source_from_hf(self.row.path)
