"""The encoder and its masked-language-modelling head: BERT's architecture with RoBERTa's choices.

Read top-down: the pieces the layers use (Dropout, attention and the two activation layouts, Padded
and Packed), then Embeddings -> SelfAttention -> FeedForward -> EncoderLayer -> Encoder -> MLMHead
(with LinearCrossEntropy, the fused loss) -> MaskedLM. Shapes use B = batch, T = tokens per row,
H = hidden size, nh = heads, hs = head size, V = vocabulary, N = predicted (masked) positions.

RoBERTa's choices: learned absolute positions counted from `pad_id + 1` (pads sit at position
`pad_id`), a single token type, GELU, post-LN blocks (pre-LN as an option), input and output
embeddings tied, an MLM head dense -> GELU -> LayerNorm -> decoder with its own bias.

Parameter names and shapes map one-to-one onto Hugging Face's `RobertaForMaskedLM`, so an export
is a pure renaming (`hf.py`): `embeddings.word_embeddings` <-> `roberta.embeddings.word_embeddings`,
`encoder.layers.0.attention.query` <-> `roberta.encoder.layer.0.attention.self.query`, and so on.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

try:  # variable-length FlashAttention for the unpadded path on CUDA, when the package is installed
    from flash_attn import flash_attn_varlen_qkvpacked_func
except ImportError:
    flash_attn_varlen_qkvpacked_func = None

IGNORE_INDEX = -100  # label of positions that are not predicted


@dataclass(frozen=True)
class ModelDims:
    """Everything the model's construction needs; built from the config and the tokenizer."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    pad_id: int
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    pre_layer_norm: bool = False

    @property
    def max_tokens(self) -> int:
        """Longest row the positions can hold: positions run from pad_id + 1 upwards."""
        return self.max_position_embeddings - self.pad_id - 1


# ---- Dropout -------------------------------------------------------------------------------------------
# On the CPU, F.dropout draws one Bernoulli sample per element, which costs more than the matmuls of a
# small layer (about 7 ms for a (32, 4, 128, 128) attention map on 2 cores). `_CPUDropout` instead takes
# one 62-bit seed from torch's CPU generator and makes the mask's random bits with SplitMix64's output
# function over a counter (a few integer passes over n / 4 int64 words, spread over all cores), then
# compares each 16-bit lane with a threshold: p is rounded to a multiple of 1/65536 (0.1 -> 0.100006) and
# the kept values are scaled by 1 / (1 - that p), so the expectation is exact. The seed comes from the
# global generator, so `torch.manual_seed` and a restored RNG state reproduce it as they do F.dropout.
# On CUDA, F.dropout is already fast and is used as is.

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as an int64: SplitMix64's counter increment
_MIX = ((30, -4658895280553007687), (27, -7723592293110705685), (31, None))  # (shift, multiplier 0xBF58.., 0x94D0..)


def random_words(count: int) -> torch.Tensor:
    """(count,) int64 of uniformly random bits: SplitMix64 at counters 1..count from a seed drawn from torch's
    CPU generator. int64 products wrap (mod 2^64) as the unsigned ones of the reference do; the logical
    right shift is an arithmetic one with the sign bits masked off."""
    seed = int(torch.randint(-(2**62), 2**62, (1,)))
    x = torch.arange(1, count + 1, dtype=torch.int64).mul_(_GOLDEN).add_(seed)
    shifted = torch.empty_like(x)
    for shift, multiplier in _MIX:
        torch.bitwise_right_shift(x, shift, out=shifted).bitwise_and_((1 << (64 - shift)) - 1)
        x.bitwise_xor_(shifted)
        if multiplier is not None:
            x.mul_(multiplier)
    return x


class _CPUDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        n = x.numel()
        drop = round(p * 65536)
        bits = random_words((n + 3) // 4).view(torch.int16)[:n]  # four 16-bit lanes per word
        keep = (bits >= drop - 32768).view(x.shape)  # P(keep) = 1 - drop / 65536
        ctx.scale = 65536 / (65536 - drop)
        ctx.save_for_backward(keep)
        return torch.ops.aten.native_dropout_backward(x, keep, ctx.scale)  # x * keep * scale, one pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        return torch.ops.aten.native_dropout_backward(grad, keep, ctx.scale), None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0.0:
        return x
    if x.device.type == "cpu" and p < 1.0:
        return _CPUDropout.apply(x, p)
    return F.dropout(x, p, training=True)


class Dropout(nn.Module):
    """nn.Dropout with the fast CPU mask of `dropout`."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


# ---- Attention -----------------------------------------------------------------------------------------
# q, k, v arrive fused: one (..., 3H) projection, split into heads here.


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(b, T, 3H) -> q, k, v, each (b, nh, T, hs) (views, no copy)."""
    b, T, H3 = qkv.shape
    x = qkv.view(b, T, 3, num_heads, H3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)
    return x[0], x[1], x[2]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              dropout_p: float) -> torch.Tensor:
    """q, k, v (b, nh, T, hs); bias (b, 1, 1, T) additive, -inf on padded keys, or None -> (b, nh, T, hs).

    On CUDA, SDPA picks a fused kernel. On the CPU, SDPA with dropout falls back to a generic path that
    also scans the scores for fully masked rows; written out, the same computation runs leaner and its
    dropout is the fast one above."""
    if q.device.type != "cpu":
        mask = None if bias is None else bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-1, -2))  # (b, nh, T, T)
    if bias is not None:
        scores = scores + bias  # fp32 bias: fp32 scores
    # The softmax in fp32 whatever the scores' dtype (CPU autocast would leave bf16 scores in bf16).
    probs = dropout(torch.softmax(scores, dim=-1, dtype=torch.float32), dropout_p, training=True)
    return torch.matmul(probs.to(v.dtype), v)


def key_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """(b, T) True on real tokens -> (b, 1, 1, T) additive: 0 on real keys, -inf on pads; None if no pads."""
    if attention_mask.device.type == "cpu" and bool(attention_mask.all()):
        return None
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill_(~attention_mask, float("-inf"))[:, None, None, :]


class Padded:
    """Attention over right-padded rows: activations are (B, T, H); padded keys are masked out."""

    def __init__(self, attention_mask: torch.Tensor, has_pads: bool = True):
        self.mask = attention_mask  # (B, T)
        # No mask at all when the rows are known to be full: on CUDA, SDPA can then pick FlashAttention.
        self.bias = key_bias(attention_mask, torch.float32) if has_pads else None

    def attend(self, qkv: torch.Tensor, num_heads: int, dropout_p: float) -> torch.Tensor:
        """(B, T, 3H) -> (B, T, H)"""
        B, T, H3 = qkv.shape
        y = attention(*split_heads(qkv, num_heads), self.bias, dropout_p)  # (B, nh, T, hs)
        return y.transpose(1, 2).reshape(B, T, H3 // 3)


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
                 max_seqlen: int):
        self.mask = attention_mask  # (B, T)
        self.index = token_index
        self.cu_seqlens = cu_seqlens
        self.max_seqlen = max_seqlen
        self._groups = None
        self._padded = None

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)"""
        return x.reshape(-1, *x.shape[2:]).index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at the pads"""
        B, T = self.mask.shape
        return x.new_zeros(B * T, *x.shape[1:]).index_copy(0, self.index, x).view(B, T, *x.shape[1:])

    def attend(self, qkv: torch.Tensor, num_heads: int, dropout_p: float) -> torch.Tensor:
        """(N, 3H) -> (N, H)"""
        N, H3 = qkv.shape
        if flash_attn_varlen_qkvpacked_func is not None and qkv.is_cuda and qkv.dtype in (torch.float16,
                                                                                         torch.bfloat16):
            y = flash_attn_varlen_qkvpacked_func(qkv.view(N, 3, num_heads, H3 // (3 * num_heads)),
                                                 self.cu_seqlens, self.max_seqlen, dropout_p=dropout_p)
            return y.reshape(N, H3 // 3)
        if qkv.device.type != "cpu":
            self._padded = self._padded or Padded(self.mask)  # its key bias, built once for all layers
            return self.pack(self._padded.attend(self.unpack(qkv), num_heads, dropout_p))
        return self.attend_in_groups(qkv, num_heads, dropout_p)

    # Eager under training.compile: how many groups, and their lengths, change from batch to batch, and a
    # compiled graph would be specialised (and recompiled) on each; the layer around it compiles once.
    @torch.compiler.disable
    def attend_in_groups(self, qkv: torch.Tensor, num_heads: int, dropout_p: float) -> torch.Tensor:
        """(N, 3H) -> (N, H), on the CPU"""
        H3 = qkv.shape[1]
        outputs = []
        for rows, T, bias in self.groups():
            # (b * T,) indices into the packed tokens -> (b, T, 3H) -> (b, nh, T, hs) -> (b * T, H)
            y = attention(*split_heads(qkv.index_select(0, rows).view(-1, T, H3), num_heads), bias, dropout_p)
            outputs.append(y.transpose(1, 2).reshape(-1, H3 // 3))
        return torch.cat(outputs).index_select(0, self._slot)  # back to packed order: (N, H)

    def groups(self) -> list[tuple[torch.Tensor, int, torch.Tensor | None]]:
        """Per length group: token indices (b * T,) to gather, T, key bias (b, 1, 1, T) or None. Built once
        per batch on the host and shared by every layer; sets self._slot, each packed token's row in the
        concatenated group outputs."""
        if self._groups is not None:
            return self._groups
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()
        order = sorted(range(len(lengths)), key=lambda r: -lengths[r])
        self._groups, self._slot, done = [], torch.empty(len(self.index), dtype=torch.long), 0
        for start, end in length_groups([lengths[r] for r in order]):
            rows = torch.tensor(order[start:end])
            n = torch.tensor([lengths[r] for r in order[start:end]])  # (b,)
            T = int(n[0])
            t = torch.arange(T)
            real = t[None, :] < n[:, None]  # (b, T)
            # pads gather the row's last token: harmless (masked as keys, discarded as queries), no zeros
            gather = self.cu_seqlens[rows][:, None] + torch.minimum(t[None, :], n[:, None] - 1)
            self._slot[gather[real]] = done + torch.nonzero(real.reshape(-1)).squeeze(1)
            self._groups.append((gather.reshape(-1), T, key_bias(real, torch.float32)))
            done += real.numel()
        return self._groups


Layout = Padded | Packed


def make_layout(attention_mask: torch.Tensor, packing: tuple[torch.Tensor, torch.Tensor, int] | None) -> Layout:
    """Packed when the batch has padding to skip; Padded when it comes without its packing, or when its
    packing says every row is full (then with no mask: nothing to unpad, nothing to hide)."""
    if packing is None:
        return Padded(attention_mask)
    if packing[0].numel() == attention_mask.numel():  # a shape, known on the host: no device sync
        return Padded(attention_mask, has_pads=False)
    return Packed(attention_mask, *packing)


class Embeddings(nn.Module):
    def __init__(self, d: ModelDims):
        super().__init__()
        self.pad_id = d.pad_id
        self.word_embeddings = nn.Embedding(d.vocab_size, d.hidden_size, padding_idx=d.pad_id)
        self.position_embeddings = nn.Embedding(d.max_position_embeddings, d.hidden_size, padding_idx=d.pad_id)
        self.token_type_embeddings = nn.Embedding(1, d.hidden_size)  # RoBERTa: one type, added everywhere
        self.norm = nn.LayerNorm(d.hidden_size, eps=d.layer_norm_eps)
        self.dropout = Dropout(d.dropout)

    def forward(self, input_ids: torch.Tensor, layout: Layout) -> torch.Tensor:
        # RoBERTa's positions: real tokens count up from pad_id + 1, pads stay at pad_id.
        keep = layout.mask.long()  # (B, T)
        positions = torch.cumsum(keep, dim=1) * keep + self.pad_id
        if isinstance(layout, Packed):  # embed the real tokens only: (N,)
            input_ids, positions = layout.pack(input_ids), layout.pack(positions)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        x = x + self.token_type_embeddings.weight[0]
        return self.dropout(self.norm(x))  # (B, T, H) or (N, H)


class SelfAttention(nn.Module):
    def __init__(self, d: ModelDims):
        super().__init__()
        self.num_heads = d.num_heads
        # Separate q/k/v parameters keep the export a pure renaming; forward fuses them into one matmul.
        self.query = nn.Linear(d.hidden_size, d.hidden_size)
        self.key = nn.Linear(d.hidden_size, d.hidden_size)
        self.value = nn.Linear(d.hidden_size, d.hidden_size)
        self.output = nn.Linear(d.hidden_size, d.hidden_size)
        self.attention_dropout = d.attention_dropout
        self.dropout = Dropout(d.dropout)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        p = self.attention_dropout if self.training else 0.0
        weight = torch.cat([self.query.weight, self.key.weight, self.value.weight])  # (3H, H)
        bias = torch.cat([self.query.bias, self.key.bias, self.value.bias])
        y = layout.attend(F.linear(x, weight, bias), self.num_heads, p)  # (..., 3H) -> (..., H)
        return self.dropout(self.output(y))


class FeedForward(nn.Module):
    def __init__(self, d: ModelDims):
        super().__init__()
        self.up = nn.Linear(d.hidden_size, d.intermediate_size)
        self.down = nn.Linear(d.intermediate_size, d.hidden_size)
        self.dropout = Dropout(d.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))  # (..., H) -> (..., 4H) -> (..., H)


class EncoderLayer(nn.Module):
    def __init__(self, d: ModelDims):
        super().__init__()
        self.pre_layer_norm = d.pre_layer_norm
        self.attention = SelfAttention(d)
        self.attention_norm = nn.LayerNorm(d.hidden_size, eps=d.layer_norm_eps)
        self.feed_forward = FeedForward(d)
        self.feed_forward_norm = nn.LayerNorm(d.hidden_size, eps=d.layer_norm_eps)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        if self.pre_layer_norm:
            x = x + self.attention(self.attention_norm(x), layout)
            return x + self.feed_forward(self.feed_forward_norm(x))
        x = self.attention_norm(x + self.attention(x, layout))
        return self.feed_forward_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    def __init__(self, d: ModelDims):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d) for _ in range(d.num_layers))
        # Pre-LN leaves the residual stream un-normalised; one LayerNorm closes it.
        self.final_norm = nn.LayerNorm(d.hidden_size, eps=d.layer_norm_eps) if d.pre_layer_norm else None

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, layout)
        return x if self.final_norm is None else self.final_norm(x)


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits x @ W^T + b against targets, the logits never kept.

    x (N, H), W (V, H), b (V,), target (N,) -> scalar. F.cross_entropy on the logits would keep the
    logits, their log-softmax and, in the backward pass, a zero-filled (N, V) gradient it then writes
    into: on a CPU that is as slow as the vocabulary matmul itself. Here the forward pass turns the
    fp32 logits into the softmax in place and keeps that one (N, V) tensor; the backward pass
    subtracts 1 at the targets, in place, and is the gradient. Under autocast the matmuls run in
    its dtype (bf16) and the softmax in fp32, as they would through autocast's own casts."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, target: torch.Tensor):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        xc, wc, bc = x.to(dtype), weight.to(dtype), bias.to(dtype)
        with torch.autocast(device, enabled=False):
            logits = F.linear(xc, wc, bc).float()  # (N, V)
        # loss = sum over rows of log(sum(exp(logits))) - logits[target], shifted by the row max for range
        shifted = logits.sub_(logits.amax(dim=1, keepdim=True))  # (N, V), in place
        at_target = shifted.gather(1, target[:, None])  # (N, 1)
        total = shifted.exp_().sum(dim=1, keepdim=True)  # shifted now holds exp(shifted); total (N, 1)
        loss = (total.log() - at_target).sum()
        probs = shifted.div_(total)  # softmax, in place
        ctx.save_for_backward(xc, wc, probs, target)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        xc, wc, probs, target = ctx.saved_tensors
        # d loss / d logits = softmax - onehot(target)
        # (new_full fills on the device: no host-to-device copy, so no sync on CUDA)
        grad = probs.scatter_add_(1, target[:, None], probs.new_full((len(target), 1), -1.0))
        grad = grad.mul_(grad_loss)
        gc = grad.to(xc.dtype)
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        return (gc @ wc).to(x_dtype), (gc.t() @ xc).to(w_dtype), grad.sum(0).to(b_dtype), None


class MLMHead(nn.Module):
    """dense -> GELU -> LayerNorm -> decoder. The decoder's weight is the word-embedding matrix."""

    def __init__(self, d: ModelDims, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(d.hidden_size, d.hidden_size)
        self.norm = nn.LayerNorm(d.hidden_size, eps=d.layer_norm_eps)
        self.word_embeddings = [word_embeddings]  # a list: tied, not registered a second time
        self.bias = nn.Parameter(torch.zeros(d.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(F.gelu(self.dense(x)))
        return F.linear(x, self.word_embeddings[0].weight, self.bias)  # (..., H) -> (..., V)

    def loss(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(N, H) hidden states at the predicted positions, (N,) targets -> summed cross-entropy."""
        x = self.norm(F.gelu(self.dense(x)))
        return LinearCrossEntropy.apply(x, self.word_embeddings[0].weight, self.bias, target)


@dataclass
class MLMOutput:
    loss: torch.Tensor | None  # scalar: mean (or sum, see `reduction`) over predicted positions
    logits: torch.Tensor | None  # (B, T, V) when asked for, else None
    predicted_logits: torch.Tensor | None = None  # (N, V) at the predicted positions, when asked for


def compile_layers(model: MaskedLM, backend: str | Callable = "inductor") -> None:
    """torch.compile each encoder layer in place (parameter names, and so checkpoints, are unchanged).
    dynamic=True: the token count and row length change every batch; one graph covers them all."""
    for layer in model.encoder.layers:
        layer.compile(dynamic=True, backend=backend)


class MaskedLM(nn.Module):
    def __init__(self, d: ModelDims):
        super().__init__()
        self.dims = d
        self.embeddings = Embeddings(d)
        self.encoder = Encoder(d)
        self.head = MLMHead(d, self.embeddings.word_embeddings)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's initialisation: N(0, 0.02) weights, zero biases, identity LayerNorms, zero pad rows.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(p.numel() for p in self.embeddings.parameters())
        return n

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        predict_positions: torch.Tensor | None = None,
        reduction: str = "mean",
        return_logits: bool = False,
        packing: tuple[torch.Tensor, torch.Tensor, int] | None = None,
        return_predicted_logits: bool = False,
    ) -> MLMOutput:
        """input_ids, attention_mask (True = real token), labels: (B, T); labels are -100 where unpredicted.

        The head runs on the predicted positions only (sparse prediction: about 15% of tokens), which
        saves most of the vocabulary projection. `predict_positions` (N,) are those positions as flat
        indices into B*T, computed by the data workers so the device never waits on a `nonzero`.
        `packing` = (token_index, cu_seqlens, max_seqlen) runs the unpadded path (see `Packed`), or, when
        it says every row is full, the padded one with no mask; without it the rows are computed padded
        with a mask built from attention_mask. All give the same result (see `make_layout`).
        """
        if attention_mask is None:
            attention_mask = input_ids != self.dims.pad_id
        layout = make_layout(attention_mask, packing)
        h = self.encode(input_ids, layout)  # (B, T, H) or (N_tokens, H)
        logits = predicted = None
        if return_logits:
            logits = self.head(layout.unpack(h) if isinstance(layout, Packed) else h)
        loss = None
        if labels is not None:
            flat_labels = labels.reshape(-1)
            if predict_positions is None:
                predict_positions = torch.nonzero(flat_labels != IGNORE_INDEX).squeeze(1)  # host waits here
            target = flat_labels.index_select(0, predict_positions)  # (N,)
            if return_predicted_logits:
                predicted = self.predict(h, predict_positions, layout)  # (N, V)
                loss = F.cross_entropy(predicted.float(), target, reduction="sum")
            else:
                loss = self.head.loss(self.select(h, predict_positions, layout), target)
            if reduction == "mean":
                loss = loss / max(1, len(target))
        return MLMOutput(loss=loss, logits=logits, predicted_logits=predicted if return_predicted_logits else None)

    def encode(self, input_ids: torch.Tensor, layout: Layout | torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> final hidden states: (B, T, H) padded, or (N_tokens, H) packed.
        A bare (B, T) attention mask means the padded layout."""
        if isinstance(layout, torch.Tensor):
            layout = Padded(layout)
        return self.encoder(self.embeddings(input_ids, layout), layout)

    def predict(self, hidden: torch.Tensor, positions: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
        """Vocabulary logits at flat (B*T) positions only -> (N, V)."""
        return self.head(self.select(hidden, positions, layout))

    @staticmethod
    def select(hidden: torch.Tensor, positions: torch.Tensor, layout: Layout | None = None) -> torch.Tensor:
        """Hidden states (B, T, H) or packed (N_tokens, H) at flat (B*T) positions -> (N, H)."""
        if isinstance(layout, Packed):
            # flat (B*T) position -> its row in the packed (N_tokens, H) activations
            packed_row = torch.cumsum(layout.mask.reshape(-1).long(), 0) - 1
            positions = packed_row.index_select(0, positions)
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
