"""torchrun process group, rank helpers, and wrapping the model for data-parallel training.

Launched by `torchrun`, each process finds RANK / WORLD_SIZE / LOCAL_RANK in its environment and joins
the default process group (NCCL on CUDA, gloo on the CPU). Launched plainly, it is a world of one and
nothing here communicates.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import secrets
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from encoder_train.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints, writes metrics.jsonl and checkpoints, and talks to W&B."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init() -> World:
    """Join the torchrun process group if there is one; pick this process's device."""
    cuda = torch.cuda.is_available()
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if "RANK" not in os.environ or world_size == 1:
            return World(device=torch.device("cuda" if cuda else "cpu"))
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise UserError(
            f"RANK, WORLD_SIZE or LOCAL_RANK is set but not a number (RANK={os.environ.get('RANK')!r}, "
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}); launch with torchrun, or unset them for one process."
        ) from None
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise UserError(
            f"RANK and WORLD_SIZE are set ({rank} of {world_size}) but MASTER_ADDR/MASTER_PORT are not: this process "
            "was not launched by torchrun; launch it with torchrun, or unset RANK and WORLD_SIZE for one process."
        )
    if rank == 0:
        print(f"waiting for {world_size} processes at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} "
              "(up to 10 minutes)", file=sys.stderr, flush=True)
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    # A rank that dies leaves the others waiting in a collective: torchrun stops them, and the timeout
    # bounds the wait where it does not.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=10))
    return World(rank, world_size, local_rank, device)


def close(world: World) -> None:
    """End the process group, from `train`'s `finally`. After a normal end (no exception on its way: every rank
    is here) a barrier first: gloo's worker thread may still hold the last reference to a finished collective's
    tensors (all_gather_object's), and dropping it needs the GIL; if the group were torn down now (the DDP
    reducer's release, on the main thread holding the GIL, joins that worker), the two would wait on each other
    for good. The barrier runs after every earlier collective on that thread, which lets it go first."""
    if world.distributed and dist.is_initialized():
        if sys.exc_info()[1] is None:
            dist.barrier()
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World, strategy: str) -> nn.Module:
    """DDP (replicated weights, all-reduced gradients) or FSDP2 (`fully_shard`: sharded weights, gradients
    and optimizer state, for models whose optimizer state does not fit on one device)."""
    if not world.distributed:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.encoder.layers:  # shard per layer, so only one layer is gathered at a time
            fully_shard(layer)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[world.local_rank] if world.device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def sum_all(value: torch.Tensor, world: World) -> torch.Tensor:
    """Sum a tensor over all ranks (in place); a no-op in a world of one."""
    if world.distributed:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def sum_ints(values: list[int], world: World) -> list[int]:
    """Sum host integers over all ranks (one small all-reduce)."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.int64, device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def gradient_sync(model: nn.Module, world: World, sync: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce on accumulation micro-steps; only the last one of a step syncs."""
    if not world.distributed or sync:
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: a switch, not a context
            model.set_requires_gradient_sync(True)
        return contextlib.nullcontext()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        return contextlib.nullcontext()
    return model.no_sync()  # DDP


def gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


SHARED_TOKEN = ".encoder-train.shared-check"


def check_shared_folder(directory: str | Path, world: World) -> None:
    """Stop unless every rank sees the checkpoint folder rank 0 writes in, as one folder on a shared file system.

    Every rank reads the checkpoint a run resumes from, and with sharded checkpoints writes its shards there: a
    folder on a node-local disk (the same path on each node, say /tmp/ckpt) would let the other nodes start afresh
    beside a resumed rank 0, or put their shards where rank 0 never looks. Rank 0 writes a file with a fresh random
    name and content (a name no node has looked up before, so no cached answer hides it); every rank reads it back,
    all say whether they did, and rank 0 removes it. Call it on every rank, once rank 0 has created the folder."""
    if not world.distributed:
        return
    directory = Path(directory)
    value = gather_objects(secrets.token_hex(16) if world.is_main else None, world)[0]
    token = directory / f"{SHARED_TOKEN}.{value}"
    if world.is_main:
        for old in directory.glob(f"{SHARED_TOKEN}.*"):  # left by a run killed during its check
            old.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # a failure to write shows as every rank missing it
            with open(token, "w") as f:
                f.write(value)
                f.flush()
                os.fsync(f.fileno())
    barrier(world)
    try:
        seen = token.read_text() == value
    except OSError:
        seen = False
    votes = gather_objects((seen, socket.gethostname(), str(directory)), world)  # all have read before this returns
    if world.is_main:
        token.unlink(missing_ok=True)
    if all(ok for ok, _, _ in votes):
        return
    groups: dict[tuple[str, str], list[int]] = {}  # the ranks that missed it, by host and folder
    for rank, (ok, host, path) in enumerate(votes):
        if not ok:
            groups.setdefault((host, path), []).append(rank)

    def who(ranks: list[int], host: str, path: str) -> str:
        return (f"{_ranks(ranks)} (host {host}"
                + (f", --checkpoint_dir {path})" if path != votes[0][2] or ranks == [0] else ")"))

    raise UserError(
        f"checkpoint folder {directory} is not shared by every node: "
        f"{'; '.join(who(ranks, *where) for where, ranks in groups.items())} cannot see the file "
        f"{who([0], *votes[0][1:])} wrote there, so a resume would silently diverge; pass a --checkpoint_dir on a "
        "file system every node mounts at the same path (NFS, Lustre, GPFS), not a node-local disk such as /tmp."
    )


def _ranks(ranks: list[int]) -> str:
    """`rank 3`, `ranks 8-15` or `ranks 1, 5`."""
    shown = f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)) \
        else ", ".join(map(str, ranks))
    return f"rank{'s' * (len(ranks) > 1)} {shown}"


def check_agree(values: dict[str, str], world: World) -> None:
    """Stop every rank with one sentence unless all ranks hold the same `values` ({what: value}, agreement.py's).
    Call it on every rank before any other collective of the run: the ranks exchange a 16-byte digest, of any size
    of `values`, and only on a mismatch the values themselves, so nothing here can abort or hang on a difference."""
    if not world.distributed:
        return
    digest = hashlib.blake2b(repr(list(values.items())).encode(), digest_size=16).hexdigest()
    if len(set(gather_objects(digest, world))) == 1:
        return
    raise UserError(disagreement(gather_objects((values, socket.gethostname()), world)))


def disagreement(gathered: list[tuple[dict[str, str], str]]) -> str:
    """The sentence for ranks that differ from rank 0: `gathered` is every rank's (values, host), in rank order. It
    names the first value that differs (in rank 0's order), where it has which value, and the next that differ."""
    ref, host0 = gathered[0]
    keys = dict.fromkeys([*ref, *(k for values, _ in gathered[1:] for k in values)])
    differ = [k for k in keys if any(values.get(k) != ref.get(k) for values, _ in gathered[1:])]
    first = differ[0]
    where: dict[tuple[str | None, str], list[int]] = {}  # the ranks that differ, by their value and host
    for rank, (values, host) in enumerate(gathered):
        if values.get(first) != ref.get(first):
            where.setdefault((values.get(first), host), []).append(rank)
    shown = [f"{_shown(value)} on {_ranks(ranks)} (host {host})" for (value, host), ranks in where.items()]
    if len(shown) > 3:
        shown = [*shown[:3], f"other values on {len(shown) - 3} more hosts"]
    also = f" (also {', '.join(differ[1:4])}{' and more' if len(differ) > 4 else ''})" if len(differ) > 1 else ""
    return (f"the processes of this run were started with different settings or data: {first} is "
            f"{_shown(ref.get(first))} on rank 0 (host {host0}) but {', '.join(shown)}{also}; start every node with "
            "the same config, flags and data (only the folders' paths may differ between nodes).")


def _shown(value: str | None) -> str:
    return "absent" if value is None else "not set" if value == "None" else value
