"""Training speed of encoder-train beside the Hugging Face Trainer, same model, same data, same machine.

    python benchmarks/speed.py                                   # small + base, bf16 + fp32
    python benchmarks/speed.py --quick                           # smoke run: small model, a few steps
    python benchmarks/speed.py --sizes small --repeats 3         # a shared machine: fastest of 3 per step
    python benchmarks/speed.py --sizes base --seq_lens 512 --batch_size 8   # a CPU with < 48 GB
    python benchmarks/speed.py --sizes --quality --quality_seeds 3          # equal quality only, with its noise

What runs. For each (size, row length, precision) the script writes `.pt` shards and a word-level
tokenizer into a temp folder, then trains the same model dimensions on the same rows, 32 rows per
step (`--batch_size`), twice:

  encoder-train  `encoder_train.train.train(config)`, the config loaded from a small YAML file;
                 its own loader (default workers: inline on a CPU, 2 on a GPU), masking,
                 sparse MLM head, AdamW.
  HF Trainer     `transformers.Trainer` + `RobertaForMaskedLM` (attn_implementation="sdpa") +
                 `DataCollatorForLanguageModeling` (mlm_probability 0.15), as `run_mlm.py` would:
                 the rows without their padding (with `special_tokens_mask`, as the tokenizer gives
                 it), padded per batch to its longest row by the collator, logits over every position.

Both see the same rows in the same order: the HF dataset lists the rows in the order encoder-train's
loader reads them (`RowOrder`), and the Trainer reads it sequentially, so batch i holds the same 32
rows on both sides. Same optimiser settings (AdamW, beta2 0.98, eps 1e-6, weight decay 0.01 off
biases and LayerNorms, clip 1.0, linear schedule), same dropout, same precision: bf16 autocast with
fp32 weights, or fp32. Both run in this process with the same torch thread count.

How it is timed. The first W steps are warm-up (allocator, worker start, first-call overheads) and
are excluded; the next N steps are timed, each on its own. encoder-train logs every step
(`training.log_interval` 1): each metrics.jsonl record holds the tokens since the last record and
their tokens/s, whose quotient is that step's wall time (on CUDA the loop reads its clock just
before the sync of its logging, right after the per-step sync of its finiteness check). HF: a
`TrainerCallback` reads the clock at the end of every step (after a CUDA sync; the Trainer syncs
every step anyway, for its NaN filter of the loss). With `--repeats R` the sides run R times each,
alternating, and batch i's time is the fastest of its R runs: every run sees the same batches, so
this keeps, step by step, the run least slowed by other work on a shared machine. Real tokens are
the non-pad tokens of the N batches, identical on both sides (the HF count comes from the attention
masks its collator built, and is checked).

Useful FLOPs of a window (the same formula for both sides; padding, and logits at positions that
are not predicted, are work HF does that counts for nothing). For L layers, hidden H, feed-forward
F, vocabulary V, rows of real lengths n_r, and P predicted positions (mask probability x the
non-special tokens, 0.15 x (n_r - 2) per row), with fwd + bwd = 3 x fwd (the backward pass does two
matmuls per forward one):

    dense      6 * L * (4H^2 + 2HF) * sum_r n_r      q, k, v, out projections and the FFN
    attention 12 * L * H * sum_r n_r^2               per token, forward QK^T and AV are each
                                                     2 * n_r * H FLOPs: 4 n_r H, x3 for fwd + bwd
    MLM head   6 * (H^2 + H*V) * P                   dense + decoder on predicted positions only

(6 x the non-embedding matmul weights per real token, plus attention over the real tokens of the
row, plus the head where a prediction is made; embeddings, LayerNorms, biases, softmax and the
optimiser are left out.) MFU = useful FLOP/s / the matmul rate measured on this machine in this run
for that precision: the fastest single 2048^3 matmul or matmul of the model's own FFN shape
(B*T x H @ H x F), measured before and after every workload.

Data. Rows of real length uniform in [0.4 L, L] (about 30% padding overall, `<s>` first, `</s>` last,
pad id 1 after), ids 5..V-1 drawn from a Zipf law (rank^-1.1). Each row repeats a motif of 4 to 16
such words, so a model has something to learn beyond word frequencies (copying needs attention):
that makes `--quality`, held-out MLM loss of both after the same steps on the same rows, evaluated
on the same held-out rows with the same masks (encoder-train's evaluation batches), a real check.

Caveats: timings vary with the machine and its load; the header prints the machine. base at 512
tokens and 32 rows needs about 24 GB (encoder-train) and well over 30 GB (HF) of host memory on a
CPU, where attention with dropout materialises (B, heads, T, T) tensors; use `--batch_size 8` there.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import json
import math
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from host import cpu_name, usable_cores
from tokenizers import Tokenizer, models, pre_tokenizers

from encoder_train.config import load_config
from encoder_train.data.shards import RowOrder, scan_shards
from encoder_train.evaluate import eval_batches, evaluate, load_trained
from encoder_train.model import IGNORE_INDEX
from encoder_train.train import autocast_for, pick_device, train

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, RoBERTa's order
BOS, PAD, EOS = 0, 1, 2
MASK_PROBABILITY = 0.15
SEED = 0


@dataclass(frozen=True)
class Size:
    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int
    vocab: int
    seq_lens: tuple[int, ...]  # row lengths benchmarked by default


SIZES = {
    "small": Size("small", 4, 256, 4, 1024, 8192, (128,)),
    "base": Size("base", 12, 768, 12, 3072, 50265, (128, 512)),  # RoBERTa-base
}

# (warm-up steps, timed steps) by default; --warmup / --steps override them all.
DEFAULT_STEPS = {("small", 128): (5, 30), ("base", 128): (3, 5), ("base", 512): (2, 3)}


@dataclass(frozen=True)
class Workload:
    """What both sides train: the model, the rows, the precision and how many steps."""

    size: Size
    seq_len: int
    precision: str  # "bf16" or "fp32"
    warmup: int  # untimed steps first
    steps: int  # timed steps after them
    batch: int = 32
    lr: float = 1e-4
    lr_warmup: int = 0  # learning-rate warm-up steps (a schedule, not the untimed steps)
    compile: bool = False  # torch.compile on both sides (training.compile; the Trainer's torch_compile)
    seed: int = SEED  # initial weights, dropout, masks (and encoder-train's row order, which HF follows)

    @property
    def name(self) -> str:
        return f"{self.size.name}_{self.seq_len}_{self.precision}_b{self.batch}" + ("_compiled" if self.compile else "")

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


@dataclass
class Timing:
    """One side's timed window, step by step."""

    step_seconds: list[float]
    step_tokens: list[int]  # real (non-pad) tokens of each step's batch

    @property
    def seconds(self) -> float:
        return sum(self.step_seconds)

    @property
    def real_tokens(self) -> int:
        return sum(self.step_tokens)

    @property
    def steps(self) -> int:
        return len(self.step_seconds)

    @property
    def tokens_per_second(self) -> float:
        return self.real_tokens / self.seconds


def fastest(runs: list[Timing]) -> Timing:
    """Each step's fastest time over runs of the same batches."""
    assert all(r.step_tokens == runs[0].step_tokens for r in runs)
    return Timing([min(times) for times in zip(*(r.step_seconds for r in runs), strict=True)], runs[0].step_tokens)


# ---- data -----------------------------------------------------------------------------------------


def write_tokenizer(path: Path, vocab: int) -> Path:
    """A word-level tokenizer: the five specials at ids 0..4, then words w5..w{vocab-1}."""
    words = {tok: i for i, tok in enumerate(SPECIALS)}
    words.update({f"w{i}": i for i in range(len(SPECIALS), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))
    return path


def zipf(vocab: int) -> torch.Tensor:
    """Probabilities of the words (ids 5..vocab-1, most frequent first): rank^-1.1, normalised."""
    weights = 1.0 / torch.arange(1, vocab - len(SPECIALS) + 1, dtype=torch.float64) ** 1.1
    return weights / weights.sum()


def make_rows(n: int, seq_len: int, vocab: int, seed: int) -> torch.Tensor:
    """(n, seq_len) int32: <s>, a repeated motif of Zipf-drawn words, </s>, right-padded with <pad>."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(math.ceil(0.4 * seq_len), seq_len + 1, (n,), generator=g)
    motif_lengths = torch.randint(4, 17, (n,), generator=g)
    words = torch.multinomial(zipf(vocab), n * 16, replacement=True, generator=g).view(n, 16) + len(SPECIALS)
    rows = torch.full((n, seq_len), PAD, dtype=torch.int32)
    for i, (length, m) in enumerate(zip(lengths.tolist(), motif_lengths.tolist(), strict=True)):
        body = words[i, :m].repeat(seq_len // m + 1)[: length - 2]
        rows[i, 0], rows[i, 1 : length - 1], rows[i, length - 1] = BOS, body.to(torch.int32), EOS
    return rows


def write_shard(directory: Path, rows: torch.Tensor) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(rows, directory / "shard_000.pt")
    return directory


def rows_in_loader_order(data_dir: Path, seq_len: int, count: int, seed: int = SEED) -> list[torch.Tensor]:
    """The first `count` rows encoder-train's loader reads (with this seed, one shard), padding removed."""
    shards = scan_shards(data_dir, seq_len)
    order = RowOrder(shards, seed, shuffle_files=1)
    table = torch.load(shards[0].path, weights_only=True)
    out = []
    for position in range(count):
        shard, row = order.locate(position)
        assert shard == 0
        r = table[row]
        out.append(r[r != PAD].long())
    return out


# ---- FLOPs and the machine's matmul rate ----------------------------------------------------------


def useful_flops(size: Size, lengths: list[int]) -> float:
    """Useful training FLOPs (fwd + bwd) of rows with these real lengths; see the module docstring."""
    H, F_, L, V = size.hidden, size.ffn, size.layers, size.vocab
    tokens = sum(lengths)
    predicted = MASK_PROBABILITY * sum(n - 2 for n in lengths)
    dense = 6 * L * (4 * H * H + 2 * H * F_) * tokens
    attention = 12 * L * H * sum(n * n for n in lengths)
    head = 6 * (H * H + H * V) * predicted
    return dense + attention + head


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # host waits for the device here


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, device: torch.device, seconds: float = 1.0) -> float:
    """GFLOP/s of (m, k) @ (k, n) in `dtype`: the fastest of at least 5 repetitions and `seconds` of them."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    sync(device)
    best, reps, start = math.inf, 0, time.perf_counter()
    while reps < 5 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        sync(device)
        best, reps = min(best, time.perf_counter() - t), reps + 1
    return 2 * m * k * n / best / 1e9


class MatmulRates:
    """Matmul rates per (precision, shape), measured before and after every workload; the best counts."""

    def __init__(self, device: torch.device):
        self.device = device
        self.measured: dict[tuple[str, int, int, int], float] = {}

    @staticmethod
    def shapes(w: Workload) -> list[tuple[int, int, int]]:
        """A square matmul and the model's FFN up-projection at full batch width."""
        return [(2048, 2048, 2048), (w.batch * w.seq_len, w.size.hidden, w.size.ffn)]

    def measure(self, w: Workload) -> None:
        dtype = torch.bfloat16 if w.precision == "bf16" else torch.float32
        for m, k, n in self.shapes(w):
            key = (w.precision, m, k, n)
            self.measured[key] = max(self.measured.get(key, 0.0), matmul_gflops(m, k, n, dtype, self.device))

    def peak(self, w: Workload) -> float:
        """The best rate measured so far for this precision, of this workload's shapes."""
        return max(self.measured[(w.precision, *shape)] for shape in self.shapes(w))


# ---- encoder-train --------------------------------------------------------------------------------


def encoder_train_config(run_dir: Path, data_dir: Path, tokenizer: Path, w: Workload) -> Path:
    """A small YAML config file for this run; train() gets it through load_config like the CLI does."""
    raw = {
        "model": {
            "vocab_size": w.size.vocab,  # exactly the HF model's (no rounding up to a multiple of 64)
            "hidden_size": w.size.hidden,
            "num_layers": w.size.layers,
            "num_heads": w.size.heads,
            "intermediate_size": w.size.ffn,
            "max_position_embeddings": w.seq_len + 2,  # RoBERTa's offset: positions start after the pad id
        },
        "data": {
            "data_dir": str(data_dir),
            "tokenizer_filepath": str(tokenizer),
            "mask_probability": MASK_PROBABILITY,
            "shuffle_files": 1,
        },
        "training": {
            "batch_size": w.batch,
            "max_steps": w.total_steps,
            "learning_rate": w.lr,
            "warmup_steps": w.lr_warmup,
            "schedule": "linear",
            "adam_beta2": 0.98,
            "adam_eps": 1e-6,
            "weight_decay": 0.01,
            "gradient_clip": 1.0,
            "precision": w.precision,
            "seed": w.seed,
            "log_interval": 1,  # a record per step: its tokens and tokens/s give its time
            "compile": w.compile,
        },
        # Only the final checkpoint is written, after the last timed step.
        "checkpoint": {"checkpoint_dir": str(run_dir / "checkpoints"), "checkpoint_every": w.total_steps + 1},
    }
    path = run_dir / "config.yaml"
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_encoder_train(
    run_dir: Path, data_dir: Path, tokenizer: Path, w: Workload, verbose: bool = False
) -> tuple[Timing, Path]:
    """Train W + N steps; time steps W+1..W+N from metrics.jsonl. Returns the timing and the final checkpoint."""
    config_file = encoder_train_config(run_dir, data_dir, tokenizer, w)
    result = quietly(lambda: train(load_config(config_file)), verbose)
    if result.stopped_by is not None:
        raise RuntimeError(f"encoder-train was stopped by signal {result.stopped_by} at step {result.step}")
    records = [json.loads(line) for line in (run_dir / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    seen = {r["step"]: r for r in records if "tokens_per_second" in r}  # training records, not evaluations
    timing = Timing([], [])
    for step in range(w.warmup + 1, w.total_steps + 1):
        tokens = seen[step]["tokens_seen"] - seen[step - 1]["tokens_seen"]
        timing.step_seconds.append(tokens / seen[step]["tokens_per_second"])  # the step's wall time
        timing.step_tokens.append(tokens)
    assert result.checkpoint is not None
    return timing, result.checkpoint


def quietly(fn, verbose: bool):
    """Run fn with its prints and progress bar captured; their end is shown if it fails (all with --verbose)."""
    if verbose:
        return fn()
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            return fn()
    except BaseException:
        print("\n".join(buffer.getvalue().splitlines()[-30:]))
        raise


# ---- Hugging Face Trainer -------------------------------------------------------------------------


class RowsDataset(torch.utils.data.Dataset):
    """Unpadded rows as the HF tokenizer returns them (return_special_tokens_mask=True), one dict per row."""

    def __init__(self, rows: list[torch.Tensor]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ids = self.rows[i].tolist()
        return {"input_ids": ids, "special_tokens_mask": [1] + [0] * (len(ids) - 2) + [1]}


class CountingCollator:
    """The HF collator, noting the real tokens of every batch it builds (in order; batch i = step i + 1)."""

    def __init__(self, collator):
        self.collator = collator
        self.real_tokens: list[int] = []

    def __call__(self, features):
        batch = self.collator(features)
        self.real_tokens.append(int(batch["attention_mask"].sum()))
        return batch


def hf_model(size: Size, seq_len: int, seed: int = SEED):
    """RobertaForMaskedLM of the same shape, dropout and RoBERTa conventions as encoder-train's model."""
    import transformers

    config = transformers.RobertaConfig(
        vocab_size=size.vocab,
        hidden_size=size.hidden,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        intermediate_size=size.ffn,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=seq_len + 2,
        type_vocab_size=1,
        layer_norm_eps=1e-5,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForMaskedLM.from_config(config, attn_implementation="sdpa")
    assert isinstance(model, transformers.RobertaForMaskedLM) and model.config._attn_implementation == "sdpa"
    return model


def run_hf(
    run_dir: Path,
    rows: list[torch.Tensor],
    tokenizer: Path,
    w: Workload,
    device: torch.device,
    workers: int = 0,
    verbose: bool = False,
):
    """Train W + N steps with the Trainer on `rows` in order; time steps W+1..W+N. Returns timing, model."""
    import transformers

    class StepClock(transformers.TrainerCallback):
        def __init__(self):
            self.times: dict[int, float] = {}

        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            self.times[state.global_step] = time.perf_counter()

    hf_tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tokenizer),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
    )
    assert len(hf_tokenizer) == w.size.vocab and hf_tokenizer.pad_token_id == PAD
    collator = CountingCollator(
        transformers.DataCollatorForLanguageModeling(hf_tokenizer, mlm=True, mlm_probability=MASK_PROBABILITY)
    )
    args = transformers.TrainingArguments(
        output_dir=str(run_dir),
        per_device_train_batch_size=w.batch,
        max_steps=w.total_steps,
        learning_rate=w.lr,
        warmup_steps=w.lr_warmup,
        lr_scheduler_type="linear",
        weight_decay=0.01,
        adam_beta1=0.9,
        adam_beta2=0.98,
        adam_epsilon=1e-6,
        max_grad_norm=1.0,
        bf16=w.precision == "bf16",
        use_cpu=device.type == "cpu",
        train_sampling_strategy="sequential",  # the rows in the order encoder-train reads them
        remove_unused_columns=False,  # keep special_tokens_mask for the collator (a torch Dataset)
        dataloader_num_workers=workers,
        logging_steps=w.total_steps,  # one log, after the window
        save_strategy="no",
        report_to=[],
        disable_tqdm=not verbose,
        seed=w.seed,
        torch_compile=w.compile,
    )
    clock = StepClock()
    trainer = transformers.Trainer(
        model=hf_model(w.size, w.seq_len, w.seed),
        args=args,
        train_dataset=RowsDataset(rows),
        data_collator=collator,
        callbacks=[clock],
    )
    quietly(trainer.train, verbose)
    window = range(w.warmup + 1, w.total_steps + 1)
    seconds = [clock.times[i] - clock.times[i - 1] for i in window]
    # Batch i is built for step i + 1; with workers the counts are made in their processes (not here).
    tokens = [collator.real_tokens[i - 1] for i in window] if workers == 0 else [-1] * w.steps
    return Timing(seconds, tokens), trainer.model


# ---- one workload: both sides ---------------------------------------------------------------------


@dataclass
class Row:
    workload: Workload
    ours: Timing
    hf: Timing
    flops: float  # useful FLOPs of the timed window
    hf_padding: float  # share of the HF batches' positions that are padding, in the window


def bench(
    work: Path, w: Workload, device: torch.device, rates: MatmulRates, repeats: int, hf_workers: int, verbose: bool
) -> Row:
    """Both sides on the same rows, `repeats` times each, alternating; each step's fastest run counts."""
    tokenizer = write_tokenizer(work / f"tokenizer_{w.size.vocab}.json", w.size.vocab)
    n_rows = w.total_steps * w.batch
    data_dir = write_shard(work / f"data_{w.name}", make_rows(n_rows, w.seq_len, w.size.vocab, seed=SEED))
    rows = rows_in_loader_order(data_dir, w.seq_len, n_rows)
    rates.measure(w)

    ours_runs, hf_runs = [], []
    for r in range(repeats):
        ours_runs.append(run_encoder_train(work / f"ours_{w.name}_{r}", data_dir, tokenizer, w, verbose)[0])
        hf_runs.append(run_hf(work / f"hf_{w.name}_{r}", rows, tokenizer, w, device, hf_workers, verbose)[0])
    print(
        f"  {w.name} s/step of each run: encoder-train "
        + " ".join(f"{t.seconds / w.steps:.3f}" for t in ours_runs)
        + ", HF "
        + " ".join(f"{t.seconds / w.steps:.3f}" for t in hf_runs),
        flush=True,
    )
    rates.measure(w)

    window = rows[w.warmup * w.batch : w.total_steps * w.batch]
    lengths = [len(r) for r in window]
    batches = [lengths[i : i + w.batch] for i in range(0, len(lengths), w.batch)]
    expected = [sum(b) for b in batches]
    for t in hf_runs:
        if hf_workers > 0:  # counted in worker processes: take the (identical) rows' counts
            t.step_tokens = expected
    if any(t.step_tokens != expected for t in ours_runs + hf_runs):
        raise RuntimeError("the two sides consumed different batches; the comparison would be void")
    padded = sum(len(b) * max(b) for b in batches)  # HF pads each batch to its longest row
    return Row(w, fastest(ours_runs), fastest(hf_runs), useful_flops(w.size, lengths), 1 - sum(lengths) / padded)


# ---- equal quality --------------------------------------------------------------------------------


@torch.no_grad()
def hf_heldout(model, val_dir: Path, spec, batch: int, device: torch.device, precision: str) -> dict[str, float]:
    """Loss and accuracy of the HF model on encoder-train's evaluation batches (same rows, same masks)."""
    model.eval()
    shards = scan_shards(val_dir, 10**9)
    loss_sum, correct, predicted = 0.0, 0, 0
    for b in eval_batches(shards, spec, batch, None):
        b = b.to(device)
        with autocast_for(precision, device):
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask.long()).logits  # (B, T, V)
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, b.predict_positions).float()  # (N, V)
        target = b.labels.reshape(-1).index_select(0, b.predict_positions)
        assert bool((target != IGNORE_INDEX).all())
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits[:, : spec.vocab_size].argmax(-1) == target).sum())
        predicted += b.num_predicted
    return {"loss": loss_sum / predicted, "accuracy": correct / predicted, "tokens": predicted}


def quality(work: Path, steps: int, precision: str, device: torch.device, hf_workers: int, verbose: bool,
            seeds: int = 1) -> str:
    """Small model, `steps` steps of both on the same rows; held-out loss on the same masked rows. With
    several seeds (initial weights, dropout, masks, row order), the spread between seeds of one trainer is
    the run-to-run noise that a difference between the trainers is measured against."""
    tokenizer = write_tokenizer(work / "tokenizer_quality.json", SIZES["small"].vocab)
    n_rows = steps * 32
    data_dir = write_shard(work / "quality_train", make_rows(n_rows, 128, SIZES["small"].vocab, seed=SEED))
    val_dir = write_shard(work / "quality_val", make_rows(16 * 32, 128, SIZES["small"].vocab, seed=SEED + 1))
    shards = scan_shards(val_dir, 128)
    autocast = autocast_for(precision, device)
    losses: dict[str, list[float]] = {"encoder-train": [], "HF Trainer": []}
    lines = []
    for seed in range(seeds):
        # One untimed step: the timing of these runs is a by-product, the losses are what count.
        w = Workload(SIZES["small"], 128, precision, 1, steps - 1, lr=5e-4, lr_warmup=max(1, steps // 10), seed=seed)
        rows = rows_in_loader_order(data_dir, w.seq_len, n_rows, seed)
        _, checkpoint = run_encoder_train(work / f"quality_ours_{seed}", data_dir, tokenizer, w, verbose)
        trained = load_trained(checkpoint, device)
        ours = evaluate(trained.model, shards, trained.spec, batch_size=w.batch, device=device, autocast=autocast)
        _, model = run_hf(work / f"quality_hf_{seed}", rows, tokenizer, w, device, hf_workers, verbose)
        hf = hf_heldout(model, val_dir, trained.spec, w.batch, device, precision)
        losses["encoder-train"].append(ours["loss"])
        losses["HF Trainer"].append(hf["loss"])
        lines.append(f"| {seed} | {ours['loss']:.4f} | {ours['accuracy']:.4f} | "
                     f"{hf['loss']:.4f} | {hf['accuracy']:.4f} |")
        print(f"  quality seed {seed}: encoder-train {ours['loss']:.4f}, HF {hf['loss']:.4f}", flush=True)

    def spread(xs: list[float]) -> str:
        mean = sum(xs) / len(xs)
        if len(xs) < 2:
            return f"{mean:.4f}"
        std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
        return f"{mean:.4f} +- {std:.4f} (sd over {len(xs)} seeds)"

    return "\n".join([
        f"equal quality (small, 128, {precision}, {steps} steps of 32 rows, lr 5e-4, lr warm-up {max(1, steps // 10)}; "
        f"{ours['tokens']} held-out predictions, same masks for both; a model knowing only word frequencies "
        f"scores {unigram_entropy(SIZES['small'].vocab):.2f}):",
        "",
        "| seed | encoder-train loss | accuracy | HF Trainer loss | accuracy |",
        "|---:|---:|---:|---:|---:|",
        *lines,
        "",
        f"held-out MLM loss: encoder-train {spread(losses['encoder-train'])}, "
        f"HF Trainer {spread(losses['HF Trainer'])}",
    ])


def unigram_entropy(vocab: int) -> float:
    """Entropy (nats) of the words' Zipf law: the loss a model knowing only word frequencies reaches."""
    p = zipf(vocab)
    return float(-(p * p.log()).sum())


# ---- report ---------------------------------------------------------------------------------------


def machine(device: torch.device) -> str:
    import transformers

    cpu, cores = cpu_name(), usable_cores()
    gpu = f", GPU {torch.cuda.get_device_name()}" if device.type == "cuda" else ""
    return (
        f"machine: {cpu}, {cores} usable cores, torch threads {torch.get_num_threads()}{gpu}; device {device}; "
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"encoder-train {encoder_train_version()}"
    )


def encoder_train_version() -> str:
    """The checkout's commit (+ "dirty" with uncommitted changes), or the package version outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return importlib.metadata.version("encoder-train")
    return commit + (" dirty" if dirty else "")


def table(rows: list[Row], rates: MatmulRates) -> str:
    lines = [
        "| model | seq | precision | encoder-train tok/s | HF Trainer tok/s | ratio | encoder-train MFU | HF MFU |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        w = r.workload
        mfu = [r.flops / t.seconds / 1e9 / rates.peak(w) for t in (r.ours, r.hf)]
        lines.append(
            f"| {w.size.name} | {w.seq_len} | {w.precision}{' compiled' if w.compile else ''} | "
            f"{r.ours.tokens_per_second:,.0f} | "
            f"{r.hf.tokens_per_second:,.0f} | {r.ours.tokens_per_second / r.hf.tokens_per_second:.2f}x | "
            f"{mfu[0]:.1%} | {mfu[1]:.1%} |"
        )
    return "\n".join(lines)


def details(rows: list[Row], rates: MatmulRates) -> str:
    lines = [
        "| model | seq | precision | batch | timed steps | real tok/step | HF padding | useful GFLOP/step | "
        "encoder-train s/step | HF s/step | matmul GFLOP/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        w, n = r.workload, r.ours.steps
        lines.append(
            f"| {w.size.name} | {w.seq_len} | {w.precision} | {w.batch} | {n} | {r.ours.real_tokens / n:,.0f} | "
            f"{r.hf_padding:.1%} | {r.flops / n / 1e9:,.1f} | {r.ours.seconds / n:.3f} | {r.hf.seconds / n:.3f} | "
            f"{rates.peak(w):,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="*", choices=list(SIZES), default=list(SIZES), help="none: --quality only")
    parser.add_argument("--precisions", nargs="+", choices=["bf16", "fp32"], default=["bf16", "fp32"])
    parser.add_argument("--seq_lens", nargs="+", type=int, help="row lengths for base (default: 128 512)")
    parser.add_argument("--steps", type=int, help="timed steps (default: small 30; base 5 at 128, 3 at 512)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: small 5; base 3 at 128, 2 at 512)")
    parser.add_argument("--batch_size", type=int, default=32, help="rows per step (lower it where memory is short)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side, alternating; the fastest counts")
    parser.add_argument("--quality", action="store_true", help="also compare held-out MLM loss (small model)")
    parser.add_argument("--quality_steps", type=int, default=300, help="training steps of the quality check")
    parser.add_argument("--quality_seeds", type=int, default=1, help="seeds of the quality check (noise: 3 or more)")
    parser.add_argument("--hf_workers", type=int, default=0, help="HF dataloader_num_workers (its default: 0)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both sides (warm-up steps compile)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small model, 1 + 2 steps, 20 quality steps")
    parser.add_argument("--work_dir", type=Path, help="where data and checkpoints go (default: a temp dir)")
    parser.add_argument("--verbose", action="store_true", help="show both trainers' own output")
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.warmup, args.steps, args.quality_steps = ["small"], 1, 2, 20
    if min(args.warmup or 1, args.steps or 1, args.repeats, args.batch_size) < 1 or args.quality_steps < 2:
        parser.error("--warmup, --steps, --repeats and --batch_size must be at least 1, --quality_steps at least 2")

    import transformers

    transformers.logging.set_verbosity_error()
    device = pick_device()
    threads = torch.get_num_threads()
    print(machine(device), flush=True)
    rates = MatmulRates(device)
    results: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        for size in (SIZES[s] for s in args.sizes):
            seq_lens = args.seq_lens if (args.seq_lens and size.name == "base") else size.seq_lens
            for seq_len in seq_lens:
                for precision in args.precisions:
                    warmup, steps = DEFAULT_STEPS.get((size.name, seq_len), (2, 3))
                    w = Workload(size, seq_len, precision, args.warmup or warmup, args.steps or steps, args.batch_size,
                                 compile=args.compile)
                    start = time.perf_counter()
                    results.append(bench(work, w, device, rates, args.repeats, args.hf_workers, args.verbose))
                    print(
                        f"  {w.name}: {w.warmup} + {w.steps} steps each side, x{args.repeats}, "
                        f"{time.perf_counter() - start:.0f} s",
                        flush=True,
                    )
                    if torch.get_num_threads() != threads:
                        print(f"  warning: torch threads changed from {threads} to {torch.get_num_threads()}")
        if results:
            print()
            print(machine(device))
            print(
                "rows of uniform length in [0.4 L, L]; ratio = encoder-train / HF tokens/s; "
                "MFU = useful FLOP/s / matmul GFLOP/s measured here (see the docstring)"
            )
            print()
            print(table(results, rates))
            print()
            print(details(results, rates))
            print()
            print(
                "matmul rates measured: "
                + ", ".join(
                    f"{p} {m}x{k}@{k}x{n}: {g:,.0f} GFLOP/s" for (p, m, k, n), g in sorted(rates.measured.items())
                ),
                flush=True,
            )
        if args.quality:
            print()
            print(quality(work, args.quality_steps, args.precisions[0], device, args.hf_workers, args.verbose,
                          args.quality_seeds))


if __name__ == "__main__":
    main()
