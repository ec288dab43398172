"""One benchmark for a lent GPU: encoder-train beside the Hugging Face Trainer, four models, one command.

    python benchmarks/gpu.py --json gpu.json            # on a GPU: the four rows, in under 8 minutes
    python benchmarks/gpu.py --smoke --json smoke.json  # on a CPU: the same script at toy sizes, < 2 minutes
    python benchmarks/gpu.py --rows roberta-base-512    # some of the rows

Rows (bf16; batch = rows per step of the Trainer; about 32k padded positions a step, 16k for large):

    roberta-base-128        RoBERTa-base, rows of 128, batch 256
    roberta-base-512        RoBERTa-base, rows of 512, batch 64
    roberta-large-512       RoBERTa-large, rows of 512, batch 32
    modernbert-base-1024    ModernBERT-base (model.family: modernbert), rows of 1,024, batch 32

Both sides train the same model dimensions on the same synthetic rows (real lengths uniform in
[0.4 L, L], speed.py's rows), timed by the pieces speed.py uses (ours.py, hf_trainer.py, mfu.py):

  encoder-train  `train(config)` from a YAML file, with the GPU options of this code's schema where they
                 exist: `training.compile: true`, and `data.batch_tokens` (micro-batches of a fixed token
                 budget, packed), set to the Trainer's mean real tokens per batch so that both sides
                 train about as many tokens per step. Which ran is printed, detected from the schema.
  HF Trainer     `transformers.Trainer` + `RobertaForMaskedLM` / `ModernBertForMaskedLM` (SDPA), bf16,
                 `torch_compile=True`, `DataCollatorForLanguageModeling`: each batch padded to its
                 longest row, logits at every position.

How it is timed. encoder-train logs every N steps (`training.log_interval` N, so the loop waits for the
device only there, as a real run does) and saves at step W + A (`checkpoint_every`): after W warm-up steps
(compilation), window A (A steps, no save) gives its tokens/s and its step time; window B (the next B steps)
holds the save, whose copy to host memory stalls the loop and whose write runs in a background thread while
training goes on. The save's stall is B's time less A's rate for B's tokens. A watcher thread notes when the
record of step W + A appears in metrics.jsonl and when the checkpoint file of that step appears (it is
renamed into place once written): the save's whole time, copy and write. The Trainer: W' warm-up steps
(its compilation), then A' steps, each timed by a callback after a sync (hf_trainer.py). Its batches vary
in length, so torch.compile's first graphs (static shapes) would be compiled again with dynamic shapes at
the first batch of a new length, a random step that may fall in the timed window; here its graphs are
dynamic from the first batch (`assume_static_by_default` off while it trains): compiled once, in warm-up.
A timed step over 3x the mean is reported as a likely recompilation.

MFU: useful FLOPs (mfu.py's count: 6 x non-embedding weights per real token, attention over real tokens,
the head on predicted positions; the same per-token count for both sides, taken over all rows of the
row's data) per second, against the H100/H200 dense bf16 spec of 989 TFLOP/s and against the fastest bf16
matmul measured in this run (an 8192^3 product and each model's feed-forward shape, at the start, per row
and at the end; rows written to --json before the end use the best rate so far). Peak GPU memory:
`torch.cuda.max_memory_allocated`, reset before each side.

--smoke: every row, both sides, the save timing and the JSON at toy sizes (2-3 layers, width 64-96, rows
of 32-256, a few steps) on whatever device there is. On a CPU the compile options are off on both sides
(inductor's C++ compilation takes about a minute a model on 2 cores; --compile_on_cpu turns them on), which
the notes say; MFU and the spec mean nothing there: the smoke run checks that the script runs, not speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import yaml
from hf_trainer import run_hf
from mfu import matmul_gflops, useful_flops
from ours import encoder_train_config
from speed import encoder_train_version, machine
from synthetic import make_rows, rows_in_loader_order, write_shard, write_tokenizer
from workload import FAMILIES, SIZES, Size, Workload, quietly

from encoder_train.checkpoint import checkpoint_path
from encoder_train.config import DataConfig, TrainingConfig, load_config
from encoder_train.devices import pick_device
from encoder_train.train import train

SPEC_TFLOPS = 989.0  # H100 / H200 SXM dense bf16, the datasheet's figure without sparsity
BUDGET_S = 450.0  # a lent machine's run should end within 8 minutes: no row starts that would pass this


@dataclass(frozen=True)
class Spec:
    """One row of the table: a model and row length, at full size and at the smoke run's toy size."""

    name: str  # stable across full and smoke runs: "roberta-base-128"
    model: str  # "roberta-base"
    size: Size
    seq_len: int
    batch: int
    toy: Size
    toy_seq_len: int
    toy_batch: int


LARGE = Size("large", 24, 1024, 16, 4096, 50265, (512,))  # RoBERTa-large
TOY = Size("toy", 2, 64, 2, 128, 512, (32,))
TOY_LARGE = Size("toy-large", 3, 96, 3, 192, 512, (64,))
# Three layers: one global, two local with the family's 128-token window, which rows of 256 exceed.
TOY_MODERN = Size("toy", 3, 64, 2, 96, 512, (256,), family="modernbert")

SPECS = [
    Spec("roberta-base-128", "roberta-base", SIZES["base"], 128, 256, TOY, 32, 8),
    Spec("roberta-base-512", "roberta-base", SIZES["base"], 512, 64, TOY, 64, 4),
    Spec("roberta-large-512", "roberta-large", LARGE, 512, 32, TOY_LARGE, 64, 4),
    Spec("modernbert-base-1024", "modernbert-base", FAMILIES["modernbert"]["base"], 1024, 32, TOY_MODERN, 256, 4),
]


@dataclass(frozen=True)
class Steps:
    """Step counts. encoder-train: W warm-up, window A without a save, window B holding one, all multiples
    of its log interval. The Trainer: `hf_warmup` untimed, then `hf_steps` timed."""

    log_interval: int
    warmup: int
    window: int  # A
    save_window: int  # B
    hf_warmup: int
    hf_steps: int


GPU_STEPS = Steps(log_interval=10, warmup=10, window=30, save_window=20, hf_warmup=5, hf_steps=20)
SMOKE_STEPS = Steps(log_interval=2, warmup=2, window=2, save_window=2, hf_warmup=1, hf_steps=2)


# ---- what this code's schema offers -------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """The GPU options each side runs with, and what the table says about them."""

    compile: bool  # training.compile on our side
    batch_tokens: bool  # data.batch_tokens on our side
    hf_compile: bool  # the Trainer's torch_compile
    notes: tuple[str, ...] = ()


def detect_options(device: torch.device, no_compile: bool, compile_on_cpu: bool = False,
                   hf_eager: bool = False) -> Options:
    """The options this code's schema has (they land in other changes), on where the device makes them pay."""
    has_compile = "compile" in TrainingConfig.model_fields
    has_batch_tokens = "batch_tokens" in DataConfig.model_fields
    notes = []
    if not has_batch_tokens:
        notes.append("data.batch_tokens is not in this code's schema: encoder-train runs `batch` rows a step")
    if not has_compile:
        notes.append("training.compile is not in this code's schema: encoder-train runs eager")
    compile_here = (device.type == "cuda" or compile_on_cpu) and not no_compile
    if device.type != "cuda" and not compile_here:
        notes.append("on a CPU training.compile and the Trainer's torch_compile are off: inductor's C++ "
                     "compilation takes about a minute a model on 2 cores (the smoke run checks the script, not speed)")
    elif no_compile:
        notes.append("--no_compile: both sides eager")
    if hf_eager and compile_here:
        notes.append("--hf_eager: the Trainer without torch_compile")
    return Options(compile=has_compile and compile_here, batch_tokens=has_batch_tokens,
                   hf_compile=compile_here and not hf_eager, notes=tuple(notes))


# ---- encoder-train's side -----------------------------------------------------------------------------


@dataclass
class Window:
    """Steps between two log points: their real tokens and wall time."""

    steps: int
    tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds

    @property
    def step_seconds(self) -> float:
        return self.seconds / self.steps


class SaveWatch(threading.Thread):
    """Notes when step `step`'s record reaches metrics.jsonl (the save starts right after it is logged) and when
    its checkpoint file appears (renamed into place once completely written): the save's copy and write."""

    def __init__(self, metrics: Path, checkpoint: Path, step: int):
        super().__init__(name="save-watch", daemon=True)
        self.metrics, self.checkpoint, self.step = metrics, checkpoint, step
        self.logged: float | None = None
        self.written: float | None = None
        self.done = threading.Event()

    def run(self) -> None:
        size = -1
        while not self.done.is_set() and (self.logged is None or self.written is None):
            now = time.perf_counter()
            if self.logged is None and self.metrics.exists() and self.metrics.stat().st_size != size:
                size = self.metrics.stat().st_size  # read again only when a record was added: the GIL is shared
                if any(json.loads(line).get("step") == self.step for line in self.metrics.read_text().splitlines()
                       if line.strip().endswith("}")):  # a line being appended is skipped until complete
                    self.logged = now
            if self.logged is not None and self.written is None and self.checkpoint.exists():
                self.written = now
            self.done.wait(0.01)

    @property
    def seconds(self) -> float | None:
        return None if self.logged is None or self.written is None else self.written - self.logged


@dataclass
class Ours:
    steady: Window  # A: no save
    with_save: Window  # B: holds the save at its start
    save_stall: float  # B's seconds less A's rate for B's tokens
    save_seconds: float | None  # the save's copy and background write, from the watcher
    checkpoint_mb: float
    peak_memory_gb: float | None
    batch_tokens: int | None


def run_ours(run_dir: Path, data_dir: Path, tokenizer: Path, spec_size: Size, seq_len: int, batch: int,
             batch_tokens: int | None, options: Options, steps: Steps, device: torch.device, verbose: bool) -> Ours:
    """W + A + B steps of encoder-train, logging every N steps and saving at step W + A."""
    save_at = steps.warmup + steps.window
    total = save_at + steps.save_window
    assert all(n % steps.log_interval == 0 for n in (steps.warmup, steps.window, steps.save_window))
    shutil.rmtree(run_dir, ignore_errors=True)  # a --work_dir used before: no old checkpoints or records
    w = Workload(spec_size, seq_len, "bf16", steps.warmup, steps.window + steps.save_window, batch,
                 compile=options.compile)
    config_file = encoder_train_config(run_dir, data_dir, tokenizer, w)  # speed.py's config, then ours:
    raw = yaml.safe_load(config_file.read_text())
    raw["training"]["log_interval"] = steps.log_interval  # the loop waits for the device at log points only
    raw["training"]["max_steps"] = total
    raw["checkpoint"]["checkpoint_every"] = save_at  # one save inside the timed steps (2 x save_at > total)
    if options.compile:
        raw["training"]["compile"] = True
    if batch_tokens is not None:
        raw["data"]["batch_tokens"] = batch_tokens
    config_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    config = load_config(config_file)

    checkpoints = Path(raw["checkpoint"]["checkpoint_dir"])
    watch = SaveWatch(checkpoints / "metrics.jsonl", checkpoint_path(checkpoints, save_at), save_at)
    fresh_device(device)
    watch.start()
    try:
        result = quietly(lambda: train(config), verbose)
    finally:
        watch.done.set()
        watch.join()
    if result.stopped_by is not None:
        raise RuntimeError(f"encoder-train was stopped by signal {result.stopped_by} at step {result.step}")
    peak = peak_memory_gb(device)

    records = [json.loads(line) for line in (checkpoints / "metrics.jsonl").read_text().splitlines()]
    seen = {r["step"]: r for r in records if "tokens_per_second" in r}  # training records, not evaluations

    def window(first: int, last: int) -> Window:
        """Steps first+1..last, from the records at the log points between them."""
        tokens, seconds = 0, 0.0
        for step in range(first + steps.log_interval, last + 1, steps.log_interval):
            n = seen[step]["tokens_seen"] - seen[step - steps.log_interval]["tokens_seen"]
            tokens, seconds = tokens + n, seconds + n / seen[step]["tokens_per_second"]
        return Window(last - first, tokens, seconds)

    steady, with_save = window(steps.warmup, save_at), window(save_at, total)
    stall = with_save.seconds - with_save.tokens / steady.tokens_per_second
    checkpoint_mb = checkpoint_path(checkpoints, save_at).stat().st_size / 1e6
    return Ours(steady, with_save, stall, watch.seconds, checkpoint_mb, peak, batch_tokens)


# ---- the Trainer's side -------------------------------------------------------------------------------


@dataclass
class Hf:
    window: Window
    slowest_step: float  # seconds: a recompilation inside the window would show here
    peak_memory_gb: float | None


def run_trainer(run_dir: Path, rows: list[torch.Tensor], tokenizer: Path, spec_size: Size, seq_len: int, batch: int,
                options: Options, steps: Steps, device: torch.device, verbose: bool) -> Hf:
    w = Workload(spec_size, seq_len, "bf16", steps.hf_warmup, steps.hf_steps, batch, compile=options.hf_compile)
    fresh_device(device)
    # Batches padded to their longest row vary in length: compiled with static shapes first, the model would be
    # compiled again with dynamic ones at the first batch of another length, which at 256 rows of 128 (96% of
    # batches 128 long) comes at a random step, maybe a timed one. Dynamic from the first batch: compiled once.
    with torch._dynamo.config.patch(assume_static_by_default=False):
        timing, model = run_hf(run_dir, rows[: w.total_steps * batch], tokenizer, w, device, 0, verbose)
    del model
    peak = peak_memory_gb(device)
    return Hf(Window(timing.steps, timing.real_tokens, timing.seconds), max(timing.step_seconds), peak)


# ---- the device ---------------------------------------------------------------------------------------


def fresh_device(device: torch.device) -> None:
    """Free what the last run left (its compiled graphs too), and restart the peak-memory count."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


class Matmul:
    """The fastest bf16 matmul measured in this run, over the shapes measured so far."""

    def __init__(self, device: torch.device, smoke: bool):
        self.device, self.smoke = device, smoke
        self.measured: dict[tuple[int, int, int], float] = {}  # shape -> TFLOP/s

    def measure(self, m: int, k: int, n: int) -> None:
        seconds = 0.2 if self.smoke else 1.0
        tflops = matmul_gflops(m, k, n, torch.bfloat16, self.device, seconds) / 1e3
        self.measured[(m, k, n)] = max(self.measured.get((m, k, n), 0.0), tflops)

    def square(self) -> None:
        side = 512 if self.smoke else 8192
        self.measure(side, side, side)

    @property
    def best(self) -> float:
        return max(self.measured.values())


# ---- one row ------------------------------------------------------------------------------------------


@dataclass
class Result:
    row: str
    model: str
    family: str
    seq_len: int
    batch_size: int
    precision: str
    ours_tokens_per_second: float
    hf_tokens_per_second: float
    ratio: float
    mfu_spec: float  # encoder-train's useful FLOP/s / 989 TFLOP/s
    hf_mfu_spec: float
    mfu_matmul: float  # / the fastest bf16 matmul measured in this run
    hf_mfu_matmul: float
    matmul_tflops: float
    ours_peak_memory_gb: float | None
    hf_peak_memory_gb: float | None
    hf_step_s: float
    hf_slowest_step_s: float
    ours_step_s: float  # window A: no save
    ours_step_with_save_s: float  # window B: one save at its start
    save_stall_s: float
    save_total_s: float | None  # the save's copy and background write
    checkpoint_mb: float
    ours_batch_tokens: int | None
    ours_compile: bool
    hf_compile: bool
    ours_tokens_per_step: float
    hf_tokens_per_step: float
    useful_gflop_per_token: float
    timed_steps_ours: int
    timed_steps_hf: int
    seconds: float  # wall time of the row, both sides, compilation included
    smoke: bool
    device: str
    commit: str
    notes: list[str] = field(default_factory=list)


def bench_row(spec: Spec, work: Path, options: Options, steps: Steps, device: torch.device, matmul: Matmul,
              smoke: bool, commit: str, verbose: bool) -> Result:
    start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    size, seq_len, batch = (spec.toy, spec.toy_seq_len, spec.toy_batch) if smoke else (spec.size, spec.seq_len,
                                                                                       spec.batch)
    ours_steps = steps.warmup + steps.window + steps.save_window
    n_rows = max(ours_steps, steps.hf_warmup + steps.hf_steps) * batch
    tokenizer = write_tokenizer(work / f"tokenizer_{size.vocab}.json", size.vocab)
    data_dir = write_shard(work / f"data_{spec.name}", make_rows(n_rows, seq_len, size.vocab, seed=0))
    rows = rows_in_loader_order(data_dir, seq_len, n_rows)
    lengths = [len(r) for r in rows]
    mean_batch_tokens = sum(lengths) / len(lengths) * batch
    # The Trainer's mean real tokens per batch, a multiple of 64, so that both sides step through about as many.
    batch_tokens = max(seq_len, 64 * round(mean_batch_tokens / 64)) if options.batch_tokens else None
    flops_per_token = useful_flops(size, lengths) / sum(lengths)

    d = size.model_dims(seq_len)
    up = 2 * size.ffn if d.feed_forward == "geglu" else size.ffn
    matmul.measure(batch_tokens or batch * seq_len, size.hidden, up)

    ours = run_ours(work / f"ours_{spec.name}", data_dir, tokenizer, size, seq_len, batch, batch_tokens, options,
                    steps, device, verbose)
    print(f"  {spec.name}: encoder-train {ours.steady.tokens_per_second:,.0f} tok/s "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    hf = run_trainer(work / f"hf_{spec.name}", rows, tokenizer, size, seq_len, batch, options, steps, device,
                     verbose)
    print(f"  {spec.name}: HF Trainer {hf.window.tokens_per_second:,.0f} tok/s "
          f"({time.perf_counter() - start:.0f} s)", flush=True)

    shutil.rmtree(work / f"ours_{spec.name}" / "checkpoints")  # RoBERTa-large's are 4 GB each
    notes = list(options.notes)
    if hf.slowest_step > 3 * hf.window.step_seconds:
        notes.append(f"{spec.name}: a timed HF step took {hf.slowest_step:.3f} s against a mean of "
                     f"{hf.window.step_seconds:.3f} s (a recompilation inside the window?); raise --hf_warmup")
        print(f"  warning: {notes[-1]}", flush=True)
    mfu = [t.tokens_per_second * flops_per_token / 1e12 for t in (ours.steady, hf.window)]  # useful TFLOP/s
    return Result(
        row=spec.name, model=spec.model, family=size.family, seq_len=seq_len, batch_size=batch, precision="bf16",
        ours_tokens_per_second=round(ours.steady.tokens_per_second, 1),
        hf_tokens_per_second=round(hf.window.tokens_per_second, 1),
        ratio=round(ours.steady.tokens_per_second / hf.window.tokens_per_second, 3),
        mfu_spec=sig(mfu[0] / SPEC_TFLOPS), hf_mfu_spec=sig(mfu[1] / SPEC_TFLOPS),
        mfu_matmul=sig(mfu[0] / matmul.best), hf_mfu_matmul=sig(mfu[1] / matmul.best),
        matmul_tflops=round(matmul.best, 2),
        ours_peak_memory_gb=rounded(ours.peak_memory_gb, 2), hf_peak_memory_gb=rounded(hf.peak_memory_gb, 2),
        hf_step_s=round(hf.window.step_seconds, 5), hf_slowest_step_s=round(hf.slowest_step, 5),
        ours_step_s=round(ours.steady.step_seconds, 5), ours_step_with_save_s=round(ours.with_save.step_seconds, 5),
        save_stall_s=round(ours.save_stall, 4), save_total_s=rounded(ours.save_seconds, 3),
        checkpoint_mb=round(ours.checkpoint_mb, 1), ours_batch_tokens=batch_tokens,
        ours_compile=options.compile, hf_compile=options.hf_compile,
        ours_tokens_per_step=round(ours.steady.tokens / ours.steady.steps, 1),
        hf_tokens_per_step=round(hf.window.tokens / hf.window.steps, 1),
        useful_gflop_per_token=sig(flops_per_token / 1e9),
        timed_steps_ours=ours.steady.steps, timed_steps_hf=hf.window.steps,
        seconds=round(time.perf_counter() - start, 1), smoke=smoke, device=device_name(device), commit=commit,
        notes=notes,
    )


def sig(x: float) -> float:
    """Four significant digits (a CPU's MFU against the GPU spec is about 1e-6)."""
    return float(f"{x:.4g}")


def rounded(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else "cpu"


def refresh(result: Result, best: float) -> Result:
    """MFU against the best matmul rate of the whole run (rows finished early saw fewer measurements)."""
    useful = [result.mfu_spec * SPEC_TFLOPS, result.hf_mfu_spec * SPEC_TFLOPS]
    return replace(result, matmul_tflops=round(best, 2), mfu_matmul=sig(useful[0] / best),
                   hf_mfu_matmul=sig(useful[1] / best))


# ---- report -------------------------------------------------------------------------------------------


def gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def table(results: list[Result]) -> str:
    lines = [
        "| model | seq | batch | encoder-train tok/s | HF Trainer tok/s | ratio | MFU of 989 TFLOP/s (ours / HF) | "
        "MFU of measured matmul (ours / HF) | peak GPU GB (ours / HF) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.model} | {r.seq_len} | {r.batch_size} | {r.ours_tokens_per_second:,.0f} | "
            f"{r.hf_tokens_per_second:,.0f} | {r.ratio:.2f}x | {r.mfu_spec:.1%} / {r.hf_mfu_spec:.1%} | "
            f"{r.mfu_matmul:.1%} / {r.hf_mfu_matmul:.1%} | {gb(r.ours_peak_memory_gb)} / {gb(r.hf_peak_memory_gb)} |"
        )
    return "\n".join(lines)


def save_table(results: list[Result]) -> str:
    lines = [
        "| model | seq | encoder-train s/step | with a save | save's stall | stall in steps | save, copy + write "
        "(background) | checkpoint MB | batch tokens (ours) | real tok/step ours / HF | timed steps ours / HF |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        total = "-" if r.save_total_s is None else f"{r.save_total_s:.2f} s"
        lines.append(
            f"| {r.model} | {r.seq_len} | {r.ours_step_s:.4f} | {r.ours_step_with_save_s:.4f} | "
            f"{r.save_stall_s:+.3f} s | {r.save_stall_s / r.ours_step_s:+.2f} | {total} | {r.checkpoint_mb:,.0f} | "
            f"{r.ours_batch_tokens or '-'} | {r.ours_tokens_per_step:,.0f} / {r.hf_tokens_per_step:,.0f} | "
            f"{r.timed_steps_ours} / {r.timed_steps_hf} |"
        )
    return "\n".join(lines)


def write_json(path: Path | None, results: list[Result]) -> None:
    if path is not None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
        tmp.replace(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="also write the rows here, one object per row (after every row)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes and a few steps: checks the script on a CPU")
    parser.add_argument("--rows", nargs="+", choices=[s.name for s in SPECS], default=[s.name for s in SPECS])
    parser.add_argument("--no_compile", action="store_true", help="both sides eager (training.compile, torch_compile)")
    parser.add_argument("--hf_eager", action="store_true", help="the Trainer without torch_compile")
    parser.add_argument("--compile_on_cpu", action="store_true", help="compile both sides on a CPU too (slow)")
    parser.add_argument("--hf_warmup", type=int, help="the Trainer's untimed steps (default: 5; smoke 1)")
    parser.add_argument("--budget_s", type=float, default=BUDGET_S,
                        help="no row starts that the last row's time says would end past this many seconds")
    parser.add_argument("--work_dir", type=Path, help="where data and checkpoints go (default: a temp dir)")
    parser.add_argument("--verbose", action="store_true", help="show both trainers' own output")
    args = parser.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    start = time.perf_counter()
    device = pick_device()
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # toy matmuls gain nothing from a 2nd thread, and on a busy machine wait for it
    if device.type != "cuda" and not args.smoke:
        print("note: no GPU here; the numbers below are a CPU's (use --smoke on a CPU)", flush=True)
    steps = SMOKE_STEPS if args.smoke else GPU_STEPS
    if args.hf_warmup is not None:
        steps = replace(steps, hf_warmup=max(1, args.hf_warmup))
    options = detect_options(device, args.no_compile, args.compile_on_cpu, args.hf_eager)
    commit = encoder_train_version()
    print(machine(device), flush=True)
    print(f"encoder-train options: training.compile {'on' if options.compile else 'off'}, data.batch_tokens "
          f"{'on (packed)' if options.batch_tokens else 'not in the schema'}; HF Trainer: SDPA, bf16, torch_compile "
          f"{'on' if options.hf_compile else 'off'}" + ("; SMOKE: toy sizes" if args.smoke else ""), flush=True)
    for note in options.notes:
        print(f"note: {note}", flush=True)

    matmul = Matmul(device, args.smoke)
    matmul.square()
    results: list[Result] = []
    skipped: list[str] = []
    failed: list[str] = []
    longest = 0.0
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        for spec in (s for s in SPECS if s.name in args.rows):
            elapsed = time.perf_counter() - start
            if elapsed + longest > args.budget_s:
                skipped.append(spec.name)
                print(f"  {spec.name}: skipped, {elapsed:.0f} s gone and the longest row took {longest:.0f} s "
                      f"(--budget_s {args.budget_s:.0f})", flush=True)
                continue
            row_start = time.perf_counter()
            try:
                result = bench_row(spec, work / spec.name, options, steps, device, matmul, args.smoke, commit,
                                   args.verbose)
            except Exception as e:  # noqa: BLE001 - a lent machine's minutes: the other rows still run
                first = (str(e).strip().splitlines() or [""])[0][:300]
                failed.append(f"{spec.name}: {type(e).__name__}: {first}")
                print(f"  {failed[-1]}", flush=True)
                traceback.print_exc()
                continue
            finally:
                longest = max(longest, time.perf_counter() - row_start)
            results.append(result)
            write_json(args.json, results)
            print(f"  {spec.name}: done in {result.seconds:.0f} s", flush=True)
    matmul.square()
    results = [refresh(r, matmul.best) for r in results]
    write_json(args.json, results)

    print()
    print(machine(device))
    print(f"bf16; ratio = encoder-train / HF tokens/s (real tokens); MFU = useful FLOP/s (mfu.py) / {SPEC_TFLOPS:.0f} "
          f"TFLOP/s or / {matmul.best:,.1f} TFLOP/s, the fastest bf16 matmul measured here ("
          + ", ".join(f"{m}x{k}@{k}x{n} {t:,.1f}" for (m, k, n), t in sorted(matmul.measured.items())) + ")")
    print()
    print(table(results))
    print()
    print(save_table(results))
    print()
    print(f"encoder-train: training.compile {'on' if options.compile else 'off'}, data.batch_tokens "
          f"{'on' if options.batch_tokens else 'absent'}; logs every {steps.log_interval} steps; "
          f"{steps.warmup} warm-up steps, {steps.window} timed without a save, {steps.save_window} holding the save. "
          f"HF Trainer: SDPA, bf16, torch_compile {'on' if options.hf_compile else 'off'}; {steps.hf_warmup} "
          f"warm-up steps, {steps.hf_steps} timed.")
    for note in dict.fromkeys(n for r in results for n in r.notes) or options.notes:
        print(f"note: {note}")
    if skipped:
        print(f"skipped for time: {', '.join(skipped)}")
    for failure in failed:
        print(f"FAILED {failure}")
    if args.smoke:
        print("SMOKE run: toy sizes; these numbers check the script, they measure nothing.")
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    if failed or not math.isfinite(sum(r.ratio for r in results)):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
