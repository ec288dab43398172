"""train(config): set up -> fit. Plain code, no callbacks.

`setup` turns a config into a ready `Run`: tokenizer, shape, data, the checkpoint folder's lock, the
model, optimizer and schedule, restored from a checkpoint when resuming. `fit` is the loop. Each
optimizer step takes `gradient_accumulation_steps` micro-batches; the loss is the mean over every
predicted token of the step (micro-batches are weighted by their predicted-token counts, not
averaged), then the gradient is clipped, the optimizer steps and the schedule advances. Logging, evaluation
and checkpoints happen visibly at the bottom of the loop. What a checkpoint holds is `state.TrainState`'s.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from encoder_train import checkpoint, devices, distributed, preflight
from encoder_train.agreement import what_must_agree
from encoder_train.batch import Batch, MaskSpec
from encoder_train.checkpointing import Saver, find_resume, skip_unloadable
from encoder_train.config import Config, dump_yaml
from encoder_train.data.formats.base import ShardInfo
from encoder_train.data.mixture import Source
from encoder_train.data.packing import packing_efficiency
from encoder_train.data.shards import scan_shards
from encoder_train.distributed import World
from encoder_train.errors import UserError
from encoder_train.evaluate import evaluate
from encoder_train.model import MaskedLM, ModelDims, compile_layers, compile_model
from encoder_train.optimizers import build_optimizer
from encoder_train.phases import Phase, Plan
from encoder_train.seeds import derive_seed
from encoder_train.state import TrainState, check_resumable, model_dims, model_section
from encoder_train.step import MetricsWindow, apply_update
from encoder_train.stream import DataStream, scan_sources, tokens_by_source
from encoder_train.tokenizer import load_tokenizer, special_tokens
from encoder_train.tracking import Tracker, TrackerIds, TrackerSettings, check_sink_folders

# The resolved config of the run, beside its checkpoints (describe writes it at start).
CONFIG_FILE = "config.yaml"


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


def train(config: Config, resume_hint: str | None = None, dry_run: bool = False,
          restart_sources: tuple[str, ...] = ()) -> TrainResult:
    """Train from `config`; under torchrun, every rank calls this and they train one model together.

    `resume_hint` is printed after a stop by a signal: how to continue (the demo resumes on its own).
    `dry_run`: print the resolved config, the model's size, the data and the plan (phases, mix, schedule, epochs
    of each source), and return before anything is written or allocated.
    `restart_sources`: sources whose files changed since the checkpoint, to read again from their beginning.
    """
    resume_hint = resume_hint or how_to_resume(config.checkpoint.load_checkpoint)
    world = distributed.init()
    try:
        if dry_run:
            return _dry_run(config, world)
        with contextlib.ExitStack() as held:  # holds the checkpoint folder's lock until the run ends
            run = setup(config, world, held, set(restart_sources))
            if run.state.step >= run.last_step:
                run.say(f"step {run.state.step} already reached training.max_steps "
                        f"({run.config.training.max_steps}); nothing to do." if run.state.step >= run.plan.total_steps
                        else f"step {run.state.step} already reached training.stop_at ({run.last_step}); nothing "
                        "to do.")
                return TrainResult(run.state.step, run.state.tokens_seen, None, run.state.resumed_from)
            return fit(run, resume_hint)
    finally:
        distributed.close(world)


def how_to_resume(load_checkpoint: str | None) -> str:
    """What to run after a stop, given how this run was started."""
    if load_checkpoint == "latest":
        return "Resume with the same command."
    if load_checkpoint:
        return (f"Resume with the same command, --load_checkpoint latest in place of --load_checkpoint "
                f"{load_checkpoint}.")
    return "Resume with the same command plus --load_checkpoint latest."


# ---- set up ---------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the loop needs, built by `setup`."""

    config: Config  # resolved: what runs (an imported folder's shape included)
    world: World
    state: TrainState
    plan: Plan  # phases, and what each step reads and computes
    stream: DataStream  # the step's micro-batches; owns the data position
    val_shards: list[ShardInfo] | None  # data.val_data_dir's (a run with data.sources has one per source)
    checkpoint_dir: Path

    @property
    def sources(self) -> list[Source]:
        return self.plan.sources

    @property
    def last_step(self) -> int:
        """Where this process stops: the run's end, or training.stop_at for a trial."""
        return min(self.plan.total_steps, self.config.training.stop_at or self.plan.total_steps)

    def say(self, message: str) -> None:
        if self.world.is_main:  # only rank 0 speaks
            print(message)


def setup(config: Config, world: World, held: contextlib.ExitStack, restart_sources: set[str] = frozenset()) -> Run:
    config, tokenizer, dims, init_weights = resolve_model(config, world)
    preflight.check_can_run(config)
    spec = mask_spec(tokenizer, config)
    plan = Plan(config, scan_sources(config.data, dims.max_tokens), world.world_size)
    config = with_plan_length(config, plan)
    val_shards = (scan_shards(config.data.val_data_dir, dims.max_tokens, "--val_data_dir")
                  if config.data.val_data_dir else None)
    # Before any other collective: nodes started with other settings or data stop here, in one sentence.
    distributed.check_agree(what_must_agree(config, plan.sources, val_shards, tokenizer, restart_sources), world)
    ckpt_dir = Path(config.checkpoint.checkpoint_dir)
    say = print if world.is_main else (lambda *a, **k: None)  # noqa: E731
    if world.is_main:
        # One writer per checkpoint folder, for the whole run; taken once the inputs are known good, before
        # anything in the folder is read or written.
        held.enter_context(checkpoint.FolderLock(ckpt_dir))
        checkpoint.ensure_writable(ckpt_dir)
        check_sink_folders(ckpt_dir, TrackerSettings.from_config(config))  # before any training time is spent
        for stale in checkpoint.remove_stale_temporaries(ckpt_dir):
            say(f"removed {stale.name}, a checkpoint left half-written by an interrupted run")
    distributed.check_shared_folder(ckpt_dir, world)  # every node must read and write the same folder
    state, saved, resumed_from, plan = resume_or_build(config, world, dims, tokenizer, spec, init_weights, plan, say,
                                                       restart_sources)
    config = with_plan_length(config, plan)
    if saved is not None:
        state.restore(saved, resumed_from)
    elif restart_sources:
        raise UserError("--restart_source applies to a resumed run; there is no checkpoint to resume here.")
    run = Run(config, world, state, plan, state.stream, val_shards, ckpt_dir)
    enter_phase(run, plan.phase_at(state.step), announce=False)
    describe(run)
    for line in preflight.warnings(config, dims, tokenizer.get_vocab_size(), plan):
        run.say(f"warning: {line}")
    return run


def resume_or_build(config: Config, world: World, dims: ModelDims, tokenizer: Tokenizer, spec: MaskSpec,
                    init_weights: dict | None, fresh: Plan, say, restart_sources: set[str] = frozenset(),
                    ) -> tuple[TrainState, dict | None, Path | None, Plan]:
    """The training state, with the weights of the checkpoint it resumes from (if any), that checkpoint's other
    state, and the plan: `fresh`, or on resume the plan the checkpoint's progress keeps (phases in tokens keep
    their tokens at other rows per step). With `latest`, a checkpoint whose shards fail to load on any rank is set
    aside and the one before it tried, on every rank together."""
    fsdp = world.distributed and config.training.data_parallel == "fsdp"
    while True:
        saved, resumed_from = find_resume(config, say, weights=False, world=world)  # sharded tensors: below
        plan = fresh
        if saved is not None:
            check_resumable(saved, fsdp, dims, resumed_from, config.training.optimizer)
            plan = Plan(fresh.config, fresh.sources, world.world_size, saved.get("plan"))
        elif init_weights is not None:
            say(f"starting from the weights in {config.model.init_from_hf}")
        weights = init_weights if saved is None else saved.get("model")
        state = build_state(with_plan_length(config, plan), world, dims, tokenizer, spec, weights, fsdp, plan, say,
                            restart_sources)
        if saved is None or "sharded_checkpoint" not in saved:
            break
        try:  # each rank loads its part of the shards, resharded to this run
            state.load_shards(saved["sharded_checkpoint"])
            break
        except checkpoint.Damaged as e:
            if config.checkpoint.load_checkpoint != "latest":
                raise
            skip_unloadable(resumed_from, e, world, say)
    if saved is not None and (resized := plan.resized(saved.get("plan"))):
        say(resized)
    return state, saved, resumed_from, plan


def resolve_model(config: Config, world: World) -> tuple[Config, Tokenizer, ModelDims, dict | None]:
    """The tokenizer, the model's shape and (with --init_from_hf) the starting weights. The returned config is
    what runs: an imported folder's shape replaces the YAML's model section, so that the printed and stored
    config describe the model that trains."""
    if config.model.init_from_hf:
        from encoder_train.hf import import_hf

        folder = import_hf(config.model.init_from_hf)  # shape, weights and tokenizer from the folder
        if config.data.tokenizer_filepath and world.is_main:
            print(f"note: the tokenizer comes from {config.model.init_from_hf}; --tokenizer_filepath "
                  f"{config.data.tokenizer_filepath} is not used.")
        config = config.model_copy(update={
            "model": model_section(folder.dims, config.model),
            "data": config.data.model_copy(update={"tokenizer_filepath": None}),
        })
        special_tokens(folder.tokenizer, config.model.init_from_hf)  # refuses a folder without <pad>/<mask>
        tokenizer, dims, weights = folder.tokenizer, folder.dims, folder.state_dict
    elif config.data.tokenizer_filepath is None:
        raise UserError("no tokenizer given; pass --tokenizer_filepath with a tokenizer.json.")
    else:
        tokenizer = load_tokenizer(config.data.tokenizer_filepath)
        pad = special_tokens(tokenizer, config.data.tokenizer_filepath).pad
        source = f"the config with tokenizer {config.data.tokenizer_filepath}"
        dims, weights = model_dims(config.model, tokenizer.get_vocab_size(), pad, source), None
    devices.check_fits(dims, world, config.training.data_parallel, config.training.optimizer)
    return config, tokenizer, dims, weights


def mask_spec(tokenizer: Tokenizer, config: Config) -> MaskSpec:
    special = special_tokens(tokenizer, config.model.init_from_hf or config.data.tokenizer_filepath)
    return MaskSpec(special.pad, special.mask, special.all_ids, tokenizer.get_vocab_size(),
                    config.data.mask_probability)


def build_state(config: Config, world: World, dims: ModelDims, tokenizer: Tokenizer, spec: MaskSpec,
                weights: dict | None, fsdp: bool, plan: Plan, say, restart_sources: set[str]) -> TrainState:
    """The model (initialised from the seed, then given `weights` if any), wrapped for data parallelism,
    with its optimizer, schedule and data stream. The order of random draws here is part of exact resume."""
    cfg = config.training
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model = MaskedLM(dims)
    if weights is not None:
        model.load_state_dict(weights)
    if cfg.compile:  # token-budget batches have one shape: the whole model compiles once, statically
        compile_model(model) if config.data.batch_tokens else compile_layers(model)
    model = distributed.wrap(model.to(world.device), world, cfg.data_parallel)
    optimizer = build_optimizer(model, cfg, world.device)
    # The plan's rate at every step (phases.Plan.learning_rate): the top-level peak x the plan's factor.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, plan.lr_factor)
    if world.distributed:  # dropout differs between ranks
        torch.manual_seed(derive_seed(cfg.seed, "dropout", world.rank))
    return TrainState(model, optimizer, scheduler, world, dims, tokenizer, spec, config, fsdp, plan,
                      DataStream(plan, spec, world), say, set(restart_sources),
                      trackers=TrackerIds(config.wandb.run_id))


def describe(run: Run) -> None:
    """What matters at start, printed by rank 0 in a few lines: where the resolved config was written, the model,
    the data, the plan and where a resume starts (notes and warnings come as they arise). The config itself (90-160
    lines, which buried the rest) goes to CHECKPOINT_DIR/config.yaml; `--dry_run` prints it."""
    cfg, state, world = run.config.training, run.state, run.world
    model = distributed.unwrap(state.model)
    if world.is_main:
        written, previous = write_config(run.checkpoint_dir, run.config, state.step)
        run.say(f"resolved config: {written}" + (f" (the one before, in force until step {state.step}, is kept as "
                                                 f"{previous.name})" if previous else ""))
    run.say(
        f"model: {model.num_parameters() / 1e6:.2f}M parameters "
        f"({model.num_parameters(True) / 1e6:.2f}M without embeddings), vocabulary {state.dims.vocab_size} "
        f"(tokenizer {state.tokenizer.get_vocab_size()}), rows up to {state.dims.max_tokens} tokens; device "
        f"{world.device}, precision {cfg.precision}"
    )
    val, data = run.val_shards, run.config.data
    shards = [s for src in run.sources for s in src.shards]
    micro = (f"{cfg.batch_size}" if data.batch_tokens is None else
             f"{data.batch_tokens} tokens (rows packed by best fit, {100 * packing_efficiency(shards, state.spec, budget=data.batch_tokens, window=data.pack_window, seed=cfg.seed, shuffle_files=data.shuffle_files, windows=1):.1f}% of slots real tokens)")  # noqa: E501
    global_batch = (f"{rows_per_step(run)} rows" if data.batch_tokens is None else
                    f"{data.batch_tokens * cfg.gradient_accumulation_steps * world.world_size} token slots")
    run.say(
        f"data: {len(shards)} shard{'s' * (len(shards) != 1)}, {sum(s.rows for s in shards)} rows"
        + (f" in {len(run.sources)} sources" if data.sources else "") + f"; global batch "
        f"{global_batch} per step = {micro} per micro-batch x {cfg.gradient_accumulation_steps} "
        f"accumulation x {world.world_size} processes" + (f" ({cfg.data_parallel})" if world.distributed else "")
        + (f"; validation: {sum(s.rows for s in val)} rows" if val else "")
    )
    run.say(f"plan: {run.plan.total_steps:,} steps\n  " + "\n  ".join(run.plan.describe()))
    if state.resumed_from is not None:
        run.say(f"resuming from {state.resumed_from} at step {state.step} "
                f"(learning rate {state.scheduler.get_last_lr()[0]:.3e})")
    sys.stdout.flush()


def write_config(folder: Path, config: Config, step: int) -> tuple[Path, Path | None]:
    """Write the resolved config to FOLDER/config.yaml, atomically; returns it and where a different one that was
    there (a resume with other settings, an earlier start) was kept: config.until_step_N.yaml, N the step this run
    starts from. Nothing is overwritten: an existing file of that name gets a number."""
    path, text = folder / CONFIG_FILE, dump_yaml(config)
    previous = None
    if path.exists():
        if path.read_text() == text:
            return path, None
        previous = folder / f"config.until_step_{step:08d}.yaml"
        for n in itertools.count(1):
            if not previous.exists():
                break
            previous = folder / f"config.until_step_{step:08d}.{n}.yaml"
        os.replace(path, previous)
    staged = folder / f".{CONFIG_FILE}.tmp"
    staged.write_text(text)
    os.replace(staged, path)
    return path, previous


def rows_per_step(run: Run) -> int:
    cfg = run.config.training
    return cfg.batch_size * cfg.gradient_accumulation_steps * run.world.world_size


def _dry_run(config: Config, world: World) -> TrainResult:
    config, tokenizer, dims, _ = resolve_model(config, world)
    preflight.check_can_run(config)
    estimate = devices.training_memory(dims, world, config.training.data_parallel, config.training.optimizer)
    plan = None
    if config.data.data_dir or config.data.sources:
        plan = Plan(config, scan_sources(config.data, dims.max_tokens), world.world_size)
        config = with_plan_length(config, plan)
    print("resolved config:\n" + dump_yaml(config).rstrip())
    print(f"model: {estimate.parameters / 1e6:.2f}M parameters, vocabulary {dims.vocab_size} (tokenizer "
          f"{tokenizer.get_vocab_size()}), rows up to {dims.max_tokens} tokens; weights, gradients and "
          f"{config.training.optimizer} optimizer state take about {estimate.needed / 1e9:.2f} GB of the "
          f"{estimate.available / 1e9:.1f} GB on {world.device}")
    if plan is not None:
        shards = [s for src in plan.sources for s in src.shards]
        print(f"data: {len(shards)} shard{'s' * (len(shards) != 1)}, {sum(s.rows for s in shards)} rows in "
              + (config.data.data_dir or f"{len(plan.sources)} sources"))
        print(f"plan: {plan.total_steps:,} steps over {world.world_size} process"
              f"{'es' * (world.world_size != 1)}\n  " + "\n  ".join(plan.describe()))
    for line in preflight.warnings(config, dims, tokenizer.get_vocab_size(), plan):
        print(f"warning: {line}")
    print("dry run: nothing was trained or written.")
    return TrainResult(0, 0, None, None)


def with_plan_length(config: Config, plan: Plan) -> Config:
    """With phases, the run's length is theirs: the config that runs (printed and stored) says so."""
    if not config.phases:
        return config
    return config.model_copy(update={"training": config.training.model_copy(update={"max_steps": plan.total_steps})})


# ---- the loop ---------------------------------------------------------------------------------------------


def fit(run: Run, resume_hint: str) -> TrainResult:
    cfg, state, world, plan, stream = run.config.training, run.state, run.world, run.plan, run.stream
    model, optimizer, scheduler, device = state.model, state.optimizer, state.scheduler, world.device
    stream.start(state.step, run.config.data.num_workers, run.config.data.prefetch_batches)
    next_step = devices.StepPrefetch(stream.next_step, device)
    tracker = Tracker(directory=run.checkpoint_dir, total_steps=cfg.max_steps, start_step=state.step,
                      fresh=state.resumed_from is None, settings=TrackerSettings.from_config(run.config),
                      run_config=run.config.to_dict(), ids=state.trackers, enabled=world.is_main)
    saver = Saver(run.config, world, state, plan.phase_ends(), tracker)
    window = MetricsWindow(device, state.step)
    autocast = devices.autocast_for(cfg.precision, device, note=tracker.write)
    phase_ends = plan.phase_ends()
    stop_votes = 0
    model.train()
    try:
        with GracefulStop() as stop:
            while state.step < run.last_step:
                phase = plan.phase_at(state.step)
                micro, data_error = next_step()
                # One small all-reduce of host integers, under torchrun the one time a step waits for the host:
                # the step's predicted tokens over all ranks (the loss is their token-weighted mean), the tokens of
                # each source, and whether any rank's data failed, its checkpoint write failed, or it was asked to
                # stop (SIGTERM), so that all ranks stop together, after the same step. One process adds nothing up.
                predicted, step_tokens, failed, write_failed, stop_votes, *source_tokens = distributed.sum_ints(
                    [sum(b.num_predicted for b in micro), sum(b.num_tokens for b in micro), int(bool(data_error)),
                     int(saver.failed), int(stop.signum is not None), *tokens_by_source(micro, len(run.sources))],
                    world)
                if stop_votes:
                    break
                if write_failed:
                    saver.wait()  # raises the write's own error where it failed (rank 0)
                    raise UserError("the checkpoint write of rank 0 failed (its message says why); the previous "
                                    "checkpoints are kept.")
                if failed:  # stop as SIGTERM does: keep the finished steps, then say what broke (exit 2)
                    saver.save_if_new()
                    reason = str(data_error) if data_error else "another process's data could not be read"
                    raise UserError(f"{reason.rstrip('.')} ({saver.kept()}); {how_to_go_on(resume_hint, saver)}")
                step_loss = forward_backward(model, micro, predicted, world, autocast)
                clip = phase.config.training.gradient_clip or float("inf")  # 0 disables clipping
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                stream.step_done(state.step, micro, source_tokens)
                state.tokens_seen += step_tokens

                step_loss = distributed.sum_all(step_loss.float(), world)  # the global loss; stays on the device
                # A NaN/inf loss or gradient must not reach the weights: fused AdamW skips the update on the
                # device when found_inf is set (its step counts stay too), other optimizers on the host (one sync
                # a step on a GPU); the host hears of it at log points.
                finite = apply_update(optimizer, scheduler, step_loss, grad_norm)
                state.step += 1
                window.add(step_loss, grad_norm, step_tokens, finite)
                tracker.advance()

                final = state.step == run.last_step
                checks = state.step % cfg.log_interval == 0 or final  # the same steps on every rank
                logs = tracker.due(state.step) or final  # rank 0's sinks alone
                evaluates = state.step % cfg.eval_every == 0 or final or state.step in phase_ends
                with saver.saved_on_failure(together=checks or evaluates):  # a stop after this step keeps it
                    if checks:
                        check_skipped(window, state.step, cfg.max_nonfinite_steps, tracker)
                    if logs:
                        # the rate this step's update used (the plan's); the scheduler already holds the next one's
                        record = window.read(state.step, plan.learning_rate(state.step - 1),
                                             state.tokens_seen,
                                             sum(stream.position.rows.values()) / sum(s.rows for s in run.sources))
                        tracker.log(record | where_the_data_is(run, phase))
                    if evaluates:
                        evaluate_held_out(run, phase, tracker, autocast)
                if state.step in phase_ends:
                    tracker.write(f"step {state.step}: phase {phase.name} complete; its checkpoint is kept")
                if state.step % run.config.checkpoint.checkpoint_every == 0 or final or state.step in phase_ends:
                    saver.save()
                if not final and plan.phase_at(state.step) is not phase:
                    enter_phase(run, plan.phase_at(state.step), tracker.write)
            if stop_votes:
                saver.save_if_new()
            saver.wait()
    finally:
        try:
            with contextlib.suppress(Exception):  # an error already on its way wins; the write still finishes
                saver.wait()
        finally:  # even when a second Ctrl-C interrupts the wait
            stream.close()
            tracker.close()
    if stop_votes:
        return stopped(run, saver, window, stop.signum or signal.SIGTERM, resume_hint)
    run.say(f"done: step {state.step}, loss {window.last_loss:.4f}, {state.tokens_seen} tokens seen; "
            f"last checkpoint {saver.last_path}")
    return TrainResult(state.step, state.tokens_seen, window.last_loss, saver.last_path)


def enter_phase(run: Run, phase: Phase, say=None, announce: bool = True) -> None:
    """What a phase changes in the model (its rotary bases); the rest (batch, mix, mask and learning rates) the
    plan gives each step. Called at start (the phase of a resumed step) and at each boundary."""
    m = phase.config.model
    if m.position_embedding == "rotary":
        distributed.unwrap(run.state.model).set_rope_theta(m.rope_theta, m.local_rope_theta)
    if announce and phase.name:
        (say or run.say)(f"step {phase.start}: phase {phase.name} begins ({phase.steps:,} steps)")


def where_the_data_is(run: Run, phase: Phase) -> dict[str, Any]:
    """The phase, and for each named source the rows and tokens it has given and its epoch: in every record."""
    extra: dict[str, Any] = {}
    if run.config.phases:
        extra |= {"phase": phase.name, "phase_index": phase.index}
    if run.config.data.sources:
        position = run.stream.position
        for s in run.sources:
            extra |= {f"source/{s.name}/rows": position.rows[s.name],
                      f"source/{s.name}/tokens": position.tokens[s.name], f"source/{s.name}/epoch": run.stream.epoch(s)}
    return extra


def evaluate_held_out(run: Run, phase: Phase, tracker: Tracker, autocast: contextlib.AbstractContextManager) -> None:
    """data.val_data_dir's loss, or each source's (val/NAME/...) and their total weighted as the phase mixes them.
    Every rank evaluates the same rows (FSDP needs all ranks in the forward); rank 0 logs."""
    cfg, state = run.config.training, run.state
    sets = ([(None, run.val_shards, 1.0)] if run.val_shards else
            [(s.name, s.val_shards, w) for s, w in zip(run.sources, phase.weights, strict=True) if s.val_shards])
    if not sets:
        return
    record: dict[str, Any] = {"step": state.step}
    if run.config.phases:
        record["phase"] = phase.name  # its index is in the training record of the same step
    results = []
    for name, shards, weight in sets:
        result = evaluate(state.model, shards, state.spec, batch_size=cfg.batch_size, device=run.world.device,
                          autocast=autocast, max_batches=cfg.eval_batches)
        results.append((result, weight))
        record |= {(f"val_{k}" if name is None else f"val/{name}/{k}"): v for k, v in result.items()}
    if sets[0][0] is not None:  # sources: the weighted total (sources the phase does not read count 0)
        if not sum(w for _, w in results):  # the phase reads none of them: their plain mean
            results = [(r, 1.0) for r, _ in results]
        total = sum(w for _, w in results)
        for key in ("loss", "accuracy"):
            record[f"val_{key}"] = sum(r[key] * w for r, w in results) / total
        record["val_perplexity"] = math.exp(min(record["val_loss"], 50.0))
    tracker.log_eval(record)


def how_to_go_on(resume_hint: str, saver: Saver) -> str:
    """How to go on after a failed step, ending the sentence: resume where a step was saved, else start again.
    The data layer's messages say only what to fix, as they are raised at start-up (nothing to resume) too."""
    if saver.last_good() is None:
        return "then run the same command again."
    return "then " + resume_hint[:1].lower() + resume_hint[1:]


def stopped(run: Run, saver: Saver, window: MetricsWindow, signum: int, resume_hint: str) -> TrainResult:
    """A run stopped by a signal (a rank asked to stop by its neighbours stops as they do): say where it is."""
    state = run.state
    if run.world.is_main:
        where = saver.last_good()
        print(f"stopped by {signal.Signals(signum).name} at step {state.step}; "
              + (f"checkpoint {where}. {resume_hint}" if where else
                 "no step had finished, so there is nothing to resume."), file=sys.stderr)
    return TrainResult(state.step, state.tokens_seen, window.last_loss, saver.last_path, stopped_by=signum)


def forward_backward(model: torch.nn.Module, micro: list[Batch], predicted: int, world: World,
                     autocast: contextlib.AbstractContextManager) -> torch.Tensor:
    """Accumulate the gradients of one optimizer step; returns its loss (a 0-d tensor on the device).

    Each micro-batch's summed loss is divided by the step's predicted tokens over all ranks; data-parallel
    gradients are averaged over ranks, hence the x W. Only the last micro-batch all-reduces gradients."""
    scale = world.world_size / max(1, predicted)
    step_loss = torch.zeros((), device=world.device)
    for i, b in enumerate(micro):
        b = b.to(world.device)
        with distributed.gradient_sync(model, world, i == len(micro) - 1), autocast:
            out = model(b.input_ids, b.attention_mask, b.labels, b.predict_positions, reduction="sum",
                        packing=b.packing)
            loss = out.loss * scale
        loss.backward()
        step_loss += loss.detach() / world.world_size
    return step_loss


def check_skipped(window: MetricsWindow, step: int, max_in_a_row: int, tracker: Tracker) -> None:
    """Report updates skipped for a NaN/inf loss or gradient since the last check; stop the run when
    `max_in_a_row` of them came in a row (the weights are those of the last good update, and the loop saves them)."""
    since = window.last_check
    skipped, worst, _ = window.read_skipped(step)
    if skipped:
        tracker.write(f"steps {since + 1}-{step}: the loss or gradient norm was not finite in {skipped} of them; "
                      f"update skipped each time ({worst} in a row at most)")
    if worst >= max_in_a_row:
        raise UserError(
            f"the loss or gradient norm was not finite for {worst} steps in a row by step {step}, so their updates "
            "were skipped and the weights are those of the last finite step: lower training.learning_rate or raise "
            "training.warmup_steps, then resume."
        )
