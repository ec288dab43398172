"""The training data as the loop sees it: each step's micro-batches, and the position a checkpoint stores.

`DataStream` owns the position (torchtitan's "stateful loader"): the loop asks it for a step's micro-batches and,
once the step is done, tells it so (`step_done`); `state_dict()` is what a checkpoint stores and `restore` reads
it back, O(1): nothing is replayed.

Row batches (one source or a mixture, with or without phases): the position is the rows and tokens each source has
given (data/mixture.py), advanced by recounting the step's draws here in the main process. Token-budget batches
(data.batch_tokens, one source): the position is (first row of a packing window, bins of it used), carried by each
batch (data/packing.py).

Resuming with other sources follows these rules (docs/recipes.md): a new source starts at its beginning, a removed
one is dropped, a source pointed at another folder starts at its beginning, and a source whose files changed in
the same folder (another fingerprint: paths, rows, widths) is refused unless the command names it with
--restart_source, which starts it again from its beginning.

This module sits one floor above data/: it is handed the plan (phases.py) and the world, reads the config's data
section (`scan_sources`) and picks the loader's workers (devices.py); data/ imports none of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from encoder_train import devices
from encoder_train.batch import Batch, MaskSpec
from encoder_train.config import DataConfig
from encoder_train.data.loader import BatchStream
from encoder_train.data.mixture import SINGLE, MixedBatches, Source, StreamPosition
from encoder_train.data.packing import TokenBudgetBatches
from encoder_train.data.shards import scan_shards
from encoder_train.data.store import canonical
from encoder_train.distributed import World
from encoder_train.errors import UserError
from encoder_train.phases import Plan


def scan_sources(data: DataConfig, max_tokens: int) -> list[Source]:
    """The run's sources with their shards' headers checked (no id is read): data.data_dir's one, or data.sources'."""
    if data.sources is None:
        return [Source(SINGLE, scan_shards(data.data_dir, max_tokens), None, str(data.data_dir))]
    return [Source(name, scan_shards(src.data_dir, max_tokens, f"data.sources.{name}.data_dir"),
                   scan_shards(src.val_data_dir, max_tokens, f"data.sources.{name}.val_data_dir")
                   if src.val_data_dir else None, src.data_dir)
            for name, src in data.sources.items()]


class DataStream:
    def __init__(self, plan: Plan, spec: MaskSpec, world: World):
        self.plan, self.spec, self.world = plan, spec, world
        self.sources = plan.sources
        self.position = StreamPosition({s.name: 0 for s in self.sources}, {s.name: 0 for s in self.sources})
        self.bins_done = 0  # token-budget batches only: bins of the window at position.rows[SINGLE] used
        self._loader: BatchStream | None = None

    # ---- the position ----

    def state_dict(self) -> dict[str, Any]:
        single = self.position.rows.get(SINGLE, 0)
        return {
            "rows_consumed": single,  # the single source's position, as checkpoints have always stored it
            "bins_done": self.bins_done,
            "world_size": self.world.world_size,
            "stream": self.position.to_dict(),
            "sources": {s.name: s.fingerprint() for s in self.sources},
            "folders": {s.name: canonical(s.root) for s in self.sources},
        }

    def restore(self, saved: dict[str, Any], restart: set[str], path: str, say: Callable[[str], None]) -> None:
        """Continue from a checkpoint's `data` entry; see the module for what happens to changed sources."""
        if "stream" in saved:
            before = StreamPosition.from_dict(saved["stream"])
        else:  # written before sources existed: one stream, its position in rows
            before = StreamPosition({SINGLE: int(saved["rows_consumed"])}, {SINGLE: 0})
        fingerprints, folders = saved.get("sources", {}), saved.get("folders", {})
        unknown = sorted(restart - {s.name for s in self.sources})
        if unknown:
            raise UserError(f"--restart_source {unknown[0]} names no source of this run; its sources: "
                            f"{', '.join(s.name for s in self.sources)}.")
        for s in self.sources:
            if s.name not in before.rows:
                if before.rows:
                    say(f"source {s.name} is new since {path}: it starts at its beginning.")
                continue
            if s.name in restart:
                say(f"source {s.name} starts again from its beginning (--restart_source).")
                continue
            moved = folders.get(s.name)
            if moved is not None and moved != canonical(s.root):  # pointed elsewhere: other data, on purpose
                say(f"source {s.name} now reads {s.root} (it read {moved}): it starts at its beginning.")
                continue
            old = fingerprints.get(s.name)
            if old is not None and old != s.fingerprint():
                flag = "--data_dir" if s.name == SINGLE else f"data.sources.{s.name}.data_dir"
                raise UserError(
                    f"the files of source {s.name} ({flag} {s.root}) changed since {path} was written (other shards, "
                    "rows or widths), so its saved position would point at other rows; restore the files, or add "
                    f"--restart_source {s.name} to read the source again from its beginning.")
            self.position.rows[s.name] = before.rows[s.name]
            self.position.tokens[s.name] = before.tokens.get(s.name, 0)
        for name in sorted(set(before.rows) - {s.name for s in self.sources}):
            say(f"source {name} of {path} is not in this run's config: it is no longer read.")
        self.bins_done = int(saved.get("bins_done", 0))

    def step_done(self, step: int, micro: list[Batch], tokens_by_source: list[int]) -> None:
        """After the update of 0-based `step`: move past its micro-batches (every rank's), adding the tokens each
        source gave (summed over ranks)."""
        if micro and micro[-1].resume_at is not None:  # token-budget bins: the position after this step's round
            self.position.rows[SINGLE], self.bins_done = micro[-1].resume_at
        else:
            m = self.plan.micro_per_step
            for g in range(step * m, (step + 1) * m):
                counts, _ = self.plan.batch(g)
                for s, n in zip(self.sources, counts, strict=True):
                    self.position.rows[s.name] += n
        for s, n in zip(self.sources, tokens_by_source, strict=True):
            self.position.tokens[s.name] += n

    def epoch(self, source: Source) -> float:
        return self.position.rows[source.name] / source.rows

    # ---- batches ----

    def start(self, step: int, num_workers: int | None, prefetch: int) -> None:
        """Background workers that build micro-batches from the current position (the one after `step` steps)."""
        cfg, data, world = self.plan.config.training, self.plan.config.data, self.world
        if data.batch_tokens is not None:
            dataset: torch.utils.data.IterableDataset = TokenBudgetBatches(
                self.sources[0].shards, self.spec, budget=data.batch_tokens, window=data.pack_window, seed=cfg.seed,
                shuffle_files=data.shuffle_files, start=(self.position.rows[SINGLE], self.bins_done),
                rank=world.rank, stride=world.world_size)
        else:
            dataset = MixedBatches(self.sources, self.spec, self.plan, seed=cfg.seed, shuffle_files=data.shuffle_files,
                                   start=dict(self.position.rows), first=step * self.plan.micro_per_step,
                                   rank=world.rank, stride=world.world_size)
        self._loader = BatchStream(dataset, num_workers=devices.loader_workers(num_workers, world.device),
                                   prefetch=prefetch, pin_memory=world.device.type == "cuda")

    def next_step(self) -> tuple[list[Batch], UserError | None]:
        """This rank's micro-batches of the next step, or the error of a shard that became unreadable or damaged
        during the run."""
        try:
            return [next(self._loader) for _ in range(self.plan.accumulation)], None
        except UserError as e:
            return [], e

    def close(self) -> None:
        if self._loader is not None:
            self._loader.close()


def tokens_by_source(micro: list[Batch], sources: int) -> list[int]:
    """Real tokens each source gave to this rank's micro-batches (token-budget bins: all from the one source)."""
    totals = [0] * sources
    for b in micro:
        for i, n in enumerate(b.source_tokens or (b.num_tokens,)):
            totals[i] += n
    return totals
