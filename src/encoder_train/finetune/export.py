"""Export a fine-tuned checkpoint as its family's Hugging Face sequence-classification folder
(`RobertaForSequenceClassification`, `BertForSequenceClassification`, `ModernBertForSequenceClassification`),
for `pipeline("text-classification")`.

The encoder goes through hf.py's mapping (`to_hf`, the family's config, the tokenizer files) with the MLM head
left out; the classification head's modules are renamed by the family's `head_names` (families/): `dense`,
`out_proj` -> `classifier.dense`, `classifier.out_proj` (RoBERTa), -> `bert.pooler.dense`, `classifier` (BERT);
`dense`, `norm`, `classifier` -> `head.dense`, `head.norm`, `classifier` (ModernBERT). The config adds the labels
(id2label, label2id), `problem_type` (regression: the pipeline then returns the number as it is) and the head's
dropout and pooling.

The exported tokenizer frames texts as fine-tuning did, `<s> A </s>` and `<s> A </s></s> B </s>` (RoBERTa's
post-processor with the tokenizer's own special tokens), whatever post-processor the tokenizer had.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, processors

from encoder_train.finetune.loop import load_finetuned
from encoder_train.hf import _require, check_output_dir, hf_config, to_hf, write_folder
from encoder_train.tokenizer import special_tokens


def export_classifier(checkpoint_path: str | Path, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a fine-tuned checkpoint as a Hugging Face sequence-classification folder; returns the folder."""
    transformers = _require("transformers")
    checkpoint_path, out = Path(checkpoint_path), Path(output_dir)
    check_output_dir(out, overwrite)
    # Loaded as `evaluate` loads it: a checkpoint of another kind or version is refused, naming --checkpoint.
    finetuned = load_finetuned(checkpoint_path, torch.device("cpu"))
    model, tokenizer, labels = finetuned.model, finetuned.tokenizer, finetuned.labels
    dims = model.backbone.dims
    special = special_tokens(tokenizer, f"stored in {checkpoint_path}")

    encoder = {k: v for k, v in model.backbone.state_dict().items() if not k.startswith("head.")}  # no MLM head
    weights = to_hf(encoder, dims)  # refuses, naming the option, what the family's class cannot express
    for name, tensor in model.head.state_dict().items():
        module, param = name.rsplit(".", 1)
        weights[f"{model.family.head_names[module]}.{param}"] = tensor.contiguous()

    regression = labels.kind == "regression"
    names = ["score"] if regression else list(labels.names)
    config = hf_config(transformers, dims, special)
    config.update(model.head.hf_config())
    dropout = finetuned.state["finetune"].get("dropout")  # None: the encoder's, as fine-tuning used
    config.classifier_dropout = dims.dropout if dropout is None else dropout
    config.architectures = [model.family.sequence_classification]
    config.id2label = dict(enumerate(names))
    config.label2id = {n: i for i, n in enumerate(names)}
    config.problem_type = "regression" if regression else "single_label_classification"

    framed = Tokenizer.from_str(tokenizer.to_str())
    bos, eos = tokenizer.id_to_token(special.bos), tokenizer.id_to_token(special.eos)
    framed.post_processor = processors.RobertaProcessing((eos, special.eos), (bos, special.bos),
                                                         trim_offsets=False, add_prefix_space=False)
    write_folder(out, config, weights, framed, special, dims)
    return out
