"""How long does a checkpoint stop training under FSDP2? The gathered single file against sharded asynchronous saves.

Run under torchrun (gloo on the CPU, or NCCL on GPUs):

    torchrun --standalone --nproc_per_node 2 benchmarks/sharded_save.py            # the small and base models
    torchrun --standalone --nproc_per_node 2 benchmarks/sharded_save.py --sizes small

For each size: the model and AdamW state after one step, then each format's save as train.py makes it. `single`:
every rank gathers the whole state (FSDP's full state dict) and copies it to host memory, then rank 0 writes it in
a background thread (checkpointing.Saver). `sharded`: every rank copies its own shards to host memory and hands
them to torch.distributed.checkpoint's async_save over a gloo group of its own. "Blocks training" is the time until
the step may go on; "until written" adds the background write. Rank 0 prints a table.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from host import cpu_name
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
from workload import SIZES

from encoder_train import checkpoint, distributed
from encoder_train.config import TrainingConfig
from encoder_train.model import MaskedLM
from encoder_train.optim import build_optimizer
from encoder_train.state import _full_state, host_copy


def trained_state(size: str, world: distributed.World) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    dims = SIZES[size].model_dims(128)
    model = distributed.wrap(MaskedLM(dims).to(world.device), world, "fsdp")
    opt = build_optimizer(model, TrainingConfig(), world.device)
    ids = torch.randint(5, dims.vocab_size, (2, 128), device=world.device)
    labels = torch.where(torch.rand(ids.shape, device=world.device) < 0.15, ids, -100)
    positions = torch.nonzero(labels.reshape(-1) != -100).squeeze(1)
    out = model(ids, torch.ones_like(ids, dtype=torch.bool), labels, positions)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def time_single(model, opt, world, folder: Path) -> tuple[float, float]:
    dist.barrier()
    t0 = time.perf_counter()
    model_state, opt_state = _full_state(model, opt, True)
    snap = host_copy({"model": model_state, "optimizer": opt_state})
    blocked = time.perf_counter() - t0
    if world.is_main:
        writer = threading.Thread(target=checkpoint.save, args=({**snap, "step": 1}, folder, 1))
        writer.start()
        writer.join()
    dist.barrier()
    return blocked, time.perf_counter() - t0


def time_sharded(model, opt, world, folder: Path, group) -> tuple[float, float]:
    dist.barrier()
    t0 = time.perf_counter()
    shards = host_copy({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)})
    future = dcp.async_save(shards, checkpoint_id=str(folder / "sharded"), process_group=group)
    blocked = time.perf_counter() - t0
    future.result()
    dist.barrier()
    return blocked, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["small", "base"], choices=sorted(SIZES))
    ap.add_argument("--repeats", type=int, default=3, help="saves of each format; the fastest counts")
    args = ap.parse_args()
    world = distributed.init()
    assert world.distributed, "run under torchrun (see the docstring)"
    group = dist.new_group(backend="gloo")
    rows = []
    for size in args.sizes:
        model, opt = trained_state(size, world)
        params = sum(p.numel() for p in MaskedLM(SIZES[size].model_dims(128)).parameters())
        results = {}
        for name in ("single", "sharded"):
            runs = []
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
                    holder = [tmp]
                    dist.broadcast_object_list(holder, src=0)  # one folder for all ranks (one host here)
                    folder = Path(holder[0])
                    runs.append(time_single(model, opt, world, folder) if name == "single"
                                else time_sharded(model, opt, world, folder, group))
                    dist.barrier()
            results[name] = min(runs)
        rows.append((size, params, results))
        del model, opt
    if world.is_main:
        print(f"machine: {cpu_name()}, {world.world_size} processes x {torch.get_num_threads()} threads, device "
              f"{world.device}, torch {torch.__version__}; FSDP2, AdamW state, fastest of {args.repeats}\n")
        print("| model | parameters | format | blocks training (s) | until written (s) |\n|---|---|---|---|---|")
        for size, params, results in rows:
            for name, (blocked, total) in results.items():
                print(f"| {size} | {params / 1e6:.1f}M | {name} | {blocked:.3f} | {total:.3f} |")
            print(f"| {size} | | sharded / single, blocking | {results['sharded'][0] / results['single'][0]:.2f}x | |")
    distributed.close(world)


if __name__ == "__main__":
    main()
