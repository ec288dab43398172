"""Dynamic masking as in RoBERTa: a pure function of (tokens, special ids, generator).

Every time a row is seen it gets a fresh mask (the loader seeds a generator per row from the run seed
and the row's position in the stream, so a mask is new per epoch yet reproducible on resume).
"""

from __future__ import annotations

import torch

from encoder_train.batch import IGNORE_INDEX


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_probability: float,
    mask_id: int,
    special_ids: torch.Tensor,
    vocab_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Select tokens for prediction and corrupt them: of the selected, 80% `<mask>`, 10% random, 10% kept.

    input_ids: (B, T) integer ids; special_ids: (S,) ids never selected nor drawn as random tokens
    (`<s> </s> <pad> <unk> <mask>`); vocab_size: the tokenizer's (ids of padded rows are never drawn).
    Returns (inputs, labels), both (B, T) int64; labels are the original ids where selected, else -100.
    """
    ids = input_ids.long()
    selectable = ~torch.isin(ids, special_ids)
    chosen = (torch.rand(ids.shape, generator=generator) < mask_probability) & selectable
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE_INDEX))

    # One uniform draw decides the fate of each chosen token: [0, .8) mask, [.8, .9) random, [.9, 1) keep.
    fate = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (fate < 0.8)
    to_random = chosen & (fate >= 0.8) & (fate < 0.9)

    # Random replacements come from the non-special vocabulary only.
    is_special = torch.zeros(vocab_size, dtype=torch.bool)
    is_special[special_ids[special_ids < vocab_size]] = True
    candidates = torch.nonzero(~is_special).squeeze(1)  # (V - S,)
    random_ids = candidates[torch.randint(len(candidates), ids.shape, generator=generator)]

    inputs = torch.where(to_mask, torch.full_like(ids, mask_id), ids)
    inputs = torch.where(to_random, random_ids, inputs)
    return inputs, labels
