"""The recipe's schedules as functions of tokens trained (RECIPE.md section 6).

Every value is read at `tokens`, the tokens trained by the end of the current step, as a fraction
p of the run's length:
  lr:        linear warmup 0 -> lr over [0, warmup]; lr until decay_start; cosine to decayed_lr
             at decay_end; decayed_lr until final_start; final_lr to the end.
  batch:     the global batch grows linearly from batch_ramp_start to global_batch_size
             sequences over [0, batch_ramp_end], in whole micro-batches (read before the step).
  lambda:    mtp_weight before mtp_switch, mtp_weight_late after.
  gamma:     bias_update_speed before bias_freeze, 0 after.
"""
from __future__ import annotations

import math

from .config import ScheduleConfig


class Schedule:
    def __init__(self, cfg: ScheduleConfig, total_tokens: int, seq_len: int, global_batch: int, batch_unit: int):
        """batch_unit: sequences in one micro-batch across all data-parallel ranks."""
        self.cfg = cfg
        self.total_tokens = total_tokens
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.batch_unit = batch_unit

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
        return max(self.batch_unit, int(size) // self.batch_unit * self.batch_unit)


def steps_for(schedule: Schedule) -> int:
    """Optimizer steps the schedule's tokens take, batch ramp included."""
    steps, tokens = 0, 0
    ramp_tokens = schedule.cfg.batch_ramp_end * schedule.total_tokens if schedule.cfg.batch_ramp_start else 0
    while tokens < min(ramp_tokens, schedule.total_tokens):
        tokens += schedule.batch_size(tokens) * schedule.seq_len
        steps += 1
    full = schedule.global_batch * schedule.seq_len
    return steps + max(0, math.ceil((schedule.total_tokens - tokens) / full))


def plan(cfg: ScheduleConfig, steps: int, tokens: int, seq_len: int, global_batch: int, batch_unit: int) -> Schedule:
    """The schedule of a run given in tokens, or in steps (then its length in tokens is the one
    whose steps, batch ramp included, come to exactly `steps`)."""
    if tokens:
        return Schedule(cfg, tokens, seq_len, global_batch, batch_unit)
    full = global_batch * seq_len
    if not cfg.batch_ramp_start:
        return Schedule(cfg, steps * full, seq_len, global_batch, batch_unit)
    low, high = steps * cfg.batch_ramp_start * seq_len // 2, steps * full  # bisection on the length
    while high - low > 1:
        middle = (low + high) // 2
        if steps_for(Schedule(cfg, middle, seq_len, global_batch, batch_unit)) > steps:
            high = middle
        else:
            low = middle
    return Schedule(cfg, low, seq_len, global_batch, batch_unit)
