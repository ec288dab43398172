"""Variable-length attention on the CPU: which way of skipping padding is fastest, forward + backward.

    python benchmarks/attention_cpu.py                 # 32 rows of 51..128 tokens, 4 heads of 64
    python benchmarks/attention_cpu.py --rows 16 --max_len 512 --heads 12
    python benchmarks/attention_cpu.py --rows 8 --max_len 512 --heads 12 --window 128   # ModernBERT's local layers

One layer's attention over q, k, v given as packed (N, 3H) tokens (as the model holds them), back to
(N, H), then its backward pass, timed the fastest of --repeats, in each precision:

  grouped  encoder-train's CPU path (layouts.Packed): rows sorted by length into at most 4 groups,
           each padded to its own longest row, attention written out, its own dropout, a few rows at
           a time where a group's scores are large (kernels.CPU_SCORES_PER_CHUNK); with --window,
           blockwise on rows long enough for it (layouts.BLOCKWISE_SHARE)
  grouped, one pass        the same with a group's rows in one pass whatever the size of its scores
  grouped, dense band      (--window) the same with the window as a dense band mask over T x T scores
  padded   every row padded to the batch's longest, torch's SDPA with a boolean key mask (what a
           padded model does; with dropout, SDPA's CPU path is its generic one)
  nested   jagged nested tensors, one per row, through SDPA: no padding at all (no mask, no dropout
           on the CPU: where it fails, the table says why)

Prints a table of milliseconds per layer with the machine it ran on.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from host import cpu_name
from synthetic import mask_spec

from encoder_train import kernels, layouts
from encoder_train.data.loader import collate
from encoder_train.layouts import Packed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--max_len", type=int, default=128, help="row lengths are uniform in [0.4 max_len, max_len]")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head_size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--window", type=int, default=None, help="a local layer's window (keys within window / 2)")
    args = ap.parse_args()
    nh, hs = args.heads, args.head_size
    H = nh * hs

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(int(0.4 * args.max_len), args.max_len + 1, (args.rows,), generator=g).tolist()
    spec = mask_spec(1000)
    batch = collate([torch.randint(5, 1000, (n,), generator=g) for n in lengths], spec, seed=0)
    N = batch.num_tokens

    def grouped(qkv: torch.Tensor, p: float) -> torch.Tensor:
        q, k, v = qkv.view(N, 3, nh, hs).unbind(1)  # heads split as model.SelfAttention splits them
        return Packed(batch.attention_mask, *batch.packing).attend(q, k, v, p, args.window).reshape(N, H)

    def with_setting(module, name: str, value):
        """`grouped` with one of its thresholds changed."""
        def run(qkv: torch.Tensor, p: float) -> torch.Tensor:
            saved = getattr(module, name)
            setattr(module, name, value)
            try:
                return grouped(qkv, p)
            finally:
                setattr(module, name, saved)
        return run

    def padded(qkv: torch.Tensor, p: float) -> torch.Tensor:
        layout = Packed(batch.attention_mask, *batch.packing)
        B, T = batch.attention_mask.shape
        x = layout.unpack(qkv).view(B, T, 3, nh, hs).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        y = F.scaled_dot_product_attention(x[0], x[1], x[2], attn_mask=batch.attention_mask[:, None, None, :],
                                           dropout_p=p)
        return layout.pack(y.transpose(1, 2).reshape(B, T, H))

    def nested(qkv: torch.Tensor, p: float) -> torch.Tensor:
        rows = [t.view(-1, 3, nh, hs) for t in qkv.split(lengths)]  # (n_i, 3, nh, hs)
        q, k, v = (torch.nested.as_nested_tensor([r[:, i] for r in rows], layout=torch.jagged).transpose(1, 2)
                   for i in range(3))  # (B, nh, ragged, hs)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        return torch.cat([t.transpose(0, 1).reshape(-1, H) for t in y.unbind()])

    def time_it(fn, p: float, dtype: torch.dtype) -> str:
        qkv = torch.randn(N, 3 * H, dtype=dtype, requires_grad=True)
        grad = torch.randn(N, H, dtype=dtype)
        best = float("inf")
        try:
            for i in range(args.repeats + 2):  # two untimed calls first
                start = time.perf_counter()
                fn(qkv, p).backward(grad)
                if i >= 2:
                    best = min(best, time.perf_counter() - start)
        except RuntimeError as e:
            return f"fails ({str(e).splitlines()[0][:60]})"
        return f"{best * 1e3:.1f}"

    cpu = cpu_name()
    print(f"machine: {cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    padding = 1 - N / (len(lengths) * max(lengths))
    print(f"{args.rows} rows of {min(lengths)}..{max(lengths)} tokens ({padding:.0%} padding), {nh} heads of {hs}"
          + (f", a window of {args.window}" if args.window else "")
          + f"; ms per layer, forward + backward, fastest of {args.repeats}\n")
    print("| attention | dropout | fp32 ms | bf16 ms |\n|---|---:|---:|---:|")
    variants = [("grouped (encoder-train)", grouped),
                ("grouped, one pass", with_setting(kernels, "CPU_SCORES_PER_CHUNK", 1 << 62))]
    if args.window:  # the window is in the grouped variants only
        variants.append(("grouped, dense band", with_setting(layouts, "BLOCKWISE_SHARE", 0.0)))
    else:
        variants += [("padded, SDPA + mask", padded), ("nested, SDPA", nested)]
    for name, fn in variants:
        for p in (0.1, 0.0):
            print(f"| {name} | {p} | {time_it(fn, p, torch.float32)} | {time_it(fn, p, torch.bfloat16)} |", flush=True)


if __name__ == "__main__":
    main()
