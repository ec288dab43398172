"""What a model family is: one `Family` per published architecture our encoder can be configured as.

A family knows its config defaults, how its models are recognised (from a `ModelDims` and from a Hugging Face
config.json), its Hugging Face classes, ONE map between our dims and the HF config (export and import both read
it), the map between our parameter names and HF's, its classification head's names, and its tokenizer's
special tokens. Everything else (`config.py`, `hf.py`, `finetune/`) asks the family, never "which family is
this?". This module sits low: it imports `errors` only (and `model.ModelDims`, without torch's cost, where used).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from encoder_train.errors import UserError

if TYPE_CHECKING:  # the registry imports no torch: config.py reads it, and `--help` stays quick
    from encoder_train.model import ModelDims

# A few options said in words where the key alone would not tell a reader what is meant.
_IN_WORDS = {("pre_layer_norm", True): "pre-LN blocks", ("pre_layer_norm", False): "post-LN blocks"}


@dataclass(frozen=True)
class ConfigField:
    """One ModelDims field and the Hugging Face config key that holds it; `cast` converts what import reads."""

    ours: str
    hf: str
    cast: Callable[[Any], Any] = int


@dataclass(frozen=True)
class Family:
    name: str
    """The word `model.family` takes."""
    defaults: dict[str, Any]
    """Config `model` keys this family sets over the schema's defaults (which are RoBERTa's); the file wins."""
    recognises: Callable[[ModelDims], bool]
    """Whether a model's dims follow this family's layout (its positions): the family it fine-tunes and
    exports as. Exactly one family recognises any dims."""
    requires: dict[str, Any]
    """ModelDims values the Hugging Face class fixes: export refuses others, import sets them."""
    positions: str
    """The positions in words, for messages: "learned positions", "rotary positions"."""
    positions_needed: str
    """model.max_position_embeddings a row of seq_len tokens needs, in words (pretokenize --help)."""

    # ---- Hugging Face ----
    model_types: tuple[str, ...]
    """config.json's model_type values this family imports (the first is what export writes)."""
    config_class: str
    """The transformers config class export writes, e.g. "RobertaConfig"."""
    masked_lm: str
    """The masked-LM class: what export writes and import reads, e.g. "RobertaForMaskedLM"."""
    sequence_classification: str
    """The sequence-classification class a fine-tuned checkpoint exports as."""
    config_fields: tuple[ConfigField, ...]
    """ours <-> HF config, one map read both ways (the computed ones are `config_to_hf` / `config_from_hf`)."""
    config_written: dict[str, Any]
    """HF config keys export writes with a value our model always computes."""
    config_required: dict[str, Any]
    """HF config keys import refuses unless they hold this value (a missing key counts as holding it)."""
    special_ids: dict[str, str]
    """HF config key -> the special-token role (tokenizer.SpecialTokens field) whose id it holds."""
    names: dict[str, str]
    """Our module -> HF's; `{i}` is a layer index. query, key and value mapping to one name are fused there."""
    ignored: re.Pattern
    """HF tensors our model does without (a pooler, tied copies, constant buffers)."""
    tied: dict[str, str]
    """HF tensor -> ours it must equal (the decoder tied to the embeddings): an untied file is refused."""
    copies: dict[str, str] = field(default_factory=dict)
    """HF tensor -> HF tensor export also writes it as (tied copies some transformers versions read)."""
    config_to_hf: Callable[[ModelDims], dict[str, Any]] | None = None
    """HF config keys computed from several fields (layer types, rotary parameters)."""
    config_from_hf: Callable[[Any, Any], dict[str, Any]] | None = None
    """(config, path) -> ModelDims fields computed from several keys; raises UserError naming the path."""
    head: str = "roberta"
    """The classification head (finetune/classifier.py's HEADS): "roberta", "bert" or "modernbert"."""
    head_names: dict[str, str] = field(default_factory=dict)
    """The head's modules -> the sequence-classification class's."""
    special_tokens: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
    """The tokenizer's bos (cls), pad, eos (sep), unk and mask tokens as this family's tokenizers spell them."""
    tokenizer_type: str = "bpe"
    """What `encoder-train tokenizer --type` trains for it: "bpe" (byte-level) or "wordpiece"."""

    def check_expressible(self, dims: ModelDims) -> None:
        """Refuse, naming the option, a model this family's Hugging Face class cannot express."""
        for key, want in self.requires.items():
            have = getattr(dims, key)
            if have != want:
                said = f" ({_IN_WORDS[key, have]})" if (key, have) in _IN_WORDS else ""
                raise UserError(
                    f"this model sets model.{key} = {have!r}{said} with {self.positions}, which {self.masked_lm} "
                    f"cannot express (it needs model.{key}: {want!r}); change model.{key}, or choose another "
                    "model.family."
                )

    def dims_defaults(self) -> dict[str, Any]:
        """ModelDims fields this family's models have unless a config says otherwise (import starts here)."""
        from encoder_train.model import ModelDims  # here, not at the top: the registry stays free of torch

        known = ModelDims.__dataclass_fields__
        return {k: v for k, v in {**self.defaults, **self.requires}.items() if k in known}
