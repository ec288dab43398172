"""Hugging Face interop: export a checkpoint as its family's masked-LM folder (`RobertaForMaskedLM`,
`BertForMaskedLM`, `ModernBertForMaskedLM`), import one to train on.

Each family (`families/`) gives its parameter names, its config field map (read both ways: export writes it,
import reads it back) and the tensors it ignores; this module only applies them. RoBERTa's and BERT's are a
pure renaming: same shapes, same positions, exact GELU, post-LN blocks, an MLM head whose decoder is tied to
the word embeddings. ModernBERT's renames too, and fuses our query/key/value into its one `Wqkv` (concatenated
in that order). Nothing else is reshaped, so an exported model gives the same logits as ours, and export ->
import gives the same tensors bit for bit. Which family a model exports to follows from its options
(`family_of`).

An exported folder holds what `from_pretrained` reads:

    config.json            the family's config class (written by the installed `transformers`)
    model.safetensors      the weights under Hugging Face's names; the decoder weight is tied, not stored
    tokenizer.json         the checkpoint's own `tokenizers` tokenizer, unchanged
    tokenizer_config.json  which token plays which role (bos, eos, sep, cls, pad, unk, mask)

so `AutoModelForMaskedLM`, `AutoTokenizer` and `pipeline("fill-mask", model=DIR)` work on it.

What cannot be expressed is refused rather than approximated, naming the option: a learned-position
model with pre-LN blocks (RoBERTa and BERT have no final LayerNorm and normalise after each block), a rotary
model that differs from ModernBERT in a way its config cannot say (post-LN, GELU without the gate, a
token type, a first-layer attention norm).

`transformers` and `safetensors` are optional (`pip install 'encoder-train[hf]'`) and imported
only when needed.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from encoder_train import families
from encoder_train.checkpoint import follow_umask
from encoder_train.errors import UserError, require
from encoder_train.families import Family
from encoder_train.model import MaskedLM, ModelDims
from encoder_train.state import load_trained
from encoder_train.tokenizer import BERT_SPECIAL_TOKENS, ROBERTA_SPECIAL_TOKENS, SpecialTokens, special_tokens

# The weights files from_pretrained looks for, in its order; the one found is named in our messages.
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def family_of(dims: ModelDims) -> Family:
    """The family whose Hugging Face class expresses this model; refuses, naming the option, a model it cannot."""
    family = families.family_of(dims)
    family.check_expressible(dims)
    return family


def hf_names(dims: ModelDims) -> dict[str, str]:
    """Every tensor of `MaskedLM(dims)`: our name -> the Hugging Face class's, in our state-dict order (q, k and
    v all name the fused Wqkv in the modern family)."""
    table = family_of(dims).names
    modules = {ours.format(i=i): hf.format(i=i) for ours, hf in table.items() for i in range(dims.num_layers)}
    names = {}
    for name in _shapes(dims):
        module, param = name.rsplit(".", 1)  # "encoder.layers.0.attention.query", "weight"
        names[name] = f"{modules[module]}.{param}"
    return names


def to_hf(state: dict[str, torch.Tensor], dims: ModelDims) -> dict[str, torch.Tensor]:
    """Our state dict -> the Hugging Face class's; tensors of ours that share one name there (q, k, v -> Wqkv)
    are concatenated in our order."""
    names, out = hf_names(dims), {}
    fused = _fused(names)
    for ours, tensor in state.items():
        if names[ours] in out:
            continue
        if names[ours] in fused:
            tensor = torch.cat([state[part] for part in fused[names[ours]]])
        out[names[ours]] = tensor.contiguous()
    return out


def from_hf(hf: dict[str, torch.Tensor], dims: ModelDims) -> dict[str, torch.Tensor | None]:
    """The Hugging Face class's tensors -> ours (None where the file lacks one), a fused tensor split in our
    order (Wqkv -> q, k, v)."""
    names = hf_names(dims)
    fused = _fused(names)
    out: dict[str, torch.Tensor | None] = {}
    for ours, name in names.items():
        tensor = hf.get(name)
        if tensor is not None and name in fused:
            parts = fused[name]
            tensor = tensor.chunk(len(parts))[parts.index(ours)]
        out[ours] = tensor
    return out


def _fused(names: dict[str, str]) -> dict[str, list[str]]:
    """HF names that several of our tensors map to -> ours, in our order: (3H, H) Wqkv <- query, key, value."""
    by_hf: dict[str, list[str]] = {}
    for ours, hf in names.items():
        by_hf.setdefault(hf, []).append(ours)
    return {hf: ours for hf, ours in by_hf.items() if len(ours) > 1}


def _shapes(dims: ModelDims) -> dict[str, torch.Size]:
    """Our tensor names and shapes, from a model on the meta device (no memory, no init time)."""
    with torch.device("meta"):
        return {name: t.shape for name, t in MaskedLM(dims).state_dict().items()}


# ---------------------------------------------------------------------------------------------------
# Export.


def export_checkpoint(checkpoint_path: str | Path, output_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a checkpoint as its family's masked-LM folder (`family_of`); returns it.

    With `overwrite`, files of these names already in `output_dir` are replaced and any others are left
    alone (`write_folder`).
    """
    transformers = _require("transformers")
    checkpoint_path, out = Path(checkpoint_path), Path(output_dir)
    check_output_dir(out, overwrite)

    # A missing checkpoint, or a folder given for one, is refused here, naming --checkpoint.
    trained = load_trained(checkpoint_path, torch.device("cpu"), flag="--checkpoint")
    dims, tokenizer = trained.model.dims, trained.tokenizer
    family = family_of(dims)  # refuses what neither class can express
    special = special_tokens(tokenizer, f"stored in {checkpoint_path}")
    if special.pad != dims.pad_id:
        raise UserError(
            f"checkpoint {checkpoint_path} is inconsistent: its tokenizer pads with id {special.pad} but its model "
            f"with {dims.pad_id}; it cannot be exported."
        )
    weights = to_hf(trained.model.state_dict(), dims)
    config = hf_config(transformers, dims, special)
    for name, copy in family.copies.items():  # a copy: safetensors refuses shared tensors
        weights[copy] = weights[name].clone()

    write_folder(out, config, weights, tokenizer, special, dims, sentence_transformers_files(dims))
    return out


def sentence_transformers_files(dims: ModelDims) -> dict[str, Any]:
    """What `SentenceTransformer(folder)` reads beside the transformers files: the encoder (module 0, the folder
    itself) followed by a pooling module (1_Pooling).

    Pooling: the mean of the last hidden states over real tokens, for both families. A masked-LM encoder's <s>
    state is never trained to summarise the row (no next-sentence task: RoBERTa's recipe), while every token's
    state is, so the mean is the better sentence vector before any fine-tuning; it is also what sentence-transformers
    itself adds when it loads a plain masked-LM folder, and what ModernBERT-based embedding models use.
    """
    return {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ],
        # The folder holds a masked-LM model: loaded as one (task fill-mask), nothing in it is left unused (as a
        # bare encoder its head would be reported as unexpected weights); the token vectors are the encoder's
        # last hidden states.
        "sentence_bert_config.json": {
            "max_seq_length": dims.max_tokens, "do_lower_case": False, "transformer_task": "fill-mask",
            "modality_config": {"text": {"method": "forward", "method_output_name": ["hidden_states", -1]}},
            "module_output_name": "token_embeddings",
        },
        "1_Pooling/config.json": {
            "word_embedding_dimension": dims.hidden_size, "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": False, "include_prompt": True,
        },
        "config_sentence_transformers.json": {"prompts": {}, "default_prompt_name": None,
                                              "similarity_fn_name": "cosine"},
    }


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that is a file or holds files (unless `overwrite`)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} is a file; pass --output_dir with a folder to create.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"output folder {out} is not empty; pass an empty or new --output_dir, or --overwrite.")


def write_folder(
    out: Path, config: Any, weights: dict[str, torch.Tensor], tokenizer: Tokenizer, special: SpecialTokens,
    dims: ModelDims, extra: dict[str, Any] | None = None,
) -> None:
    """Write a Hugging Face folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json, and
    `extra` (relative path -> JSON content).

    The files are written to a temporary folder beside `out` and moved into place one by one, so no
    half-written model.safetensors ever sits under its final name; files of other names in `out` are left alone.
    """
    safetensors_torch = _require("safetensors.torch")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        try:
            config.save_pretrained(tmp)
            safetensors_torch.save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save(str(tmp / "tokenizer.json"))
            tokenizer_config = _tokenizer_config(tokenizer, special, dims)
            (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
            for name, content in (extra or {}).items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_text(json.dumps(content, indent=2) + "\n")
            for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                follow_umask(f)  # files in a mkdtemp folder may be private; the exported ones are not
                (out / f.relative_to(tmp)).parent.mkdir(parents=True, exist_ok=True)
                os.replace(f, out / f.relative_to(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise UserError(f"could not write to {out} ({e.strerror}); pass a writable --output_dir.") from None


def hf_config(transformers: ModuleType, dims: ModelDims, special: SpecialTokens) -> Any:
    """The family's transformers config describing `dims` (its masked-LM class named in `architectures`), from
    the family's one field map: the values import reads back."""
    family = family_of(dims)
    kwargs = {f.hf: getattr(dims, f.ours) for f in family.config_fields}
    kwargs |= family.config_written | (family.config_to_hf(dims) if family.config_to_hf else {})
    kwargs |= {key: getattr(special, role) for key, role in family.special_ids.items()}
    return getattr(transformers, family.config_class)(architectures=[family.masked_lm], **kwargs)


def _tokenizer_config(tokenizer: Tokenizer, special: SpecialTokens, dims: ModelDims) -> dict[str, Any]:
    """tokenizer_config.json: load tokenizer.json as it is, and name the special tokens' roles.

    `PreTrainedTokenizerFast` (an alias of `TokenizersBackend` in transformers 5) loads tokenizer.json
    unchanged in both transformers 4 and 5. Naming no class would make AutoTokenizer pick
    `RobertaTokenizer`, which in transformers 5 rebuilds a byte-level BPE pipeline around the
    vocabulary and so breaks any other tokenizer (WordPiece, WordLevel, ...).
    """
    token = tokenizer.id_to_token
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token(special.bos),
        "eos_token": token(special.eos),
        "cls_token": token(special.bos),  # RoBERTa: <s> A </s></s> B </s>
        "sep_token": token(special.eos),
        "pad_token": token(special.pad),
        "unk_token": token(special.unk),
        "mask_token": token(special.mask),
        "model_max_length": dims.max_tokens,  # positions past pad_id + 1 run out here
        "clean_up_tokenization_spaces": False,  # decode exactly what the tokenizer decodes
    }


# ---------------------------------------------------------------------------------------------------
# Import.


@dataclass
class HFModel:
    """A Hugging Face masked-LM folder, read into our terms: `MaskedLM(dims).load_state_dict(state_dict)`."""

    dims: ModelDims
    state_dict: dict[str, torch.Tensor]  # our names, fp32
    tokenizer: Tokenizer


def import_hf(directory: str | Path) -> HFModel:
    """Read a local RobertaForMaskedLM, BertForMaskedLM or ModernBertForMaskedLM folder (config.json, weights,
    tokenizer) to train on.

    `transformers` reads the config and the weights (model.safetensors or pytorch_model.bin, either
    possibly sharded, with its .index.json); we rename, refuse what our model cannot compute, and read
    the tokenizer: tokenizer.json, or RoBERTa's vocab.json + merges.txt (byte-level BPE), or BERT's vocab.txt
    (WordPiece). RoBERTa's token types other than type 0 are dropped (RobertaConfig defaults to 2 though
    RoBERTa uses one): type 0 is what Hugging Face adds when no token_type_ids are given, so the logits are
    unchanged. BERT's second type is kept (unused in training) so that export gives it back.
    """
    transformers = _require("transformers")
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{directory} is not a folder; pass a folder written by save_pretrained.")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise UserError(f"{config_file} does not exist; pass a folder written by save_pretrained (config.json, "
                        "model.safetensors, tokenizer.json).")
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, huggingface_hub's validation errors, ...
        raise UserError(f"{config_file} could not be read by transformers ({_why(e)}); re-save the model with "
                        "save_pretrained.") from None
    family = families.for_model_type(config.model_type, config_file)
    dims = _dims(config, config_file, family)
    _check_stored_shapes(directory, dims, config_file)  # before from_pretrained allocates what config.json says
    hf, info, weights_file = _load_weights(transformers, directory, config)

    names = hf_names(dims)
    architecture = family.masked_lm
    mismatched = {name: (file_shape, config_shape) for name, file_shape, config_shape in info["mismatched_keys"]}
    for name in names.values():
        if name in mismatched:
            file_shape, config_shape = mismatched[name]
            raise UserError(
                f"{weights_file}: {name} has shape {tuple(file_shape)} but {config_file} implies "
                f"{tuple(config_shape)}; re-save the model with save_pretrained so config and weights agree."
            )
    state = {}
    for ours, tensor in from_hf(hf, dims).items():
        if tensor is None:
            raise UserError(
                f"{weights_file} has no {names[ours]}; pass a folder saved from {architecture} (a model with its "
                "masked-LM head)."
            )
        if ours.endswith("token_type_embeddings.weight"):
            tensor = tensor[:dims.type_vocab_size]  # RoBERTa: (2, H) -> (1, H), type 0 only; BERT keeps both
        # fp32 whatever the file holds: an upcast from fp16 / bf16 is exact.
        state[ours] = tensor.float() if tensor.is_floating_point() else tensor

    stored = set(hf) | set(info["unexpected_keys"])
    unknown = sorted(k for k in stored - set(names.values()) if not family.ignored.fullmatch(k))
    if unknown:
        raise UserError(
            f"{weights_file} holds tensors our model has no place for ({', '.join(unknown[:3])}"
            f"{', ...' if len(unknown) > 3 else ''}); only plain {architecture} models can be imported."
        )
    _tied(hf, state, weights_file, family)
    tokenizer = _read_tokenizer(directory, dims, config_file)
    return HFModel(dims, state, tokenizer)


def _dims(config: Any, path: Path, family: Family) -> ModelDims:
    """ModelDims from a transformers config through the family's field map, refusing what our model computes
    differently."""
    _refuse_other_values(config, path, family.config_required)
    return _build_dims(path, "size or pad_token_id", lambda: {
        **family.dims_defaults(),
        **{f.ours: f.cast(getattr(config, f.hf)) for f in family.config_fields},
        **(family.config_from_hf(config, path) if family.config_from_hf else {}),
    })


def _refuse_other_values(config: Any, path: Path, fixed: dict[str, Any]) -> None:
    """Each (key, value our model computes): a config that says otherwise is refused."""
    for key, value in fixed.items():
        if getattr(config, key, value) != value:
            raise UserError(f"{path} sets {key} to {getattr(config, key)!r}; our model supports only {value!r}.")


def _build_dims(path: Path, lacking: str, fields: Callable[[], dict[str, Any]]) -> ModelDims:
    """ModelDims from `fields()` (the config's values read and converted there, so that a missing or malformed
    one is this one sentence), refusing shapes that describe no model."""
    try:
        dims = ModelDims(**fields())
    except (TypeError, ValueError, KeyError) as e:
        raise UserError(f"{path} lacks a usable {lacking} ({e}); re-save the model with save_pretrained.") from None
    if dims.num_layers < 1 or dims.num_heads < 1 or dims.hidden_size % dims.num_heads:
        raise UserError(f"{path}: num_hidden_layers {dims.num_layers}, hidden_size {dims.hidden_size} and "
                        f"num_attention_heads {dims.num_heads} describe no usable model; fix the config.")
    return dims


def _stored_shapes(directory: Path) -> tuple[dict[str, tuple[int, ...]], Path] | None:
    """Every tensor's shape in the folder's weights, read from the headers only (safetensors) or through a memory
    map (a .bin), so nothing the size of the model is allocated; None when the files cannot be read this way
    (from_pretrained then reports why)."""
    found = [directory / name for name in WEIGHTS_FILES if (directory / name).is_file()]
    if not found:
        return None
    first = found[0]
    try:
        files = ([directory / f for f in sorted(set(json.loads(first.read_text())["weight_map"].values()))]
                 if first.name.endswith(".index.json") else [first])
        shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="pt") as g:
                    shapes |= {k: tuple(g.get_slice(k).get_shape()) for k in g.keys()}  # noqa: SIM118
            else:
                stored = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                shapes |= {k: tuple(v.shape) for k, v in stored.items() if isinstance(v, torch.Tensor)}
    except Exception:  # noqa: BLE001 - a damaged or foreign file: from_pretrained's own message names it
        return None
    return shapes, first


def _check_stored_shapes(directory: Path, dims: ModelDims, config_file: Path) -> None:
    """Refuse a config.json whose sizes the weights contradict, naming the key, before any tensor is made: a
    hidden_size of 10^9 would otherwise be allocated (GBs) before from_pretrained compares the shapes."""
    read = _stored_shapes(directory)
    if read is None:
        return
    stored, weights_file = read
    layers = {int(m.group(1)) for k in stored if (m := re.search(r"\.layers?\.(\d+)\.", k))}
    if layers and max(layers) + 1 != dims.num_layers:
        raise UserError(f"{config_file} says num_hidden_layers {dims.num_layers} but {weights_file} holds "
                        f"{max(layers) + 1} layers; fix num_hidden_layers in config.json, or re-save the model with "
                        "save_pretrained.")
    with torch.device("meta"):  # our shapes, in the Hugging Face class's names and layout, with no memory
        expected = {k: tuple(v.shape) for k, v in to_hf(MaskedLM(dims).state_dict(), dims).items()}
    sizes = {"vocab_size": dims.vocab_size, "hidden_size": dims.hidden_size,
             "intermediate_size": dims.intermediate_size, "max_position_embeddings": dims.max_position_embeddings}
    for name, shape in expected.items():
        have = stored.get(name)
        if have is None or len(have) != len(shape):
            continue  # absent or of another rank: from_pretrained's report names it
        for axis, (want, got) in enumerate(zip(shape, have, strict=True)):
            if want == got or name.endswith("token_type_embeddings.weight") and axis == 0:
                continue  # token types: the file may hold 2, we keep type 0
            # The key behind this axis: the size that divides it (q/k/v fused: 3 H; GeGLU's up: 2 I).
            key = next((k for k, v in sizes.items() if v and want % v == 0 and want // v in (1, 2, 3)), None)
            said = f"{key} {sizes[key]}" if key else f"a shape of {shape}"
            raise UserError(f"{config_file} says {said} but {weights_file} holds {name} of shape {have}; fix "
                            "config.json to match the weights, or re-save the model with save_pretrained.")


def _load_weights(
    transformers: ModuleType, directory: Path, config: Any
) -> tuple[dict[str, torch.Tensor], dict[str, Any], Path]:
    """The tensors `from_pretrained` loads (Hugging Face's names; missing ones, which it initialises at
    random, left out), its report (missing, unexpected, mismatched keys), and the file to name in errors.

    It reads a .bin with torch.load(weights_only=True): tensors and plain containers only, never code.
    A stored decoder that differs from the embeddings it copies stays untied (transformers 5), for `_tied`.
    """
    found = [directory / name for name in WEIGHTS_FILES if (directory / name).is_file()]
    if not found:
        raise UserError(
            f"{directory} has no model.safetensors nor pytorch_model.bin; pass a folder written by save_pretrained."
        )
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report lists what we refuse below, in our words
    try:
        model, info = transformers.AutoModelForMaskedLM.from_pretrained(
            directory, config=config, local_files_only=True, weights_only=True,
            ignore_mismatched_sizes=True,  # report a wrong shape in `info` rather than raise
            output_loading_info=True)
    except pickle.UnpicklingError:
        raise UserError(
            f"weights file {found[0]} holds objects that safe (weights_only) loading refuses; convert it to "
            "model.safetensors with save_pretrained."
        ) from None
    except Exception as e:  # noqa: BLE001 - OSError, ValueError, SafetensorError (no public class), ...
        raise UserError(f"weights file {found[0]} could not be read by transformers ({_why(e)}); copy the whole "
                        "model folder again, or re-save it with save_pretrained.") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing = set(info["missing_keys"])
    return {k: v for k, v in model.state_dict().items() if k not in missing}, info, found[0]


def _tied(hf: dict[str, torch.Tensor], state: dict[str, torch.Tensor], weights_file: Path, family: Family) -> None:
    """Refuse a stored decoder that is not a copy of what our head ties it to (an untied head)."""
    for name, ours in family.tied.items():
        if name in hf and not torch.equal(hf[name].float(), state[ours]):
            raise UserError(
                f"{weights_file}: {name} differs from the tensor it is tied to in {family.masked_lm} ({ours} here); "
                "our model ties them, so an untied head cannot be imported."
            )


def _read_tokenizer(directory: Path, dims: ModelDims, config_file: Path) -> Tokenizer:
    """tokenizer.json, else vocab.json + merges.txt built into RoBERTa's byte-level BPE tokenizer, else BERT's
    vocab.txt built into its WordPiece tokenizer."""
    path = directory / "tokenizer.json"
    vocab, merges, wordpieces = directory / "vocab.json", directory / "merges.txt", directory / "vocab.txt"
    if path.is_file():
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library raises a bare Exception for unparsable files
            raise UserError(
                f"{path} could not be read as a tokenizers JSON file ({e}); re-save the tokenizer."
            ) from None
    elif vocab.is_file() and merges.is_file():
        path = vocab
        tokenizer = _byte_level_bpe(vocab, merges)
    elif wordpieces.is_file():
        path = wordpieces
        tokenizer = _wordpiece(wordpieces, directory / "tokenizer_config.json")
    else:
        raise UserError(
            f"{directory} has no tokenizer.json (nor vocab.json + merges.txt, nor vocab.txt); save the tokenizer "
            "there with tokenizer.save_pretrained."
        )
    if tokenizer.get_vocab_size() > dims.vocab_size:
        raise UserError(
            f"{path} has {tokenizer.get_vocab_size()} tokens but {config_file} gives the model only "
            f"vocab_size {dims.vocab_size}; use the tokenizer the model was trained with."
        )
    special = special_tokens(tokenizer, path)
    if special.pad != dims.pad_id:
        raise UserError(
            f"{path} pads with id {special.pad} but {config_file} has pad_token_id {dims.pad_id}; use the "
            "tokenizer the model was trained with."
        )
    return tokenizer


def _byte_level_bpe(vocab: Path, merges: Path) -> Tokenizer:
    """RoBERTa's tokenizer from its two files: the pipeline `encoder-train tokenizer` also builds."""
    try:
        tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception for unparsable files
        raise UserError(f"{vocab} and {merges} could not be read as a BPE vocabulary ({e}); re-save them.") from None
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # Only the special tokens the vocabulary holds; a missing one is reported by `special_tokens`.
    tokenizer.add_special_tokens([t for t in ROBERTA_SPECIAL_TOKENS if tokenizer.token_to_id(t.content) is not None])
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    if bos is not None and eos is not None:
        tokenizer.post_processor = processors.RobertaProcessing(("</s>", eos), ("<s>", bos), trim_offsets=True,
                                                                add_prefix_space=False)
    return tokenizer


def _wordpiece(vocab: Path, tokenizer_config: Path) -> Tokenizer:
    """BERT's tokenizer from its vocab.txt (as `BertWordPieceTokenizer`), lower-casing as tokenizer_config.json's
    do_lower_case says (absent: true, BertTokenizer's default, as bert-base-uncased)."""
    lowercase = True
    if tokenizer_config.is_file():
        try:
            lowercase = bool(json.loads(tokenizer_config.read_text()).get("do_lower_case", True))
        except (ValueError, OSError, AttributeError) as e:
            raise UserError(f"{tokenizer_config} could not be read as JSON ({e}); re-save the tokenizer.") from None
    try:
        tokenizer = Tokenizer(models.WordPiece.from_file(str(vocab), unk_token="[UNK]"))
    except Exception as e:  # noqa: BLE001 - the library raises a bare Exception for unparsable files
        raise UserError(f"{vocab} could not be read as a WordPiece vocabulary ({e}); re-save it.") from None
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    # Only the special tokens the vocabulary holds; a missing one is reported by `special_tokens`.
    tokenizer.add_special_tokens([t for t in BERT_SPECIAL_TOKENS if tokenizer.token_to_id(t.content) is not None])
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls is not None and sep is not None:
        tokenizer.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    return tokenizer


# ---------------------------------------------------------------------------------------------------
# Helpers.


def _require(module: str) -> ModuleType:
    """Import an optional dependency of the `hf` extra, or tell the user how to install it."""
    return require(module, "hf", "Hugging Face interop")


def _why(e: Exception) -> str:
    """An exception's message on one line, to quote inside our sentence."""
    return " ".join(str(e).split())
