"""The fast kernels under the model: dropout, attention and the fused MLM loss.

Each computes what its textbook form does (F.dropout; softmax(q k^T / sqrt(hs)) v; F.cross_entropy on the
logits), faster where torch's own is slow, mostly on the CPU; the comments say why. Shapes use b = rows,
T = tokens per row, nh = heads, hs = head size, N = tokens (or predicted positions), H = hidden size,
V = vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

try:  # variable-length FlashAttention for the unpadded path on CUDA, when the package is installed
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None
try:  # PyTorch's own variable-length attention (recent versions; CUDA; no dropout)
    from torch.nn.attention.varlen import varlen_attn as torch_varlen_attn
except ImportError:
    torch_varlen_attn = None


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


# Eager under torch.compile: inductor cannot hold the 64-bit constants of SplitMix64 (an OverflowError).
@torch.compiler.disable
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
# q, k, v arrive with their heads already split (by model.SelfAttention); a layout (layouts.py) picks
# which of these runs and gathers the tokens for it.


# On the CPU, a batch's attention runs in chunks of rows whose scores hold at most this many elements (32 MB
# in fp32): scores that stay near the caches run the softmax, the dropout mask and their backward passes
# faster. `benchmarks/attention_cpu.py --rows 8 --max_len 512 --heads 12`: with dropout 0.1, 143 ms forward +
# backward in fp32 instead of 219 in one pass (87 instead of 158 in bf16); rows of 128 take the same.
CPU_SCORES_PER_CHUNK = 1 << 23


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              dropout_p: float, block: int | None = None) -> torch.Tensor:
    """q, k, v (b, nh, T, hs); bias (b or 1, 1, 1 or T, T) additive, -inf on masked keys, or None -> (b, nh, T, hs).
    With `block` (the CPU only), a sliding window computed blockwise: bias is then `layouts.block_band_bias`'s
    (see `local_attention`).

    On CUDA, SDPA picks a fused kernel. On the CPU, SDPA with dropout falls back to a generic path that
    also scans the scores for fully masked rows; written out, the same computation runs leaner and its
    dropout is the fast one above."""
    if q.device.type != "cpu" and block is None:
        mask = None if bias is None else bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    b, nh, T, _ = q.shape
    rows = max(1, CPU_SCORES_PER_CHUNK // (nh * T * (3 * block if block else T)))
    if rows >= b:
        return _written_attention(q, k, v, bias, dropout_p, block)
    parts = []
    for i in range(0, b, rows):
        chunk_bias = bias if bias is None or bias.shape[0] == 1 else bias[i:i + rows]
        parts.append(_written_attention(q[i:i + rows], k[i:i + rows], v[i:i + rows], chunk_bias, dropout_p, block))
    return torch.cat(parts)


def _written_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                       dropout_p: float, block: int | None) -> torch.Tensor:
    """`attention` written out: q, k, v (b, nh, T, hs) -> (b, nh, T, hs)."""
    if block is not None:
        return local_attention(q, k, v, bias, block, dropout_p)
    scores = torch.matmul(q * (1.0 / math.sqrt(q.shape[-1])), k.transpose(-1, -2))  # (b, nh, T, T)
    if bias is not None:
        scores = scores + bias  # fp32 bias: fp32 scores
    # The softmax in fp32 whatever the scores' dtype (CPU autocast would leave bf16 scores in bf16).
    probs = dropout(torch.softmax(scores, dim=-1, dtype=torch.float32), dropout_p, training=True)
    return torch.matmul(probs.to(v.dtype), v)


# Eager under training.compile (a graph break, CPU only): with dynamic shapes AOTAutograd fails to trace the
# backward of the overlapping key blocks ("view size is not compatible"), and the matmuls are the same eager.
@torch.compiler.disable
def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, block: int,
                    dropout_p: float) -> torch.Tensor:
    """Sliding-window attention in blocks: q, k, v (b, nh, T, hs) -> (b, nh, T, hs).

    The rows are cut into nb blocks of c = `block` positions (c >= window / 2). Query block i scores only
    the keys of blocks i - 1, i and i + 1, which hold every key within c positions of its queries: 3c
    scores per query instead of T (192 instead of 512 for ModernBERT's window of 128 on rows of 512), the
    same result as the dense band mask. bias (b or 1, 1, nb, c, 3c), from `layouts.block_band_bias`: -inf
    outside the band, on padded keys and on the zero blocks before and after the row."""
    b, nh, T, hs = q.shape
    c, nb = block, bias.shape[2]
    tail = nb * c - T
    qb = F.pad(q * (1.0 / math.sqrt(hs)), (0, 0, 0, tail)).reshape(b, nh, nb, c, hs)  # q may come transposed
    # One zero block before the row and one after: block i's keys are positions (i - 1) c .. (i + 2) c - 1.
    kb = F.pad(k, (0, 0, c, tail + c)).unfold(2, 3 * c, c)  # (b, nh, nb, hs, 3c), overlapping views
    vb = F.pad(v, (0, 0, c, tail + c)).unfold(2, 3 * c, c)  # (b, nh, nb, hs, 3c)
    scores = torch.matmul(qb, kb) + bias  # (b, nh, nb, c, 3c), fp32 bias: fp32 scores
    probs = dropout(torch.softmax(scores, dim=-1, dtype=torch.float32), dropout_p, training=True)
    y = torch.matmul(probs.to(v.dtype), vb.transpose(-1, -2))  # (b, nh, nb, c, hs)
    return y.reshape(b, nh, nb * c, hs)[:, :, :T]


def key_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """(b, T) True on real tokens -> (b, 1, 1, T) additive: 0 on real keys, -inf on pads; None if no pads."""
    if attention_mask.device.type == "cpu" and bool(attention_mask.all()):
        return None
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    return bias.masked_fill_(~attention_mask, float("-inf"))[:, None, None, :]


def grouped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      groups: list[tuple[torch.Tensor, int, torch.Tensor | None, int | None]], slot: torch.Tensor,
                      dropout_p: float) -> torch.Tensor:
    """Packed q, k, v (N, nh, hs) -> (N, nh, hs), attention run over rows in length groups (the CPU path).

    groups: per group of rows, the token indices (b * T,) that gather its rows, each padded to the group's
    longest row T, the group's bias (key bias (b, 1, 1, T), a window's, or None) and its `block` (None but
    for a window computed blockwise); slot (N,): each packed token's row in the
    concatenated group outputs. Both come from `layouts.Packed.groups`."""
    outputs = []
    for rows, T, bias, block in groups:
        # (b * T,) indices into the packed tokens -> (b, T, nh, hs) -> (b, nh, T, hs)
        qg, kg, vg = (x.index_select(0, rows).view(-1, T, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        y = attention(qg, kg, vg, bias, dropout_p, block)  # (b, nh, T, hs)
        outputs.append(y.transpose(1, 2).flatten(0, 1))  # (b * T, nh, hs)
    return torch.cat(outputs).index_select(0, slot)  # back to packed order: (N, nh, hs)


def has_varlen_attention(x: torch.Tensor, dropout_p: float = 0.0) -> bool:
    """Whether `varlen_attention` runs on tensors like x: CUDA, fp16 or bf16, and either the flash-attn package
    or PyTorch's own varlen attention, which has no dropout (so only at attention dropout 0, as ModernBERT
    trains; with dropout the rows are padded for SDPA instead, which has it)."""
    if not x.is_cuda or x.dtype not in (torch.float16, torch.bfloat16):
        return False
    return flash_attn_varlen_func is not None or (torch_varlen_attn is not None and dropout_p == 0.0)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, dropout_p: float, window: int | None = None) -> torch.Tensor:
    """Packed q, k, v (N, nh, hs), cu_seqlens (B + 1,) int32 -> (N, nh, hs): variable-length attention on the
    packed tokens as they are, no padding at all; `window`: keys at most window / 2 away (inclusive)."""
    sides = (-1, -1) if window is None else (window // 2, window // 2)
    if flash_attn_varlen_func is not None:
        return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p=dropout_p,
                                      window_size=sides)
    return torch_varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, window_size=sides)


# ---- The MLM loss --------------------------------------------------------------------------------------


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
        # loss = sum over rows of log(sum(exp(logits))) - logits[target], shifted by the row max for range.
        # Rows whose target is negative (-100: the padding of a fixed-size prediction set) count for nothing.
        valid = (target >= 0)[:, None]  # (N, 1)
        safe = target.clamp_min(0)
        shifted = logits.sub_(logits.amax(dim=1, keepdim=True))  # (N, V), in place
        at_target = shifted.gather(1, safe[:, None])  # (N, 1)
        total = shifted.exp_().sum(dim=1, keepdim=True)  # shifted now holds exp(shifted); total (N, 1)
        loss = ((total.log() - at_target) * valid).sum()
        probs = shifted.div_(total)  # softmax, in place
        ctx.save_for_backward(xc, wc, probs, safe, valid)
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        xc, wc, probs, target, valid = ctx.saved_tensors
        # d loss / d logits = softmax - onehot(target), zero on ignored rows
        # (new_full fills on the device: no host-to-device copy, so no sync on CUDA)
        grad = probs.scatter_add_(1, target[:, None], probs.new_full((len(target), 1), -1.0))
        grad = grad.mul_(grad_loss * valid)  # one pass, as the plain scaling was
        gc = grad.to(xc.dtype)
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        return (gc @ wc).to(x_dtype), (gc.t() @ xc).to(w_dtype), grad.sum(0).to(b_dtype), None
