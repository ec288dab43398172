"""What a checkpoint holds, in one place: the training state saved and restored, and a trained model
loaded back for evaluation, fill-mask and export.

A checkpoint is a dict of tensors and builtins (so `torch.load(weights_only=True)` reads it); each entry is
written and read back by one part of `TrainState`:

    model, optimizer                  state dicts, unsharded (FSDP gathers them), on the CPU      TrainState
    dims                              the model's shape (`ModelDims`)                             TrainState
    tokenizer                         {json, mask_spec}: evaluate, fill-mask and export need no other file
    config                            the resolved config                                         TrainState
    step, tokens_seen                 optimizer steps taken, real tokens seen                     Counters
    rng                               one {torch, cuda} generator state per rank                  RandomState
    optimizer_name                    training.optimizer (absent in checkpoints from before the   Optimization
                                      choice: adamw)
    sharded_optimizer                 whether FSDP wrote it (a resume must use the same strategy)
    scheduler                         the schedule's state dict
    wandb_run_id                      the W&B run a resume continues                              tracking.TrackerIds
    plan                              each phase's steps and token slots done (phases.Plan.progress), and
                                      what a step reads: a resume keeps the phases' lengths in    PlanProgress
                                      tokens
    data                              the data stream's position (DataStream.state_dict): rows    DataPosition
                                      and tokens per source, each source's fingerprint, the
                                      world size

A new piece of state (EMA weights, a streaming source's position) is one part: a class with `state_dict` and
`load_state_dict` over its own keys, and one line in `TrainState.parts`.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from tokenizers import Tokenizer

from encoder_train import checkpoint, distributed, families
from encoder_train.batch import MaskSpec
from encoder_train.config import Config, ModelConfig, TrainingConfig, resolved_vocab_size
from encoder_train.distributed import World
from encoder_train.errors import UserError
from encoder_train.model import MaskedLM, ModelDims
from encoder_train.optimizers import sync_hyperparameters
from encoder_train.phases import Plan
from encoder_train.schedule import lr_factor
from encoder_train.seeds import derive_seed
from encoder_train.tracking import TrackerIds

if TYPE_CHECKING:
    from encoder_train.stream import DataStream

# ---- the model's shape: one source ----------------------------------------------------------------------

# ModelDims fields that a resumed run may change: regularisation, a numerical constant, the initialisation
# (the weights are loaded), and the rotary bases (a context-extension stage raises the global one). Every
# other field fixes parameter shapes or the function computed, so a checkpoint must match it; with rotary
# positions, max_position_embeddings is no parameter either, so longer rows may follow shorter ones.
MAY_CHANGE_ON_RESUME = ("dropout", "attention_dropout", "layer_norm_eps", "init", "rope_theta", "local_rope_theta")
SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(ModelDims) if f.name not in MAY_CHANGE_ON_RESUME)


def model_dims(cfg: ModelConfig, tokenizer_vocab: int, pad_id: int, source: str) -> ModelDims:
    """The model's shape: every field the config's model section shares with `ModelDims`, plus what only the
    tokenizer knows (the vocabulary size, the pad id). A new architecture option is a field in both."""
    names = {f.name for f in dataclasses.fields(ModelDims)}
    shared = {k: v for k, v in cfg.model_dump().items() if k in names}
    dims = ModelDims(**shared | {"vocab_size": resolved_vocab_size(cfg, tokenizer_vocab, source), "pad_id": pad_id})
    dims.check_row_length(2, source, "")  # <s> and </s> at least
    return dims


def model_section(dims: ModelDims, cfg: ModelConfig) -> ModelConfig:
    """The config's model section describing `dims` (an imported folder's shape replaces the YAML's)."""
    shape = {k: v for k, v in dataclasses.asdict(dims).items() if k in ModelConfig.model_fields}
    return cfg.model_copy(update={**shape, "family": families.family_of(dims).name})


def check_same_shape(saved: dict[str, Any], dims: ModelDims, path: Path) -> None:
    current = dataclasses.asdict(dims)
    # A field a checkpoint lacks was written before the field existed: it had the field's default then.
    default = {f.name: f.default for f in dataclasses.fields(ModelDims) if f.default is not dataclasses.MISSING}
    saved = {k: saved.get(k, default.get(k)) for k in current}
    fields = [k for k in SHAPE_FIELDS if not (dims.rotary and k == "max_position_embeddings")]
    diffs = [f"{k} {saved[k]} vs {current[k]}" for k in fields if saved[k] != current[k]]
    if diffs:
        raise UserError(
            f"checkpoint {path} was trained with a different model shape (checkpoint vs config: "
            f"{', '.join(diffs)}); use the config it was trained with, or start a new --checkpoint_dir."
        )


# ---- the training state ---------------------------------------------------------------------------------


class Part(Protocol):
    """A piece of the training state that saves and restores itself under its own top-level keys of a checkpoint
    (the keys listed in the module, which checkpoints have always had: old checkpoints load, and new ones load in
    older versions)."""

    def state_dict(self) -> dict[str, Any]:
        """Its entries of a checkpoint: tensors and builtins (a weights_only checkpoint holds them)."""
        ...

    def load_state_dict(self, saved: dict[str, Any], path: Path) -> None:
        """Continue from the checkpoint `saved` (the whole dict: a part reads its own keys), written at `path`."""
        ...


@dataclass
class Counters:
    """Optimizer steps taken and real tokens seen."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, saved: dict[str, Any], path: Path) -> None:
        if not isinstance(saved["step"], int) or not isinstance(saved["tokens_seen"], int):
            raise TypeError("step and tokens_seen must be integers")
        self.step, self.tokens_seen = saved["step"], saved["tokens_seen"]


@dataclass
class RandomState:
    """Every rank's torch (and CUDA) generator: dropout's randomness. Resumed by another number of processes, the
    ranks are reseeded, and the run says what that changes. Loaded after the counters (the reseed takes the step)."""

    world: World
    seed: int
    counters: Counters
    plan: Plan
    say: Callable[[str], None]

    def state_dict(self) -> dict[str, Any]:
        """A collective under torchrun: one entry per rank, gathered."""
        cuda = self.world.device.type == "cuda"
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if cuda else None}
        return {"rng": distributed.gather_objects(rng, self.world)}

    def load_state_dict(self, saved: dict[str, Any], path: Path) -> None:
        world, step = self.world, self.counters.step
        if len(saved["rng"]) == world.world_size:  # each rank continues its own random stream
            torch.set_rng_state(saved["rng"][world.rank]["torch"])
            if world.device.type == "cuda" and saved["rng"][world.rank].get("cuda") is not None:
                torch.cuda.set_rng_state(saved["rng"][world.rank]["cuda"])
        else:
            torch.manual_seed(derive_seed(self.seed, "dropout", world.rank, step))
            self.say(world_size_note(saved, world.world_size, self.plan.step_reads(step)))


@dataclass
class Optimization:
    """The optimizer and its schedule. The optimizer's tensors travel with the model's (`TrainState.snapshot`,
    `TrainState.shards`); here are its name, whether FSDP wrote it, and the scheduler. On resume the config in force
    wins over the checkpoint's: the optimizer's spec puts changed hyper-parameters in force (optimizers/), the plan
    the learning rate (phases.Plan.learning_rate). Loaded after the counters (the rate is the resumed step's)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    config: Config
    sharded: bool  # FSDP: state dicts are gathered on save and scattered on load
    plan: Plan
    counters: Counters
    say: Callable[[str], None]

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer_name": self.config.training.optimizer, "sharded_optimizer": self.sharded,
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, saved: dict[str, Any], path: Path) -> None:
        if "sharded_checkpoint" not in saved:  # a sharded checkpoint's optimizer is loaded with its shards
            _load_optimizer(self.model, self.optimizer, saved["optimizer"], self.sharded)
        self.scheduler.load_state_dict(saved["scheduler"])
        step = self.counters.step
        changed = changed_settings(saved.get("config", {}), self.config)
        if changed:
            saved_training = saved.get("config", {}).get("training")
            # the phases' schedule, not the top level's, sets the rate: not compared with the checkpoint's
            before = None if self.config.phases else \
                TrainingConfig.model_validate(saved_training) if saved_training else self.config.training
            self.say(resume_note(changed, before, self.plan.learning_rate(step), step))
            sync_hyperparameters(self.optimizer, self.config.training)
        self.plan.resume_rate(self.scheduler, step)


@dataclass
class PlanProgress:
    """Each phase's steps and token slots done (phases.Plan.progress). A resumed run's plan is built from it
    (train.resume_or_build), before the state it sizes, so there is nothing left to load here."""

    plan: Plan
    counters: Counters

    def state_dict(self) -> dict[str, Any]:
        return {"plan": self.plan.progress(self.counters.step)}

    def load_state_dict(self, saved: dict[str, Any], path: Path) -> None:
        pass


@dataclass
class DataPosition:
    """The data stream's position (DataStream.state_dict): rows and tokens per source, their fingerprints.
    `restart`: sources to read again from their beginning (--restart_source)."""

    stream: DataStream
    restart: set[str]
    say: Callable[[str], None]

    def state_dict(self) -> dict[str, Any]:
        return {"data": self.stream.state_dict()}

    def load_state_dict(self, saved: dict[str, Any], path: Path) -> None:
        self.stream.restore(saved["data"], self.restart, str(path), self.say)


@dataclass
class TrainState:
    """Everything a resume needs, and the objects it lives in: the model (DDP- or FSDP-wrapped) and what the run is,
    saved whole, and the parts, each saving and restoring itself. A new piece of state (EMA weights, say) is one
    part: a class with `state_dict` and `load_state_dict`, and a line in `parts`."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    world: World
    dims: ModelDims
    tokenizer: Tokenizer
    spec: MaskSpec
    config: Config
    sharded: bool  # FSDP: state dicts are gathered on save and scattered on load
    plan: Plan
    stream: DataStream  # the step's micro-batches; owns the data position
    say: Callable[[str], None]
    restart_sources: set[str] = field(default_factory=set)
    counters: Counters = field(default_factory=Counters)
    trackers: TrackerIds = field(default_factory=TrackerIds)
    resumed_from: Path | None = None

    def __post_init__(self) -> None:
        c = self.counters
        # In the order a resume loads them: the counters first (others read the step), the data last (its notes
        # follow the rest).
        self.parts: list[Part] = [
            c,
            RandomState(self.world, self.config.training.seed, c, self.plan, self.say),
            Optimization(self.model, self.optimizer, self.scheduler, self.config, self.sharded, self.plan, c, self.say),
            self.trackers,
            PlanProgress(self.plan, c),
            DataPosition(self.stream, self.restart_sources, self.say),
        ]

    @property
    def step(self) -> int:
        return self.counters.step

    @step.setter
    def step(self, value: int) -> None:
        self.counters.step = value

    @property
    def tokens_seen(self) -> int:
        return self.counters.tokens_seen

    @tokens_seen.setter
    def tokens_seen(self, value: int) -> None:
        self.counters.tokens_seen = value

    def snapshot(self) -> dict[str, Any]:
        """The whole training state; a collective under torchrun (every rank calls it, rank 0 writes it)."""
        model_state, optimizer_state = _full_state(self.model, self.optimizer, self.sharded)
        return {"model": model_state, "optimizer": optimizer_state, **self.snapshot_rest()}

    def shards(self) -> dict[str, Any]:
        """The model and optimizer state as this rank holds it, keyed by parameter name (FSDP: its shards, as
        DTensors; otherwise whole): what a sharded checkpoint's ranks write, each its own part."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {"model": get_model_state_dict(self.model),
                "optimizer": get_optimizer_state_dict(self.model, self.optimizer)}

    def load_shards(self, path: str) -> None:
        """Load a sharded checkpoint's model and optimizer into this run's, each rank its part: DCP reshards, so the
        checkpoint may come from another number of processes, or from FSDP into one plain process. Every rank
        calls it; when any rank's part fails to load, all raise `checkpoint.Damaged` (so they fall back together)."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        current = self.shards()
        alone = not (dist.is_available() and dist.is_initialized())
        reason = None
        try:
            with warnings.catch_warnings():  # alone: DCP warns that it assumes one process, which is what we mean
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(current, checkpoint_id=path, no_dist=alone, planner=checkpoint.safe_load_planner())
        except checkpoint.DCP_ERRORS as e:  # a damaged, unreadable or foreign checkpoint fails in many ways
            reason = checkpoint.dcp_reason(e)
        if distributed.sum_ints([int(reason is not None)], self.world)[0]:
            raise checkpoint.Damaged(
                f"checkpoint {path}'s shards do not load into this model ({reason or 'on another rank'}); resume "
                "from an earlier checkpoint or with the config it was written with.")
        set_model_state_dict(self.model, current["model"])
        set_optimizer_state_dict(self.model, self.optimizer, current["optimizer"])

    def snapshot_rest(self) -> dict[str, Any]:
        """Everything but the model and optimizer tensors; a collective under torchrun (the RNG states are
        gathered)."""
        rest = {
            "dims": dataclasses.asdict(self.dims),
            "tokenizer": {"json": self.tokenizer.to_str(), "mask_spec": dataclasses.asdict(self.spec)},
            "config": self.config.to_dict(),
        }
        for part in self.parts:
            rest |= part.state_dict()
        return rest

    def restore(self, saved: dict[str, Any], path: Path) -> None:
        """Continue from `saved` (the model's weights are already in place, see `load_weights`)."""
        try:
            for part in self.parts:
                part.load_state_dict(saved, path)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UserError(
                f"checkpoint {path} lacks or mangles training state this version reads ({type(e).__name__}: {e}); "
                "it was written by another version of encoder-train: resume with that version, or start a new "
                "--checkpoint_dir (evaluate, fill-mask and export still read its weights)."
            ) from None
        self.resumed_from = path


def world_size_note(saved: dict[str, Any], world_size: int, reads: str) -> str:
    """Say what resuming with another number of processes changes: dropout (each rank has its own random stream),
    and the rows of a step only where the global batch changed (`reads`: what this run's next step reads)."""
    before = len(saved["rng"])
    was = saved.get("plan", {}).get("step_reads") or _step_reads(saved.get("config", {}), before)
    head = f"resuming {before} processes' run with {world_size}: the data continues from the same row"
    tail = "dropout is reseeded, so the run differs from one that kept its world size."
    if was == reads:
        return f"{head} and each step still takes {reads}, but {tail}"
    unit = reads.split(" ", 1)[1]
    return f"{head}, but each step now takes a different number of {unit} ({was} -> {reads}) and {tail}"


def _step_reads(config: dict[str, Any], world_size: int) -> str:
    """What a step of a checkpoint's run read, from its config (checkpoints written before the plan was stored):
    the global batch of its top-level settings, in the words of phases.Plan.step_reads."""
    training, budget = config.get("training", {}), config.get("data", {}).get("batch_tokens")
    per_process = training.get("gradient_accumulation_steps", 1) * world_size
    if budget is not None:
        return f"{budget * per_process:,} token slots"
    return f"{training.get('batch_size', 0) * per_process:,} rows"


def host_copy(obj: Any) -> Any:
    """A snapshot with every tensor copied to host memory (cloned on the CPU), so that training may go on
    changing the originals while the copy is written."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: host_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(host_copy(v) for v in obj)
    return obj


def check_resumable(saved: dict[str, Any], sharded: bool, dims: ModelDims, path: Path, optimizer: str) -> None:
    """Refuse a checkpoint this run cannot continue, before any weights are touched. `optimizer`: this run's
    training.optimizer, which must be the checkpoint's (one optimizer's state means nothing to another)."""
    if "classifier" in saved or "finetune" in saved:
        raise UserError(
            f"checkpoint {path} is a fine-tuned classifier from `encoder-train finetune`, not a pretraining "
            "checkpoint, so pretraining cannot resume from it; pass a checkpoint that `encoder-train train` wrote "
            "(or use this one with `encoder-train export-classifier` or `evaluate`)."
        )
    # A sharded folder reshards, and a state keyed by parameter name loads anywhere; a plain optimizer's state (keyed
    # by position) only without FSDP.
    by_name = "sharded_checkpoint" in saved or keyed_by_name(saved.get("optimizer"))
    if not by_name and saved.get("sharded_optimizer", False) != sharded:
        raise UserError(
            f"checkpoint {path} was written with training.data_parallel = "
            f"{'fsdp' if saved.get('sharded_optimizer') else 'ddp'} and resumes only that way; set it accordingly."
        )
    saved_optimizer = saved.get("optimizer_name", "adamw")  # written before the choice existed: AdamW
    if saved_optimizer != optimizer:
        raise UserError(
            f"checkpoint {path} was trained with training.optimizer {saved_optimizer}, not {optimizer}, and its "
            f"optimizer state serves only {saved_optimizer}; resume with training.optimizer: {saved_optimizer}, or "
            f"start {optimizer} in a new --checkpoint_dir."
        )
    check_same_shape(saved.get("dims", {}), dims, path)


# Settings that do not change what a run computes: resuming with other values is the same run.
NOT_TRAJECTORY = {
    "training.log_interval", "training.eval_every", "training.eval_batches", "training.max_nonfinite_steps",
    "training.compile", "data.num_workers", "data.prefetch_batches",
    # paths: the same files may have moved; their contents are checked where it matters
    "data.data_dir", "data.val_data_dir", "data.tokenizer_filepath", "model.init_from_hf",
    # a trial's early stop: resuming without it continues the same run
    "training.stop_at",
}


def changed_settings(saved: dict[str, Any], config: Config) -> list[tuple[str, Any, Any]]:
    """(key, checkpoint's value, this run's value) for every setting that changes the trajectory."""
    now = config.to_dict()
    changed = []
    for section in ("model", "data", "training"):
        for key, value in now[section].items():
            dotted = f"{section}.{key}"
            old = saved.get(section, {}).get(key, value)
            if dotted not in NOT_TRAJECTORY and old != value:
                changed.append((dotted, old, value))
    if saved and saved.get("phases", []) != now["phases"]:
        changed.append(("phases", f"{len(saved.get('phases', []))} phases", f"{len(now['phases'])} phases"))
    return changed


def resume_note(changed: list[tuple[str, Any, Any]], saved: TrainingConfig | None, rate: float, step: int) -> str:
    """Say what a resume with other settings does: the run is no longer the uninterrupted one. `rate`: the plan's
    learning rate for the next step, said beside what the checkpoint's settings `saved` would give (with phases,
    None: not compared)."""
    listed = ", ".join(f"{k} {old} -> {new}" for k, old, new in changed)
    note = (f"note: resuming with settings that differ from the checkpoint's ({listed}); from step {step} on the "
            "run differs from an uninterrupted one")
    before = rate if saved is None else saved.learning_rate * lr_factor(step, saved)
    if before != rate:
        note += (f"; the learning rate of the next step is {rate:.3e} under the new schedule, where the "
                 f"checkpoint's settings would give {before:.3e}")
    return note + "."


def _full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
    """Unsharded model and optimizer state on the CPU. With FSDP2 every rank must call it (it gathers)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)
    return distributed.unwrap(model).state_dict(), optimizer.state_dict()


def keyed_by_name(optimizer_state: Any) -> bool:
    """Whether an optimizer state is keyed by parameter name (FSDP's, or a consolidated sharded checkpoint's), which
    any run can load, rather than by position in the optimizer (a plain optimizer's state_dict)."""
    state = optimizer_state.get("state", {}) if isinstance(optimizer_state, dict) else {}
    return bool(state) and all(isinstance(k, str) for k in state)


def _load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict, sharded: bool) -> None:
    if sharded or keyed_by_name(saved):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved)


def check_weights_fit(weights: dict[str, Any], dims: ModelDims, path: str | Path) -> None:
    """Refuse weights that are not the model the checkpoint's shape describes (the shards of another run under
    this one's meta.pt, say), naming the first tensor that differs. Costs no memory: the model is built on the
    meta device."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MaskedLM(dims).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in weights.items() if isinstance(v, torch.Tensor)}
    wrong = [f"{k} {found.get(k, 'missing')} where {shape} is expected" for k, shape in expected.items()
             if found.get(k) != shape] + [f"{k}, which the model lacks" for k in found if k not in expected]
    if wrong:
        raise checkpoint.Damaged(f"checkpoint {path}'s weights are not the model its shape describes ({wrong[0]}"
                                 f"{f' and {len(wrong) - 1} more' if len(wrong) > 1 else ''}); its files come from "
                                 "more than one run: use another checkpoint.")


# ---- a trained model, for use -----------------------------------------------------------------------------


@dataclass
class Trained:
    """A model restored from a checkpoint, with what inference needs around it."""

    model: MaskedLM
    tokenizer: Tokenizer
    spec: MaskSpec
    state: dict[str, Any]


def load_trained(path: str | Path, device: torch.device, flag: str = "--checkpoint") -> Trained:
    """Rebuild the model and tokenizer stored in a checkpoint (no other file needed); `flag` named `path`."""
    state = checkpoint.load(path, flag=flag)
    try:
        dims = ModelDims(**state["dims"])
        tokenizer = Tokenizer.from_str(state["tokenizer"]["json"])
        spec = MaskSpec(**state["tokenizer"]["mask_spec"])
    except (KeyError, TypeError):
        raise UserError(f"checkpoint {path} lacks the model shape or tokenizer; it was not written by this "
                        "version of encoder-train.") from None
    check_weights_fit(state["model"], dims, path)
    model = MaskedLM(dims)
    model.load_state_dict(state["model"])
    return Trained(model.to(device).eval(), tokenizer, spec, state)
