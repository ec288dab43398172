"""RoBERTa (Liu et al. 2019): the schema's defaults. Learned positions counted from pad_id + 1, one token type,
GELU, post-LN, an MLM head dense -> GELU -> LayerNorm -> decoder tied to the embeddings. Exported as
RobertaForMaskedLM; XLM-RoBERTa folders share the architecture and names and import the same way."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from encoder_train.families.spec import ConfigField, Family

if TYPE_CHECKING:  # the registry imports no torch: config.py reads it, and `--help` stays quick
    from encoder_train.model import ModelDims

# Our module -> RobertaForMaskedLM's; `{i}` is a layer index. Each module's `weight` / `bias` keep their names;
# `head` -> `lm_head` covers the decoder bias `head.bias` -> `lm_head.bias`. The decoder weight is the
# word-embedding matrix on both sides and is stored once.
NAMES: dict[str, str] = {
    "embeddings.word_embeddings": "roberta.embeddings.word_embeddings",  # (V, H)
    "embeddings.position_embeddings": "roberta.embeddings.position_embeddings",  # (max_position_embeddings, H)
    "embeddings.token_type_embeddings": "roberta.embeddings.token_type_embeddings",  # (1, H)
    "embeddings.norm": "roberta.embeddings.LayerNorm",
    "encoder.layers.{i}.attention.query": "roberta.encoder.layer.{i}.attention.self.query",  # (H, H)
    "encoder.layers.{i}.attention.key": "roberta.encoder.layer.{i}.attention.self.key",
    "encoder.layers.{i}.attention.value": "roberta.encoder.layer.{i}.attention.self.value",
    "encoder.layers.{i}.attention.output": "roberta.encoder.layer.{i}.attention.output.dense",
    "encoder.layers.{i}.attention_norm": "roberta.encoder.layer.{i}.attention.output.LayerNorm",
    "encoder.layers.{i}.feed_forward.up": "roberta.encoder.layer.{i}.intermediate.dense",  # (I, H)
    "encoder.layers.{i}.feed_forward.down": "roberta.encoder.layer.{i}.output.dense",  # (H, I)
    "encoder.layers.{i}.feed_forward_norm": "roberta.encoder.layer.{i}.output.LayerNorm",
    "head": "lm_head",  # head.bias (V,): the decoder's bias
    "head.dense": "lm_head.dense",
    "head.norm": "lm_head.layer_norm",
}

# The post-LN, learned-position layout BERT and RoBERTa share; `bert.py` reads these too.
POST_LN_REQUIRES = {"pre_layer_norm": False, "feed_forward": "gelu", "global_attention_every": 1,
                    "attention_bias": True, "feed_forward_bias": True, "norm_bias": True, "head_bias": True,
                    "token_type_embedding": True}
POST_LN_FIELDS = (
    ConfigField("vocab_size", "vocab_size"),
    ConfigField("hidden_size", "hidden_size"),
    ConfigField("num_layers", "num_hidden_layers"),
    ConfigField("num_heads", "num_attention_heads"),
    ConfigField("intermediate_size", "intermediate_size"),
    ConfigField("max_position_embeddings", "max_position_embeddings"),
    ConfigField("pad_id", "pad_token_id"),  # RoBERTa's position offset too: it must be set
    ConfigField("dropout", "hidden_dropout_prob", float),
    ConfigField("attention_dropout", "attention_probs_dropout_prob", float),
    ConfigField("layer_norm_eps", "layer_norm_eps", float),
)
# transformers 5 has no position_embedding_type, but keeps the key of a config.json that sets it.
POST_LN_REQUIRED = {"hidden_act": "gelu", "position_embedding_type": "absolute", "is_decoder": False,
                    "add_cross_attention": False}


def _learned_after_pad(dims: ModelDims) -> bool:
    return not dims.rotary and dims.position_start == "after_pad"


FAMILY = Family(
    name="roberta",
    defaults={},  # the schema's defaults are RoBERTa's
    recognises=_learned_after_pad,
    # RobertaConfig defaults to 2 token types though RoBERTa uses one: import keeps type 0 (what Hugging Face adds
    # when no token_type_ids are given, so the logits are unchanged) and export writes 1.
    requires={**POST_LN_REQUIRES, "position_embedding": "learned", "position_start": "after_pad",
              "type_vocab_size": 1},
    positions="learned positions",
    positions_needed="seq_len + pad id + 1 with roberta's learned positions (seq_len + 2 with pad id 1)",
    model_types=("roberta", "xlm-roberta"),  # same architecture, same parameter names
    config_class="RobertaConfig",
    masked_lm="RobertaForMaskedLM",
    sequence_classification="RobertaForSequenceClassification",
    config_fields=POST_LN_FIELDS,
    config_written={"hidden_act": "gelu", "type_vocab_size": 1, "tie_word_embeddings": True},  # exact (erf) GELU
    config_required=POST_LN_REQUIRED,
    special_ids={"pad_token_id": "pad", "bos_token_id": "bos", "eos_token_id": "eos"},
    names=NAMES,
    # The pooler serves sentence classification, never masked-LM; `position_ids` is a constant buffer older
    # versions saved; the decoder's weight and bias are tied copies (checked to be copies).
    ignored=re.compile(r"roberta\.pooler\..*|roberta\.embeddings\.position_ids|lm_head\.decoder\.(weight|bias)"),
    tied={"lm_head.decoder.weight": "embeddings.word_embeddings.weight", "lm_head.decoder.bias": "head.bias"},
    # transformers 4.4x ties `lm_head.bias` to `lm_head.decoder.bias` after loading, in that direction, and so
    # loses the bias of a file holding only `lm_head.bias` (as its own save_pretrained writes): both are written.
    copies={"lm_head.bias": "lm_head.decoder.bias"},
    head="roberta",
    head_names={"dense": "classifier.dense", "out_proj": "classifier.out_proj"},
)
