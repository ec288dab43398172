"""Model FLOPs utilisation: useful FLOPs of a window of rows, and the machine's matmul rate to divide by.

MFU = useful FLOP/s / the fastest matmul rate measured on this machine for that precision. What counts
as useful (dense layers, attention over the real tokens, the MLM head at predicted positions) is
spelled out in speed.py's docstring (`python benchmarks/speed.py --help`).
"""

from __future__ import annotations

import math
import time

import torch
from workload import MASK_PROBABILITY, Size, Workload, sync


def useful_flops(size: Size, lengths: list[int]) -> float:
    """Useful training FLOPs (fwd + bwd) of rows with these real lengths; see speed.py's docstring.

    Counted: the non-embedding matmuls per real token, 6 x their weights (q, k, v and output projections,
    4H^2; the feed-forward, 2HF with GELU, 3HF with GeGLU: an up projection to 2F, value and gate, and a
    down one from F); attention QK^T and AV over real keys: all n of its row in a global layer, at most
    W + 1 in a local layer of window W (W / 2 each side; fewer at the row's ends, still counted as
    min(n, W + 1)); the MLM head at predicted positions. Not counted: embeddings, rotary positions,
    LayerNorms, biases, the GELU and gate products, softmax, dropout and the optimiser.
    """
    d = size.model_dims(max(lengths))
    H, F_, L, V = size.hidden, size.ffn, size.layers, size.vocab
    tokens = sum(lengths)
    predicted = MASK_PROBABILITY * sum(n - 2 for n in lengths)
    ffn_matmuls = 3 if d.feed_forward == "geglu" else 2
    dense = 6 * L * (4 * H * H + ffn_matmuls * H * F_) * tokens
    keys = [sum(n * (n if d.is_global(i) else min(n, d.local_attention + 1)) for n in lengths) for i in range(L)]
    attention = 12 * H * sum(keys)  # = 12 L H sum_r n_r^2 when every layer is global
    head = 6 * (H * H + H * V) * predicted
    return dense + attention + head


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, seconds: float = 1.0) -> float:
    """GFLOP/s of (m, k) @ (k, n) in `dtype`: the fastest of at least 5 repetitions and `seconds` of them."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync(device)
    best, reps, start = math.inf, 0, time.perf_counter()
    while reps < 5 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        sync(device)
        best, reps = min(best, time.perf_counter() - t), reps + 1
    return 2 * m * k * n / best / 1e9


class MatmulRates:
    """Matmul rates per (precision, shape), measured before and after every workload; the best counts."""

    def __init__(self, device: torch.device):
        self.device = device
        self.measured: dict[tuple[str, int, int, int], float] = {}

    @staticmethod
    def shapes(w: Workload) -> list[tuple[int, int, int]]:
        """A square matmul and the model's FFN up-projection at full batch width (GeGLU: 2 x ffn wide)."""
        up = 2 * w.size.ffn if w.size.model_dims(w.seq_len).feed_forward == "geglu" else w.size.ffn
        return [(2048, 2048, 2048), (w.batch * w.seq_len, w.size.hidden, up)]

    def measure(self, w: Workload) -> None:
        dtype = torch.bfloat16 if w.precision == "bf16" else torch.float32
        for m, k, n in self.shapes(w):
            key = (w.precision, m, k, n)
            self.measured[key] = max(self.measured.get(key, 0.0), matmul_gflops(m, k, n, dtype, self.device))

    def peak(self, w: Workload) -> float:
        """The best rate measured so far for this precision, of this workload's shapes."""
        return max(self.measured[(w.precision, *shape)] for shape in self.shapes(w))
