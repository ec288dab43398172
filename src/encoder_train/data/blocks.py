"""Blocks of rows of remote shards, fetched ahead of use and kept within a memory budget.

A shard in object storage is read a block (`BLOCK_BYTES` of consecutive rows, data/shards.py) at a time, on a few
threads (`fetch_pool`), ahead of the rows asked for: a row costs no request of its own, and the training step does
not wait on the network as long as bandwidth keeps up.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import numpy as np

from encoder_train.data.formats.base import ShardInfo
from encoder_train.data.store import env_number

FETCH_THREADS = 8  # concurrent remote reads per process
CACHE_MB_ENV = "ENCODER_TRAIN_REMOTE_CACHE_MB"
CACHE_MB = 512  # default memory for remote blocks, per data source and loader process


class BlockSource(Protocol):
    """A remote shard read a block at a time (data/shards.py's ShardReader): `info.path` names it, and
    `fetch(k)` reads block k as a (rows, width) array of the stored dtype."""

    info: ShardInfo

    def fetch(self, k: int) -> np.ndarray: ...


_pools: dict[int, ThreadPoolExecutor] = {}


def fetch_pool() -> ThreadPoolExecutor:
    """This process's threads for remote reads (a forked loader worker makes its own)."""
    pool = _pools.get(os.getpid())
    if pool is None:
        pool = _pools[os.getpid()] = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="encoder-train-fetch")
    return pool


def cache_budget() -> int:
    """Bytes of remote blocks a BlockCache keeps: ENCODER_TRAIN_REMOTE_CACHE_MB, else CACHE_MB."""
    return int(env_number(CACHE_MB_ENV, CACHE_MB, "megabytes") * (1 << 20))


class BlockCache:
    """Blocks of rows of remote shards: fetched on `fetch_pool()`'s threads ahead of use (at most
    2 x FETCH_THREADS in flight), kept within a memory budget, the least recently used dropped first.

    Only the thread that owns it calls it (a loader worker, or the training process); the pool's threads only
    fetch. A failed fetch ahead is forgotten and tried again when its rows are needed, so only an error that
    persists (data/store.py's retries) reaches the batch, as a UserError naming the object.
    """

    def __init__(self, budget: int | None = None):
        self.budget = cache_budget() if budget is None else budget
        self._blocks: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._pending: dict[tuple[str, int], Future] = {}
        self._bytes = 0

    def room(self) -> bool:
        """Whether another fetch ahead may start now."""
        if len(self._pending) >= 2 * FETCH_THREADS:
            self._collect()
        return len(self._pending) < 2 * FETCH_THREADS

    def prefetch(self, reader: BlockSource, k: int) -> None:
        key = (reader.info.path, k)
        if key not in self._blocks and key not in self._pending and self.room():
            self._pending[key] = fetch_pool().submit(reader.fetch, k)

    def get(self, reader: BlockSource, k: int) -> np.ndarray:
        key = (reader.info.path, k)
        block = self._blocks.get(key)
        if block is not None:
            self._blocks.move_to_end(key)
            return block
        pending = self._pending.pop(key, None)
        block = pending.result() if pending is not None else reader.fetch(k)
        self._keep(key, block)
        return block

    def _collect(self) -> None:
        """Move finished fetches into the cache; drop failed ones (tried again when needed)."""
        for key, f in list(self._pending.items()):
            if f.done():
                del self._pending[key]
                if f.exception() is None:
                    self._keep(key, f.result())

    def _keep(self, key: tuple[str, int], block: np.ndarray) -> None:
        self._blocks[key] = block
        self._blocks.move_to_end(key)
        self._bytes += block.nbytes
        while self._bytes > self.budget and len(self._blocks) > 1:
            self._bytes -= self._blocks.popitem(last=False)[1].nbytes

    def close(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()
        self._blocks.clear()
        self._bytes = 0
