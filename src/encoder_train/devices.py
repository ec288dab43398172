"""The device a run computes on: which one, in what precision, how batches reach it, and whether the
model's training state fits in its memory.

A config with absurd sizes (`hidden_size: 1099511627776`) must be refused with a number before anything
is allocated: an allocation that size fails deep inside torch with a traceback, or, worse, succeeds
lazily and brings the machine down with it later.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from encoder_train.distributed import World
from encoder_train.errors import UserError
from encoder_train.model import MaskedLM, ModelDims
from encoder_train.optimizers import OPTIMIZERS


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def autocast_for(precision: str, device: torch.device, note=print) -> contextlib.AbstractContextManager:
    """bf16 autocast (fp32 master weights) where the device supports it, else plain fp32."""
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            note("note: this GPU has no bf16 support; training in fp32.")
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively. A CPU without it (AVX2 only: no AVX512-BF16 or AMX) emulates
    bf16 matmuls: measured on a 2-core AVX2 machine, the quickstart's model trains at ~107 tokens/s in bf16 against
    ~1,650 in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: assume it does, as autocast will try
        return True


def loader_workers(configured: int | None, device: torch.device) -> int:
    """data.num_workers, or when unset: 2 background workers feeding a GPU; none on a CPU, where the batch
    (a few ms of masking and collating) is cheaper built inline than by a process that preempts the
    compute threads mid-matmul."""
    if configured is not None:
        return configured
    return 2 if device.type == "cuda" else 0


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    needed: int  # bytes per process for weights, gradients and optimizer state
    available: int  # bytes of memory on the process's device


def rough_parameters(dims: ModelDims) -> int:
    """A lower bound on the parameter count from the dominant matrices, in exact integer arithmetic, safe for
    any size (building even a meta-device model of width 2**40 overflows torch's int64 shapes)."""
    h, i = dims.hidden_size, dims.intermediate_size
    return (dims.vocab_size + dims.max_position_embeddings) * h + dims.num_layers * (4 * h * h + 2 * h * i) + h * h


def count_parameters(dims: ModelDims) -> int:
    """The exact parameter count, from a model built on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        return MaskedLM(dims).num_parameters()


def device_memory(device: torch.device) -> int:
    """Bytes of memory on `device`: the GPU's, or the host's (its cgroup limit, when lower)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            total = min(total, int(Path(limit_file).read_text().strip()))
        except (OSError, ValueError):  # absent, or "max"
            continue
    return total


def training_memory(dims: ModelDims, world: World, data_parallel: str, optimizer: str) -> MemoryEstimate:
    """Weights, gradients and the optimizer's state (its spec's bytes per parameter: optimizers/): activations come
    on top and depend on the batch, so this is the floor below which training cannot start at all."""
    rough = rough_parameters(dims)
    params = rough if rough > 2**40 else count_parameters(dims)
    shards = world.world_size if world.distributed and data_parallel == "fsdp" else 1  # FSDP splits the state
    needed = OPTIMIZERS[optimizer].training_bytes(dims, params)
    return MemoryEstimate(params, needed // shards, device_memory(world.device))


def check_fits(dims: ModelDims, world: World, data_parallel: str, optimizer: str) -> None:
    """Refuse, with the numbers, a model whose training state alone exceeds the device's memory."""
    e = training_memory(dims, world, data_parallel, optimizer)
    if e.needed > e.available:
        raise UserError(
            f"the configured model has about {e.parameters:.3g} parameters, whose weights, gradients and {optimizer} "
            f"optimizer state need about {e.needed / 1e9:.3g} GB per process, more than the {e.available / 1e9:.3g} "
            f"GB of memory on {world.device}; the largest part comes from {largest_part(dims)}: lower it."
        )


def largest_part(dims: ModelDims) -> str:
    """The config keys behind the biggest term of `rough_parameters`."""
    h, i = dims.hidden_size, dims.intermediate_size
    parts = {
        f"the vocabulary ({dims.vocab_size:,} rows: model.vocab_size or model.pad_vocab_multiple) x model.hidden_size":
            dims.vocab_size * h,
        f"model.max_position_embeddings ({dims.max_position_embeddings:,}) x model.hidden_size":
            0 if dims.rotary else dims.max_position_embeddings * h,
        f"model.num_layers ({dims.num_layers:,}) x model.hidden_size ({h:,}) and model.intermediate_size ({i:,})":
            dims.num_layers * (4 * h * h + 2 * h * i),
    }
    return max(parts, key=parts.get)


class StepPrefetch:
    """A step's micro-batches on the GPU one step ahead: while step s computes, step s + 1's batches (in
    pinned memory) are copied host -> device on a side CUDA stream, so the step never waits for its inputs.
    On a CPU it just passes `fetch`'s batches through.

    fetch() -> (batches, error): one step's micro-batches, or the data error that stopped them."""

    def __init__(self, fetch: Callable[[], tuple[list, Exception | None]], device: torch.device):
        self.fetch, self.device = fetch, device
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.ahead: tuple[list, Exception | None] | None = None

    def __call__(self) -> tuple[list, Exception | None]:
        if self.side is None:
            return self.fetch()
        batches, error = self.ahead if self.ahead is not None else self._copy(self.fetch())
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.side)  # the copies are done before the step reads them
        for b in batches:
            b.record_stream(main)  # memory allocated on the side stream, used on the main one
        self.ahead = self._copy(self.fetch()) if error is None else ([], None)
        return batches, error

    def _copy(self, fetched: tuple[list, Exception | None]) -> tuple[list, Exception | None]:
        batches, error = fetched
        with torch.cuda.stream(self.side):
            return [b.to(self.device) for b in batches], error
