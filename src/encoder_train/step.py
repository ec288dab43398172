"""One optimizer update and the window of metrics between log points: shared by pretraining (train.py) and
fine-tuning (finetune/loop.py), whose losses differ but whose update, skip of non-finite steps and records do not.
"""

from __future__ import annotations

import time
import warnings

import torch

from encoder_train.optimizers import skips_on_device


def apply_update(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
                 loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """Step the optimizer and the schedule, then clear the gradients; returns whether the step was finite (a 0-d
    bool tensor on the device).

    A NaN/inf loss or gradient must not reach the weights or the optimizer's state. An optimizer whose spec says so
    (fused AdamW) skips the update on the device when found_inf is set (its step counts stay too), and the host does
    not wait here. Other optimizers (foreach AdamW, StableAdamW, Muon) read no found_inf: the host reads the flag and
    does not call their step, which costs one device sync per step on a GPU. Either way the schedule moves on (a
    skipped update still counts as a step) and the caller hears of it at log points, through the window."""
    finite = torch.isfinite(loss) & torch.isfinite(grad_norm)
    if skips_on_device(optimizer):
        optimizer.found_inf = (~finite).float()
        optimizer.step()
        scheduler.step()
    elif bool(finite):  # the host waits for the device here: one sync a step on a GPU
        optimizer.step()
        scheduler.step()
    else:
        with warnings.catch_warnings():  # a first step skipped: torch warns of a schedule stepped before the optimizer
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return finite


class MetricsWindow:
    """Loss, gradient norm and tokens summed since the last log point, and the count of skipped (non-finite)
    updates; kept on the device and read back (the host waits for the device) only at log points."""

    def __init__(self, device: torch.device, start_step: int = 0):
        self.loss_sum = torch.zeros((), device=device)
        self.norm_sum = torch.zeros((), device=device)
        self.finite_steps = torch.zeros((), device=device, dtype=torch.int64)
        self.skipped = torch.zeros((), device=device, dtype=torch.int64)  # since the last check
        self.run = torch.zeros((), device=device, dtype=torch.int64)  # non-finite steps in a row, now
        self.worst_run = torch.zeros((), device=device, dtype=torch.int64)  # longest run since the last check
        self.steps, self.tokens, self.t0 = 0, 0, time.perf_counter()
        self.last_loss: float | None = None
        self.last_check = start_step

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, tokens: int, finite: torch.Tensor) -> None:
        """One step; a skipped (non-finite) one counts for the skip tallies, not for the averages."""
        self.loss_sum += torch.where(finite, loss, 0.0)
        self.norm_sum += torch.where(finite, grad_norm.detach(), 0.0)
        self.finite_steps += finite
        self.skipped += ~finite
        self.run.mul_(~finite).add_(~finite)
        torch.maximum(self.worst_run, self.run, out=self.worst_run)
        self.tokens += tokens
        self.steps += 1

    def read_skipped(self, step: int) -> tuple[int, int, int]:
        """(updates skipped, the longest run of them, the run going on now) since the last check; resets."""
        skipped, worst, run = (int(x) for x in torch.stack([self.skipped, self.worst_run, self.run]).tolist())
        self.skipped.zero_()
        self.worst_run.copy_(self.run)
        self.last_check = step
        return skipped, worst, run

    def read(self, step: int, lr: float, tokens_seen: int, epoch: float) -> dict[str, float | int]:
        """The window's averages as a record (with the caller's position: step, tokens seen, epoch), then a new
        window."""
        now = time.perf_counter()
        steps = int(self.finite_steps.item())  # 0 when every update of the window was skipped: NaN, not 0.0
        metrics = {
            "step": step,
            # Steps this record averages: log_interval, fewer in the first window after a resume from a checkpoint
            # between log points (a window never spans a resume), and skipped (non-finite) steps not counted.
            "window_steps": steps,
            "loss": self.loss_sum.item() / steps if steps else float("nan"),
            "lr": lr,
            "grad_norm": self.norm_sum.item() / steps if steps else float("nan"),
            "tokens_per_second": self.tokens / max(now - self.t0, 1e-9),
            "tokens_seen": tokens_seen,
            "epoch": epoch,
        }
        self.last_loss = metrics["loss"]
        self.loss_sum.zero_()
        self.norm_sum.zero_()
        self.finite_steps.zero_()
        self.steps, self.tokens, self.t0 = 0, 0, now
        return metrics
