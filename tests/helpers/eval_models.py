"""Models under evaluation for the task kinds' tests: tiny encoders exported as Hugging Face folders, and an
EvalModel (evaluation/spec.py) over such a folder, built as the harness builds it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from tokenizers import Tokenizer

from encoder_train.evaluation.models import fingerprint
from encoder_train.hf import export_checkpoint
from helpers.hf_models import dims_for, write_checkpoint


@dataclass
class FolderModel:
    """An EvalModel over a local Hugging Face folder: mean pooling over a Transformer module truncating at
    min(max_length, the model's window). Each call builds a fresh model, as the harness's does."""

    folder: Path
    name: str = "tiny"
    step: int | None = None
    output_dir: Path | None = None  # where fine-tunes are kept (OUTPUT_DIR/finetuned/NAME/); None: beside the folder
    device: str = "cpu"

    def files_fingerprint(self) -> str:
        return fingerprint(self.folder)

    def finetuned_dir(self) -> Path:
        return (self.output_dir or self.folder.parent) / "finetuned" / self.name

    def hf_folder(self) -> Path:
        return self.folder

    def sentence_transformer(self, max_length: int):
        from sentence_transformers import SentenceTransformer

        # An export's own modules.json: a Transformer module over the masked-LM folder (its encoder's last hidden
        # states, the bare encoder's output) and mean pooling; the window is its sentence_bert_config's.
        model = SentenceTransformer(str(self.folder), device="cpu")
        model.max_seq_length = min(max_length, model.max_seq_length)
        return model


def random_export(folder: Path, tokenizer: Tokenizer, **dims) -> Path:
    """A tiny random RoBERTa-shaped model (hidden 32, 2 layers), written as a checkpoint and exported: transformers
    writes the folder. `dims` changes ModelDims fields (a window of 128 tokens by default, dropout off)."""
    folder.mkdir(parents=True, exist_ok=True)
    dims = {"max_position_embeddings": 130, "dropout": 0.0, "attention_dropout": 0.0, **dims}
    path, _ = write_checkpoint(folder / "ckpt", tokenizer, replace(dims_for(tokenizer.get_vocab_size()), **dims))
    return export_checkpoint(path, folder / "export")
