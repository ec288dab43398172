"""Export a fine-tuned checkpoint as a Hugging Face `RobertaForSequenceClassification` or
`ModernBertForSequenceClassification` folder, whichever family the model is, for `pipeline("text-classification")`.

The encoder goes through hf.py's mapping (`to_hf`, the family's config, the tokenizer files) with the MLM head
left out; the classification head's modules carry Hugging Face's names already (classifier.py), so it is a
prefix: `dense`, `out_proj` -> `classifier.dense`, `classifier.out_proj` (RoBERTa); `dense`, `norm` ->
`head.dense`, `head.norm` and `classifier` -> `classifier` (ModernBERT). The config adds the labels (id2label,
label2id), `problem_type` (regression: the pipeline then returns the number as it is) and the head's dropout
and pooling.

The exported tokenizer frames texts as fine-tuning did, `<s> A </s>` and `<s> A </s></s> B </s>` (RoBERTa's
post-processor with the tokenizer's own special tokens), whatever post-processor the tokenizer had.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, processors

from encoder_train import checkpoint
from encoder_train.errors import UserError
from encoder_train.hf import _require, _tokenizer_config, modernbert_config, roberta_config, to_hf
from encoder_train.model import ModelDims
from encoder_train.tokenizer import special_tokens

# Our head's module -> the Hugging Face class's, per family.
HEAD_NAMES = {
    "roberta": {"dense": "classifier.dense", "out_proj": "classifier.out_proj"},
    "modernbert": {"dense": "head.dense", "norm": "head.norm", "classifier": "classifier"},
}
CLASSES = {"roberta": "RobertaForSequenceClassification", "modernbert": "ModernBertForSequenceClassification"}


def export_classifier(checkpoint_path: str | Path, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a fine-tuned checkpoint as a Hugging Face sequence-classification folder; returns the folder."""
    transformers = _require("transformers")
    safetensors_torch = _require("safetensors.torch")
    checkpoint_path, out = Path(checkpoint_path), Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file; pass --output_dir with a folder to create.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} is not empty; pass an empty or new --output_dir, or --overwrite.")
    state = checkpoint.load(checkpoint_path, flag="--checkpoint")
    if "classifier" not in state or "task" not in state:
        raise UserError(f"checkpoint {checkpoint_path} holds no classification head (it is not from `encoder-train "
                        "finetune`); export an encoder with `encoder-train export`, or fine-tune it first.")
    dims = ModelDims(**state["dims"])
    tokenizer = Tokenizer.from_str(state["tokenizer"]["json"])
    special = special_tokens(tokenizer, f"stored in {checkpoint_path}")
    task, family = state["task"], state["task"]["family"]

    encoder = {k: v for k, v in state["model"].items() if not k.startswith("head.")}  # no MLM head
    weights = to_hf(encoder, dims)  # refuses, naming the option, what the family's class cannot express
    for name, tensor in state["classifier"].items():
        module, param = name.rsplit(".", 1)
        weights[f"{HEAD_NAMES[family][module]}.{param}"] = tensor.contiguous()

    labels = task["labels"]
    regression = labels["kind"] == "regression"
    names = ["score"] if regression else labels["names"]
    dropout = state["finetune"].get("dropout")
    dropout = dims.dropout if dropout is None else dropout
    if family == "modernbert":
        config = modernbert_config(transformers, dims, special)
        config.classifier_pooling = task["pooling"]
    else:
        config = roberta_config(transformers, dims, special)
    config.classifier_dropout = dropout
    config.architectures = [CLASSES[family]]
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}
    config.problem_type = "regression" if regression else "single_label_classification"

    framed = Tokenizer.from_str(tokenizer.to_str())
    bos, eos = tokenizer.id_to_token(special.bos), tokenizer.id_to_token(special.eos)
    framed.post_processor = processors.RobertaProcessing((eos, special.eos), (bos, special.bos),
                                                         trim_offsets=False, add_prefix_space=False)
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        try:
            config.save_pretrained(tmp)
            safetensors_torch.save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            framed.save(str(tmp / "tokenizer.json"))
            tokenizer_config = _tokenizer_config(framed, special, dims)
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
            for f in tmp.iterdir():  # each file appears whole under its name
                os.replace(f, out / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise UserError(f"could not write to {out} ({e.strerror}); pass a writable --output_dir.") from None
    return out
