"""What a speed benchmark trains and what it measures: model sizes, a workload, one side's step times.

Imported by the scripts beside it: speed.py and its pieces (synthetic.py the rows, ours.py and
hf_trainer.py the two sides, mfu.py the FLOPs, quality.py the held-out loss).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch

from encoder_train.config import ModelConfig
from encoder_train.model import ModelDims
from encoder_train.state import model_dims

MASK_PROBABILITY = 0.15
SEED = 0


@dataclass(frozen=True)
class Size:
    name: str
    layers: int
    hidden: int
    heads: int
    ffn: int  # intermediate size (GeGLU: the up projection is 2 x ffn wide, value and gate)
    vocab: int
    seq_lens: tuple[int, ...]  # row lengths benchmarked by default
    family: str = "roberta"  # model.family: "modernbert" sets its architecture (see families/)

    @property
    def label(self) -> str:
        """The name in tables and run folders: `small`, `base` (RoBERTa) or `modernbert-small`, ..."""
        return self.name if self.family == "roberta" else f"{self.family}-{self.name}"

    def model_dims(self, seq_len: int) -> ModelDims:
        """encoder-train's model of this size for rows of `seq_len` tokens (RoBERTa's pad id 1, no rounding up)."""
        if self.family == "roberta":
            return ModelDims(vocab_size=self.vocab, hidden_size=self.hidden, num_layers=self.layers,
                             num_heads=self.heads, intermediate_size=self.ffn, max_position_embeddings=seq_len + 2,
                             pad_id=1)
        # The family's options as training resolves them: the config schema fills them in from model.family.
        cfg = ModelConfig(family=self.family, vocab_size=self.vocab, hidden_size=self.hidden, num_layers=self.layers,
                          num_heads=self.heads, intermediate_size=self.ffn, max_position_embeddings=seq_len)
        return model_dims(cfg, self.vocab, 1, f"benchmark size {self.label}")


SIZES = {
    "small": Size("small", 4, 256, 4, 1024, 8192, (128,)),
    "base": Size("base", 12, 768, 12, 3072, 50265, (128, 512)),  # RoBERTa-base
}
# The modern family (rotary positions, GeGLU, no biases, pre-LN, every 3rd layer global, a 128-token window
# elsewhere, no dropout). small: RoBERTa small's width, depth and heads, with ModernBERT's feed-forward
# proportion (intermediate 1.5 x hidden, as ModernBERT-base's 1152 = 1.5 x 768).
MODERN_SIZES = {
    "small": Size("small", 4, 256, 4, 384, 8192, (128,), family="modernbert"),
    "base": Size("base", 22, 768, 12, 1152, 50368, (512,), family="modernbert"),  # ModernBERT-base
}
FAMILIES = {"roberta": SIZES, "modernbert": MODERN_SIZES}


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
        compiled = "_compiled" if self.compile else ""
        return f"{self.size.label}_{self.seq_len}_{self.precision}_b{self.batch}{compiled}"

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


def sync(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device before reading a clock; nothing to wait for on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()  # host waits for the device here


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
