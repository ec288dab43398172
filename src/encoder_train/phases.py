"""The run's plan: its phases, and what each step of them reads and computes.

A run without `phases:` is one phase spanning training.max_steps with the top-level config. With phases, phase i
covers steps [start_i, start_i + steps_i) and its config is `Config.phase_config(i)`: the top level with the
phase's overrides. From (step) the plan answers everything that changes during a run:

    micro_rows(step)   rows per micro-batch (batch_size, or on its way there during a batch-size warmup)
    mask_rate(step)    the mask probability (constant, or linear from mask_probability to mask_probability_end)
    learning_rate(step) the learning rate (each phase has its own peak, warmup and decay): the one function the
                       scheduler, a resume and the records read (`lr_factor`: it over the top-level peak)
    batch(g)           micro-batch g's rows per source and mask rate (data/mixture.py reads this)

Every answer is a pure function of the config, the sources' sizes, the world size and, on resume, the progress the
checkpoint stored: a resumed run, any worker and any rank compute the same plan without talking to each other.

A phase given in `tokens` is turned into steps at the rows per step of the run that starts it. What the user asked
for is the tokens, so the plan that holds across resumes is kept in token slots: a checkpoint stores, for each
phase, the steps and the expected token slots done in it (`progress`). A run resumed with other rows per step
(another world size, batch_size or accumulation) keeps the phases already done as they ran, trains the remaining
slots of the phase in progress at its own rows per step, and turns later phases into steps at those rows. The
phase in progress then has another length in steps, and its schedules (learning rate, batch and mask warmups)
stretch or shrink to it from the resumed step on, as when a phase is lengthened (it still lasts through its
warmups). Resumed at the rows per step it began with (what `_rate` lists), a phase is exactly what the
uninterrupted plan makes it, so that an ordinary resume keeps every step.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from encoder_train.config import Config, TrainingConfig
from encoder_train.data.mixture import SINGLE, Source, draw_counts, mix_shares
from encoder_train.errors import UserError
from encoder_train.schedule import lr_factor

if TYPE_CHECKING:
    from torch.optim.lr_scheduler import LambdaLR

# Epochs of one source past which a plan is warned about: returns from repeated data fall to next to nothing
# around 16 epochs (Muennighoff et al. 2023, "Scaling Data-Constrained Language Models").
MANY_EPOCHS = 16


@dataclass(frozen=True)
class Phase:
    index: int
    name: str  # "" for a run without phases
    start: int  # the first step of the phase (0-based: the update that makes step start + 1)
    steps: int
    config: Config  # in force while the phase lasts; training.max_steps is the phase's length
    weights: tuple[float, ...]  # per source of the run (in Plan.sources' order), summing to 1; 0: not read

    @property
    def end(self) -> int:
        return self.start + self.steps


@dataclass(frozen=True)
class Done:
    """What a phase had done when a checkpoint was written: steps, and the token slots they read (expected, as
    a length in tokens counts them)."""

    steps: int = 0
    slots: float = 0.0
    length: int = 0  # its length in the plan then (0: not begun)
    rate: tuple = ()  # what its slots per step followed from then (Plan._rate)

    @property
    def complete(self) -> bool:
        """It had ended: it keeps the steps it ran."""
        return self.length > 0 and self.steps >= self.length


class Plan:
    def __init__(self, config: Config, sources: list[Source], world_size: int, progress: dict | None = None):
        """`progress`: a checkpoint's record (`Plan.progress`), when resuming: the lengths in tokens hold."""
        self.config, self.sources, self.world_size = config, sources, world_size
        self.names = [s.name for s in sources]
        self.seed = config.training.seed
        self.accumulation = config.training.gradient_accumulation_steps
        self.micro_per_step = self.accumulation * world_size  # global micro-batches per optimizer step
        self.phases: list[Phase] = []
        self._done: list[Done] = []  # per phase: what it had done at the checkpoint this run resumed from
        start = 0
        if not config.phases:
            self.phases.append(Phase(0, "", 0, config.training.max_steps, config, self._weights(config, "")))
            self._done.append(Done())
        saved = _saved_progress(progress)
        for i, p in enumerate(config.phases):
            where = f"phases[{i}] ({p.name})"
            cfg = config.phase_config(i)
            done = saved.get((i, p.name), Done()) if p.tokens else Done()
            warm = max(cfg.training.warmup_steps, cfg.training.batch_size_warmup_steps)
            steps = p.steps or self._steps_for_tokens(cfg, p.tokens, done, where)
            if done.steps:  # resumed with more rows per step, a phase still lasts through its warmups
                steps = max(steps, warm)
            cfg = config.phase_config(i, steps)
            if warm > steps:
                raise UserError(f"{where} lasts {steps} steps ({p.tokens:,} tokens) but warms up over {warm}; "
                                "shorten the warmup or lengthen the phase.")
            self.phases.append(Phase(i, p.name, start, steps, cfg, self._weights(cfg, where)))
            self._done.append(done)
            start += steps
        self._starts = [p.start for p in self.phases]
        self.total_steps = self.phases[-1].end
        if config.phases and "max_steps" in config.training.model_fields_set \
                and config.training.max_steps != self.total_steps:
            raise UserError(f"training.max_steps ({config.training.max_steps}) disagrees with the phases, which "
                            f"last {self.total_steps} steps; remove training.max_steps or make them agree.")
        for phase in self.phases:
            self._check_masking(phase)

    # ---- the phases ----

    def phase_at(self, step: int) -> Phase:
        """The phase that makes the update of 0-based `step` (the last phase past the end)."""
        return self.phases[max(0, bisect.bisect_right(self._starts, step) - 1)]

    def phase_ends(self) -> set[int]:
        """Steps after which a phase is complete (its checkpoint is kept): every phase's end, with phases."""
        return {p.end for p in self.phases} if self.config.phases else set()

    # ---- what a step computes ----

    def micro_rows(self, step: int) -> int:
        phase = self.phase_at(step)
        t, cfg = step - phase.start, phase.config.training
        return _warmup_rows(cfg, t) if t < cfg.batch_size_warmup_steps else cfg.batch_size

    def mask_rate(self, step: int) -> float:
        phase = self.phase_at(step)
        data = phase.config.data
        if data.mask_probability_end is None:
            return data.mask_probability
        progress = min(1.0, (step - phase.start) / phase.steps)
        return data.mask_probability + (data.mask_probability_end - data.mask_probability) * progress

    def learning_rate(self, step: int) -> float:
        """The learning rate of 0-based `step`'s update, resumed or not: the phase's schedule at the phase's own step
        times its peak. The scheduler (LambdaLR: the optimizer's initial rate, the top-level peak, x `lr_factor`),
        `resume_rate` and the records all come to this number."""
        return self.config.training.learning_rate * self.lr_factor(step)

    def lr_factor(self, step: int) -> float:
        """`learning_rate(step)` over the top-level training.learning_rate: what LambdaLR multiplies the optimizer's
        initial rates by."""
        phase = self.phase_at(step)
        cfg = phase.config.training
        scale = cfg.learning_rate / self.config.training.learning_rate
        return scale * lr_factor(step - phase.start, cfg)

    def resume_rate(self, scheduler: LambdaLR, step: int) -> None:
        """Put the plan's rate for `step`'s update in force in a scheduler and optimizer restored from a checkpoint,
        whose peak and rate are the checkpoint's: the config's peak becomes the base of every later step, and the
        next update's rate is `learning_rate(step)` now (LambdaLR would apply a changed schedule one step late)."""
        peak, rate = self.config.training.learning_rate, self.learning_rate(step)
        groups = scheduler.optimizer.param_groups
        for group in groups:
            group["initial_lr"], group["lr"] = peak, rate
        scheduler.base_lrs = [peak] * len(groups)
        scheduler._last_lr = [rate] * len(groups)

    def batch(self, g: int) -> tuple[list[int], float]:
        """Global micro-batch g's rows per source and mask rate (data/mixture.py's MixSchedule)."""
        step = g // self.micro_per_step
        phase = self.phase_at(step)
        return draw_counts(phase.weights, self.micro_rows(step), self.seed, g), self.mask_rate(step)

    # ---- sizes ----

    def rows_per_step(self, step: int) -> int:
        return self.micro_rows(step) * self.micro_per_step

    def phase_rows(self, phase: Phase) -> int:
        """Rows the phase reads over all ranks."""
        cfg = phase.config.training
        warm = min(cfg.batch_size_warmup_steps, phase.steps)
        return sum(self.rows_per_step(phase.start + t) for t in range(warm)) + \
            (phase.steps - warm) * cfg.batch_size * self.micro_per_step

    def _steps_for_tokens(self, cfg: Config, tokens: int, done: Done, where: str) -> int:
        """Steps to read `tokens` token slots, batch warmup included, of which `done` (a resumed phase's) were read:
        a row counts its source's row width, so a step's expected slots are its rows times the mean width under the
        phase's weights. A phase whose slots are all read ends where it stands."""
        if done.complete:
            return done.steps
        if done.steps and done.rate == self._rate(cfg):  # the rows per step it began with: the uninterrupted plan
            # (the slots summed anew from a saved count could round off by a step)
            return max(done.steps, self._steps_for_tokens(cfg, tokens, Done(), where))
        if done.slots >= tokens:  # shortened to less than it has read: it ends here
            return max(1, done.steps)
        width = self._width(self._weights(cfg, where))
        t, slots = cfg.training, done.slots
        for step in range(done.steps, t.batch_size_warmup_steps):
            slots += _warmup_rows(t, step) * self.micro_per_step * width
            if slots >= tokens:
                return step + 1
        per_step = t.batch_size * self.micro_per_step * width
        return max(done.steps, t.batch_size_warmup_steps) + math.ceil((tokens - slots) / per_step)

    def _rate(self, cfg: Config) -> tuple:
        """What a phase's expected slots per step follow from: micro-batches per step, a row's expected slots, and
        the rows per micro-batch (batch_size, and its warmup's start and steps)."""
        t = cfg.training
        return (self.micro_per_step, self._width(self._weights(cfg, "")), t.batch_size, t.batch_size_start,
                t.batch_size_warmup_steps)

    def _width(self, weights: tuple[float, ...]) -> float:
        """A row's expected token slots under `weights`: the mean of the sources' row widths."""
        return sum(s.width * w for s, w in zip(self.sources, weights, strict=True))

    # ---- what a checkpoint stores ----

    def progress(self, step: int) -> dict:
        """Each phase's steps and expected token slots done by 0-based `step` (the steps taken): what a resumed run
        needs to keep the phases' lengths in tokens (see the module). Also what one step reads, for the resume's
        message. Builtins only (a weights_only checkpoint holds it)."""
        phases = []
        for p, before in zip(self.phases, self._done, strict=True):
            steps = min(max(step - p.start, 0), p.steps)
            phases.append({"name": p.name, "steps": steps, "length": p.steps, "slots": self._slots(p, before, steps),
                           "rate": list(self._rate(p.config))})
        return {"phases": phases, "step_reads": self.step_reads(step)}

    def resized(self, progress: dict | None) -> str | None:
        """Say which phases given in tokens last another number of steps than in the plan of the checkpoint that
        `progress` comes from (resumed with other rows per step), or None."""
        saved = {(i, p["name"]): int(p["length"]) for i, p in enumerate((progress or {}).get("phases", []))}
        resized = [f"phase {p.name} now lasts {p.steps:,} steps (planned: {saved[p.index, p.name]:,})"
                   for p in self.phases if p.name and self.config.phases[p.index].tokens
                   and saved.get((p.index, p.name), p.steps) != p.steps]
        if not resized:
            return None
        return (f"phases given in tokens read their tokens at this run's rows per step: {', '.join(resized)}; the "
                f"run now lasts {self.total_steps:,} steps.")

    def _slots(self, phase: Phase, before: Done, steps: int) -> float:
        """Expected token slots of the phase's first `steps` steps, those before a resume as they were counted."""
        if steps <= before.steps:
            return before.slots if steps == before.steps else 0.0
        width, t = self._width(phase.weights), phase.config.training
        warm = min(t.batch_size_warmup_steps, steps)
        slots = before.slots + sum(_warmup_rows(t, k) * self.micro_per_step * width for k in range(before.steps, warm))
        return slots + (steps - max(before.steps, warm)) * t.batch_size * self.micro_per_step * width

    def step_reads(self, step: int) -> str:
        """What the update of 0-based `step` reads over all ranks, in words: rows, or token slots for token-budget
        batches."""
        budget = self.phase_at(step).config.data.batch_tokens
        if budget is not None:
            return f"{budget * self.micro_per_step:,} token slots"
        return f"{self.rows_per_step(step):,} rows"

    def _weights(self, cfg: Config, where: str) -> tuple[float, ...]:
        """The phase's weight of every source of the run, normalised; sources the phase does not read get 0."""
        data = cfg.data
        if data.sources is None:
            return (1.0,)
        shares = mix_shares(data, self.sources, where or "data.sources")
        return tuple(shares.get(n, 0.0) for n in self.names)

    def _check_masking(self, phase: Phase) -> None:
        """Refuse a phase whose micro-batches are expected to select fewer than one token for prediction: most
        would predict nothing and the run would train at loss 0. Counted generously (every row full, all but <s>
        and </s> selectable), at the phase's smallest micro-batch and lowest mask rate (its start or its end)."""
        data = phase.config.data
        selectable = data.batch_tokens or sum(w * max(s.width - 2, 0) for s, w in zip(self.sources, phase.weights,
                                                                                    strict=True))
        if not selectable:  # rows of <s></s> alone: the shards' own check names the file
            return
        for step in (phase.start, phase.end - 1):
            rows = 1 if data.batch_tokens else self.micro_rows(step)
            expected = self.mask_rate(step) * rows * selectable
            if expected < 1:
                key = "mask_probability_end" if step != phase.start and data.mask_probability_end else \
                    "mask_probability"
                size = f"{data.batch_tokens} tokens" if data.batch_tokens else \
                    f"{rows} row{'s' * (rows != 1)} of up to {selectable + 2:.0f} tokens"
                where = f"phases[{phase.index}] ({phase.name})" if phase.name else "the config"
                raise UserError(f"{where}: data.{key} {getattr(data, key):g} selects about {expected:.2g} tokens "
                                f"per micro-batch ({size}), fewer than 1, so most steps would predict nothing and "
                                f"train at loss 0; raise data.{key} (0.15 is RoBERTa's) or the batch.")

    def rows_read(self) -> list[float]:
        """The rows the run is expected to read of each source (in the sources' order), over all ranks."""
        read = [0.0] * len(self.sources)
        for p in self.phases:
            rows = self.phase_rows(p)
            for i, w in enumerate(p.weights):
                read[i] += rows * w
        return read

    def warnings(self, max_tokens: int) -> list[str]:
        """What in the plan runs but makes no sense, one sentence each: a source read over and over, and rows far
        shorter than the `max_tokens` a row of the model may have."""
        lines = []
        for s, rows in zip(self.sources, self.rows_read(), strict=True):
            if rows > MANY_EPOCHS * s.rows:
                key, fix = ("data.data_dir", "add data or shorten the run") if s.name == SINGLE else \
                    (f"source {s.name}", "add data, shorten the run or lower the source's weight")
                lines.append(f"{key} is read about {rows / s.rows:,.0f} times over ({rows:,.0f} rows of its "
                             f"{s.rows:,}), and past ~{MANY_EPOCHS} epochs repeated rows add next to nothing "
                             f"(Muennighoff et al. 2023); {fix}.")
        short = self._short_rows(max_tokens)
        if short:
            widest, phases = short
            who = ("the run reads" if not self.config.phases else f"phase {phases[0].name} reads" if len(phases) == 1
                   else f"phases {', '.join(p.name for p in phases)} read")
            later = ", and no later phase reads longer ones" if self.config.phases else ""
            lines.append(f"{who} rows of at most {widest} tokens, under a quarter of the {max_tokens:,} a row of this "
                         f"model may have (model.max_position_embeddings){later}: the model never trains on longer "
                         "rows; feed it longer rows (pretokenize --seq_len) or lower model.max_position_embeddings.")
        return lines

    def _short_rows(self, max_tokens: int) -> tuple[int, list[Phase]] | None:
        """The widest row and the phases from the first that, with every phase after it, reads only rows under a
        quarter of `max_tokens` (a short-context stage before a longer one is a curriculum, not a mistake)."""
        tail: list[Phase] = []
        widest = 0
        for p in reversed(self.phases):
            width = max(s.width for s, w in zip(self.sources, p.weights, strict=True) if w)
            if 4 * width >= max_tokens:
                break
            tail.insert(0, p)
            widest = max(widest, width)
        return (widest, tail) if tail else None

    def describe(self) -> list[str]:
        """The plan in lines: each phase's steps, tokens, mix and schedule; each source's size and epochs read."""
        lines, read = [], self.rows_read()
        for p in self.phases:
            rows = self.phase_rows(p)
            slots = sum(rows * w * s.width for w, s in zip(p.weights, self.sources, strict=True))
            t, d = p.config.training, p.config.data
            mix = ", ".join(f"{n} {100 * w:.1f}%" for n, w in zip(self.names, p.weights, strict=True) if w) \
                if len(self.sources) > 1 or self.names != [SINGLE] else "one source"
            lr = [self.learning_rate(p.start),
                  max(self.learning_rate(s) for s in (p.start, p.start + t.warmup_steps - 1 if t.warmup_steps else
                                                      p.start, p.end - 1)),
                  self.learning_rate(p.end - 1)]
            mask = f"{d.mask_probability:g}" + (f" -> {d.mask_probability_end:g}" if d.mask_probability_end else "")
            batch = (f"{t.batch_size_start} -> {t.batch_size} rows over {t.batch_size_warmup_steps} steps"
                     if t.batch_size_warmup_steps else f"{t.batch_size} rows") + \
                f" per micro-batch ({self.rows_per_step(p.end - 1):,} rows per step)"
            schedule = t.schedule + (f", warmup {t.warmup_steps}" if t.warmup_steps else "") + \
                (f", decay {t.decay_shape}" if t.schedule == "wsd" else "")
            lines.append(f"phase {p.name or 'the run'}: steps {p.start + 1}-{p.end} ({p.steps:,}), about "
                         f"{slots:,.0f} token slots; mix {mix}; {batch}; mask rate {mask}; lr {lr[0]:.2e} -> peak "
                         f"{lr[1]:.2e} -> {lr[2]:.2e} ({schedule})")
        for s, rows in zip(self.sources, read, strict=True):
            lines.append(f"source {s.name}: {len(s.shards)} shards, {s.rows:,} rows of up to {s.width} tokens "
                         f"({s.token_slots:,} token slots); the run reads about {rows:,.0f} rows = "
                         f"{rows / s.rows:.2f} epochs")
        return lines


def _warmup_rows(training: TrainingConfig, t: int) -> int:
    """Rows per micro-batch at step t of a batch-size warmup: linear from batch_size_start, whole rows."""
    return max(1, training.batch_size_start + (training.batch_size - training.batch_size_start) * t
               // training.batch_size_warmup_steps)


def _saved_progress(progress: dict | None) -> dict[tuple[int, str], Done]:
    """A checkpoint's record by (phase index, name): a phase renamed or moved since counts as not begun."""
    if not progress:  # a fresh run, or a checkpoint written before plans were stored
        return {}
    try:
        return {(i, p["name"]): Done(int(p["steps"]), float(p["slots"]), int(p["length"]), tuple(p["rate"]))
                for i, p in enumerate(progress["phases"])}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"the checkpoint to resume from holds a mangled plan ({type(e).__name__}: {e}), so the "
                        "phases' progress is unknown; resume from an earlier checkpoint.") from None
