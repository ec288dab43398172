"""The one typed configuration schema, and how YAML and command-line flags are merged into it.

Precedence: schema defaults < YAML file < command-line flags. Defaults live here and nowhere else;
the bundled YAML files in `configs/` are just data. Every field has a one-line docstring, which the
docs/configuration.md is generated from (python -m encoder_train.docgen).

A config has six sections:

    model:      the encoder's shape (what a checkpoint must match to be resumed)
    data:       where batches come from and how they are masked
    training:   optimisation
    checkpoint: where and how often state is saved
    wandb:      Weights & Biases logging
    tensorboard: TensorBoard event files
"""

from __future__ import annotations

import difflib
import math
import re
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    model_validator,
)

from encoder_train import families
from encoder_train.errors import UserError
from encoder_train.optimizers import OPTIMIZERS
from encoder_train.urls import credentials_refusal, is_remote, local_only, local_path, redact

# Bundled configs: `--config_file base.yaml` works from any folder.
BUNDLED_CONFIG_DIR = Path(__file__).parent / "configs"


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    return value


# Numbers are numbers: YAML's `true` is not 1, a float is not an integer, `.inf` and `.nan` are no
# setting's value. (Strings such as "1e-3" still parse as floats: PyYAML reads 1e-3 without a dot as text.)
Int = Annotated[int, Strict()]
Float = Annotated[float, BeforeValidator(_not_a_bool), Field(allow_inf_nan=False)]
Bool = Annotated[bool, Strict()]


def _local_only(value: str) -> str:
    why = local_only(value)
    if why:
        raise ValueError(f"it {why}")
    return value


# A file or folder read or written on this machine: a URL is refused, where it would become a local folder `s3:`.
LocalPath = Annotated[str, AfterValidator(_local_only)]


class Section(BaseModel):
    """Unknown keys are errors (a typo must not silently fall back to a default)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelConfig(Section):
    family: Literal[families.NAMES] = "roberta"  # type: ignore[valid-type]  # the registry's names
    """Sets the architecture's defaults in one word (`modernbert`: rotary positions, GeGLU, no biases, pre-LN,
    local/global attention, 8,192 positions; `bert`: positions from 0, two token types, eps 1e-12, 512
    positions); each key below still overrides it."""
    init_from_hf: LocalPath | None = None
    """Local Hugging Face RoBERTa, BERT or ModernBERT masked-LM folder to start from (flag --init_from_hf); its
    config.json and tokenizer replace this section's shape and --tokenizer_filepath: continued, domain-adaptive
    pretraining."""
    vocab_size: Int | None = Field(default=None, ge=8)
    """Vocabulary size; absent: the tokenizer's size rounded up to a multiple of `pad_vocab_multiple`."""
    pad_vocab_multiple: Int = Field(default=64, ge=1)
    """Round a vocabulary taken from the tokenizer up to this multiple (64 keeps matmuls aligned)."""
    hidden_size: Int = Field(default=768, ge=1)
    """Width of the residual stream."""
    num_layers: Int = Field(default=12, ge=1)
    """Number of encoder layers."""
    num_heads: Int = Field(default=12, ge=1)
    """Attention heads per layer; must divide `hidden_size`."""
    intermediate_size: Int = Field(default=3072, ge=1)
    """Width of the feed-forward layer (4 x hidden in BERT/RoBERTa)."""
    max_position_embeddings: Int = Field(default=514, ge=3)
    """Positions. RoBERTa's learned ones are offset past the pad id, so 514 allows 512-token rows; with BERT's
    (position_start: zero) or rotary positions it is the longest row."""
    dropout: Float = Field(default=0.1, ge=0.0, lt=1.0)
    """Dropout on embeddings, attention output and feed-forward output."""
    attention_dropout: Float = Field(default=0.1, ge=0.0, lt=1.0)
    """Dropout on attention probabilities."""
    layer_norm_eps: Float = Field(default=1e-5, gt=0.0)
    """LayerNorm epsilon (RoBERTa 1e-5, BERT 1e-12)."""
    pre_layer_norm: Bool = False
    """Pre-LN blocks (x + f(LN(x))) instead of BERT/RoBERTa's post-LN (LN(x + f(x))); adds a final LayerNorm."""
    first_attention_norm: Bool = True
    """Pre-LN only: the first layer normalises its attention input; ModernBERT omits it (the embeddings' norm
    just did)."""
    position_embedding: Literal["learned", "rotary"] = "learned"
    """`learned` absolute positions (RoBERTa) or `rotary` (RoPE on queries and keys, counted within each row; no
    position parameters, so a checkpoint can be resumed with longer rows)."""
    rope_theta: Float = Field(default=160_000.0, gt=0.0)
    """Rotary base of the global-attention layers (ModernBERT 160,000; raise it to extend the context)."""
    local_rope_theta: Float = Field(default=10_000.0, gt=0.0)
    """Rotary base of the local (sliding-window) layers."""
    global_attention_every: Int = Field(default=1, ge=1)
    """Every Nth layer (0, N, 2N, ...) attends over the whole row; the others within `local_attention`. 1: all
    global (RoBERTa); ModernBERT 3."""
    local_attention: Int = Field(default=128, ge=2)
    """Window of the local layers in tokens: a token sees those at most local_attention / 2 positions away."""
    feed_forward: Literal["gelu", "geglu"] = "gelu"
    """`gelu` (up, GELU, down) or `geglu` (one up projection to 2 x intermediate_size; GELU of one half times the
    other, then down)."""
    attention_bias: Bool = True
    """Biases in the query/key/value and attention-output projections."""
    feed_forward_bias: Bool = True
    """Biases in the feed-forward projections."""
    norm_bias: Bool = True
    """Biases (shifts) in the LayerNorms."""
    head_bias: Bool = True
    """A bias in the MLM head's dense layer (the decoder keeps its own bias either way)."""
    token_type_embedding: Bool = True
    """RoBERTa's single token-type vector added to every token's embedding; ModernBERT has none."""
    type_vocab_size: Int = Field(default=1, ge=1)
    """Token-type rows (BERT 2): every input is type 0 (masked-LM without the next-sentence task); the others
    are kept so that a Hugging Face model exports back whole."""
    position_start: Literal["after_pad", "zero"] = "after_pad"
    """Where learned positions count from: `after_pad` (RoBERTa: the first token at pad id + 1, pads at the pad
    id) or `zero` (BERT: each token at its place in the row)."""
    init: Literal["bert", "modernbert"] = "bert"
    """Initialisation: BERT's N(0, 0.02) everywhere, or ModernBERT's (normal truncated at 2 sigma; output
    projections scaled by 1 / sqrt(2 x num_layers))."""

    @model_validator(mode="before")
    @classmethod
    def _family_defaults(cls, data: Any) -> Any:
        """A family fills in every key the file leaves out; keys the file sets win."""
        if isinstance(data, dict) and data.get("family") in families.FAMILIES:
            return {**families.FAMILIES[data["family"]].defaults, **data}
        return data


# Source and phase names become metric keys (source/NAME/rows), W&B keys, seeds, flags and folder names: a word of
# ASCII letters, digits, `_`, `-` and `.`, starting with a letter or digit, matched as a whole.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NAME_LENGTH = 64


def _a_name(value: str) -> str:
    if len(value) > NAME_LENGTH or not NAME_PATTERN.fullmatch(value):
        why = f"{len(value):,} characters" if len(value) > NAME_LENGTH else "other characters"
        raise ValueError(f"a name must be 1 to {NAME_LENGTH} ASCII letters, digits, _, - or ., starting with a "
                         f"letter or digit (this one has {why})")
    return value


Name = Annotated[str, AfterValidator(_a_name)]


class SourceConfig(Section):
    data_dir: str
    """Folder of this source's training `.pt` shards, searched recursively; a path or a URL (`s3://`, `gs://`,
    `hf://`: docs/data.md)."""
    weight: Float | None = Field(default=None, gt=0.0)
    """Share of each batch's rows drawn from this source, relative to the others' weights (absent: 1, or from
    data.temperature)."""
    val_data_dir: str | None = None
    """Held-out shards of this source, evaluated on their own (val/NAME/loss) beside the weighted total."""


class DataConfig(Section):
    data_dir: str | None = None
    """Folder of training `.pt` shards, searched recursively (flag --data_dir); a path or a URL (`s3://`, `gs://`,
    `hf://`: docs/data.md). One source; for several, use `sources`."""
    sources: dict[Name, SourceConfig] | None = None
    """Named data sources mixed by weight, in place of data_dir: `{web: {data_dir: shards/web, weight: 3}, ...}`;
    each batch holds the sources in proportion to their weights (docs/recipes.md)."""
    temperature: Float | None = Field(default=None, gt=0.0)
    """With sources: weights proportional to each source's size in tokens to this power (1: by size, 0.3: flatter,
    as mmBERT and XLM-R sample languages), in place of each source's weight."""
    tokenizer_filepath: LocalPath | None = None
    """Hugging Face `tokenizers` JSON file (flag --tokenizer_filepath)."""
    val_data_dir: str | None = None
    """Held-out `.pt` shards, evaluated every `training.eval_every` steps and at the end (flag --val_data_dir)."""
    mask_probability: Float = Field(default=0.15, gt=0.0, lt=1.0)
    """Share of non-special tokens selected for prediction (RoBERTa/BERT: 0.15). A rate expected to select fewer than
    one token per micro-batch (which would train at loss 0) is refused at start."""
    mask_probability_end: Float | None = Field(default=None, gt=0.0, lt=1.0)
    """A mask-rate schedule: the rate moves linearly from mask_probability to this over the run (or the phase);
    absent: constant."""
    num_workers: Int | None = Field(default=None, ge=0, le=256)  # a typo's 10**6 would fork until the machine dies
    """Background processes that read shards, mask and collate; 0 builds batches in the training process.
    Unset: 2 on a GPU; 0 on a CPU, where a worker takes turns with the compute threads on the same cores
    and slows every matmul it interrupts (2 cores, benchmarks/loader_overhead.py: +29% step time with one
    worker, +4% inline)."""
    prefetch_batches: Int = Field(default=4, ge=1, le=1024)  # the loader queues them all before the first batch
    """Batches each worker keeps ready ahead of the training step."""
    shuffle_files: Int = Field(default=4, ge=1)
    """Rows are shuffled across windows of this many consecutive (shuffled) files."""
    batch_tokens: Int | None = Field(default=None, ge=2)
    """Micro-batches of exactly this many tokens, rows packed end to end by best-fit (instead of
    `training.batch_size` rows padded to the longest): fixed shapes for a compiled GPU step. Absent: rows."""
    pack_window: Int = Field(default=1024, ge=1)
    """With batch_tokens: rows packed together at a time (a larger window packs fuller bins)."""


class TrainingConfig(Section):
    batch_size: Int = Field(default=32, ge=1, le=65_536)  # rows are gathered one by one: 10**9 never finishes
    """Rows per micro-batch (flag --batch_size). Rows per optimizer step = batch_size x accumulation."""
    gradient_accumulation_steps: Int = Field(default=1, ge=1, le=16_384)  # a step's micro-batches are held together
    """Micro-batches per optimizer step."""
    max_steps: Int = Field(default=10_000, ge=1)
    """Optimizer steps to train for; with phases, the sum of theirs (a --max_steps flag then stops the run early)."""
    stop_at: Int | None = Field(default=None, ge=1)
    """Stop after this step although the schedule runs to max_steps (a trial of a long recipe); with phases,
    --max_steps sets it. Not a change of the run: resuming without it continues the same run."""
    batch_size_warmup_steps: Int = Field(default=0, ge=0)
    """Batch-size warmup: over this many steps the micro-batch grows linearly from batch_size_start rows to
    batch_size (ModernBERT grows its batch over its first tokens); 0: none."""
    batch_size_start: Int = Field(default=1, ge=1)
    """Rows per micro-batch at the first step of a batch-size warmup."""
    learning_rate: Float = Field(default=6e-4, gt=0.0)
    """Peak learning rate, reached at the end of warmup."""
    warmup_steps: Int = Field(default=0, ge=0)
    """Steps of linear warmup from 0 to `learning_rate`."""
    schedule: Literal["linear", "cosine", "constant", "wsd"] = "linear"
    """Decay after warmup: linear to 0 at `max_steps` (RoBERTa), cosine to 0, constant, or `wsd`
    (warmup-stable-decay: hold the peak, then decay to 0 over the last `decay_steps` or `decay_fraction`)."""
    decay_steps: Int | None = Field(default=None, ge=1)
    """wsd: the last this many steps decay; absent: `decay_fraction` of max_steps."""
    decay_fraction: Float = Field(default=0.1, gt=0.0, le=1.0)
    """wsd: the share of max_steps (at the end) that decays, when `decay_steps` is absent."""
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = "linear"
    """wsd: the decay's shape from the peak to 0: linear, cosine, or 1 - sqrt(progress)."""
    adam_beta1: Float = Field(default=0.9, ge=0.0, lt=1.0)
    """AdamW beta1."""
    adam_beta2: Float = Field(default=0.98, ge=0.0, lt=1.0)
    """AdamW beta2 (RoBERTa uses 0.98 for stability with large batches)."""
    adam_eps: Float = Field(default=1e-6, gt=0.0)
    """AdamW epsilon."""
    weight_decay: Float = Field(default=0.01, ge=0.0)
    """Decoupled weight decay; biases, LayerNorm weights and other 1-D parameters get none."""
    optimizer: Literal[tuple(OPTIMIZERS)] = "adamw"  # the registry's names (optimizers/__init__.py)
    """`adamw` (PyTorch's), `stable_adamw` (StableAdamW, as ModernBERT; the stable-adamw extra) or `muon` (Muon for
    the layers' weight matrices, AdamW for the rest; docs/training.md#optimizers). Fixed for a run."""
    muon_momentum: Float = Field(default=0.95, ge=0.0, lt=1.0)
    """muon: Muon's Nesterov momentum. Its learning rate is `learning_rate`: updates are scaled to AdamW's size."""
    gradient_clip: Float = Field(default=1.0, ge=0.0)
    """Clip the gradient's global L2 norm to this value; 0 disables clipping (flag --gradient_clip)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16 autocast with fp32 master weights, or plain fp32. bf16 falls back to fp32 where unsupported."""
    compile: Bool = False
    """torch.compile each encoder layer (in place, dynamic shapes: no recompiling as batch lengths vary); speed only,
    and measured no faster than eager on a 2-core CPU or an H200 (docs/benchmarks.md)."""
    data_parallel: Literal["ddp", "fsdp"] = "ddp"
    """Under torchrun: DDP (weights replicated) or FSDP2 (weights, gradients and optimizer state sharded)."""
    max_nonfinite_steps: Int = Field(default=5, ge=1)
    """Stop the run after this many optimizer steps in a row with a NaN/inf loss or gradient (each is skipped)."""
    seed: Int = Field(default=0, ge=0, lt=2**63)
    """Seeds initialisation, dropout, data order and masking."""
    log_interval: Int = Field(default=10, ge=1)
    """Steps between progress updates and lines in metrics.jsonl."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """How progress is shown (flag --progress): `bar`, a progress bar redrawn in place; `lines`, one plain line per
    log_interval (step, loss, lr, tokens/s, elapsed, ETA), for output that goes to a file; `auto`, the bar on a
    terminal and lines otherwise (a cluster job's log)."""
    eval_every: Int = Field(default=1000, ge=1)
    """Steps between held-out evaluations (when data.val_data_dir is set); one also runs at the end."""
    eval_batches: Int | None = Field(default=None, ge=1)
    """Evaluate on at most this many batches of the validation data; absent: all of it."""


class CheckpointConfig(Section):
    checkpoint_dir: LocalPath = "checkpoints"
    """Folder for checkpoints (checkpoint_XXXXXXXX.pt files, or sharded checkpoint_XXXXXXXX/ folders) and
    metrics.jsonl (flag --checkpoint_dir)."""
    checkpoint_every: Int = Field(default=1000, ge=1)
    """Optimizer steps between checkpoints; one is also written at the end (flag --checkpoint_every)."""
    max_checkpoints: Int = Field(default=3, ge=1)
    """How many of the newest checkpoints to keep (flag --max_checkpoints)."""
    load_checkpoint: LocalPath | None = None
    """Checkpoint file (or sharded folder) to resume from, or `latest` for the newest in checkpoint_dir (flag
    --load_checkpoint)."""
    format: Literal["auto", "single", "sharded"] = "auto"
    """`single`: one file, the state gathered on rank 0; `sharded`: a folder where every rank writes its own shards
    (torch.distributed.checkpoint), in the background; `auto`: sharded under FSDP2 with several processes, else
    single. Every command reads both (docs/checkpoints.md)."""


def phase_key_error(where: str, section: str, key: str) -> str:
    """Why a phase may not set `section.key`, with the fix."""
    allowed = ", ".join(f"{section}.{k}" for k in PHASE_KEYS.get(section, ()))
    if section == "model" and key in ModelConfig.model_fields:
        why = "changes the model's shape or function, which a checkpoint fixes for the whole run"
    elif section in ("data", "training", "model") and key in type(getattr(Config(), section)).model_fields:
        why = "is fixed for the whole run"
    else:
        why = "is not a key a phase can set"
    return (f"{where}: {section}.{key} {why}; set it at the top level of the file, or remove it from the phase "
            f"(a phase may set {allowed or 'data:, training: and model: keys only'}).")


def _wandb_name(what: str, reserved: str, longest: int) -> Any:
    """A string W&B accepts as a run id or project name, checked before training starts (W&B itself refuses it
    only when the run starts, or fails on a file name the id makes)."""

    def check(value: str | None) -> str | None:
        if value is None:
            return value
        bad = sorted({c for c in value if c in reserved or c.isspace() or not c.isprintable()})
        if not value or bad or len(value) > longest:
            shown = ", ".join(repr(c) for c in bad)
            raise ValueError(f"a W&B {what} must be 1 to {longest} characters without spaces or any of "
                             f"{' '.join(reserved)}" + (f" (found {shown})" if bad else f" (it has {len(value)})"))
        return value

    return AfterValidator(check)


class WandbConfig(Section):
    enabled: Bool = False
    """Log to Weights & Biases (flag --wandb). Off: W&B is never imported."""
    project: Annotated[str, _wandb_name("project name", "/\\#?%:", 128)] = "encoder-train"
    """W&B project (flag --wandb_project_name)."""
    run_id: Annotated[str | None, _wandb_name("run id", ":;,#?/'", 128)] = None
    """Resume this W&B run; by default a resumed checkpoint continues its own run (flag --wandb_run_id)."""
    log_freq: Int = Field(default=10, ge=1)
    """Optimizer steps between W&B logs (flag --wandb_log_freq)."""


class TensorBoardConfig(Section):
    enabled: Bool = False
    """Write TensorBoard event files to CHECKPOINT_DIR/tensorboard (flag --tensorboard). Off: never imported."""
    log_freq: Int = Field(default=10, ge=1)
    """Optimizer steps between TensorBoard scalars."""


# What a phase may change. Everything else is fixed for the run: the model's shape (the checkpoint's tensors), the
# optimizer and its state's meaning, the seed and the layout of a step (accumulation, token budgets).
PHASE_KEYS = {
    "data": ("sources", "temperature", "mask_probability", "mask_probability_end"),
    "training": ("batch_size", "batch_size_start", "batch_size_warmup_steps", "learning_rate", "warmup_steps",
                 "schedule", "decay_steps", "decay_fraction", "decay_shape", "gradient_clip"),
    "model": ("rope_theta", "local_rope_theta"),
}
# With phases, the schedules belong to each phase (a warmup written at the top level would otherwise repeat in
# every phase); a phase that names none holds its learning rate, batch size and mask rate constant.
PHASE_SCHEDULE_KEYS = {
    "data": ("mask_probability_end",),
    "training": ("warmup_steps", "schedule", "decay_steps", "decay_fraction", "decay_shape",
                 "batch_size_warmup_steps", "batch_size_start"),
}

# Phase keys that act only where the phase's config has what they act on: (section, key) -> (whether it acts there,
# what it needs). A phase setting one where it does nothing (a context extension's rope_theta on learned positions)
# is refused: the run would silently not do what the file says.
INERT_PHASE_KEYS: dict[tuple[str, str], tuple[Callable[[Config], bool], str]] = {
    ("model", "rope_theta"): (lambda c: c.model.position_embedding == "rotary",
                              "rotary positions (model.position_embedding: rotary); this model's are learned"),
    ("model", "local_rope_theta"): (lambda c: c.model.position_embedding == "rotary"
                                    and c.model.global_attention_every > 1,
                                    "local rotary layers (rotary positions and model.global_attention_every above 1)"),
    **{("training", key): (lambda c: c.training.schedule == "wsd", "the phase's training.schedule to be wsd")
       for key in ("decay_steps", "decay_fraction", "decay_shape")},
    ("training", "batch_size_start"): (lambda c: c.training.batch_size_warmup_steps > 0,
                                       "a batch-size warmup (training.batch_size_warmup_steps in the phase)"),
}


def check_phase_keys_act(phase: PhaseConfig, config: Config, where: str) -> None:
    """Refuse a key the phase sets that does nothing in the phase's `config` (INERT_PHASE_KEYS)."""
    for section in PHASE_KEYS:
        for key in getattr(phase, section) or {}:
            acts, needs = INERT_PHASE_KEYS.get((section, key), (lambda c: True, ""))
            if not acts(config):
                raise UserError(f"{where}: {section}.{key} does nothing here: it needs {needs}; remove it from the "
                                "phase, or give the phase (or the model) what it needs.")


class PhaseConfig(Section):
    name: Name
    """The phase's name, in logs, metrics and the plan (e.g. stable, context_extension, decay)."""
    steps: Int | None = Field(default=None, ge=1)
    """Length in optimizer steps (or give `tokens`)."""
    tokens: Int | None = Field(default=None, ge=1)
    """Length in tokens, counted as row slots (a row of a source counts its row width; the mix's expected slots per
    step), turned into steps at start (rounded up); --dry_run prints the steps."""
    data: dict[str, Any] | None = None
    """Overrides of the data section while the phase lasts: sources (which are read, and their weights),
    temperature, mask_probability, mask_probability_end."""
    training: dict[str, Any] | None = None
    """Overrides of the training section: batch_size (and its warmup), learning_rate and the phase's schedule
    (warmup_steps, schedule, decay_*), gradient_clip."""
    model: dict[str, Any] | None = None
    """Overrides of the model section that keep its shape: rope_theta, local_rope_theta (a context extension)."""

    @model_validator(mode="after")
    def _one_length(self) -> PhaseConfig:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give a phase either steps or tokens (one of them)")
        return self


class Config(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    wandb: WandbConfig = WandbConfig()
    tensorboard: TensorBoardConfig = TensorBoardConfig()
    phases: list[PhaseConfig] = []
    """Phases run one after another, each overriding some data/training/model keys while it lasts (docs/recipes.md).
    The run's length is the sum of theirs."""

    def phase_config(self, index: int, steps: int | None = None) -> Config:
        """The config in force during phase `index` of `steps` steps (default: the phase's own; a length in tokens
        is known only once the data is): this one with the phase's overrides, max_steps the phase's length.
        Schedules are the phase's own (see PHASE_SCHEDULE_KEYS); a phase's `data.sources` names the sources it
        reads."""
        phase = self.phases[index]
        where = f"phases[{index}] ({phase.name})"
        merged = self.to_dict()
        del merged["phases"]
        merged["training"]["max_steps"] = steps or phase.steps or 2**62
        for section, keys in PHASE_SCHEDULE_KEYS.items():
            defaults = type(getattr(self, section))()
            for key in keys:
                merged[section][key] = getattr(defaults, key)
        merged["training"]["schedule"] = "constant"
        for section, allowed in PHASE_KEYS.items():
            overrides = getattr(phase, section) or {}
            for key, value in overrides.items():
                if key not in allowed:
                    raise UserError(phase_key_error(where, section, key))
                if section == "data" and key == "sources":
                    merged["data"]["sources"] = self._phase_sources(where, value)
                else:
                    merged[section][key] = value
        if (phase.data or {}).get("temperature") is not None and merged["data"]["sources"]:
            # A phase's temperature replaces the weights it inherits (weights it writes itself still conflict).
            own = (phase.data or {}).get("sources") or {}
            for name, entry in merged["data"]["sources"].items():
                if not (isinstance(own.get(name), dict) and "weight" in own[name]):
                    entry["weight"] = None
        config = validate(merged, where)
        config.check_consistency(where)
        check_phase_keys_act(phase, config, where)
        return config

    def _phase_sources(self, where: str, value: Any) -> dict[str, Any]:
        """A phase's `data.sources`: the sources it reads (a subset of data.sources), each with an optional weight."""
        known = self.data.sources or {}
        if not isinstance(value, dict) or not value:
            raise UserError(f"{where}: data.sources must map source names to {{weight: ...}} or {{}} (the sources "
                            f"this phase reads), e.g. {{{next(iter(known), 'web')}: {{weight: 2}}}}.")
        picked = {}
        for name, entry in value.items():
            if name not in known:
                listed = ", ".join(known) or "none: define them in data.sources first"
                raise UserError(f"{where}: data.sources names the unknown source {name!r}; a phase reads sources "
                                f"defined in the top-level data.sources ({listed}).")
            entry = entry or {}
            if not isinstance(entry, dict) or set(entry) - {"weight"}:
                raise UserError(f"{where}: data.sources.{name} may only set weight (its folders are set once, in "
                                "the top-level data.sources); write e.g. {weight: 2}, or {} for the top-level weight.")
            picked[name] = {**known[name].model_dump(), **entry}
        return picked

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of builtins: printable, YAML-dumpable, storable in a weights_only checkpoint."""
        return self.model_dump(mode="python")

    def check_consistency(self, source: str) -> None:
        """Cross-field rules that one field's own type cannot express."""
        m = self.model
        if m.hidden_size % m.num_heads:
            raise UserError(
                f"{source}: model.hidden_size ({m.hidden_size}) must be divisible by model.num_heads "
                f"({m.num_heads}); change one of them."
            )
        if m.position_embedding == "rotary" and (m.hidden_size // m.num_heads) % 2:
            raise UserError(
                f"{source}: rotary positions rotate pairs of dimensions, but model.hidden_size / model.num_heads "
                f"({m.hidden_size} / {m.num_heads}) is odd; make the head size even."
            )
        self._check_data(source)
        if self.phases:
            self._check_phases(source)
        if self.training.warmup_steps > self.training.max_steps and not self.phases:
            raise UserError(
                f"{source}: training.warmup_steps ({self.training.warmup_steps}) exceeds training.max_steps "
                f"({self.training.max_steps}); lower warmup_steps or raise max_steps."
            )
        t = self.training
        if t.batch_size * t.gradient_accumulation_steps > MAX_ROWS_PER_STEP:
            raise UserError(
                f"{source}: training.batch_size x training.gradient_accumulation_steps ({t.batch_size} x "
                f"{t.gradient_accumulation_steps}) is {t.batch_size * t.gradient_accumulation_steps:,} rows per "
                f"optimizer step, more than {MAX_ROWS_PER_STEP:,} (RoBERTa used 8,192); lower one of them."
            )
        spec = OPTIMIZERS[t.optimizer]
        if spec.not_with_fsdp and t.data_parallel == "fsdp":
            others = " or ".join(name for name, s in OPTIMIZERS.items() if not s.not_with_fsdp)
            raise UserError(
                f"{source}: training.optimizer {t.optimizer} does not work with training.data_parallel fsdp "
                f"({spec.not_with_fsdp}); set training.data_parallel: ddp, or choose training.optimizer {others}."
            )
        # Checkpoints are .pt files too: inside a data folder, the next run would read them as shards.
        ckpt = Path(self.checkpoint.checkpoint_dir).resolve()
        folders = [("data.data_dir", self.data.data_dir), ("data.val_data_dir", self.data.val_data_dir)]
        for name, src in (self.data.sources or {}).items():
            folders += [(f"data.sources.{name}.data_dir", src.data_dir),
                        (f"data.sources.{name}.val_data_dir", src.val_data_dir)]
        for key, folder in folders:
            refused = credentials_refusal(folder, key, source)  # no user:secret@ in a URL: the config is printed
            if refused:
                raise UserError(refused)
            if folder and not is_remote(folder) and ckpt.is_relative_to(Path(local_path(folder)).resolve()):
                raise UserError(
                    f"{source}: the checkpoint folder {self.checkpoint.checkpoint_dir} lies inside the {key} folder "
                    f"{folder}, where the next run would read its checkpoint_*.pt files as data shards; pass a "
                    "--checkpoint_dir outside it."
                )


    def _check_data(self, source: str) -> None:
        d, t = self.data, self.training
        if d.sources is not None:
            if d.data_dir is not None:
                raise UserError(f"{source}: data.data_dir and data.sources are both set; a run reads either one "
                                "folder (data_dir) or named sources: move the folder into data.sources, or drop one.")
            if not d.sources:
                raise UserError(f"{source}: data.sources is empty; name at least one source, e.g. "
                                "{web: {data_dir: shards/web}}.")
            if d.val_data_dir is not None:
                raise UserError(f"{source}: data.val_data_dir is set beside data.sources; give each source its own "
                                "val_data_dir (the run reports each and their weighted total).")
            weighted = [n for n, s in d.sources.items() if s.weight is not None]
            if d.temperature is not None and weighted:
                raise UserError(f"{source}: data.temperature and data.sources.{weighted[0]}.weight are both set; "
                                "weights come either from each source or from the temperature: drop one.")
        elif d.temperature is not None:
            raise UserError(f"{source}: data.temperature weights named data.sources, but there are none; define "
                            "data.sources or drop data.temperature.")
        if d.batch_tokens is not None and (d.sources is not None or self.phases):
            raise UserError(f"{source}: data.batch_tokens (token-budget batches) does not combine with data.sources "
                            "or phases yet; use training.batch_size rows instead.")
        if t.batch_size_start > t.batch_size and t.batch_size_warmup_steps:
            raise UserError(f"{source}: training.batch_size_start ({t.batch_size_start}) exceeds training.batch_size "
                            f"({t.batch_size}); the warmup grows the batch up to batch_size.")
        if t.batch_size_warmup_steps > t.max_steps and not self.phases:
            raise UserError(f"{source}: training.batch_size_warmup_steps ({t.batch_size_warmup_steps}) exceeds "
                            f"training.max_steps ({t.max_steps}); lower it.")

    def _check_phases(self, source: str) -> None:
        names = [p.name for p in self.phases]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UserError(f"{source}: phase name {twice[0]!r} is used twice; give every phase its own name.")
        for section, keys in PHASE_SCHEDULE_KEYS.items():
            given = getattr(self, section).model_fields_set
            for key in keys:
                if key in given:
                    raise UserError(f"{source}: {section}.{key} is set at the top level of a file with phases; "
                                    "schedules belong to a phase: move it into the phase it applies to.")
        if "max_steps" in self.training.model_fields_set and all(p.steps for p in self.phases):
            total = sum(p.steps for p in self.phases)
            if total != self.training.max_steps:
                raise UserError(f"{source}: training.max_steps ({self.training.max_steps}) disagrees with the "
                                f"phases' steps, which sum to {total}; remove training.max_steps (the phases set the "
                                "length) or make them agree.")
        for i, phase in enumerate(self.phases):
            cfg = self.phase_config(i)
            warm = max(cfg.training.warmup_steps, cfg.training.batch_size_warmup_steps)
            if phase.steps is not None and warm > phase.steps:
                raise UserError(f"{source}: phases[{i}] ({phase.name}) warms up over {warm} steps but lasts "
                                f"{phase.steps}; shorten the warmup or lengthen the phase.")


# Command-line flag -> dotted config key. Flags left unset (None) do not override the YAML; any other key
# is set with `--set section.key=value`.
FLAG_TO_KEY: dict[str, str] = {
    "init_from_hf": "model.init_from_hf",
    "data_dir": "data.data_dir",
    "tokenizer_filepath": "data.tokenizer_filepath",
    "val_data_dir": "data.val_data_dir",
    "batch_size": "training.batch_size",
    "gradient_clip": "training.gradient_clip",
    "max_steps": "training.max_steps",
    "learning_rate": "training.learning_rate",
    "seed": "training.seed",
    "precision": "training.precision",
    "checkpoint_dir": "checkpoint.checkpoint_dir",
    "load_checkpoint": "checkpoint.load_checkpoint",
    "checkpoint_every": "checkpoint.checkpoint_every",
    "max_checkpoints": "checkpoint.max_checkpoints",
    "wandb": "wandb.enabled",
    "wandb_run_id": "wandb.run_id",
    "wandb_log_freq": "wandb.log_freq",
    "wandb_project_name": "wandb.project",
    "tensorboard": "tensorboard.enabled",
    "progress": "training.progress",
}

# A config is a few dozen values: more than this many after YAML's aliases are expanded is an alias bomb
# (`a: &a [x, x]`, `b: &b [*a, *a]`, ...), which would otherwise hang validation and grow the error tenfold
# per level.
MAX_YAML_VALUES = 10_000

# Rows per optimizer step and process: 128 times RoBERTa's 8,192. More is a typo, and would take hours to gather.
MAX_ROWS_PER_STEP = 1 << 20


def resolve_config_path(config_file: str, config_dir: str | None) -> Path:
    """`--config_file` in `--config_dir` (default: the bundled configs), or an existing path as given."""
    if config_dir is not None:
        if Path(config_dir).is_file():
            raise UserError(f"--config_dir {config_dir} is a file, not a folder; pass the folder that holds "
                            f"{config_file}, or drop --config_dir.")
        candidate = Path(config_dir) / config_file
        if candidate.is_file():
            return candidate
        if not Path(config_dir).is_dir():
            raise UserError(f"config folder {config_dir} does not exist; check --config_dir.")
    direct = Path(config_file)
    if direct.is_file():
        return direct
    bundled = BUNDLED_CONFIG_DIR / config_file
    if config_dir is None and bundled.is_file():
        return bundled
    if direct.is_dir() or (config_dir is not None and (Path(config_dir) / config_file).is_dir()):
        raise UserError(f"--config_file {config_file} is a folder, not a YAML file; pass the file inside it "
                        "(e.g. base.yaml).")
    if direct.exists():  # a pipe, a device: reading it would block or never end
        raise UserError(f"--config_file {config_file} is not a regular file (a pipe or a device); save the config "
                        "to a file and pass that.")
    where = config_dir if config_dir is not None else f"the bundled configs ({BUNDLED_CONFIG_DIR})"
    shipped = ", ".join(bundled_configs())
    raise UserError(
        f"config file {config_file} was found neither as a path nor in {where}; "
        f"pass an existing YAML file (bundled: {shipped})."
    )


def bundled_configs() -> list[str]:
    """The names of the configs that ship with encoder-train."""
    return sorted(p.name for p in BUNDLED_CONFIG_DIR.glob("*.yaml"))


def parse_set(items: list[str]) -> dict[str, tuple[Any, str]]:
    """`--set key.path=value` items -> {dotted path: (value, how the user wrote it)}; values are YAML.

    A path starts with a section and goes as deep as the schema: `training.max_steps`,
    `data.sources.web.data_dir` (a source by name, a new name adds a source), `phases.1.steps` or
    `phases.decay.steps` (a phase of the file by index or by name). `apply_override` walks it into the file."""
    parsed: dict[str, tuple[Any, str]] = {}
    for item in items:
        dotted, sep, text = item.partition("=")
        dotted = dotted.strip()
        origin = f"--set {item}"
        parts = dotted.split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise UserError(f"{origin} is not of the form section.key=value (deeper keys joined by dots); write "
                            "e.g. --set training.max_steps=200 or --set data.sources.web.weight=2.")
        section = parts[0]
        if section not in Config.model_fields:
            close = difflib.get_close_matches(section, list(Config.model_fields), n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}? " if close else ""
            raise UserError(f"{origin}: unknown section {section}; {hint}sections: {', '.join(Config.model_fields)}.")
        if dotted in parsed:
            raise UserError(f"{parsed[dotted][1]} and {origin} both set {dotted}; pass it once.")
        parsed[dotted] = (_parse_yaml(text, origin, "value") if text.strip() else None, origin)
    return parsed


def apply_override(raw: dict[str, Any], dotted: str, value: Any, origin: str, created: dict[str, str]) -> str:
    """Set `dotted` (a path as parse_set takes it) to `value` in the file's raw dict, walking the schema beside it.
    Returns the path as validation names it (phases by index). A mapping the path needs that the file lacks is
    made (recorded in `created` with `origin`); a key the schema lacks, a list index past the file's phases, or a
    path through a plain value is refused in one sentence naming the item: an override is never dropped."""
    node: Any = raw  # the file's value at the path so far: a mapping, or the list of phases
    annotation: Any = Config  # the schema's type there
    done: list[str] = []
    parts, i = dotted.split("."), 0
    while True:
        taken = _name_length(annotation, node, parts[i:])  # names may hold dots: en.wiki
        key, below = _schema_step(annotation, node, ".".join(parts[i:i + taken]), done, origin)
        i += taken
        if i == len(parts):
            node[key] = value
            return ".".join([*done, str(key)])
        done.append(str(key))
        node = _container(node, key, below, ".".join(done), origin, created)
        annotation = below


def _name_length(annotation: Any, node: Any, rest: list[str]) -> int:
    """How many parts of a --set path's `rest` name the entry of a dict of sources or a list of phases: the most
    that join (with dots) into a name the file has, else one."""
    annotation = _inner(annotation)
    if _is_section(annotation) or not isinstance(node, dict | list):
        return 1
    names = set(node) if isinstance(node, dict) else {item.get("name") for item in node if isinstance(item, dict)}
    return next((k for k in range(len(rest), 1, -1) if ".".join(rest[:k]) in names), 1)


def _schema_step(annotation: Any, node: Any, part: str, done: list[str], origin: str) -> tuple[str | int, Any]:
    """One step of a --set path: the key in the file's `node` (an index into a list) and the schema's type below."""
    annotation = _inner(annotation)
    if _is_section(annotation):
        if part not in annotation.model_fields:
            raise UserError(unknown_key([*done, part], origin))
        return part, annotation.model_fields[part].annotation
    if get_origin(annotation) is list:
        return _list_index(node, part, ".".join(done), origin), get_args(annotation)[0]
    if get_origin(annotation) is dict or annotation is Any:  # data.sources.NAME, a phase's overrides
        return part, get_args(annotation)[-1] if get_args(annotation) else Any
    where = ".".join(done)
    raise UserError(f"{origin}: {where} is a value, not a section with keys; write --set {where}=VALUE.")


def _container(node: Any, key: str | int, annotation: Any, path: str, origin: str, created: dict[str, str]) -> Any:
    """The mapping (or list) at node[key] that a --set path goes through; made if the file lacks it."""
    kind = list if get_origin(_inner(annotation)) is list else dict
    child = node[key] if isinstance(node, list) else node.get(key)
    if child is None:
        child = node[key] = kind()
        created[path] = origin
    if not isinstance(child, kind):
        what = "list" if kind is list else "mapping"
        raise UserError(f"{origin}: the file's {path} is {_short(child)}, not a {what}; fix it in the file.")
    return child


def _list_index(items: list[Any], part: str, where: str, origin: str) -> int:
    """A phase named in a --set path: digits are an index into the file's list, anything else a phase's name."""
    names = [item.get("name") if isinstance(item, dict) else None for item in items]
    listed = ", ".join(f"{i} {n}" for i, n in enumerate(names)) or "none"
    if part.isdigit() and int(part) < len(items):
        return int(part)
    if not part.isdigit() and part in names:
        return names.index(part)
    raise UserError(f"{origin}: the file has no {where} entry {part!r} (its {where}: {listed}); name one by its "
                    f"index or its name, or add it in the file.")


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key: Any, first: Any, mark: Any):
        self.key, self.first, self.problem_mark = key, first, mark


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key written twice in one mapping: PyYAML silently keeps the last, so a
    second `model:` section would drop the first one's keys without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}  # key -> where it was first written
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` merges; a key written next to it overrides, as YAML means
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKey(key, seen[key], key_node.start_mark)
                seen[key] = key_node.start_mark
            except TypeError:
                continue  # an unhashable key: the base constructor reports it
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, source: str, what: str) -> Any:
    """YAML text -> Python values, with every way a YAML text can fail said in one sentence."""
    try:
        value = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        _count_values(value, [MAX_YAML_VALUES])
    except _DuplicateKey as e:
        first, again = e.first, e.problem_mark
        where = (f"line {first.line + 1}, columns {first.column + 1} and {again.column + 1}" if first.line == again.line
                 else f"lines {first.line + 1} and {again.line + 1}")
        raise UserError(
            f"{source}: key {_short(e.key)} is written twice in one mapping ({where}), and YAML would silently keep "
            "only the second; merge them into one."
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{source}: the {what} is not valid YAML{where}: {problem}; fix the syntax.") from None
    except (RecursionError, OverflowError):
        raise UserError(
            f"{source}: the {what} holds more than {MAX_YAML_VALUES} values once YAML's aliases (*name) are "
            "expanded, or nests too deeply; a config needs a few dozen: remove the aliases."
        ) from None
    return value


def _count_values(value: Any, budget: list[int]) -> None:
    """Walk the loaded YAML as validation would, stopping once it has seen `budget` values."""
    budget[0] -= 1
    if budget[0] < 0:
        raise OverflowError
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    for child in children:
        _count_values(child, budget)


def load_config(
    path: str | Path, overrides: dict[str, Any] | None = None, origins: dict[str, str] | None = None
) -> Config:
    """Read a YAML file, apply `{dotted.key: value}` overrides, validate. Raises UserError.

    `origins` names where an override came from (`--set training.x=1`) for messages; by default the flag
    of FLAG_TO_KEY that sets the key.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {path} is a folder, not a YAML file; pass the file inside it.")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "it is not UTF-8 text"
        raise UserError(f"config file {path} could not be read ({why}); check the path.") from None
    raw = _parse_yaml(text, f"config file {path}", "file")
    if raw is None:
        raise UserError(
            f"config file {path} is empty: it sets nothing, which would train the schema's default model for "
            "10,000 steps; write the sections you mean (copy a bundled config such as base.yaml)."
        )
    if not isinstance(raw, dict):
        raise UserError(
            f"config file {path} must be a mapping with sections model:, data:, training:, ... "
            f"(it holds a {type(raw).__name__})."
        )
    overrides = dict(overrides or {})
    if raw.get("phases") and "training.max_steps" in overrides:
        # With phases the length is theirs: --max_steps stops a trial run early, the schedule unchanged.
        overrides["training.stop_at"] = overrides.pop("training.max_steps")
        if origins and "training.max_steps" in origins:
            origins = {**origins, "training.stop_at": origins["training.max_steps"]}
    # Every override reaches the file's dict or is refused: none is skipped. They are named by the path that
    # validation reports (a phase by index), and so is every mapping one of them made.
    named: dict[str, str] = {}
    given: dict[str, str] = {}  # resolved path -> the item that set it
    for dotted, value in overrides.items():
        origin = (origins or {}).get(dotted) or flag_for(dotted)
        resolved = apply_override(raw, dotted, value, origin, named)
        # A later item that sets a key again, or a whole mapping holding an earlier item's key, would drop it.
        earlier = next((o for k, o in given.items() if k == resolved or k.startswith(resolved + ".")), None)
        if earlier:
            raise UserError(f"{earlier} and {origin} both set {resolved}; pass it once.")
        named[resolved] = given[resolved] = origin
    config = validate(raw, str(path), named)
    config.check_consistency(str(path))
    return config


def flag_for(key: str) -> str:
    """How a user sets `key` on the command line."""
    flag = {k: f for f, k in FLAG_TO_KEY.items()}.get(key)
    return f"--{flag}" if flag else f"--set {key}=..."


def validate(raw: dict[str, Any], source: str, origins: dict[str, str] | None = None) -> Config:
    """Validate a nested dict against the schema; the first problem becomes one clear sentence.

    origins: {dotted key: the flag it came from}, for values given on the command line."""
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        # A typo first: it explains the required key it leaves missing beside it.
        err = min(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
        loc = [str(p) for p in err["loc"]]
        key = ".".join(loc)
        # The command line's item that set this key, or made the mapping that holds it (a new source's).
        origin = next(((origins or {}).get(".".join(loc[:n])) for n in range(len(loc), 0, -1)
                       if ".".join(loc[:n]) in (origins or {})), None)
        if origin:  # the value came from the command line, not the file
            if err["type"] in ("extra_forbidden", "missing") or loc[-1] == "[key]":
                raise UserError(describe_error(err, origin)) from None
            msg = _message(err)
            shown = origin if origin.startswith("--set") else f"{origin} {_short(err.get('input'))}"
            raise UserError(f"{shown} is invalid ({key}): {msg}.") from None
        raise UserError(describe_error(err, source)) from None


def _message(err: Any) -> str:
    """pydantic's message, lower-cased, without its "Value error, " before our own validators' sentences."""
    msg = str(err["ctx"]["error"]) if err["type"] == "value_error" and "error" in err.get("ctx", {}) else err["msg"]
    return msg[0].lower() + msg[1:]


def _short(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: a message must stay one readable sentence."""
    text = redact(value if isinstance(value, str) and limit > 60 else repr(value))  # before the cut: no half secret
    return text if len(text) <= limit else text[: limit - 5] + " ...)"


def _inner(annotation: Any) -> Any:
    """X from `X | None` and `Annotated[X, ...]`: the type a value at that place is validated as."""
    while True:
        if get_origin(annotation) is Annotated:
            annotation = get_args(annotation)[0]
        elif get_origin(annotation) in (Union, types.UnionType):
            kinds = [a for a in get_args(annotation) if a is not type(None)]
            if len(kinds) != 1:
                return annotation
            annotation = kinds[0]
        else:
            return annotation


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def schema_at(path: list[str]) -> Any:
    """The schema's type at a path of keys, walked as validation walks it: a section's field, a value of a dict
    (data.sources.NAME), an item of a list (phases.0). None once the path leaves the schema (or a free-form
    dict such as a phase's overrides): a caller describing an error must never fail on a strange path."""
    annotation: Any = Config
    for part in path:
        annotation = _inner(annotation)
        if _is_section(annotation):
            field = annotation.model_fields.get(part)
            if field is None:
                return None
            annotation = field.annotation
        elif get_origin(annotation) in (dict, list) and get_args(annotation):
            annotation = get_args(annotation)[-1]
        else:
            return None
    return _inner(annotation)


def unknown_key(path: list[str], source: str) -> str:
    """One sentence for a key the schema does not have at `path`: the nearest valid key and the valid ones."""
    key, prefix = ".".join(path), ".".join(path[:-1])
    parent = schema_at(path[:-1])
    valid = list(parent.model_fields) if _is_section(parent) else []
    close = difflib.get_close_matches("".join(path[-1:]), valid, n=1, cutoff=0.6)
    hint = f"did you mean {prefix + '.' if prefix else ''}{close[0]}? " if close else ""
    listed = f"valid keys{' in ' + prefix if prefix else ''}: {', '.join(valid)}." if valid else \
        f"{prefix} takes no keys of its own."
    return f"{source}: unknown key {_short(key, 80)}; {hint}{listed}"


def describe_error(err: Any, source: str) -> str:
    """One sentence for a pydantic error: the file, the dotted key, the value, and the fix."""
    loc = [str(p) for p in err["loc"]]
    kind = err["type"]
    if len(loc) >= 2 and loc[-1] == "[key]":  # a mapping's key failed its own type: a source's name
        key = ".".join(loc[:-2])
        return f"{source}: {key} names the source {_short(loc[-2])}, but {_message(err)}; rename it."
    key = ".".join(loc)
    if kind == "extra_forbidden":
        return unknown_key(loc, source)
    value = err.get("input")
    if kind == "model_type" and value is None and len(loc) == 1:  # `model:` with nothing under it
        return (f"{source}: section {key} is empty ({key}: with no key under it); write its keys, or delete the "
                "line to keep the defaults.")
    if kind == "missing":
        return f"{source}: {key} is required and not set; set it."
    if kind == "invalid_key":
        where = f"in {'.'.join(loc[:-1])}" if len(loc) > 1 else "at the top level"
        return f"{source}: key {_short(loc[-1])} {where} is not a name; keys are words such as batch_size."
    msg = _message(err)
    if kind == "int_type" and isinstance(value, bool):
        msg += " (true/false are not integers)"
    return f"{source}: {key} = {_short(value)} is invalid: {msg}; fix the value in the file or on the command line."


def resolved_vocab_size(model: ModelConfig, tokenizer_vocab: int, source: str) -> int:
    """The embedding rows: the configured size, or the tokenizer's rounded up to `pad_vocab_multiple`."""
    if model.vocab_size is None:
        return math.ceil(tokenizer_vocab / model.pad_vocab_multiple) * model.pad_vocab_multiple
    if model.vocab_size < tokenizer_vocab:
        raise UserError(
            f"{source}: model.vocab_size ({model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({tokenizer_vocab}); remove model.vocab_size to take it from the tokenizer."
        )
    return model.vocab_size


def dump_yaml(config: Config) -> str:
    """The resolved config as YAML: CHECKPOINT_DIR/config.yaml at start, and what --dry_run prints."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
