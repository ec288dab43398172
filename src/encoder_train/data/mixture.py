"""Batches drawn from named data sources, and the data stream's position (what a checkpoint stores).

A source is one folder of shards with its own endless row stream (order.RowOrder: epochs of shuffled files and
rows; a source that runs out starts its next epoch, reshuffled, while the others go on). The run's global
sequence of micro-batches g = 0, 1, 2, ... is cut from the sources as `MixSchedule.batch(g)` says: how many rows
each source gives to micro-batch g (drawn with the phase's weights from a generator seeded by (seed, g)) and at
which mask rate. A source's rows are taken in order from its stream, so its position is one integer, the rows it
has given; the stream's whole state is one such integer per source (`StreamPosition`), and resuming replays
nothing: the workers start from the stored positions and only recount the draws of the micro-batches other
ranks and workers build (integer arithmetic, no data).

One process builds micro-batches g = rank, rank + W, ... (W data-parallel ranks); within a process, worker w of
n builds every n-th of those (`Share`), and the DataLoader hands them out round-robin: the loop sees them in
order whatever the number of workers.

With one source read from data.data_dir, the stream is exactly the single stream of earlier runs: its rows,
order and masks do not depend on a source name (checkpoints of such runs resume unchanged).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from encoder_train.batch import Batch, MaskSpec
from encoder_train.data.formats import format_for
from encoder_train.data.formats.base import ShardInfo
from encoder_train.data.loader import DataError, RowSource, collate
from encoder_train.data.store import relative
from encoder_train.errors import UserError
from encoder_train.seeds import derive_seed

# The name of the one source of a run that reads data.data_dir.
SINGLE = "data_dir"


@dataclass(frozen=True)
class Source:
    """One named folder of shards (and optional held-out shards); the folder may be a URL (data/store.py)."""

    name: str
    shards: list[ShardInfo]
    val_shards: list[ShardInfo] | None = None
    root: str = ""  # the folder, for messages and fingerprints

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def width(self) -> int:
        """The longest row (token slots per row)."""
        return max(s.width for s in self.shards)

    @property
    def token_slots(self) -> int:
        """rows x width over the shards: the source's size from the headers alone (no id is read)."""
        return sum(s.rows * s.width for s in self.shards)

    def order_seed(self, seed: int) -> int:
        """The seed of this source's row order: the run's own for the single source (as before sources existed),
        else one per name, so two sources never share an order."""
        return seed if self.name == SINGLE else derive_seed(seed, "source", self.name)

    def mask_seed(self, seed: int, position: int) -> int:
        """The seed of the mask of the row at `position` in this source's stream: a row is masked anew on every
        pass, reproducibly."""
        return derive_seed(seed, "mask", position) if self.name == SINGLE else derive_seed(seed, "mask", self.name,
                                                                                           position)

    def fingerprint(self) -> str:
        """What the stream's positions refer to: every shard's path (relative to the folder) and what its format
        says identifies it (a .pt shard's rows and width). A resume whose files changed would read other rows at the
        same positions."""
        h = hashlib.blake2b(digest_size=12)
        for s in self.shards:  # relative paths: a local copy and a bucket of the same files agree
            rel = relative(s.path, self.root) if self.root else s.path
            h.update(f"{rel}\t{format_for(s.path).fingerprint(s)}\n".encode())
        return h.hexdigest()


@dataclass
class StreamPosition:
    """Where the data stream stands after a step: rows and real tokens each source has given. One integer per
    source is the whole state: everything after it is a function of (seed, sources, schedule, position)."""

    rows: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {"rows": dict(self.rows), "tokens": dict(self.tokens)}

    @classmethod
    def from_dict(cls, saved: dict) -> StreamPosition:
        return cls({k: int(v) for k, v in saved["rows"].items()}, {k: int(v) for k, v in saved["tokens"].items()})


class MixSchedule(Protocol):
    """Micro-batch g's rows per source (in the order of the sources) and its mask rate."""

    def batch(self, g: int) -> tuple[list[int], float]: ...


@dataclass(frozen=True)
class Fixed:
    """One source, `rows` rows per micro-batch, one mask rate: the schedule of a run without phases or sources."""

    rows: int
    mask_rate: float

    def batch(self, g: int) -> tuple[list[int], float]:
        return [self.rows], self.mask_rate


class MixSettings(Protocol):
    """What mix_shares reads of the data config (config.DataConfig, which the caller hands in: data/ does not
    import the config): the named sources, each with an optional weight, and the temperature."""

    sources: dict[str, Any] | None
    temperature: float | None


def mix_shares(data: MixSettings, sources: list[Source], where: str) -> dict[str, float]:
    """The share of rows each of data.sources gets (`sources`: the run's, scanned), summing to 1: from the
    sources' weights, or from their sizes in token slots to the power data.temperature. A share that rounds to 0 (a
    weight 1e-300 beside 1e300) is refused: that source would never be read."""
    named = data.sources or {}
    sized = {s.name: s for s in sources}
    if data.temperature is not None:
        weights = temperature_weights([sized[n].token_slots for n in named], data.temperature)
    else:
        weights = [src.weight or 1.0 for src in named.values()]
    shares = dict(zip(named, normalise(weights), strict=True))
    for name, share in shares.items():
        if share == 0.0:
            why = (f"data.temperature {data.temperature:g} on sources of {sized[name].token_slots:,} and up to "
                   f"{max(sized[n].token_slots for n in named):,} token slots" if data.temperature is not None
                   else f"its weight {named[name].weight:g} beside {max(weights):g}")
            raise UserError(f"{where}: the share of source {name} rounds to 0 ({why}), so it would never be read; "
                            "raise its weight, lower the temperature, or leave the source out.")
    return shares


def normalise(weights: Sequence[float]) -> list[float]:
    """Positive finite weights -> shares summing to 1. Each is divided by the largest before they are added:
    the plain sum of weights near the float limit (1e308 + 1e308) is inf, which would make every share 0."""
    top = max(weights)
    scaled = [w / top for w in weights]  # each in [0, 1], the largest 1: their sum is at most len(weights)
    total = sum(scaled)
    return [w / total for w in scaled]


def temperature_weights(sizes: Sequence[int], temperature: float) -> list[float]:
    """size ** temperature relative to the largest size's, in log space: (s / s_max) ** t = exp(t (ln s - ln s_max)),
    each in [0, 1] for any finite t > 0. The plain power overflows a float (2,880 ** 100; a corpus of 1e12 tokens
    at t ~ 26). An empty source weighs 0."""
    top = math.log(max(max(sizes), 1))
    return [math.exp(temperature * (math.log(s) - top)) if s > 0 else 0.0 for s in sizes]


def draw_counts(weights: Sequence[float], rows: int, seed: int, g: int) -> list[int]:
    """How many of micro-batch g's `rows` rows each source gives: each row drawn from the sources with
    probabilities `weights` (summing to 1), from a generator seeded by (seed, g). Pure and cheap: any process
    recomputes any micro-batch's draw. numpy's PCG64 and a binary search over the cumulative weights give the same
    integers on every machine."""
    if len(weights) == 1:
        return [rows]
    u = np.random.Generator(np.random.PCG64(derive_seed(seed, "mix", g))).random(rows)
    edges = np.cumsum(np.asarray(weights, dtype=np.float64))
    edges[-1] = 1.0  # u < 1 always lands in some source
    picked = np.searchsorted(edges, u, side="right")
    return np.bincount(picked, minlength=len(weights)).tolist()


class Share:
    """Which micro-batches of the global sequence g = 0, 1, ... this worker builds: those of this rank
    (g % stride == rank), and of them every `workers`-th from the `worker`-th. The one worker loop of row and
    token-budget batches alike."""

    def __init__(self, rank: int, stride: int):
        info = get_worker_info()
        self.worker, self.workers = (info.id, info.num_workers) if info else (0, 1)
        self.rank, self.stride, self._seen = rank, stride, 0

    def take(self, g: int) -> bool:
        """Whether this worker builds micro-batch `g`; call once per g, in order."""
        if g % self.stride != self.rank:
            return False
        mine = self._seen % self.workers == self.worker
        self._seen += 1
        return mine


class MixedBatches(IterableDataset):
    """Endless masked micro-batches from `sources`, from micro-batch `first` (a multiple of `stride`) with the
    sources at `start` (rows given so far); this process takes every `stride`-th from the `rank`-th."""

    def __init__(self, sources: list[Source], spec: MaskSpec, schedule: MixSchedule, *, seed: int,
                 shuffle_files: int, start: dict[str, int], first: int = 0, rank: int = 0, stride: int = 1):
        self.sources, self.spec, self.schedule = sources, spec, schedule
        self.seed, self.shuffle_files = seed, shuffle_files
        self.start, self.first, self.rank, self.stride = start, first, rank, stride

    def __iter__(self) -> Iterator[Batch | DataError]:
        share = Share(self.rank, self.stride)
        readers = [RowSource(s.shards, self.spec, s.order_seed(self.seed), self.shuffle_files) for s in self.sources]
        cursor = [self.start.get(s.name, 0) for s in self.sources]
        g = self.first
        try:
            while True:
                counts, mask_rate = self.schedule.batch(g)
                if share.take(g):
                    try:
                        yield self._build(readers, cursor, counts, mask_rate)
                    except UserError as e:
                        yield DataError(str(e))
                        return
                cursor = [c + n for c, n in zip(cursor, counts, strict=True)]
                g += 1
        finally:
            for r in readers:
                r.close()

    def _build(self, readers: list[RowSource], cursor: list[int], counts: list[int], mask_rate: float) -> Batch:
        """Rows grouped by source (in the sources' order), each masked by its own position's seed."""
        rows, seeds, taken = [], [], []
        for source, reader, at, n in zip(self.sources, readers, cursor, counts, strict=True):
            part = [reader.row(p) for p in range(at, at + n)]
            rows += part
            seeds += [source.mask_seed(self.seed, p) for p in range(at, at + n)]
            taken.append(sum(int((r != self.spec.pad_id).sum()) for r in part))
        first = next((at for at, n in zip(cursor, counts, strict=True) if n), 0)
        batch = collate(rows, self.spec, row_seeds=seeds, probability=mask_rate, first_row=first)
        batch.source_tokens = tuple(taken)
        return batch


def MLMBatches(shards: list[ShardInfo], spec: MaskSpec, *, batch_size: int, seed: int,  # noqa: N802 - a dataset
               shuffle_files: int, start_row: int = 0, stride: int = 1) -> MixedBatches:
    """Endless batches of `batch_size` rows of one folder from row `start_row`, every `stride`-th taken: the
    single-source stream (as train.py builds it for data.data_dir)."""
    return MixedBatches([Source(SINGLE, shards)], spec, Fixed(batch_size, spec.probability), seed=seed,
                        shuffle_files=shuffle_files, start={SINGLE: start_row}, stride=stride)
