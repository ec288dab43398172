"""A classification (or regression) head on the pretrained encoder, pooled as the model's family does it.

  SequenceClassifier: (B, T) ids -> backbone.encode -> (B, T, H) -> head -> (B, C) logits

`backbone` is the whole `MaskedLM`, MLM head included (frozen, unused), so that a fine-tuned checkpoint's
"model" entry is an ordinary checkpoint's: `load_trained`, `evaluate`, `fill-mask` and `export` read it as
they read any other. The head's parameters are saved beside it, under "classifier".

One head per kind (`HEADS`; each family names its kind and the Hugging Face names of the head's modules, see
`families/`), so that export is a renaming:

  roberta     RobertaClassificationHead: the <s> token -> dropout -> dense -> tanh -> dropout -> out_proj
  bert        BertForSequenceClassification's pooler and classifier: the [CLS] token -> dense -> tanh -> dropout
              -> out_proj (its `bert.pooler.dense` and `classifier`)
  modernbert  ModernBertForSequenceClassification's: the CLS token or the mean of the real tokens (its
              `classifier_pooling`) -> dense -> GELU -> LayerNorm -> dropout -> classifier
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from encoder_train.errors import UserError
from encoder_train.families import family_of
from encoder_train.model import MaskedLM, ModelDims

Pooling = Literal["cls", "mean"]


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, how: Pooling) -> torch.Tensor:
    """(B, T, H) hidden states, (B, T) mask (True on real tokens) -> (B, H): the first token, or the mean of the
    real ones. Rows are right-padded, so the first token is each row's <s> / [CLS]."""
    if how == "cls":
        return hidden[:, 0]
    weights = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


class RobertaHead(nn.Module):
    """RobertaClassificationHead: pooled <s> -> dropout -> dense -> tanh -> dropout -> out_proj. BERT's pooler
    and classifier are the same without the first dropout (`dropout_first`)."""

    pooling: Pooling = "cls"

    def __init__(self, hidden_size: int, num_outputs: int, dropout: float, dropout_first: bool = True):
        super().__init__()
        self.dropout_first = dropout_first
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out_proj = nn.Linear(hidden_size, num_outputs)
        for layer in (self.dense, self.out_proj):  # BERT's initialisation, as the encoder's
            nn.init.normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    @property
    def output(self) -> nn.Linear:
        return self.out_proj

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H), (B, T) -> (B, C)"""
        x = pool(hidden, attention_mask, self.pooling)
        if self.dropout_first:
            x = self.dropout(x)
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)

    def hf_config(self) -> dict:
        """Entries the sequence-classification class's config takes for this head: none."""
        return {}


class ModernBertHead(nn.Module):
    """ModernBertForSequenceClassification's: pooled CLS (or mean) -> dense -> GELU -> LayerNorm -> dropout ->
    classifier. Biases as the model's: `dense` as its MLM head's dense layer (the export's classifier_bias), the
    LayerNorm as its norms."""

    def __init__(self, dims: ModelDims, num_outputs: int, dropout: float, pooling: Pooling):
        super().__init__()
        self.pooling = pooling
        self.dense = nn.Linear(dims.hidden_size, dims.hidden_size, bias=getattr(dims, "head_bias", False))
        self.norm = nn.LayerNorm(dims.hidden_size, eps=dims.layer_norm_eps, bias=getattr(dims, "norm_bias", True))
        self.drop = nn.Dropout(dropout)
        self.classifier = nn.Linear(dims.hidden_size, num_outputs)
        for layer in (self.dense, self.classifier):
            nn.init.normal_(layer.weight, std=0.02)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)

    @property
    def output(self) -> nn.Linear:
        return self.classifier

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, H), (B, T) -> (B, C)"""
        x = self.norm(F.gelu(self.dense(pool(hidden, attention_mask, self.pooling))))
        return self.classifier(self.drop(x))

    def hf_config(self) -> dict:
        """ModernBertForSequenceClassification's pooling."""
        return {"classifier_pooling": self.pooling}


def roberta_head(dims: ModelDims, num_outputs: int, dropout: float, pooling: Pooling) -> nn.Module:
    if pooling != "cls":
        raise UserError(f"--pooling {pooling}: RoBERTa's classification head reads the <s> token only (and so does "
                        "RobertaForSequenceClassification); leave --pooling out for this model.")
    return RobertaHead(dims.hidden_size, num_outputs, dropout)


def bert_head(dims: ModelDims, num_outputs: int, dropout: float, pooling: Pooling) -> nn.Module:
    if pooling != "cls":
        raise UserError(f"--pooling {pooling}: BERT's pooler reads the [CLS] token only (and so does "
                        "BertForSequenceClassification); leave --pooling out for this model.")
    return RobertaHead(dims.hidden_size, num_outputs, dropout, dropout_first=False)


# A family's `head` -> the head it fine-tunes with.
HEADS: dict[str, Callable[[ModelDims, int, float, Pooling], nn.Module]] = {
    "roberta": roberta_head,
    "bert": bert_head,
    "modernbert": ModernBertHead,
}


class SequenceClassifier(nn.Module):
    def __init__(self, backbone: MaskedLM, num_outputs: int, dropout: float | None = None, pooling: Pooling = "cls"):
        super().__init__()
        dims = backbone.dims
        self.family = family_of(dims)  # its published architecture fixes the head
        self.num_outputs = num_outputs
        self.backbone = backbone
        for p in backbone.head.parameters():  # the MLM head: kept in the checkpoint, not trained
            p.requires_grad_(False)
        self.head = HEADS[self.family.head](dims, num_outputs, dims.dropout if dropout is None else dropout, pooling)

    @torch.no_grad()
    def start_at(self, value: float) -> None:
        """A regression head's output starts at `value` (the mean training label): AdamW moves a bias by about
        the learning rate a step, so a target mean of 3 would otherwise take thousands of steps to reach."""
        self.head.output.bias.fill_(value)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) right-padded ids and mask (True on real tokens) -> (B, C) logits; C = 1 for regression."""
        hidden = self.backbone.encode(input_ids, attention_mask)  # (B, T, H)
        return self.head(hidden, attention_mask)
