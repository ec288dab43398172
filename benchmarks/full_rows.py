"""Rows without padding (packed FULL-SENTENCES shards): attention with a key mask, or with none.

    python benchmarks/full_rows.py                  # RoBERTa-base, 32 full rows of 512, bf16 on a GPU
    python benchmarks/full_rows.py --layers 4 --hidden 256 --heads 4 --seq_len 128   # a CPU-sized model

The loader sends every batch's packing; when it says every row is full, the model runs them padded
with no mask at all, and on CUDA SDPA may then pick FlashAttention instead of a kernel that reads a
mask. This times one forward + backward pass both ways on the same batch: given no packing, the model
builds the key mask from the attention mask as it would for rows with padding.
"""

from __future__ import annotations

import argparse
import time

import torch
from synthetic import mask_spec
from workload import sync

from encoder_train.data.loader import collate
from encoder_train.model import MaskedLM, ModelDims


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = 50265
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(5, vocab, (args.seq_len,), generator=g) for _ in range(args.rows)]
    spec = mask_spec(vocab)
    b = collate(rows, spec, seed=0).to(device)
    dims = ModelDims(vocab_size=50304, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
                     intermediate_size=4 * args.hidden, max_position_embeddings=args.seq_len + 2, pad_id=1)
    model = MaskedLM(dims).to(device)

    def step(packing) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(b.input_ids, b.attention_mask, b.labels, b.predict_positions, packing=packing).loss
        loss.backward()

    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; {args.layers} x {args.hidden}, {args.rows} full rows of {args.seq_len}, "
          f"bf16 autocast; ms per forward + backward, mean of {args.steps} after 3 warm-up, two rounds\n")
    print("| attention | round 1 | round 2 |\n|---|---:|---:|")
    results: dict[str, list[float]] = {"with a key mask": [], "no mask (the loader's packing)": []}
    for _ in range(2):
        for label, packing in zip(results, (None, b.packing), strict=True):
            for _ in range(3):
                step(packing)
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step(packing)
            sync(device)
            results[label].append((time.perf_counter() - start) / args.steps * 1e3)
    for label, times in results.items():
        print(f"| {label} | {times[0]:.1f} | {times[1]:.1f} |")


if __name__ == "__main__":
    main()
