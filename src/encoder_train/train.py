"""train(config): set up -> loop -> close. Plain code, no callbacks.

Each optimizer step takes `gradient_accumulation_steps` micro-batches; the loss is the mean over
every predicted token of the step (micro-batches are weighted by their predicted-token counts, not
averaged), then the gradient is clipped, AdamW steps and the schedule advances. Logging, W&B and
checkpoints happen visibly at the bottom of the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from encoder_train import checkpoint
from encoder_train.config import Config, ModelConfig, dump_yaml, resolved_vocab_size
from encoder_train.data.loader import BatchStream, MaskSpec, MLMBatches
from encoder_train.data.shards import scan_shards
from encoder_train.errors import UserError
from encoder_train.evaluate import evaluate
from encoder_train.model import MaskedLM, ModelDims
from encoder_train.optim import build_optimizer, build_scheduler
from encoder_train.tokenizer import SpecialTokens, load_tokenizer, special_tokens
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


def find_resume(config: Config) -> tuple[dict[str, Any] | None, Path | None]:
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
            print(f"no checkpoint in {directory} yet; starting a fresh run.")
            return None, None
        found = checkpoint.load_latest_good(directory)
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


def train(config: Config) -> TrainResult:
    # ---- set up ---------------------------------------------------------------------------------
    cfg_t, cfg_d, cfg_c = config.training, config.data, config.checkpoint
    device = pick_device()
    hf_start = None
    if config.model.init_from_hf:
        from encoder_train.hf import import_hf

        hf_start = import_hf(config.model.init_from_hf)  # shape, weights and tokenizer from the folder
        tokenizer, tokenizer_source = hf_start.tokenizer, config.model.init_from_hf
    elif cfg_d.tokenizer_filepath is None:
        raise UserError("no tokenizer given; pass --tokenizer_filepath with a tokenizer.json.")
    else:
        tokenizer, tokenizer_source = load_tokenizer(cfg_d.tokenizer_filepath), cfg_d.tokenizer_filepath
    special: SpecialTokens = special_tokens(tokenizer, tokenizer_source)
    tokenizer_vocab = tokenizer.get_vocab_size()
    dims = hf_start.dims if hf_start else model_dims(config.model, tokenizer_vocab, special.pad, "config")
    shards = scan_shards(cfg_d.data_dir, dims.max_tokens)
    val_shards = scan_shards(cfg_d.val_data_dir, dims.max_tokens) if cfg_d.val_data_dir else None
    spec = MaskSpec(special.pad, special.mask, special.all_ids, tokenizer_vocab, cfg_d.mask_probability)
    ckpt_dir = checkpoint.ensure_writable(cfg_c.checkpoint_dir)
    for stale in checkpoint.remove_stale_temporaries(ckpt_dir):
        print(f"removed {stale.name}, a checkpoint left half-written by an interrupted run")
    state, resumed_from = find_resume(config)

    torch.manual_seed(cfg_t.seed)
    model = MaskedLM(dims)
    if hf_start is not None and state is None:
        model.load_state_dict(hf_start.state_dict)
        print(f"starting from the weights in {config.model.init_from_hf}")
    model = model.to(device)
    optimizer = build_optimizer(model, cfg_t, device)
    scheduler = build_scheduler(optimizer, cfg_t)
    step, tokens_seen, rows_consumed = 0, 0, 0
    wandb_run_id = config.wandb.run_id
    if state is not None:
        assert resumed_from is not None
        check_same_shape(state.get("dims", {}), dims, resumed_from)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, tokens_seen = state["step"], state["tokens_seen"]
        rows_consumed = state["data"]["rows_consumed"]
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        wandb_run_id = wandb_run_id or state.get("wandb_run_id")

    rows_per_step = cfg_t.batch_size * cfg_t.gradient_accumulation_steps
    print("resolved config:\n" + dump_yaml(config).rstrip())
    print(
        f"model: {model.num_parameters() / 1e6:.2f}M parameters ({model.num_parameters(True) / 1e6:.2f}M "
        f"without embeddings), vocabulary {dims.vocab_size} (tokenizer {tokenizer_vocab}), rows up to "
        f"{dims.max_tokens} tokens; device {device}, precision {cfg_t.precision}"
    )
    print(
        f"data: {len(shards)} shards, {sum(s.rows for s in shards)} rows; {rows_per_step} rows per step "
        f"({cfg_t.batch_size} x {cfg_t.gradient_accumulation_steps} accumulation)"
        + (f"; validation: {sum(s.rows for s in val_shards)} rows" if val_shards else "")
    )
    if resumed_from is not None:
        print(f"resuming from {resumed_from} at step {step} (learning rate {scheduler.get_last_lr()[0]:.3e})")
    sys.stdout.flush()
    if step >= cfg_t.max_steps:
        print(f"step {step} already reached training.max_steps ({cfg_t.max_steps}); nothing to do.")
        return TrainResult(step, tokens_seen, None, resumed_from)

    stream = BatchStream(
        MLMBatches(
            shards,
            spec,
            batch_size=cfg_t.batch_size,
            seed=cfg_t.seed,
            shuffle_files=cfg_d.shuffle_files,
            start_row=rows_consumed,
        ),
        num_workers=cfg_d.num_workers,
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
        wandb_log_freq=config.wandb.log_freq,
        config=config.to_dict(),
        wandb_dir=ckpt_dir,
    )
    autocast = autocast_for(cfg_t.precision, device, note=tracker.write)
    clip = cfg_t.gradient_clip if cfg_t.gradient_clip > 0 else float("inf")

    def snapshot() -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "step": step,
            "tokens_seen": tokens_seen,
            "data": {"rows_consumed": rows_consumed},
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
            },
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
        last_path, saved_step = checkpoint.save(snapshot(), ckpt_dir, step), step
        deleted = checkpoint.rotate(ckpt_dir, cfg_c.max_checkpoints)
        tracker.write(f"step {step}: saved {last_path}" + (f", removed {len(deleted)} old" if deleted else ""))

    try:
        with GracefulStop() as stop:
            while step < cfg_t.max_steps and stop.signum is None:
                micro = [next(stream) for _ in range(cfg_t.gradient_accumulation_steps)]
                # Token-weighted mean over the whole step: each micro-batch's summed loss / all predictions.
                predicted = max(1, sum(b.num_predicted for b in micro))
                step_loss = torch.zeros((), device=device)
                for b in micro:
                    b = b.to(device)
                    with autocast:
                        out = model(b.input_ids, b.attention_mask, b.labels, b.predict_positions, reduction="sum",
                                    packing=b.packing)
                    loss = out.loss / predicted
                    loss.backward()
                    step_loss += loss.detach()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                rows_consumed += rows_per_step
                step_tokens = sum(b.num_tokens for b in micro)
                tokens_seen += step_tokens

                # The one host-device sync of a step: a NaN/inf loss or gradient must not reach the weights.
                if not bool(torch.isfinite(step_loss + grad_norm)):
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
                loss_sum += step_loss
                norm_sum += grad_norm.detach()
                tokens_since_log += step_tokens
                steps_since_log += 1
                tracker.advance()

                wandb_due = tracker.run is not None and step % config.wandb.log_freq == 0
                if step % cfg_t.log_interval == 0 or step == cfg_t.max_steps or wandb_due:
                    now = time.perf_counter()
                    metrics = {
                        "step": step,
                        "loss": loss_sum.item() / steps_since_log,  # host waits for the device here
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
                    result = evaluate(model, val_shards, spec, batch_size=cfg_t.batch_size, device=device,
                                      autocast=autocast, max_batches=cfg_t.eval_batches)
                    tracker.log_eval({"step": step, **{f"val_{k}": v for k, v in result.items()}})

                if step % cfg_c.checkpoint_every == 0 or step == cfg_t.max_steps:
                    save()
            if stop.signum is not None and step != saved_step:
                save()
    finally:
        stream.close()
        tracker.close()
    if stop.signum is not None:
        where = last_path or resumed_from
        print(
            f"stopped by {signal.Signals(stop.signum).name} at step {step}; "
            + (f"checkpoint {where}. Resume with the same command plus --load_checkpoint latest."
               if where else "no step had finished, so there is nothing to resume."),
            file=sys.stderr,
        )
        return TrainResult(step, tokens_seen, last_loss, last_path, stopped_by=stop.signum)
    print(f"done: step {step}, loss {last_loss:.4f}, {tokens_seen} tokens seen; last checkpoint {last_path}")
    return TrainResult(step, tokens_seen, last_loss, last_path)
