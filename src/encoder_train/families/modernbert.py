"""ModernBERT (Warner et al. 2024, as transformers' ModernBertConfig defaults): rotary positions, GeGLU, no
biases, pre-LN without the first layer's attention norm, a global layer every third with local (sliding-window)
attention between. Exported as ModernBertForMaskedLM; every choice is still a config key of its own."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from encoder_train.errors import UserError
from encoder_train.families.spec import ConfigField, Family

if TYPE_CHECKING:  # the registry imports no torch: config.py reads it, and `--help` stays quick
    from encoder_train.model import ModelDims

# Our module -> ModernBertForMaskedLM's. query, key and value all map to `Wqkv`: fused on export (their rows
# concatenated, q then k then v, as ModernBERT splits them), split on import.
NAMES: dict[str, str] = {
    "embeddings.word_embeddings": "model.embeddings.tok_embeddings",  # (V, H)
    "embeddings.norm": "model.embeddings.norm",
    "encoder.layers.{i}.attention_norm": "model.layers.{i}.attn_norm",  # absent in layer 0
    "encoder.layers.{i}.attention.query": "model.layers.{i}.attn.Wqkv",  # rows [0, H) of (3H, H)
    "encoder.layers.{i}.attention.key": "model.layers.{i}.attn.Wqkv",  # rows [H, 2H)
    "encoder.layers.{i}.attention.value": "model.layers.{i}.attn.Wqkv",  # rows [2H, 3H)
    "encoder.layers.{i}.attention.output": "model.layers.{i}.attn.Wo",
    "encoder.layers.{i}.feed_forward_norm": "model.layers.{i}.mlp_norm",
    "encoder.layers.{i}.feed_forward.up": "model.layers.{i}.mlp.Wi",  # (2I, H): value half, then gate half
    "encoder.layers.{i}.feed_forward.down": "model.layers.{i}.mlp.Wo",  # (H, I)
    "encoder.final_norm": "model.final_norm",
    "head": "decoder",  # head.bias (V,): the decoder's bias
    "head.dense": "head.dense",
    "head.norm": "head.norm",
}


def _to_hf(dims: ModelDims) -> dict[str, Any]:
    """Layer types, both rotary bases, and the embeddings' dropout (ours is the one `dropout`)."""
    layer_types = ["full_attention" if dims.is_global(i) else "sliding_attention" for i in range(dims.num_layers)]
    return {
        "layer_types": layer_types,
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": dims.rope_theta},
                            "sliding_attention": {"rope_type": "default", "rope_theta": dims.local_rope_theta}},
        "embedding_dropout": dims.dropout,
    }


def _from_hf(config: Any, path: Path) -> dict[str, Any]:
    """The global-layer period from the layer types, the two bases from the rotary parameters."""
    layer_types = list(config.layer_types)
    globals_at = [i for i, t in enumerate(layer_types) if t == "full_attention"]
    every = globals_at[1] - globals_at[0] if len(globals_at) > 1 else len(layer_types)
    if not globals_at or globals_at[0] != 0 or globals_at != list(range(0, len(layer_types), every)):
        raise UserError(f"{path}: layer_types {layer_types} is not one global layer every N starting at layer 0, "
                        "the only pattern our model builds.")
    rope = config.rope_parameters
    if any(rope[t].get("rope_type", "default") != "default" for t in ("full_attention", "sliding_attention")):
        raise UserError(f"{path} uses a rotary scaling (rope_type other than default) our model does not compute.")
    return {"rope_theta": float(rope["full_attention"]["rope_theta"]),
            "local_rope_theta": float(rope["sliding_attention"]["rope_theta"]), "global_attention_every": every}


FAMILY = Family(
    name="modernbert",
    defaults={
        "position_embedding": "rotary",
        "rope_theta": 160_000.0,
        "local_rope_theta": 10_000.0,
        "global_attention_every": 3,
        "local_attention": 128,
        "feed_forward": "geglu",
        "attention_bias": False,
        "feed_forward_bias": False,
        "norm_bias": False,
        "head_bias": False,
        "token_type_embedding": False,
        "pre_layer_norm": True,
        "first_attention_norm": False,
        "init": "modernbert",
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "max_position_embeddings": 8192,
    },
    recognises=lambda dims: dims.rotary,
    requires={"pre_layer_norm": True, "first_attention_norm": False, "feed_forward": "geglu",
              "token_type_embedding": False, "position_embedding": "rotary"},
    positions="rotary positions",
    positions_needed="seq_len with rotary positions (modernbert)",
    model_types=("modernbert",),
    config_class="ModernBertConfig",
    masked_lm="ModernBertForMaskedLM",
    sequence_classification="ModernBertForSequenceClassification",
    config_fields=(
        ConfigField("vocab_size", "vocab_size"),
        ConfigField("hidden_size", "hidden_size"),
        ConfigField("intermediate_size", "intermediate_size"),
        ConfigField("num_layers", "num_hidden_layers"),
        ConfigField("num_heads", "num_attention_heads"),
        ConfigField("max_position_embeddings", "max_position_embeddings"),
        ConfigField("layer_norm_eps", "norm_eps", float),
        ConfigField("norm_bias", "norm_bias", bool),
        ConfigField("attention_bias", "attention_bias", bool),
        ConfigField("feed_forward_bias", "mlp_bias", bool),
        ConfigField("head_bias", "classifier_bias", bool),
        ConfigField("dropout", "mlp_dropout", float),
        ConfigField("attention_dropout", "attention_dropout", float),
        ConfigField("local_attention", "local_attention"),  # its sliding_window is local_attention // 2, as ours
        ConfigField("pad_id", "pad_token_id"),
    ),
    # exact (erf) GELU, as F.gelu
    config_written={"hidden_activation": "gelu", "classifier_activation": "gelu", "decoder_bias": True,
                    "tie_word_embeddings": True},
    config_required={"hidden_activation": "gelu", "classifier_activation": "gelu", "decoder_bias": True,
                     "tie_word_embeddings": True},
    special_ids={"pad_token_id": "pad", "bos_token_id": "bos", "eos_token_id": "eos", "cls_token_id": "bos",
                 "sep_token_id": "eos"},
    names=NAMES,
    ignored=re.compile(r"decoder\.weight"),  # the tied copy of the embeddings
    tied={"decoder.weight": "embeddings.word_embeddings.weight"},
    config_to_hf=_to_hf,
    config_from_hf=_from_hf,
    head="modernbert",
    head_names={"dense": "head.dense", "norm": "head.norm", "classifier": "classifier"},
    special_tokens=("[CLS]", "[PAD]", "[SEP]", "[UNK]", "[MASK]"),  # ModernBERT's own tokenizer; <s> ... work too
)
