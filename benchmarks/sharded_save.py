"""How long does a checkpoint stop training under FSDP2? The gathered single file against sharded asynchronous saves,
and what the sharded checkpoint's content checksums cost on save and on load.

Run under torchrun (gloo on the CPU, or NCCL on GPUs):

    torchrun --standalone --nproc_per_node 2 benchmarks/sharded_save.py            # the small and base models
    torchrun --standalone --nproc_per_node 2 benchmarks/sharded_save.py --sizes small

For each size: the model and AdamW state after one step, then each format's save as train.py makes it. `single`:
every rank gathers the whole state (FSDP's full state dict) and copies it to host memory, then rank 0 writes it in
a background thread (checkpointing.Saver). `sharded`: every rank copies its own shards to host memory and hands
them to torch.distributed.checkpoint's async_save over a gloo group of its own. `sharded + checksums`: the same, then
each rank hashes the files it wrote (SHA-256, in the background writer, as checkpointing.Saver does) and rank 0
gathers the digests. "Blocks training" is the time until the step may go on; "until written" adds the background
write (and hashing). Loading: every rank reads its shards into the model (DCP, as a resume does), without and with
rank 0 first hashing every file against the marker (as `latest` verifies a checkpoint). Rank 0 prints the tables.
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
from encoder_train.optimizers import build_optimizer
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


def time_sharded(model, opt, world, folder: Path, group, checksums: bool = False) -> tuple[float, float]:
    dist.barrier()
    t0 = time.perf_counter()
    shards = host_copy({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)})
    future = dcp.async_save(shards, checkpoint_id=str(folder / "sharded"), process_group=group)
    blocked = time.perf_counter() - t0
    future.result()
    if checksums:  # each rank its own files, then the digests to rank 0 (rank 0 also hashes the index)
        sums = {f.name: checkpoint.file_sha256(f) for f in checkpoint.shard_files(folder / "sharded", world.rank)}
        every = [None] * world.world_size
        dist.all_gather_object(every, sums, group=group)
        if world.is_main:
            checkpoint.file_sha256(folder / "sharded" / ".metadata")
    dist.barrier()
    return blocked, time.perf_counter() - t0


def time_load(model, opt, world, folder: Path, checksums: bool) -> float:
    """A resume's read of the sharded checkpoint in `folder`/sharded, with rank 0 first hashing every file."""
    dist.barrier()
    t0 = time.perf_counter()
    if checksums and world.is_main:
        for f in sorted((folder / "sharded").iterdir()):
            checkpoint.file_sha256(f)
    dist.barrier()
    current = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, opt)}
    dcp.load(current, checkpoint_id=str(folder / "sharded"))
    dist.barrier()
    return time.perf_counter() - t0


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
        results, loads = {}, {}
        for name in ("single", "sharded", "sharded + checksums"):
            runs = []
            for _ in range(args.repeats):
                with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
                    holder = [tmp]
                    dist.broadcast_object_list(holder, src=0)  # one folder for all ranks (one host here)
                    folder = Path(holder[0])
                    runs.append(time_single(model, opt, world, folder) if name == "single"
                                else time_sharded(model, opt, world, folder, group, name != "sharded"))
                    if name != "single":
                        loads.setdefault(name, []).append(time_load(model, opt, world, folder, name != "sharded"))
                    dist.barrier()
            results[name] = min(runs)
        rows.append((size, params, results, {k: min(v) for k, v in loads.items()}))
        del model, opt
    if world.is_main:
        print(f"machine: {cpu_name()}, {world.world_size} processes x {torch.get_num_threads()} threads, device "
              f"{world.device}, torch {torch.__version__}; FSDP2, AdamW state, fastest of {args.repeats}\n")
        print("| model | parameters | format | blocks training (s) | until written (s) |\n|---|---|---|---|---|")
        for size, params, results, _ in rows:
            for name, (blocked, total) in results.items():
                print(f"| {size} | {params / 1e6:.1f}M | {name} | {blocked:.3f} | {total:.3f} |")
            print(f"| {size} | | sharded / single, blocking | {results['sharded'][0] / results['single'][0]:.2f}x | |")
            print(f"| {size} | | checksums / without, until written | | "
                  f"{results['sharded + checksums'][1] / results['sharded'][1]:.2f}x |")
        print("\n| model | load (resume) | seconds |\n|---|---|---|")
        for size, _, _, loads in rows:
            for name, seconds in loads.items():
                print(f"| {size} | {name} | {seconds:.3f} |")
            print(f"| {size} | checksums / without | {loads['sharded + checksums'] / loads['sharded']:.2f}x |")
    distributed.close(world)


if __name__ == "__main__":
    main()
