"""BERT (Devlin et al. 2019), trained with RoBERTa's recipe: masked-LM only, no next-sentence task. RoBERTa's
layout but for three things: learned positions counted from 0 (every token at its place in the row), two token
types (every input is type 0; type 1's row is kept so that export gives the folder back), LayerNorm epsilon
1e-12. The MLM head is BertForMaskedLM's `cls.predictions` (dense -> GELU -> LayerNorm -> tied decoder + bias);
the pooler and the next-sentence head of a BertForPreTraining file are dropped on import.

Its tokenizers are WordPiece with [CLS] [SEP] [PAD] [MASK] [UNK] and the post-processor "[CLS] A [SEP]"
(`encoder-train tokenizer --type wordpiece`, or a BERT folder's own tokenizer.json or vocab.txt)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from encoder_train.families.roberta import POST_LN_FIELDS, POST_LN_REQUIRED, POST_LN_REQUIRES
from encoder_train.families.spec import ConfigField, Family

if TYPE_CHECKING:  # the registry imports no torch: config.py reads it, and `--help` stays quick
    from encoder_train.model import ModelDims

# Our module -> BertForMaskedLM's; `{i}` is a layer index. `head` -> `cls.predictions` covers the decoder bias.
NAMES: dict[str, str] = {
    "embeddings.word_embeddings": "bert.embeddings.word_embeddings",  # (V, H)
    "embeddings.position_embeddings": "bert.embeddings.position_embeddings",  # (max_position_embeddings, H)
    "embeddings.token_type_embeddings": "bert.embeddings.token_type_embeddings",  # (2, H)
    "embeddings.norm": "bert.embeddings.LayerNorm",
    "encoder.layers.{i}.attention.query": "bert.encoder.layer.{i}.attention.self.query",  # (H, H)
    "encoder.layers.{i}.attention.key": "bert.encoder.layer.{i}.attention.self.key",
    "encoder.layers.{i}.attention.value": "bert.encoder.layer.{i}.attention.self.value",
    "encoder.layers.{i}.attention.output": "bert.encoder.layer.{i}.attention.output.dense",
    "encoder.layers.{i}.attention_norm": "bert.encoder.layer.{i}.attention.output.LayerNorm",
    "encoder.layers.{i}.feed_forward.up": "bert.encoder.layer.{i}.intermediate.dense",  # (I, H)
    "encoder.layers.{i}.feed_forward.down": "bert.encoder.layer.{i}.output.dense",  # (H, I)
    "encoder.layers.{i}.feed_forward_norm": "bert.encoder.layer.{i}.output.LayerNorm",
    "head": "cls.predictions",  # head.bias (V,): the decoder's bias
    "head.dense": "cls.predictions.transform.dense",
    "head.norm": "cls.predictions.transform.LayerNorm",
}


def _learned_from_zero(dims: ModelDims) -> bool:
    return not dims.rotary and dims.position_start == "zero"


FAMILY = Family(
    name="bert",
    defaults={"position_start": "zero", "type_vocab_size": 2, "layer_norm_eps": 1e-12,
              "max_position_embeddings": 512},
    recognises=_learned_from_zero,
    requires={**POST_LN_REQUIRES, "position_embedding": "learned", "position_start": "zero"},
    positions="learned positions counted from 0",
    positions_needed="seq_len with bert's learned positions",
    model_types=("bert",),
    config_class="BertConfig",
    masked_lm="BertForMaskedLM",
    sequence_classification="BertForSequenceClassification",
    config_fields=(*POST_LN_FIELDS, ConfigField("type_vocab_size", "type_vocab_size")),
    config_written={"hidden_act": "gelu", "tie_word_embeddings": True},  # exact (erf) GELU
    config_required=POST_LN_REQUIRED,
    special_ids={"pad_token_id": "pad"},
    names=NAMES,
    # The pooler and the next-sentence head (BertForPreTraining) serve no masked-LM; `position_ids` and
    # `token_type_ids` are constant buffers; the decoder's weight and bias are tied copies (checked to be copies).
    ignored=re.compile(r"bert\.pooler\..*|cls\.seq_relationship\..*|bert\.embeddings\.(position_ids|token_type_ids)"
                       r"|cls\.predictions\.decoder\.(weight|bias)"),
    tied={"cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
          "cls.predictions.decoder.bias": "head.bias"},
    copies={"cls.predictions.bias": "cls.predictions.decoder.bias"},
    head="bert",
    head_names={"dense": "bert.pooler.dense", "out_proj": "classifier"},
    special_tokens=("[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"),
    tokenizer_type="wordpiece",
)
