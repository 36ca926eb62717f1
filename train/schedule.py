"""The recipe's schedules as functions of tokens trained (report section 4.2; docs/recipe.md).

Every value is read at `tokens`, the tokens trained by the end of the current step, as a fraction
p of the run's length:
  lr:        linear warmup 0 -> lr over [0, warmup]; lr until decay_start; cosine to decayed_lr
             at decay_end; decayed_lr until final_start; final_lr to the end.
  batch:     the global batch grows linearly from batch_ramp_start to global_batch_size
             sequences over [0, batch_ramp_end], in whole micro-batches (read before the step);
             pipelined, in micro-batch counts the pipeline schedule runs (DualPipe: even, >= 2PP).
  lambda:    mtp_weight before mtp_switch, mtp_weight_late after.
  gamma:     bias_update_speed before bias_freeze, 0 after.
"""
from __future__ import annotations

import math
from collections.abc import Iterator

from dsv3.parallel.mesh import Layout
from dsv3.parallel.schedules import micro_batch_counts, validate

from .config import Config, ScheduleConfig


class Schedule:
    def __init__(self, cfg: ScheduleConfig, total_tokens: int, seq_len: int, global_batch: int, batch_unit: int,
                 pipeline: tuple[str, int] | None = None):
        """batch_unit: sequences in one micro-batch across all data-parallel ranks. pipeline:
        (parallel.schedule, parallel.pp) of a pipelined run, whose schedule runs only some micro-batch
        counts per step (a multiple of 2 for DualPipe, a minimum for all)."""
        self.cfg = cfg
        self.total_tokens = total_tokens
        self.seq_len = seq_len
        self.global_batch = global_batch
        multiple, least = micro_batch_counts(*pipeline) if pipeline else (1, 1)
        self.batch_multiple = batch_unit * multiple  # the ramp's batches are multiples of this
        self.least_batch = math.ceil(least / multiple) * self.batch_multiple

    def progress(self, tokens: int) -> float:
        return tokens / self.total_tokens

    def lr(self, tokens: int) -> float:
        c, p = self.cfg, self.progress(tokens)
        if p < c.warmup:
            return c.lr * p / c.warmup
        if p < c.decay_start:
            return c.lr
        if p < c.decay_end:
            t = (p - c.decay_start) / (c.decay_end - c.decay_start)
            return c.decayed_lr + (c.lr - c.decayed_lr) * 0.5 * (1 + math.cos(math.pi * t))
        return c.decayed_lr if p < c.final_start else c.final_lr

    def mtp_weight(self, tokens: int) -> float:
        return self.cfg.mtp_weight if self.progress(tokens) < self.cfg.mtp_switch else self.cfg.mtp_weight_late

    def bias_update_speed(self, tokens: int) -> float:
        return self.cfg.bias_update_speed if self.progress(tokens) < self.cfg.bias_freeze else 0.0

    def batch_size(self, tokens_before: int) -> int:
        """Global batch (sequences) of the step that starts after `tokens_before` tokens."""
        start, end = self.cfg.batch_ramp_start, self.cfg.batch_ramp_end
        p = self.progress(tokens_before)
        if not start or p >= end:
            return self.global_batch
        size = start + (self.global_batch - start) * p / end
        return max(self.least_batch, int(size) // self.batch_multiple * self.batch_multiple)

    def ramp(self) -> Iterator[int]:
        """The global batch of each step of the batch ramp, in order; every later step runs global_batch."""
        tokens = 0
        ramp_tokens = self.cfg.batch_ramp_end * self.total_tokens if self.cfg.batch_ramp_start else 0
        while tokens < min(ramp_tokens, self.total_tokens):
            size = self.batch_size(tokens)
            yield size
            tokens += size * self.seq_len

    def batch_sizes(self) -> set[int]:
        """Every global batch a step of the run can have: the ramp's and the full one."""
        return {self.global_batch, *self.ramp()}


def steps_for(schedule: Schedule) -> int:
    """Optimizer steps the schedule's tokens take, batch ramp included."""
    ramp = list(schedule.ramp())
    tokens = sum(ramp) * schedule.seq_len
    full = schedule.global_batch * schedule.seq_len
    return len(ramp) + max(0, math.ceil((schedule.total_tokens - tokens) / full))


def plan(cfg: ScheduleConfig, steps: int, tokens: int, seq_len: int, global_batch: int, batch_unit: int,
         pipeline: tuple[str, int] | None = None) -> Schedule:
    """The schedule of a run given in tokens, or in steps (then its length in tokens is the one
    whose steps, batch ramp included, come to exactly `steps`)."""
    def schedule(total_tokens: int) -> Schedule:
        return Schedule(cfg, total_tokens, seq_len, global_batch, batch_unit, pipeline)

    if tokens:
        return schedule(tokens)
    full = global_batch * seq_len
    if not cfg.batch_ramp_start:
        return schedule(steps * full)
    low, high = steps * cfg.batch_ramp_start * seq_len // 2, steps * full  # bisection on the length
    while high - low > 1:
        middle = (low + high) // 2
        if steps_for(schedule(middle)) > steps:
            high = middle
        else:
            low = middle
    return schedule(low)


def run_schedule(cfg: Config, layout: Layout) -> Schedule:
    """The schedule of the run `cfg` on `layout`, after checking that every step's batch splits
    into micro-batches over the data-parallel ranks, in counts the pipeline schedule runs (each
    size of the ramp, not only the first and last: one sentence at start, never mid-run)."""
    tc = cfg.train
    batch_unit = tc.micro_batch_size * layout.data_parallel
    if tc.global_batch_size % batch_unit:
        raise ValueError(f"train.global_batch_size={tc.global_batch_size} is not a multiple of "
                         f"train.micro_batch_size={tc.micro_batch_size} x {layout.data_parallel} data-parallel ranks.")
    pipeline = (cfg.parallel.schedule, layout.pp) if layout.pp > 1 else None
    schedule = plan(tc.schedule, tc.steps, tc.tokens, cfg.data.seq_len, tc.global_batch_size, batch_unit, pipeline)
    if pipeline:
        for batch_size in sorted(schedule.batch_sizes(), reverse=True):  # the recipe's own batch first
            validate(*pipeline, batch_size // batch_unit)
    return schedule
