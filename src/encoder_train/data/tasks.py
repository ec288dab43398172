"""`pretokenize` as N tasks on many machines: datatrove runs each task, we read, pack and publish the shards.

    pretokenize --num_tasks 3 --task_index 1 ...      (or SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT)

    inputs, sorted  -> input k belongs to task k mod N (by file: a file is never split)
    task i          -> datatrove's LocalPipelineExecutor(tasks=N, local_tasks=1, local_rank_offset=i) runs
                       [TextReader, ShardWriter] as rank i (its per-rank method), unless
                       OUTPUT_DIR/.pretokenize/completions/0000i exists
    ShardWriter     -> rows as prepare.py packs them, `train/0000i-000000.pt`, ... each published whole
                       (local: a temp name, then rename; object store: a local temp file, then one upload)
    last task done  -> OUTPUT_DIR/manifest.json (data/manifest.py), from every task's record

Why datatrove's executor and not its readers: its jsonl reader holds each line whole and logs a bad line as a
warning instead of stopping, so the first step is our own reader over textfiles.py (bounded reads, one sentence per
damaged file). What datatrove gives: the pipeline contract our two steps implement (a rank reads its own inputs), a
completion record per task (a rerun skips finished tasks) and per-task statistics under OUTPUT_DIR/.pretokenize; its
SLURM and Ray executors run the same steps for whoever drives the pipeline from Python.

A task that dies is run again with the same command: its shards get the same names and the same bytes (the output
depends only on the inputs, the tokenizer and the settings), so a shard it had published is replaced by itself, and
nothing is duplicated or lost. The first task to start records the plan (OUTPUT_DIR/.pretokenize/plan.json: inputs,
task count, settings, tokenizer); every later one must match it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datatrove.data import Document, DocumentsPipeline
from datatrove.executor import LocalPipelineExecutor
from datatrove.io import DataFolder
from datatrove.pipeline.base import PipelineStep
from loguru import logger
from tqdm import tqdm

from encoder_train.data.formats import FORMATS
from encoder_train.data.inputs import input_name
from encoder_train.data.manifest import NAME as MANIFEST
from encoder_train.data.manifest import InputEntry, Manifest, ShardEntry, TokenizerEntry, Totals, check_listing
from encoder_train.data.prepare import ENCODE_BATCH_CHARS, PretokenizeReport, RowPacker, encoded_batches
from encoder_train.data.store import RemoteStore
from encoder_train.errors import UserError
from encoder_train.textfiles import Input, check_formats, check_inputs, file_texts, input_bytes
from encoder_train.tokenizer import load_tokenizer, special_tokens
from encoder_train.urls import CREDENTIALS, is_remote, local_path

# Under OUTPUT_DIR: plan.json and tasks/NNNNN.json (ours); completions/, stats/ and logs/ (datatrove's).
STATE = ".pretokenize"
PLAN = f"{STATE}/plan.json"
PROGRESS_SECONDS = 30.0  # one plain progress line this often, off a terminal
READ_BYTES = 8 << 20  # bytes per read while hashing a shard for --verify
HASH_THREADS = 8  # shards hashed at once by --verify


@dataclass(frozen=True)
class TaskPlan:
    """What every task of one output must agree on: the inputs (in order, with sizes), the task count, and every
    setting that changes the shards."""

    num_tasks: int
    inputs: list[tuple[str, int]]  # (path or URL, bytes)
    seq_len: int
    rows_per_shard: int
    val_fraction: float
    text_field: str
    folders: tuple[str, str]
    on_bad_input: str
    tokenizer_sha256: str
    vocab_size: int

    def task_inputs(self, task: int) -> list[int]:
        """Input k is task k mod num_tasks's: by file, round-robin over the sorted list."""
        return list(range(task, len(self.inputs), self.num_tasks))

    def as_json(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self)))  # tuples as lists, as read back


def tasks_from_environment(num_tasks: int | None, task_index: int | None) -> tuple[int, int]:
    """(N, i) from the flags, else from a SLURM array job, else (1, 0); refuses an index outside N."""
    if num_tasks is None and task_index is None and "SLURM_ARRAY_TASK_COUNT" in os.environ:
        try:
            num_tasks = int(os.environ["SLURM_ARRAY_TASK_COUNT"])
            task_index = int(os.environ["SLURM_ARRAY_TASK_ID"]) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", "0"))
        except (KeyError, ValueError):
            raise UserError("SLURM_ARRAY_TASK_COUNT is set but SLURM_ARRAY_TASK_ID is missing or not a number; submit "
                            "with sbatch --array=0-N, or pass --num_tasks and --task_index.") from None
    num_tasks = 1 if num_tasks is None else num_tasks
    task_index = 0 if task_index is None else task_index
    if not 0 <= task_index < num_tasks:
        raise UserError(f"--task_index {task_index} is outside --num_tasks {num_tasks}; pass an index from 0 to "
                        f"{num_tasks - 1}.")
    return num_tasks, task_index


class Output:
    """OUTPUT_DIR, a local folder or a URL: small files written atomically, shards published whole, listings."""

    def __init__(self, location: str | Path):
        self.remote = is_remote(location)
        if self.remote:
            self.store = RemoteStore(str(location), "--output_dir")
            self.root = self.store.root
            scheme, rest = self.root.split("://", 1)
            bucket = f"{scheme}://{rest.split('/', 1)[0]}"
            if not self.store.retry(f"--output_dir {self.root}", lambda: self.store.fs.exists(
                    self.store.fs_path(self.root).split("/", 1)[0]), listing=True):
                where = CREDENTIALS.get(self.store.protocol, "the storage library's credentials")
                raise UserError(f"--output_dir {self.root}: the bucket {bucket} does not exist, or these credentials "
                                f"may not see it; create it, or check the URL and {where}.")
        else:
            self.root = str(local_path(location))
            if os.path.exists(self.root) and not os.path.isdir(self.root):
                raise UserError(f"output_dir {self.root} is a file; pass a folder path as --output_dir.")

    def where(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def read_text(self, rel: str) -> str | None:
        """The file's text, or None when there is none."""
        if not self.remote:
            try:
                return Path(self.root, rel).read_text()
            except FileNotFoundError:
                return None
        path = self.store.fs_path(self.where(rel))

        def read() -> str | None:
            try:
                return self.store.fs.cat_file(path).decode()
            except FileNotFoundError:
                return None

        return self.store.retry(self.where(rel), read, listing=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a small file whole: a temp file renamed (local), or one PUT (object store)."""
        with tempfile.NamedTemporaryFile(dir=None if self.remote else self._folder(rel), delete=False,
                                         prefix=".", suffix=".tmp") as f:
            f.write(data)
        self.publish(rel, f.name)

    def create(self, rel: str, data: bytes) -> bool:
        """Write a small file only if there is none yet (two tasks starting at once: one plan wins); False when one
        was there. Locally a hard link, which fails where the name exists; on S3 a conditional PUT (If-None-Match).
        Other stores have no such write: there the last of two simultaneous first tasks wins."""
        if self.remote and self.store.protocol not in ("s3", "s3a"):
            if self.read_text(rel) is not None:
                return False
            self.write_bytes(rel, data)
            return True
        if self.remote:
            target = self.store.fs_path(self.where(rel))
            try:
                self.store.fs.pipe_file(target, data, mode="create")
                return True
            except Exception:  # the precondition failed (or the write did): tell them apart by reading
                if self.read_text(rel) is not None:
                    return False
                raise
        with tempfile.NamedTemporaryFile(dir=self._folder(rel), delete=False, prefix=".", suffix=".tmp") as f:
            f.write(data)
        try:
            os.link(f.name, Path(self.root, rel))
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(f.name)

    def publish(self, rel: str, temp: str) -> None:
        """Move the finished local file `temp` to `rel`: it appears only whole, under its final name."""
        try:
            if self.remote:
                target = self.store.fs_path(self.where(rel))
                self.store.retry(self.where(rel), lambda: self.store.fs.put_file(temp, target))
            else:
                os.replace(temp, Path(self.root, rel))
        except OSError as e:
            raise UserError(f"could not write {self.where(rel)} ({e.strerror or e}); free space or pass another "
                            "--output_dir.") from None
        finally:
            if os.path.exists(temp):
                os.unlink(temp)

    def temp_for(self, rel: str) -> str:
        """A temp file to write `rel`'s bytes to before `publish`: beside it (local, so the rename stays on one
        disk; a `.tmp` name the trainer never reads), else in the system's temp folder."""
        if self.remote:
            fd, name = tempfile.mkstemp(suffix=".pt.tmp")
            os.close(fd)
            return name
        self._folder(rel)
        return str(Path(self.root, rel + ".tmp"))

    def _folder(self, rel: str) -> str:
        folder = Path(self.root, rel).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"could not create {folder} ({e.strerror}); pass a writable --output_dir.") from None
        return str(folder)

    def shards(self) -> list[tuple[str, int]]:
        """(path relative to the root, size) of every `.pt` file under it, sorted; [] when there is none."""
        suffixes = tuple(FORMATS)
        if not self.remote:
            root = Path(self.root)
            if not root.is_dir():
                return []
            return sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*")
                          if p.name.endswith(suffixes) and p.is_file())
        base = self.store.fs_path(self.root)
        found = self.store.retry(f"output_dir {self.root}", lambda: self.store.fs.find(base, detail=True),
                                 listing=True)
        return sorted((p[len(base) + 1:], int(info.get("size") or 0)) for p, info in found.items()
                      if p.endswith(suffixes) and p.startswith(base + "/") and info.get("type", "file") == "file")

    def sha256(self, rel: str) -> str:
        """The file's sha256, read READ_BYTES at a time."""
        digest = hashlib.sha256()
        if self.remote:
            path = self.store.fs_path(self.where(rel))
            f = self.store.retry(self.where(rel), lambda: self.store.fs.open(path, "rb", block_size=READ_BYTES))
        else:
            f = open(Path(self.root, rel), "rb")  # noqa: SIM115 - closed by `with f`
        with f:
            while chunk := f.read(READ_BYTES):
                digest.update(chunk)
        return digest.hexdigest()

    def datafolder(self) -> DataFolder:
        """OUTPUT_DIR/.pretokenize for datatrove, on the same filesystem (and credentials) as the shards."""
        if self.remote:
            return DataFolder(self.store.fs_path(self.where(STATE)), fs=self.store.fs)
        return DataFolder(str(Path(self.root, STATE)))


@dataclass
class TaskCounters:
    """What one task has read and written so far; shared by its reader and its writer, and shown as progress."""

    task: int
    num_tasks: int
    total_bytes: int
    documents: int = 0
    bytes_read: int = 0
    tokens: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)


class TextReader(PipelineStep):
    """The task's input files as datatrove Documents, read by textfiles.py (bounded reads)."""

    name = "text files (textfiles.py)"
    type = "READER"

    def __init__(self, inputs: list[Input], plan: TaskPlan, counters: TaskCounters):
        super().__init__()
        self.inputs, self.plan, self.counters = inputs, plan, counters

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        def count(n: int) -> None:
            self.counters.bytes_read += n

        for k in self.plan.task_inputs(rank):
            path = self.inputs[k]
            try:
                check_formats([path], self.plan.text_field)
                for number, text in enumerate(file_texts(path, count, self.plan.text_field)):
                    yield Document(text=text, id=f"{k}/{number}", metadata={"input": k})
            except UserError as e:
                if self.plan.on_bad_input == "stop":
                    raise UserError(f"task {rank}: {str(e).rstrip('.')}; or pass --on_bad_input skip to leave out "
                                    "the rest of such a file.") from None
                self.counters.skipped.append({"input": k, "path": input_name(path), "reason": str(e)})
                print(f"task {rank}: skipped the rest of {path}: {e}", file=sys.stderr)


class ShardWriter(PipelineStep):
    """Documents -> packed rows -> this task's train/val shards, each published whole; then the task's record."""

    name = "packed .pt shards"
    type = "WRITER"

    def __init__(self, output: Output, plan: TaskPlan, tokenizer_path: str, counters: TaskCounters,
                 bar: bool, batch_chars: int = ENCODE_BATCH_CHARS):
        super().__init__()
        self.output, self.plan, self.tokenizer_path = output, plan, tokenizer_path
        self.counters, self.bar, self.batch_chars = counters, bar, batch_chars

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        plan, counters = self.plan, self.counters
        tokenizer = load_tokenizer(self.tokenizer_path)
        ids = special_tokens(tokenizer, self.tokenizer_path)
        tokenizer.encode_special_tokens = True  # text spelling "<s>" is text (see prepare.py)
        packer = RowPacker(plan.seq_len, bos=ids.bos, eos=ids.eos, pad=ids.pad)
        shards = _TaskShards(self.output, plan, rank, ids.pad)
        progress = _Progress(counters, self.bar)
        batch_inputs: deque[int] = deque()  # the input of each batch pulled by the encoder, not yet packed
        fed = 0  # tokens given to the packer so far: stream position of the next one
        try:
            for texts, stream in encoded_batches(tokenizer, _batches(data, self.batch_chars, batch_inputs), ids.eos):
                k = batch_inputs.popleft()
                counters.tokens += len(stream) - len(texts)  # every document comes with one separator
                if counters.documents == 0:
                    stream = stream[1:]  # the stream starts with a document, not a separator
                counters.documents += len(texts)
                self.stat_update("documents", value=len(texts), unit="batch")
                self.stat_update("tokens", value=len(stream), unit="batch")
                shards.input_starts(fed, k)
                fed += len(stream)
                shards.add(packer.rows(stream))
                progress.update()
            shards.add(packer.last_row())
            shards.close()
        finally:
            progress.close()
        record = {"task": rank, "documents": counters.documents, "tokens": counters.tokens, "rows": shards.rows,
                  "train_rows": shards.split_rows[0], "val_rows": shards.split_rows[1],
                  "padding": packer.padding, "input_bytes": counters.total_bytes, "shards": shards.entries,
                  "skipped": counters.skipped}
        self.output.write_bytes(_task_record(rank), json.dumps(record, indent=1).encode())


def _batches(documents: DocumentsPipeline, batch_chars: int, inputs: deque[int]) -> Iterator[list[str]]:
    """Documents in lists of about `batch_chars` characters, never two input files in one list (so a shard's
    inputs are known from token positions); each list's input is appended to `inputs` as it is handed out."""
    batch: list[str] = []
    chars, current = 0, -1
    for document in documents or ():
        k = document.metadata["input"]
        if batch and (k != current or chars >= batch_chars):
            inputs.append(current)
            yield batch
            batch, chars = [], 0
        current = k
        batch.append(document.text)
        chars += len(document.text)
    if batch:
        inputs.append(current)
        yield batch


class _TaskShards:
    """Sends each of a task's rows to train or val by its index in the task (every 1/val_fraction-th is val, as in
    prepare.py) and writes `FOLDER/TTTTT-NNNNNN.pt` shards of rows_per_shard rows, each published whole."""

    def __init__(self, output: Output, plan: TaskPlan, task: int, pad: int):
        self.output, self.plan, self.task, self.pad = output, plan, task, pad
        self.buffers = [np.empty((plan.rows_per_shard, plan.seq_len), dtype=np.int32) for _ in range(2)]
        self.first = [0, 0]  # the task-row index of each buffer's first row
        self.filled = [0, 0]
        self.split_rows = [0, 0]
        self.counts = [0, 0]  # shards written per split
        self.rows = 0
        self.entries: list[dict[str, Any]] = []
        self.starts: list[int] = []  # stream position where each input's tokens start: (k,), increasing
        self.start_inputs: list[int] = []

    def input_starts(self, position: int, k: int) -> None:
        if not self.start_inputs or self.start_inputs[-1] != k:
            self.starts.append(position)
            self.start_inputs.append(k)

    def add(self, rows: np.ndarray) -> None:
        index = np.arange(self.rows, self.rows + len(rows), dtype=np.float64)  # exact below 2^53 rows
        is_val = np.floor((index + 1) * self.plan.val_fraction) > np.floor(index * self.plan.val_fraction)
        for split, mask in ((0, ~is_val), (1, is_val)):
            picked, where = rows[mask], index[mask].astype(np.int64)
            while len(picked):
                if self.filled[split] == 0:
                    self.first[split] = int(where[0])
                take = min(len(picked), self.plan.rows_per_shard - self.filled[split])
                self.buffers[split][self.filled[split]:self.filled[split] + take] = picked[:take]
                self.filled[split] += take
                self.split_rows[split] += take
                last = int(where[take - 1])
                picked, where = picked[take:], where[take:]
                if self.filled[split] == self.plan.rows_per_shard:
                    self._write(split, last)
        self.rows += len(rows)

    def close(self) -> None:
        for split in (0, 1):
            if self.filled[split]:
                self._write(split, self.rows - 1)

    def _write(self, split: int, last_row: int) -> None:
        """Save the filled rows as the split's next shard: bytes in memory (torch.save), a temp file, one publish."""
        rows = self.buffers[split][:self.filled[split]]
        data = io.BytesIO()  # saved in memory so the archive name inside does not depend on the file's name
        torch.save(torch.from_numpy(rows).clone(), data)
        rel = f"{self.plan.folders[split]}/{self.task:05d}-{self.counts[split]:06d}.pt"
        temp = self.output.temp_for(rel)
        try:
            Path(temp).write_bytes(data.getbuffer())
            info = FORMATS[".pt"].header(temp, self.plan.seq_len)
        except OSError as e:
            Path(temp).unlink(missing_ok=True)
            raise UserError(f"could not write {self.output.where(rel)} ({e.strerror}); free space or pass another "
                            "--output_dir.") from None
        self.output.publish(rel, temp)
        width = self.plan.seq_len - 2  # stream tokens per row
        self.entries.append({
            "path": rel, "task": self.task, "rows": info.rows, "width": info.width,
            "dtype": str(info.dtype).removeprefix("torch."), "offset": info.offset, "row_stride": info.row_stride,
            "bytes": len(data.getbuffer()), "tokens": int(np.count_nonzero(rows != self.pad)),
            "sha256": hashlib.sha256(data.getbuffer()).hexdigest(),
            "inputs": self._inputs(self.first[split] * width, (last_row + 1) * width)})
        self.counts[split] += 1
        self.filled[split] = 0

    def _inputs(self, start: int, end: int) -> list[int]:
        """The inputs whose tokens lie in stream positions [start, end): the span from a shard's first row to its
        last, so the other split's rows between them count too (an input wholly inside such a row is named by this
        shard as well; inputs follow each other in the stream, so no other is)."""
        lo = max(bisect_right(self.starts, start) - 1, 0)
        hi = bisect_right(self.starts, end - 1)
        return sorted(set(self.start_inputs[lo:hi]))


class _Progress:
    """Documents, bytes, tokens, rate and ETA: a bar on a terminal, else one plain line every PROGRESS_SECONDS."""

    def __init__(self, counters: TaskCounters, bar: bool):
        self.counters, self.began = counters, time.monotonic()
        self.last = self.began
        self.bar = tqdm(total=counters.total_bytes, unit="B", unit_scale=True,
                        desc=f"task {counters.task}/{counters.num_tasks}") if bar else None

    def update(self) -> None:
        c = self.counters
        if self.bar is not None:
            self.bar.update(c.bytes_read - self.bar.n)
            self.bar.set_postfix(documents=c.documents, tokens=c.tokens, refresh=False)
            return
        now = time.monotonic()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        c = self.counters
        seconds = max(now - self.began, 1e-9)
        rate = c.bytes_read / seconds
        eta = (c.total_bytes - c.bytes_read) / rate if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta < 86400 * 365 else "?"
        return (f"task {c.task} of {c.num_tasks}: {c.documents:,} documents, {c.bytes_read / 1e6:,.1f} of "
                f"{c.total_bytes / 1e6:,.1f} MB, {c.tokens:,} tokens, {rate / 1e6:.2f} MB/s, "
                f"{c.tokens / seconds:,.0f} tokens/s, ETA {eta_text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass(frozen=True)
class TaskResult:
    report: PretokenizeReport | None  # None when the task had been done before (skipped)
    manifest: Manifest | None  # written by this run: every task is done
    pending: int  # tasks not done yet


def run_task(inputs: list[Input], tokenizer_path: str | Path, output_dir: str | Path, seq_len: int,
             rows_per_shard: int, val_fraction: float, text_field: str, folders: tuple[str, str],
             num_tasks: int, task_index: int, on_bad_input: str = "stop", progress: bool = False) -> TaskResult:
    """Run task `task_index` of `num_tasks` (skipped when its completion record exists), then write the manifest if
    every task is done."""
    if num_tasks > len(inputs):
        raise UserError(f"--num_tasks {num_tasks} is more than the {len(inputs)} input files; inputs are split by "
                        f"file, so pass --num_tasks {len(inputs)} or less.")
    check_inputs(inputs)
    output = Output(output_dir)
    tokenizer_bytes = Path(tokenizer_path).read_bytes()
    vocab_size = load_tokenizer(tokenizer_path).get_vocab_size()
    plan = TaskPlan(num_tasks=num_tasks, inputs=[(input_name(p), size) for p, size in _sizes(inputs)],
                    seq_len=seq_len, rows_per_shard=rows_per_shard, val_fraction=val_fraction, text_field=text_field,
                    folders=folders, on_bad_input=on_bad_input,
                    tokenizer_sha256=hashlib.sha256(tokenizer_bytes).hexdigest(), vocab_size=vocab_size)
    _settle_plan(output, plan)
    mine = plan.task_inputs(task_index)
    counters = TaskCounters(task=task_index, num_tasks=num_tasks, total_bytes=input_bytes([inputs[k] for k in mine]))
    executor = LocalPipelineExecutor(
        pipeline=[TextReader(inputs, plan, counters),
                  ShardWriter(output, plan, str(tokenizer_path), counters, bar=progress)],
        tasks=num_tasks, workers=1, local_tasks=1, local_rank_offset=task_index,
        logging_dir=output.datafolder(), skip_completed=True)
    # datatrove logs a failing task's traceback, with the values of its variables, to stderr; a UserError is one
    # sentence, and our own progress lines say what a task does. Its records (completions, stats) are files, kept.
    logger.disable("datatrove")
    done_before = executor.is_rank_completed(task_index)
    began = time.perf_counter()
    if not done_before:
        # The executor's per-task method: what run() calls for each rank, without the multiprocess Manager server
        # run() starts for its pool, which one task per command never uses and which a SIGKILLed task would leave
        # running as an orphan.
        executor._run_for_rank(task_index)
    report = None if done_before else _report(output, plan, task_index, time.perf_counter() - began)
    pending = executor.get_incomplete_ranks(range(num_tasks), skip_completed=True)
    manifest = None if pending else write_manifest(output, plan)
    return TaskResult(report=report, manifest=manifest, pending=len(pending))


def _sizes(inputs: list[Input]) -> list[tuple[Input, int]]:
    return [(p, input_bytes([p])) for p in inputs]


def _task_record(task: int) -> str:
    return f"{STATE}/tasks/{task:05d}.json"


def _settle_plan(output: Output, plan: TaskPlan) -> None:
    """Record the plan in a new output, or refuse a run that differs from the one recorded; refuse an output that
    already holds shards this plan did not write."""
    text = output.read_text(PLAN)
    want = plan.as_json()
    if text is None:
        existing = output.shards()
        if existing:
            raise UserError(f"output_dir {output.root} already holds {len(existing)} .pt shard"
                            f"{'s' if len(existing) != 1 else ''} of another run (e.g. {existing[0][0]}) and no "
                            f"{PLAN}; choose another --output_dir (tasks never replace shards they did not write).")
        if output.create(PLAN, json.dumps(want, indent=1).encode()):
            return
        text = output.read_text(PLAN) or "{}"  # another task recorded its plan first: this one must match it
    try:
        recorded = json.loads(text)
    except ValueError:
        raise UserError(f"{output.where(PLAN)} is not JSON; remove the damaged file only if {output.root} holds no "
                        "shards yet, else choose another --output_dir.") from None
    for key, value in want.items():
        if recorded.get(key) != value:
            what = {"inputs": "the input files (or their sizes)", "num_tasks": "--num_tasks"}.get(key, key)
            shown = f" ({recorded.get(key)!r} recorded, {value!r} now)" if key != "inputs" else ""
            raise UserError(f"output_dir {output.root} is being written by a run with other {what}{shown}, as "
                            f"{output.where(PLAN)} records; rerun with the same inputs and settings, or choose "
                            "another --output_dir.")


def _report(output: Output, plan: TaskPlan, task: int, seconds: float) -> PretokenizeReport:
    record = json.loads(output.read_text(_task_record(task)) or "{}")
    shards = record["shards"]
    slots = record["rows"] * plan.seq_len
    train = [s for s in shards if s["path"].startswith(plan.folders[0] + "/")]
    return PretokenizeReport(
        output_dir=output.root, train_dir=output.where(plan.folders[0]), val_dir=output.where(plan.folders[1]),
        seq_len=plan.seq_len, documents=record["documents"], tokens=record["tokens"], rows=record["rows"],
        train_rows=record["train_rows"], val_rows=record["val_rows"], train_shards=len(train),
        val_shards=len(shards) - len(train), fill_ratio=(slots - record["padding"]) / max(slots, 1),
        input_bytes=record["input_bytes"], output_bytes=sum(s["bytes"] for s in shards), seconds=seconds)


def write_manifest(output: Output, plan: TaskPlan) -> Manifest:
    """OUTPUT_DIR/manifest.json from every task's record (all tasks are done), written whole."""
    records = []
    for task in range(plan.num_tasks):
        text = output.read_text(_task_record(task))
        if text is None:
            raise UserError(f"task {task} is recorded as done but {output.where(_task_record(task))} is missing; "
                            f"remove {output.where(f'{STATE}/completions/{task:05d}')} and run task {task} again.")
        records.append(json.loads(text))
    shards = sorted((ShardEntry(**{**s, "inputs": tuple(s["inputs"])}) for r in records for s in r["shards"]),
                    key=lambda s: s.path)
    manifest = Manifest(
        num_tasks=plan.num_tasks, seq_len=plan.seq_len, text_field=plan.text_field,
        tokenizer=TokenizerEntry(vocab_size=plan.vocab_size, sha256=plan.tokenizer_sha256),
        folders={"train": plan.folders[0], "val": plan.folders[1]},
        inputs=tuple(InputEntry(path=p, bytes=b, task=k % plan.num_tasks) for k, (p, b) in enumerate(plan.inputs)),
        shards=tuple(shards),
        totals=Totals(documents=sum(r["documents"] for r in records),
                      input_bytes=sum(b for _, b in plan.inputs), rows=sum(r["rows"] for r in records),
                      tokens=sum(r["tokens"] for r in records), shards=len(shards)))
    output.write_bytes(MANIFEST, manifest.to_json().encode())
    return manifest


def verify(output_dir: str | Path) -> Manifest:
    """Check OUTPUT_DIR against its manifest: every shard present, of its size and sha256, none unlisted. Prints one
    line per missing, damaged or unlisted shard to stderr and raises a UserError summing them up."""
    output = Output(output_dir)
    text = output.read_text(MANIFEST)
    if text is None:
        raise UserError(f"{output.where(MANIFEST)} does not exist; it is written when every pretokenize task is done "
                        "(a plain rerun of any task writes it then).")
    manifest = Manifest.from_json(text, output.where(MANIFEST))
    listed = output.shards()
    differences = check_listing(manifest, listed)
    sizes = dict(listed)
    damaged = [(s.path, f"{sizes[s.path]:,} bytes, the manifest says {s.bytes:,}")
               for s in manifest.shards if s.path in sizes and sizes[s.path] != s.bytes]
    whole = [s for s in manifest.shards if sizes.get(s.path) == s.bytes]
    # Every byte is read to hash it: HASH_THREADS shards at a time, as the reads wait on the network.
    with ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="verify") as pool:
        digests = list(pool.map(output.sha256, [s.path for s in whole]))
    damaged += [(s.path, "its sha256 differs from the manifest's")
                for s, digest in zip(whole, digests, strict=True) if digest != s.sha256]
    lines = ([f"missing: {output.where(p)}" for p in differences.missing]
             + [f"damaged: {output.where(p)} ({why})" for p, why in sorted(damaged)]
             + [f"unlisted: {output.where(p)} (not in the manifest)" for p in differences.unlisted])
    if lines:
        print("\n".join(lines), file=sys.stderr)
        raise UserError(f"{output.root} does not match its manifest: {len(differences.missing)} missing, "
                        f"{len(damaged)} damaged and {len(differences.unlisted)} unlisted of "
                        f"{len(manifest.shards)} shards; rerun the tasks that wrote them (remove their "
                        f"{STATE}/completions/ records first) or restore the files.")
    return manifest
