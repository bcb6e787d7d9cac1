"""One line early in a fit: how long it will take on this machine, from steps just timed.

`RunEstimate` times a few steps after the first (which carries the warm-up: allocation, the
loader's first batch, lazy initialisation) with a monotonic clock and prints, on rank zero,

    estimate: 625 steps at 2.13 s/step (timed over steps 2-6) -> training about 22 min (ends ~19:32 UTC);
    then sampling 2,000 images (50 ddim_stochastic steps each) and evaluation

It only reads clocks and the trainer's step counts: no forward pass, no random draw, nothing
that the privacy core or the checkpoints see. Sampling and evaluation are named, not timed
(timing them would take extra sampling). What the timed steps do not show, e.g. a checkpoint
every `checkpoint_every_n_steps` or epsilon recomputed on logging steps, is left out.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from tqdm import tqdm

TIMED_STEPS = 5  # steps 2..6 of a fit


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


def after_training(cfg: Any) -> str:
    """What `dp-diffusion train` does after the fit (`sample_and_evaluate`), in words."""
    wanted = max(cfg.sample.num_samples, cfg.eval.num_samples if cfg.eval.enabled else 0)
    if wanted == 0:
        return "then no sampling"
    sampling = f"then sampling {wanted:,} images ({cfg.sample.num_steps} {cfg.sample.sampler} steps each)"
    return sampling + (" and evaluation" if cfg.eval.enabled else "")


def format_duration(seconds: float) -> str:
    """`45 s`, `22 min`, `3.2 h`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def last_step(trainer: L.Trainer, module: L.LightningModule) -> int | None:
    """The global step the fit ends at: `max_steps`, or earlier where the privacy budget guard allows fewer
    logical steps (`allowed_steps` of a private module, which counts the same steps). None: unbounded."""
    end = trainer.max_steps if trainer.max_steps > 0 else None
    allowed = getattr(module, "allowed_steps", None)
    if isinstance(allowed, int) and end is not None:
        end = min(end, allowed)
    return end


class RunEstimate(Callback):
    """Prints one line, after step `timed + 1` of a fit, estimating the fit's wall time (see module docstring).

    `stage` names a public stage (`public_warm_start`, `dp_teacher`, ...); `then` says what follows the fit.
    The fit's steps are those between the global step it starts at (> 0 when resumed) and its last step;
    a fit of 2 steps or fewer prints nothing. `clock` (seconds, monotonic) and `now` (aware UTC datetime)
    are injectable for tests.
    """

    def __init__(self, stage: str | None = None, then: str | None = None, timed: int = TIMED_STEPS,
                 clock: Callable[[], float] = time.perf_counter, now: Callable[[], datetime] = utc_now) -> None:
        if timed < 1:
            raise ValueError(f"timed must be >= 1, got {timed}")
        self.stage = stage
        self.then = then
        self.timed = timed
        self.clock = clock
        self.now = now
        self.first_step = 0
        self.started = 0.0
        self.mark: tuple[int, float] | None = None  # (global step, clock) at the end of the fit's first step
        self.done = True
        self.line: str | None = None  # the line printed, if any

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.first_step = trainer.global_step
        self.started = self.clock()
        self.mark = None
        self.done = False
        self.line = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.done:
            return
        step = trainer.global_step
        end = last_step(trainer, pl_module)
        if end is None or end - self.first_step <= 2:
            self.done = True
            return
        if self.mark is None:
            if step > self.first_step:  # the first step (with the warm-up) has ended: time from here
                self.mark = (step, self.clock())
            return
        window = min(self.timed, end - self.first_step - 2)  # at least one step left after the line
        if step - self.mark[0] < window:
            return
        self.done = True
        now = self.clock()
        per_step = (now - self.mark[1]) / (step - self.mark[0])
        left = max(end - step, 0) * per_step
        self.line = self.describe(trainer, end, per_step, step, total=now - self.started + left,
                                  ends=self.now() + timedelta(seconds=left))
        if trainer.is_global_zero:
            show(self.line)

    def describe(self, trainer: L.Trainer, end: int, per_step: float, step: int, total: float,
                 ends: datetime) -> str:
        """The estimate line for a fit ending at global step `end`, timed up to global step `step`."""
        steps = end - self.first_step
        what = f"{steps:,} steps" if self.first_step == 0 else \
            f"{steps:,} remaining steps (resumed at step {self.first_step:,})"
        if 0 < trainer.max_steps != end:
            what += f" (the privacy budget allows {end:,} of {trainer.max_steps:,})"
        clock = ends.strftime("%H:%M" if ends.date() == self.now().date() else "%a %H:%M")
        line = (f"estimate{f' ({self.stage})' if self.stage else ''}: {what} at {per_step:.3g} s/step "
                f"(timed over steps {self.mark[0] + 1}-{step}) -> "
                f"training about {format_duration(total)} "
                f"(ends ~{clock} UTC)")
        return f"{line}; {self.then}" if self.then else line


def show(line: str) -> None:
    """Print `line` to stdout; tqdm clears its bars (Lightning's progress bar) first and redraws them below."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()
