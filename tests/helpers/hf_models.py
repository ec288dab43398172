"""Tiny RoBERTa- and ModernBERT-shaped models, their checkpoints and padded batches: parity with transformers."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from tokenizers import Tokenizer

from conftest import PAD, VOCAB
from encoder_train import checkpoint
from encoder_train.batch import MaskSpec
from encoder_train.model import MaskedLM, ModelDims
from encoder_train.tokenizer import special_tokens


def dims_for(vocab_size: int, **changes) -> ModelDims:
    return ModelDims(vocab_size=vocab_size, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                     max_position_embeddings=40, pad_id=PAD, **changes)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every parameter off its initial value: zero biases and unit LayerNorms would hide a swapped name."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.05)


def write_checkpoint(folder: Path, tokenizer: Tokenizer, dims: ModelDims) -> tuple[Path, MaskedLM]:
    """A checkpoint as training writes it (the keys export reads), and its model in eval mode."""
    folder.mkdir()
    torch.manual_seed(0)
    model = MaskedLM(dims)
    perturb(model)
    special = special_tokens(tokenizer)
    spec = MaskSpec(special.pad, special.mask, special.all_ids, tokenizer.get_vocab_size(), 0.15)
    state = {"model": model.state_dict(), "step": 2, "dims": asdict(dims),
             "tokenizer": {"json": tokenizer.to_str(), "mask_spec": asdict(spec)}}
    return checkpoint.save(state, folder, 2), model.eval()


def padded_batch(vocab_size: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (B, T) ids, row i holding lengths[i] real tokens (never the pad id), right-padded; and the mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(PAD + 1, vocab_size, (len(lengths), max(lengths)), generator=g)
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, PAD), mask


def assert_same_logits(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()


MODERN = dict(pre_layer_norm=True, first_attention_norm=False, position_embedding="rotary", rope_theta=160_000.0,
              local_rope_theta=10_000.0, global_attention_every=3, local_attention=8, feed_forward="geglu",
              attention_bias=False, feed_forward_bias=False, norm_bias=False, head_bias=False,
              token_type_embedding=False, init="modernbert", dropout=0.0, attention_dropout=0.0)


def modern_dims(**changes) -> ModelDims:
    # 4 layers: global, local, local, global; a window of 8 tokens (4 each side), rows up to 30: local layers matter
    return ModelDims(**{**dict(vocab_size=VOCAB, hidden_size=32, num_layers=4, num_heads=2, intermediate_size=48,
                               max_position_embeddings=64, pad_id=PAD), **MODERN, **changes})
