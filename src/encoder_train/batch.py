"""The contract between the data pipeline and the model: what masking needs to know, what a batch holds,
and the label of the positions that are not predicted.

It depends on torch alone, so the data pipeline (which builds batches) and the model (which reads them)
both build on it without knowing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

IGNORE_INDEX = -100  # label of positions that are not predicted


@dataclass(frozen=True)
class MaskSpec:
    """What masking needs to know about the vocabulary; built once from the tokenizer."""

    pad_id: int
    mask_id: int
    special_ids: tuple[int, ...]  # never selected, never drawn as random replacements
    vocab_size: int  # the tokenizer's (not the model's padded) vocabulary
    probability: float


@dataclass
class Batch:
    """One micro-batch. B rows, T = longest row in the batch, N = predicted positions."""

    input_ids: torch.Tensor  # (B, T) int64, masked
    attention_mask: torch.Tensor  # (B, T) bool, True on real tokens
    labels: torch.Tensor  # (B, T) int64, original id where predicted, else -100
    predict_positions: torch.Tensor  # (N,) int64, flat indices into B*T of the predicted positions
    num_tokens: int  # real (non-pad) tokens
    num_predicted: int  # N
    first_row: int  # position of this batch's first row in the endless row stream
    # The unpadded layout (layouts.Packed); when every row is full, the model sees that it has no pads to mask.
    token_index: torch.Tensor | None = None  # (num_tokens,) flat indices of the real tokens in B*T
    cu_seqlens: torch.Tensor | None = None  # (B + 1,) int32, cumulative row lengths
    max_seqlen: int = 0
    # Token-budget batches (data/packing.py) come packed already: B = 1, T = the budget, the rows as segments
    # of cu_seqlens (padded to a fixed count with empty ones), and each token's place in its row here.
    positions: torch.Tensor | None = None  # (T,) int64
    resume_at: tuple[int, int] | None = None  # the data position after this batch's round (see packing.py)
    source_tokens: tuple[int, ...] | None = None  # real tokens from each data source (data/mixture.py), in order

    @property
    def packing(self) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None] | None:
        if self.token_index is None:
            return None
        return self.token_index, self.cu_seqlens, self.max_seqlen, self.positions

    def _map_tensors(self, fn) -> Batch:
        return Batch(**{f.name: fn(v) if isinstance(v := getattr(self, f.name), torch.Tensor) else v
                        for f in fields(self)})

    def to(self, device: torch.device) -> Batch:
        # non_blocking: with pinned memory the copy overlaps with compute instead of stalling the host.
        return self._map_tensors(lambda t: t.to(device, non_blocking=True))

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Tell the caching allocator that `stream` uses these tensors (copied on another stream)."""
        self._map_tensors(lambda t: t.record_stream(stream) or t)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread when pin_memory=True."""
        return self._map_tensors(lambda t: t.pin_memory())
