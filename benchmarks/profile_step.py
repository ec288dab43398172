"""Where a training step's time goes: torch.profiler over a few steps of the demo-sized model.

    python benchmarks/profile_step.py                     # bf16, rows of 128 with about 30% padding
    python benchmarks/profile_step.py --precision fp32 --steps 5
    python benchmarks/profile_step.py --family modernbert     # the modern family's small model

The same step as training takes (unpadded layout, sparse head with the fused loss, clipping, fused
AdamW) on one batch in memory. Prints the operators by their own time, per step, and the share of
the step that the matmuls (mm, addmm, bmm) take.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from synthetic import mask_spec
from torch.profiler import ProfilerActivity, profile
from workload import FAMILIES

from encoder_train.config import TrainingConfig
from encoder_train.data.loader import collate
from encoder_train.model import MaskedLM
from encoder_train.optimizers import build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=list(FAMILIES), default="roberta", help="the small model of this family")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--seq_len", type=int, default=128)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()

    torch.manual_seed(0)
    vocab = FAMILIES[args.family]["small"].vocab
    dims = FAMILIES[args.family]["small"].model_dims(args.seq_len)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(int(0.4 * args.seq_len), args.seq_len + 1, (args.rows,), generator=g).tolist()
    spec = mask_spec(vocab)
    b = collate([torch.randint(5, vocab, (n,), generator=g) for n in lengths], spec, seed=0)
    model = MaskedLM(dims).train()
    optimizer = build_optimizer(model, TrainingConfig(), torch.device("cpu"))
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16"
                else contextlib.nullcontext())

    def step() -> None:
        with autocast:
            loss = model(b.input_ids, b.attention_mask, b.labels, b.predict_positions, packing=b.packing).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):  # allocator and first-call warm-up
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3  # ms per step
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    matmul = matmul / args.steps / 1e3
    print(f"{args.precision}, {args.rows} rows of {min(lengths)}..{max(lengths)} tokens, {b.num_tokens} real; "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; profiled step {total:.0f} ms, "
          f"matmuls (mm, addmm, bmm) {matmul:.0f} ms ({matmul / total:.0%})\n")
    print("| operator | ms per step | share | calls per step |\n|---|---:|---:|---:|")
    for e in events[: args.top]:
        ms = e.self_cpu_time_total / args.steps / 1e3
        print(f"| {e.key} | {ms:.1f} | {ms / total:.1%} | {e.count // args.steps} |")


if __name__ == "__main__":
    main()
