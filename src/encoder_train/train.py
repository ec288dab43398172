"""train(config): set up -> loop -> close. Plain code, no callbacks.

Each optimizer step takes `gradient_accumulation_steps` micro-batches; the loss is the mean over
every predicted token of the step (micro-batches are weighted by their predicted-token counts, not
averaged), then the gradient is clipped, AdamW steps and the schedule advances. Logging, W&B and
checkpoints happen visibly at the bottom of the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from encoder_train import checkpoint, devices, distributed
from encoder_train.config import Config, ModelConfig, TrainingConfig, dump_yaml, resolved_vocab_size
from encoder_train.data.loader import BatchStream, MaskSpec, MLMBatches
from encoder_train.data.shards import derive_seed, scan_shards
from encoder_train.distributed import World
from encoder_train.errors import UserError
from encoder_train.evaluate import evaluate
from encoder_train.model import MaskedLM, ModelDims, compile_layers
from encoder_train.optim import apply_hyperparameters, build_optimizer, build_scheduler, lr_factor
from encoder_train.tokenizer import load_tokenizer, special_tokens
from encoder_train.tracking import Tracker


@dataclass
class TrainResult:
    step: int
    tokens_seen: int
    last_loss: float | None
    checkpoint: Path | None
    stopped_by: int | None = None  # the signal that stopped the run early, if one did


class GracefulStop:
    """First SIGTERM or SIGINT: finish the current optimizer step, checkpoint, exit. Second SIGINT: at once.

    Preemptible machines send SIGTERM some seconds before the kill; finishing one step and writing a
    checkpoint in that time loses nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(press Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def loader_workers(configured: int | None, device: torch.device) -> int:
    """data.num_workers, or when unset: 2 background workers feeding a GPU; none on a CPU, where the batch
    (a few ms of masking and collating) is cheaper built inline than by a process that preempts the
    compute threads mid-matmul."""
    if configured is not None:
        return configured
    return 2 if device.type == "cuda" else 0


def autocast_for(precision: str, device: torch.device, note=print) -> contextlib.AbstractContextManager:
    """bf16 autocast (fp32 master weights) where the device supports it, else plain fp32."""
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            note("note: this GPU has no bf16 support; training in fp32.")
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_dims(cfg: ModelConfig, tokenizer_vocab: int, pad_id: int, source: str) -> ModelDims:
    """The model's shape: the config plus what only the tokenizer knows (vocabulary size, pad id)."""
    dims = ModelDims(
        vocab_size=resolved_vocab_size(cfg, tokenizer_vocab, source),
        hidden_size=cfg.hidden_size,
        num_layers=cfg.num_layers,
        num_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        pad_id=pad_id,
        dropout=cfg.dropout,
        attention_dropout=cfg.attention_dropout,
        layer_norm_eps=cfg.layer_norm_eps,
        pre_layer_norm=cfg.pre_layer_norm,
    )
    if dims.max_tokens < 2:
        raise UserError(
            f"{source}: model.max_position_embeddings ({cfg.max_position_embeddings}) leaves no room for tokens "
            f"after RoBERTa's position offset (pad id {pad_id} + 1); raise it to at least {pad_id + 3}."
        )
    return dims


# The fields of ModelDims that fix parameter shapes; a checkpoint must match them to be resumed.
SHAPE_FIELDS = ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "max_position_embeddings", "pre_layer_norm")


def check_same_shape(saved: dict[str, Any], dims: ModelDims, path: Path) -> None:
    current = dataclasses.asdict(dims)
    diffs = [f"{k} {saved.get(k)} vs {current[k]}" for k in SHAPE_FIELDS if saved.get(k) != current[k]]
    if diffs:
        raise UserError(
            f"checkpoint {path} was trained with a different model shape (checkpoint vs config: "
            f"{', '.join(diffs)}); use the config it was trained with, or start a new --checkpoint_dir."
        )


def find_resume(config: Config, say=print) -> tuple[dict[str, Any] | None, Path | None]:
    """The checkpoint to resume from, if any, refusing anything that would overwrite newer checkpoints."""
    directory = Path(config.checkpoint.checkpoint_dir)
    existing = checkpoint.list_checkpoints(directory)
    wanted = config.checkpoint.load_checkpoint
    if wanted is None:
        if existing:
            raise UserError(
                f"checkpoint folder {directory} already holds checkpoints up to step {existing[-1][0]}; "
                "resume them with --load_checkpoint latest, or pass an empty --checkpoint_dir."
            )
        return None, None
    if wanted == "latest":
        if not existing:
            say(f"no checkpoint in {directory} yet; starting a fresh run.")
            return None, None
        found = checkpoint.load_latest_good(directory, note=say)
        if found is None:
            raise UserError(
                f"none of the {len(existing)} checkpoints in {directory} loads; pass a good one with "
                "--load_checkpoint, or pass another --checkpoint_dir."
            )
        # Checkpoints newer than the good one are damaged: the run will write good ones in their place.
        return found
    path = Path(wanted)
    state = checkpoint.load(path)
    newer = [s for s, p in existing if s > state["step"] and p.resolve() != path.resolve()]
    if newer:
        raise UserError(
            f"checkpoint folder {directory} holds checkpoints newer than {path.name} (up to step {max(newer)}), "
            "which resuming would overwrite; resume with --load_checkpoint latest, or pass another --checkpoint_dir."
        )
    return state, path


# Settings that do not change what a run computes: resuming with other values is the same run.
NOT_TRAJECTORY = {
    "training.log_interval", "training.eval_every", "training.eval_batches", "training.max_nonfinite_steps",
    "training.compile", "data.num_workers", "data.prefetch_batches",
    # paths: the same files may have moved; their contents are checked where it matters
    "data.data_dir", "data.val_data_dir", "data.tokenizer_filepath", "model.init_from_hf",
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
    return changed


def resume_note(changed: list[tuple[str, Any, Any]], saved: TrainingConfig, now: TrainingConfig, step: int) -> str:
    """Say what a resume with other settings does: the run is no longer the uninterrupted one."""
    listed = ", ".join(f"{k} {old} -> {new}" for k, old, new in changed)
    note = (f"note: resuming with settings that differ from the checkpoint's ({listed}); from step {step} on the "
            "run differs from an uninterrupted one")
    before, after = saved.learning_rate * lr_factor(step, saved), now.learning_rate * lr_factor(step, now)
    if before != after:
        note += (f"; the learning rate of the next step is {after:.3e} under the new schedule, where the "
                 f"checkpoint's settings would give {before:.3e}")
    return note + "."


def train(config: Config,
          resume_hint: str = "Resume with the same command plus --load_checkpoint latest.",
          dry_run: bool = False) -> TrainResult:
    """Train from `config`; under torchrun, every rank calls this and they train one model together.

    `resume_hint` is printed after a stop by a signal: how to continue (the demo resumes on its own).
    `dry_run`: print the resolved config, the model's size and the data, and return before anything is
    written or allocated.
    """
    world = distributed.init()
    try:
        if dry_run:
            return _dry_run(config, world)
        with contextlib.ExitStack() as held:  # holds the checkpoint folder's lock until the run ends
            return _train(config, world, resume_hint, held)
    finally:
        distributed.close(world)


def _dry_run(config: Config, world: World) -> TrainResult:
    config, tokenizer, _, dims, _ = _model_setup(config, world, allocate=False)
    estimate = devices.training_memory(dims, world, config.training.data_parallel)
    print("resolved config:\n" + dump_yaml(config).rstrip())
    print(f"model: {estimate.parameters / 1e6:.2f}M parameters, vocabulary {dims.vocab_size} (tokenizer "
          f"{tokenizer.get_vocab_size()}), rows up to {dims.max_tokens} tokens; weights, gradients and AdamW state "
          f"take about {estimate.needed / 1e9:.2f} GB of the {estimate.available / 1e9:.1f} GB on {world.device}")
    if config.data.data_dir:
        shards = scan_shards(config.data.data_dir, dims.max_tokens)
        print(f"data: {len(shards)} shard{'s' * (len(shards) != 1)}, {sum(s.rows for s in shards)} rows in "
              f"{config.data.data_dir}")
    print("dry run: nothing was trained or written.")
    return TrainResult(0, 0, None, None)


def _model_setup(config: Config, world: World, allocate: bool = True):
    """The tokenizer, the model's shape, and (with --init_from_hf) the starting weights; the returned config
    is what runs: an imported folder's shape replaces the YAML's model section."""
    hf_start = None
    if config.model.init_from_hf:
        from encoder_train.hf import import_hf

        hf_start = import_hf(config.model.init_from_hf)  # shape, weights and tokenizer from the folder
        tokenizer, tokenizer_source = hf_start.tokenizer, config.model.init_from_hf
        if config.data.tokenizer_filepath and world.is_main:
            print(f"note: the tokenizer comes from {config.model.init_from_hf}; --tokenizer_filepath "
                  f"{config.data.tokenizer_filepath} is not used.")
        shape = {f: getattr(hf_start.dims, f) for f in ModelConfig.model_fields if hasattr(hf_start.dims, f)}
        config = config.model_copy(update={
            "model": config.model.model_copy(update=shape),
            "data": config.data.model_copy(update={"tokenizer_filepath": None}),
        })
    elif config.data.tokenizer_filepath is None:
        raise UserError("no tokenizer given; pass --tokenizer_filepath with a tokenizer.json.")
    else:
        tokenizer, tokenizer_source = load_tokenizer(config.data.tokenizer_filepath), config.data.tokenizer_filepath
    special = special_tokens(tokenizer, tokenizer_source)
    dims = hf_start.dims if hf_start else model_dims(config.model, tokenizer.get_vocab_size(), special.pad, "config")
    devices.check_fits(dims, world, config.training.data_parallel)
    return config, tokenizer, special, dims, hf_start


def _train(config: Config, world: World, resume_hint: str, held: contextlib.ExitStack) -> TrainResult:
    # ---- set up ---------------------------------------------------------------------------------
    config, tokenizer, special, dims, hf_start = _model_setup(config, world)
    cfg_t, cfg_d, cfg_c = config.training, config.data, config.checkpoint
    device = world.device
    say = print if world.is_main else (lambda *a, **k: None)  # noqa: E731 - only rank 0 speaks
    tokenizer_vocab = tokenizer.get_vocab_size()
    shards = scan_shards(cfg_d.data_dir, dims.max_tokens)
    val_shards = scan_shards(cfg_d.val_data_dir, dims.max_tokens, "--val_data_dir") if cfg_d.val_data_dir else None
    spec = MaskSpec(special.pad, special.mask, special.all_ids, tokenizer_vocab, cfg_d.mask_probability)
    ckpt_dir = Path(cfg_c.checkpoint_dir)
    if world.is_main:
        # One writer per checkpoint folder, for the whole run; taken once the inputs are known good, before
        # anything in the folder is read or written.
        held.enter_context(checkpoint.FolderLock(ckpt_dir))
        checkpoint.ensure_writable(ckpt_dir)
        for stale in checkpoint.remove_stale_temporaries(ckpt_dir):
            say(f"removed {stale.name}, a checkpoint left half-written by an interrupted run")
    state, resumed_from = find_resume(config, say)
    fsdp = world.distributed and cfg_t.data_parallel == "fsdp"
    if state is not None and state.get("sharded_optimizer", False) != fsdp:
        raise UserError(
            f"checkpoint {resumed_from} was written with training.data_parallel = "
            f"{'fsdp' if state.get('sharded_optimizer') else 'ddp'} and resumes only that way; set it accordingly."
        )

    torch.manual_seed(cfg_t.seed)  # the same initial weights on every rank
    model = MaskedLM(dims)
    if state is not None:
        check_same_shape(state.get("dims", {}), dims, resumed_from)
        model.load_state_dict(state["model"])
    elif hf_start is not None:
        model.load_state_dict(hf_start.state_dict)
        say(f"starting from the weights in {config.model.init_from_hf}")
    if cfg_t.compile:
        compile_layers(model)
    model = distributed.wrap(model.to(device), world, cfg_t.data_parallel)
    optimizer = build_optimizer(model, cfg_t, device)
    scheduler = build_scheduler(optimizer, cfg_t)
    if world.distributed:  # dropout differs between ranks
        torch.manual_seed(derive_seed(cfg_t.seed, "dropout", world.rank))
    step, tokens_seen, rows_consumed = 0, 0, 0
    wandb_run_id = config.wandb.run_id
    if state is not None:
        load_optimizer(model, optimizer, state["optimizer"], fsdp)
        scheduler.load_state_dict(state["scheduler"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        rows_consumed = state["data"]["rows_consumed"]
        saved_world = len(state["rng"])
        if saved_world == world.world_size:  # each rank continues its own random stream
            torch.set_rng_state(state["rng"][world.rank]["torch"])
            if device.type == "cuda" and state["rng"][world.rank].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"][world.rank]["cuda"])
        else:
            torch.manual_seed(derive_seed(cfg_t.seed, "dropout", world.rank, step))
            say(f"resuming {saved_world} processes' run with {world.world_size}: the data continues from the same "
                f"row, but each step now takes a different number of rows and dropout is reseeded, so the run "
                "differs from one that kept its world size.")
        wandb_run_id = wandb_run_id or state.get("wandb_run_id")
        changed = changed_settings(state.get("config", {}), config)
        if changed:
            saved_training = TrainingConfig.model_validate(state["config"]["training"]) if "training" in state.get(
                "config", {}) else cfg_t
            say(resume_note(changed, saved_training, cfg_t, step))
            apply_hyperparameters(optimizer, scheduler, cfg_t, step)

    rows_per_step = cfg_t.batch_size * cfg_t.gradient_accumulation_steps * world.world_size
    raw_model = distributed.unwrap(model)
    say("resolved config:\n" + dump_yaml(config).rstrip())
    say(
        f"model: {raw_model.num_parameters() / 1e6:.2f}M parameters "
        f"({raw_model.num_parameters(True) / 1e6:.2f}M without embeddings), vocabulary {dims.vocab_size} "
        f"(tokenizer {tokenizer_vocab}), rows up to {dims.max_tokens} tokens; device {device}, "
        f"precision {cfg_t.precision}"
    )
    say(
        f"data: {len(shards)} shard{'s' * (len(shards) != 1)}, {sum(s.rows for s in shards)} rows; "
        f"global batch {rows_per_step} rows per "
        f"step = {cfg_t.batch_size} per micro-batch x {cfg_t.gradient_accumulation_steps} accumulation x "
        f"{world.world_size} processes" + (f" ({cfg_t.data_parallel})" if world.distributed else "")
        + (f"; validation: {sum(s.rows for s in val_shards)} rows" if val_shards else "")
    )
    if resumed_from is not None:
        say(f"resuming from {resumed_from} at step {step} (learning rate {scheduler.get_last_lr()[0]:.3e})")
    sys.stdout.flush()
    if step >= cfg_t.max_steps:
        say(f"step {step} already reached training.max_steps ({cfg_t.max_steps}); nothing to do.")
        return TrainResult(step, tokens_seen, None, resumed_from)

    # Rank r takes micro-batches r, r + W, r + 2W, ... of the one global stream: ranks read disjoint rows,
    # and together they read exactly what one process would.
    stream = BatchStream(
        MLMBatches(
            shards,
            spec,
            batch_size=cfg_t.batch_size,
            seed=cfg_t.seed,
            shuffle_files=cfg_d.shuffle_files,
            start_row=rows_consumed + world.rank * cfg_t.batch_size,
            stride=world.world_size,
        ),
        num_workers=loader_workers(cfg_d.num_workers, device),
        prefetch=cfg_d.prefetch_batches,
        pin_memory=device.type == "cuda",
    )
    tracker = Tracker(
        metrics_path=ckpt_dir / "metrics.jsonl",
        total_steps=cfg_t.max_steps,
        start_step=step,
        fresh=state is None,
        wandb_enabled=config.wandb.enabled,
        wandb_project=config.wandb.project,
        wandb_run_id=wandb_run_id,
        config=config.to_dict(),
        wandb_dir=ckpt_dir,
        enabled=world.is_main,
    )
    autocast = autocast_for(cfg_t.precision, device, note=tracker.write)
    clip = cfg_t.gradient_clip if cfg_t.gradient_clip > 0 else float("inf")

    def snapshot() -> dict[str, Any]:
        """The whole training state; a collective under torchrun (every rank calls it, rank 0 writes it)."""
        model_state, optimizer_state = full_state(model, optimizer, fsdp)
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None}
        return {
            "model": model_state,
            "optimizer": optimizer_state,
            "sharded_optimizer": fsdp,
            "scheduler": scheduler.state_dict(),
            "step": step,
            "tokens_seen": tokens_seen,
            # The position of every rank follows from it: rank r reads from rows_consumed + r * batch_size.
            "data": {"rows_consumed": rows_consumed, "world_size": world.world_size},
            "rng": distributed.gather_objects(rng, world),  # one entry per rank
            "dims": dataclasses.asdict(dims),
            # The tokenizer travels with the weights: evaluate, fill-mask and export need no other file.
            "tokenizer": {"json": tokenizer.to_str(), "mask_spec": dataclasses.asdict(spec)},
            "config": config.to_dict(),
            "wandb_run_id": tracker.wandb_run_id,
        }

    # ---- loop -----------------------------------------------------------------------------------
    model.train()
    rows_per_epoch = sum(s.rows for s in shards)
    last_path: Path | None = None
    last_loss: float | None = None
    loss_sum = torch.zeros((), device=device)  # summed on the device; read back only at log time
    norm_sum = torch.zeros((), device=device)
    steps_since_log, tokens_since_log, t_log = 0, 0, time.perf_counter()
    nonfinite_in_a_row = 0
    saved_step = None if state is None else step

    def save() -> None:
        nonlocal last_path, saved_step
        snap = snapshot()
        saved_step = step
        if world.is_main:
            last_path = checkpoint.save(snap, ckpt_dir, step)
            deleted = checkpoint.rotate(ckpt_dir, cfg_c.max_checkpoints)
            tracker.write(f"step {step}: saved {last_path}" + (f", removed {len(deleted)} old" if deleted else ""))

    try:
        with GracefulStop() as stop:
            stop_votes = 0.0
            while step < cfg_t.max_steps and not stop_votes:
                data_error: UserError | None = None
                try:
                    micro = [next(stream) for _ in range(cfg_t.gradient_accumulation_steps)]
                except UserError as e:  # a shard became unreadable or damaged during the run
                    micro, data_error = [], e
                # Token-weighted mean over the whole global step: each micro-batch's summed loss over all
                # predicted tokens of all ranks. Data-parallel gradients are averaged over ranks, hence x W.
                # The same all-reduce tells every rank whether any rank's data failed, so all stop together.
                predicted, step_tokens, failed = distributed.sum_ints(
                    [sum(b.num_predicted for b in micro), sum(b.num_tokens for b in micro), int(bool(data_error))],
                    world)
                if failed:
                    # Stop as SIGTERM does: keep the finished steps, then say what broke (exit 2).
                    if step > 0 and step != saved_step:
                        save()
                    kept = f"step {step} is saved in {last_path or resumed_from}" if (last_path or resumed_from) \
                        else "no step had finished"
                    reason = str(data_error) if data_error else "another process's data could not be read"
                    raise UserError(f"{reason.rstrip('.')} ({kept}).")
                scale = world.world_size / max(1, predicted)
                step_loss = torch.zeros((), device=device)
                for i, b in enumerate(micro):
                    b = b.to(device)
                    with distributed.gradient_sync(model, world, i == len(micro) - 1), autocast:
                        out = model(b.input_ids, b.attention_mask, b.labels, b.predict_positions, reduction="sum",
                                    packing=b.packing)
                        loss = out.loss * scale
                    loss.backward()
                    step_loss += loss.detach() / world.world_size
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                rows_consumed += rows_per_step
                tokens_seen += step_tokens

                # The one host-device sync of a step (and, under torchrun, one small all-reduce): the global
                # loss, and whether any rank was asked to stop, so that all ranks stop after the same step.
                status = distributed.sum_all(
                    torch.stack([step_loss.float(), torch.tensor(float(stop.signum is not None), device=device)]),
                    world)
                global_loss, stop_votes = status.tolist()
                if not math.isfinite(global_loss + float(grad_norm)):
                    # A NaN/inf loss or gradient must not reach the weights.
                    optimizer.zero_grad(set_to_none=True)
                    nonfinite_in_a_row += 1
                    tracker.write(f"step {step + 1}: loss or gradient norm is not finite; update skipped "
                                  f"({nonfinite_in_a_row} in a row)")
                    if nonfinite_in_a_row >= cfg_t.max_nonfinite_steps:
                        raise UserError(
                            f"the loss or gradient norm was not finite for {nonfinite_in_a_row} steps in a row "
                            f"after step {step}; the last good checkpoint is {last_path or resumed_from or 'none'}: "
                            "lower training.learning_rate or raise training.warmup_steps, then resume from it."
                        )
                    continue
                nonfinite_in_a_row = 0
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                loss_sum += global_loss
                norm_sum += grad_norm.detach()
                tokens_since_log += step_tokens
                steps_since_log += 1
                tracker.advance()

                wandb_due = tracker.run is not None and step % config.wandb.log_freq == 0
                if step % cfg_t.log_interval == 0 or step == cfg_t.max_steps or wandb_due:
                    now = time.perf_counter()
                    metrics = {
                        "step": step,
                        "loss": loss_sum.item() / steps_since_log,
                        "lr": scheduler.get_last_lr()[0],
                        "grad_norm": norm_sum.item() / steps_since_log,
                        "tokens_per_second": tokens_since_log / max(now - t_log, 1e-9),
                        "tokens_seen": tokens_seen,
                        "epoch": rows_consumed / rows_per_epoch,
                    }
                    last_loss = metrics["loss"]
                    tracker.log(metrics)
                    if wandb_due or step == cfg_t.max_steps:
                        tracker.log_wandb(metrics)
                    loss_sum.zero_()
                    norm_sum.zero_()
                    steps_since_log, tokens_since_log, t_log = 0, 0, now

                if val_shards and (step % cfg_t.eval_every == 0 or step == cfg_t.max_steps):
                    # Every rank evaluates the same rows (FSDP needs all ranks in the forward); rank 0 logs.
                    result = evaluate(model, val_shards, spec, batch_size=cfg_t.batch_size, device=device,
                                      autocast=autocast, max_batches=cfg_t.eval_batches)
                    tracker.log_eval({"step": step, **{f"val_{k}": v for k, v in result.items()}})

                if step % cfg_c.checkpoint_every == 0 or step == cfg_t.max_steps:
                    save()
            if stop_votes and step != saved_step:
                save()
    finally:
        stream.close()
        tracker.close()
    if stop_votes:
        where = last_path or resumed_from
        signum = stop.signum or signal.SIGTERM  # a rank asked to stop by its neighbours stops as they do
        if world.is_main:
            print(
                f"stopped by {signal.Signals(signum).name} at step {step}; "
                + (f"checkpoint {where}. {resume_hint}"
                   if where else "no step had finished, so there is nothing to resume."),
                file=sys.stderr,
            )
        return TrainResult(step, tokens_seen, last_loss, last_path, stopped_by=signum)
    say(f"done: step {step}, loss {last_loss:.4f}, {tokens_seen} tokens seen; last checkpoint {last_path}")
    return TrainResult(step, tokens_seen, last_loss, last_path)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
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


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict, sharded: bool) -> None:
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, saved, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(saved)
