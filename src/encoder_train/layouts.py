"""Where a batch's tokens sit in the activations: padded rows, or the real tokens packed (padding removed).

The layers of model.py run the same over either; only the embeddings, attention and the prediction
gather need to know which. A layout hides the padding from attention: it takes q, k, v with their heads
split, gathers their tokens for an attention kernel (kernels.py) and hands the result back in its own
layout. Shapes use B = rows, T = tokens per row (the longest), N = real tokens in the batch, H = hidden
size, nh = heads, hs = head size.

  Padded  activations (B, T, H); attention_mask (B, T), True on real tokens.
  Packed  activations (N, H); token_index (N,), the flat positions of the real tokens in B*T;
          cu_seqlens (B + 1,) int32, where each row starts in the packed order; max_seqlen, the longest row.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from encoder_train.kernels import attention, grouped_attention, has_varlen_attention, key_bias, varlen_attention


class Padded:
    """Attention over right-padded rows: activations are (B, T, H); padded keys are masked out."""

    def __init__(self, attention_mask: torch.Tensor, has_pads: bool = True):
        self.mask = attention_mask  # (B, T)
        # No mask at all when the rows are known to be full: on CUDA, SDPA can then pick FlashAttention.
        self.bias = key_bias(attention_mask, torch.float32) if has_pads else None
        self._windowed: dict[int, tuple[torch.Tensor | None, int | None]] = {}
        self.cache: dict = {}  # what the layers share per batch (rotary angles), keyed by its maker

    def positions(self) -> torch.Tensor:
        """(T,): each column's place in its row, for rotary embeddings (broadcast over B)."""
        return torch.arange(self.mask.shape[1], device=self.mask.device)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
               window: int | None = None) -> torch.Tensor:
        """q, k, v (B, T, nh, hs) -> (B, T, nh, hs); `window`: keys at most window / 2 positions away only."""
        bias, block = (self.bias, None) if window is None else self._window_bias(window)
        y = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), bias, dropout_p, block)
        return y.transpose(1, 2)  # (B, T, nh, hs)

    def _window_bias(self, window: int) -> tuple[torch.Tensor | None, int | None]:
        """The key bias plus the window's band, and its block (`band`), built once per batch for every local
        layer."""
        if window not in self._windowed:
            real = self.mask if self.bias is not None else None
            self._windowed[window] = band(self.bias, self.mask.shape[1], window, real, self.mask.device)
        return self._windowed[window]


def length_groups(lengths: list[int], max_groups: int = 4) -> list[tuple[int, int]]:
    """Rows sorted longest first -> at most `max_groups` runs [start, end) of consecutive rows, chosen to
    minimise the attention work once each run is padded to its longest row: sum of rows x longest^2, plus
    a fixed cost per extra run (its share of kernel launches) of an eighth of the whole batch padded.

    Dynamic programming over (runs used, rows covered); B <= a few hundred rows, so it is cheap."""
    B = len(lengths)
    overhead = B * lengths[0] ** 2 / 8
    cost = [[math.inf] * (B + 1) for _ in range(max_groups + 1)]  # cost[g][i]: first i rows in g runs
    cut = [[0] * (B + 1) for _ in range(max_groups + 1)]
    cost[0][0] = 0.0
    for g in range(1, max_groups + 1):
        for i in range(g, B + 1):
            for j in range(g - 1, i):  # the last run is rows j..i-1, padded to lengths[j]
                c = cost[g - 1][j] + (i - j) * lengths[j] ** 2 + overhead
                if c < cost[g][i]:
                    cost[g][i], cut[g][i] = c, j
    used = min(range(1, max_groups + 1), key=lambda g: cost[g][B])
    runs, i = [], B
    for g in range(used, 0, -1):
        runs.append((cut[g][i], i))
        i = cut[g][i]
    return runs[::-1]


class Packed:
    """Unpadded activations: only the N real tokens of the batch, (N, H). Embeddings, projections,
    feed-forward and LayerNorms skip the padding entirely. Attention:
      - CUDA with the flash-attn package: variable-length FlashAttention on the packed tokens as they are;
      - CPU: rows sorted by length into a few groups (`length_groups`), each padded only to its own
        longest row; with lengths spread evenly over [0.4 T, T] that cuts the padded attention work by
        a quarter to a third against padding every row to T;
      - otherwise: rows padded back to (B, T) for SDPA.

    token_index (N,): flat positions of the real tokens in the (B, T) batch; cu_seqlens (B + 1,): where
    each row starts in the packed order; both come from the data workers, so the host never waits.
    """

    def __init__(self, attention_mask: torch.Tensor, token_index: torch.Tensor, cu_seqlens: torch.Tensor,
                 max_seqlen: int, positions: torch.Tensor | None = None):
        self.mask = attention_mask  # (B, T)
        self.index = token_index
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = max_seqlen
        self._groups = None
        self._padded = None
        self._positions = positions  # given for token-budget batches, whose rows share one (1, T) line
        self.cache: dict = {}  # what the layers share per batch (rotary angles), keyed by its maker
        self._windowed: dict[int, list] = {}

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)"""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at the pads"""
        B, T = self.mask.shape
        return x.new_zeros(B * T, *x.shape[1:]).index_copy(0, self.index, x).view(B, T, *x.shape[1:])

    def positions(self) -> torch.Tensor:
        """(N,): each packed token's place in its row, for rotary embeddings (and learned positions)."""
        if self._positions is None:
            self._positions = self.index % self.mask.shape[1]
        return self._positions

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
               window: int | None = None) -> torch.Tensor:
        """q, k, v (N, nh, hs) -> (N, nh, hs); `window`: keys at most window / 2 positions away only."""
        if has_varlen_attention(q, dropout_p):
            return varlen_attention(q, k, v, self.cu_seqlens, self.max_seqlen, dropout_p, window)
        # Rows padded back for SDPA: batches of rows on a GPU. A token-budget batch is one line of many rows
        # (positions given), which padding back would run as one row: its rows go by length groups instead.
        if q.device.type != "cpu" and self._positions is None:
            self._padded = self._padded or Padded(self.mask)  # its key bias, built once for all layers
            return self.pack(self._padded.attend(self.unpack(q), self.unpack(k), self.unpack(v), dropout_p, window))
        return self.attend_in_groups(q, k, v, dropout_p, window)

    # Eager under training.compile: how many groups, and their lengths, change from batch to batch, and a
    # compiled graph would be specialised (and recompiled) on each; the layer around it compiles once.
    @torch.compiler.disable
    def attend_in_groups(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                         window: int | None = None) -> torch.Tensor:
        """q, k, v (N, nh, hs) -> (N, nh, hs), on the CPU"""
        groups = self.groups() if window is None else self.window_groups(window)
        return grouped_attention(q, k, v, groups, self._slot, dropout_p)

    def window_groups(self, window: int) -> list[tuple[torch.Tensor, int, torch.Tensor | None, int | None]]:
        """`groups()` with each group's key bias narrowed to the window (`band`), built once per batch."""
        if window not in self._windowed:
            self._windowed[window] = [
                (rows, T, *band(bias, T, window, real, rows.device))
                for (rows, T, bias, _), real in zip(self.groups(), self._real, strict=True)
            ]
        return self._windowed[window]

    def groups(self) -> list[tuple[torch.Tensor, int, torch.Tensor | None, int | None]]:
        """Per length group: token indices (b * T,) to gather, T, key bias (b, 1, 1, T) or None, and no block
        (`grouped_attention`). Built once per batch on the host and shared by every layer; sets self._slot,
        each packed token's row in the concatenated group outputs."""
        if self._groups is not None:
            return self._groups
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()
        # longest first; the empty segments that pad a token-budget batch's cu_seqlens to a fixed size dropped
        order = sorted((r for r in range(len(lengths)) if lengths[r]), key=lambda r: -lengths[r])
        device = self.cu_seqlens.device
        self._groups, self._real, done = [], [], 0
        self._slot = torch.empty(len(self.index), dtype=torch.long, device=device)
        for start, end in length_groups([lengths[r] for r in order]):
            rows = torch.tensor(order[start:end], device=device)
            n = torch.tensor([lengths[r] for r in order[start:end]], device=device)  # (b,)
            T = lengths[order[start]]
            t = torch.arange(T, device=device)
            real = t[None, :] < n[:, None]  # (b, T)
            # pads gather the row's last token: harmless (masked as keys, discarded as queries), no zeros
            gather = self.cu_seqlens[rows][:, None] + torch.minimum(t[None, :], n[:, None] - 1)
            self._slot[gather[real]] = done + torch.nonzero(real.reshape(-1)).squeeze(1)
            self._groups.append((gather.reshape(-1), T, key_bias(real, torch.float32), None))
            self._real.append(real)
            done += real.numel()
        return self._groups


def window_bias(T: int, window: int, real: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """(1 or b, 1, T, T) additive: -inf where key j is more than window / 2 from query i, else 0; None when the
    window covers every row. `real` (b, T), when given, exempts pad queries: their outputs are discarded, and
    a pad far past its row's end would otherwise see no key at all (a softmax over nothing is NaN)."""
    half = window // 2
    if half >= T - 1:
        return None
    t = torch.arange(T, device=device)
    far = (t[:, None] - t[None, :]).abs() > half  # (T, T)
    far = far[None, None] if real is None else far[None, None] & real[:, None, :, None]
    return torch.zeros(far.shape, dtype=torch.float32, device=device).masked_fill_(far, float("-inf"))


# Blockwise local attention pays once it scores at most this share of the dense band's T x T (below 3/4 the
# gathering of key blocks costs more than the scores it saves).
BLOCKWISE_SHARE = 0.75


def band(bias: torch.Tensor | None, T: int, window: int, real: torch.Tensor | None,
         device: torch.device) -> tuple[torch.Tensor | None, int | None]:
    """A local layer's attention bias for rows of T (with key bias `bias` (b, 1, 1, T) or None, and `real`
    (b, T) where rows have pads), and the block of `kernels.local_attention`, or None for dense attention.

    Blockwise on the CPU when it scores at most BLOCKWISE_SHARE of the dense T x T (rows of 2.5 windows or
    more: 3c keys per query, c = window / 2, against T); SDPA on CUDA takes the dense band as its mask."""
    c = max(window // 2, 1)
    nb = -(-T // c)
    if device.type == "cpu" and nb * c * 3 * c <= BLOCKWISE_SHARE * T * T:
        return block_band_bias(T, window, real, device), c
    return combine(bias, window_bias(T, window, real, device)), None


def block_band_bias(T: int, window: int, real: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """(1 or b, 1, nb, c, 3c) additive for `kernels.local_attention` with blocks of c = window / 2: -inf where
    key j of query i's three blocks is more than window / 2 away, beyond the row (the zero blocks), or a pad.
    Pad queries see every key of their blocks: their outputs are discarded, and a softmax over nothing would
    be NaN, whose gradient would spread."""
    half = window // 2
    c = max(half, 1)
    nb = -(-T // c)
    q_pos = torch.arange(nb * c, device=device).view(nb, c)  # (nb, c)
    k_pos = torch.arange(-c, (nb + 1) * c, device=device).unfold(0, 3 * c, c)  # (nb, 3c): (i - 1) c ...
    if real is None:
        real = torch.ones(1, T, dtype=torch.bool, device=device)
    real_q = F.pad(real, (0, nb * c - T)).view(-1, nb, c)  # (b, nb, c); False past the row
    real_k = F.pad(real, (c, nb * c - T + c)).unfold(1, 3 * c, c)  # (b, nb, 3c); False in the zero blocks
    far = (q_pos[:, :, None] - k_pos[:, None, :]).abs() > half  # (nb, c, 3c)
    masked = (far[None] | ~real_k[:, :, None, :]) & real_q[:, :, :, None]  # (b, nb, c, 3c)
    bias = torch.zeros(masked.shape, dtype=torch.float32, device=device).masked_fill_(masked, float("-inf"))
    return bias[:, None]


def combine(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """The sum of two additive biases, either of which may be absent."""
    return b if a is None else a if b is None else a + b


Layout = Padded | Packed


def make_layout(attention_mask: torch.Tensor, packing: tuple | None) -> Layout:
    """Packed when the batch has padding to skip, or comes packed to a token budget (its rows' positions
    given); Padded when it comes without its packing, or when its packing says every row is full (then with
    no mask: nothing to unpad, nothing to hide). packing: (token_index, cu_seqlens, max_seqlen[, positions])."""
    if packing is not None and len(packing) > 3 and packing[3] is not None:
        return Packed(attention_mask, *packing)
    packing = None if packing is None else packing[:3]
    if packing is None:
        return Padded(attention_mask)
    if packing[0].numel() == attention_mask.numel():  # a shape, known on the host: no device sync
        return Padded(attention_mask, has_pads=False)
    return Packed(attention_mask, *packing)
