"""Pipeline schedules: which rank runs what, in which order (report section 3.2.1; docs/recipe.md).

A schedule is a list of actions per pipeline rank. Actions name a *virtual stage* (a slice of the
model placed on one rank) and a micro-batch:
  F   forward of a micro-batch through a stage
  B   full backward (input and weight gradients)
  I   input-gradient backward only; its weight gradients wait in a FIFO
  W   the weight gradients of the oldest waiting I (zero-bubble deferral)
  FB  the forward of one micro-batch overlapped with the backward of another (DualPipe's F&B)

Placements (`Placement`):
  1f1b       PP stages, stage r on rank r.
  zbv        2PP stages in a V: rank r holds stages r and 2PP-1-r (so rank 0 holds the first and
             the last, and the MTP module shares the embedding physically).
  dualpipev  the same V placement ("cut-in-half" DualPipe).
  dualpipe   two chains of PP stages: rank r holds model stage r of chain 0 and model stage
             PP-1-r of chain 1. The first half of the micro-batches enter at rank 0 and flow
             down chain 0, the second half enter at rank PP-1 and flow up chain 1; every model
             stage exists on two ranks, whose gradients are summed.
A schedule is one entry of `SHAPES`: virtual stages per rank, chains, and the builder of each
rank's order.

`python -m dsv3.parallel.schedules --schedule dualpipe --pp 4 --micro-batches 10` prints one.
"""
from __future__ import annotations

import argparse
from collections import deque
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Action:
    kind: str  # F, B, I, W or FB
    stage: int  # virtual stage (for FB: of the forward)
    mb: int  # micro-batch (for FB: of the forward)
    b_stage: int = -1  # FB only: the backward's stage and micro-batch
    b_mb: int = -1
    phase: int = 0  # DualPipe(V): which of the 8 phases of DualPipe's dualpipe.py emitted it

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"F{self.mb}.{self.stage}+B{self.b_mb}.{self.b_stage}"
        return f"{self.kind}{self.mb}.{self.stage}"

    @property
    def forward(self) -> "Action":
        return Action("F", self.stage, self.mb)

    @property
    def backward(self) -> "Action":
        return Action("B", self.b_stage, self.b_mb)


@dataclass(frozen=True)
class Placement:
    """Where the virtual stages of a schedule live, and which model stage each one runs: stage s
    sits on rank s for s < pp and on rank 2pp-1-s beyond (a V), and each chain of stages runs
    through every model stage once (its `Shape` in SHAPES)."""
    schedule: str
    pp: int

    @property
    def shape(self) -> Shape:
        return SHAPES[self.schedule]

    @property
    def n_stages(self) -> int:
        """Virtual stages."""
        return self.shape.stages_per_rank * self.pp

    @property
    def n_model_stages(self) -> int:
        """Distinct slices of the model, which is also the length of a chain (DualPipe runs each
        slice twice, once per chain)."""
        return self.n_stages // self.shape.chains

    def rank(self, stage: int) -> int:
        return stage if stage < self.pp else 2 * self.pp - 1 - stage

    def model_stage(self, stage: int) -> int:
        return stage % self.n_model_stages

    def is_first(self, stage: int) -> bool:
        return self.model_stage(stage) == 0

    def is_last(self, stage: int) -> bool:
        return self.model_stage(stage) == self.n_model_stages - 1

    def next(self, stage: int) -> int | None:
        return None if self.is_last(stage) else stage + 1

    def prev(self, stage: int) -> int | None:
        return None if self.is_first(stage) else stage - 1

    def stages_of(self, rank: int) -> list[int]:
        return [s for s in range(self.n_stages) if self.rank(s) == rank]

    def entry_stage(self, mb: int, n_microbatches: int) -> int:
        """The first virtual stage of micro-batch mb: each chain takes an equal share, in order
        (DualPipe: the second half enters chain 1)."""
        return mb * self.shape.chains // n_microbatches * self.n_model_stages


def micro_batch_counts(schedule: str, pp: int) -> tuple[int, int]:
    """(multiple, least): a step of `schedule` over pp ranks runs a multiple of `multiple` micro-batches
    (one share per chain), and at least `least`, one per virtual stage (enough to fill the pipeline)."""
    shape = SHAPES[schedule]
    return shape.chains, shape.stages_per_rank * pp


def validate(schedule: str, pp: int, n_microbatches: int) -> None:
    """One sentence on why a schedule cannot run, or nothing."""
    if schedule not in SCHEDULES:
        raise ValueError(f"parallel.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}.")
    if pp < 2:
        raise ValueError(f"parallel.schedule={schedule} needs parallel.pp >= 2, got {pp}.")
    if SHAPES[schedule].chains > 1 and pp % 2:  # the two chains enter at opposite ends, meeting half-way
        raise ValueError(f"parallel.schedule={schedule} needs an even parallel.pp, got {pp}.")
    multiple, least = micro_batch_counts(schedule, pp)
    if n_microbatches % multiple:  # DualPipe's two halves
        raise ValueError(f"parallel.schedule={schedule} needs an even number of micro-batches per step, got "
                         f"{n_microbatches} (train.global_batch_size / (train.micro_batch_size x data ranks)).")
    if n_microbatches < least:
        raise ValueError(f"parallel.schedule={schedule} with parallel.pp={pp} needs at least {least} micro-batches "
                         f"per step, got {n_microbatches} (train.global_batch_size / (train.micro_batch_size x "
                         f"data ranks)).")


def build(schedule: str, pp: int, n_microbatches: int) -> dict[int, list[Action]]:
    """The actions of every rank."""
    validate(schedule, pp, n_microbatches)
    order = SHAPES[schedule].order
    return {rank: order(rank, pp, n_microbatches) for rank in range(pp)}


def forward_only(placement: Placement, n_microbatches: int) -> dict[int, list[Action]]:
    """Evaluation: every micro-batch forward through its chain, stages in order on each rank."""
    orders = {rank: [] for rank in range(placement.pp)}
    for mb in range(n_microbatches):
        stage = placement.entry_stage(mb, n_microbatches)
        while stage is not None:
            orders[placement.rank(stage)].append(Action("F", stage, mb))
            stage = placement.next(stage)
    return orders


# --- the schedules ---------------------------------------------------------------------------------

def _one_f_one_b(rank: int, pp: int, n: int) -> list[Action]:
    warmup = min(pp - 1 - rank, n)
    actions = [Action("F", rank, mb) for mb in range(warmup)]
    for i in range(n - warmup):  # steady state: one forward, one backward
        actions += [Action("F", rank, warmup + i), Action("B", rank, i)]
    actions += [Action("B", rank, mb) for mb in range(n - warmup, n)]
    return actions


def _zbv(rank: int, pp: int, n: int) -> list[Action]:
    """ZB-V (Qi et al. 2024, section 6) as torch.distributed.pipelining orders it: chunk 0 is
    stage `rank`, chunk 1 stage 2PP-1-rank; I and W are split and W fills the bubbles."""
    chunk = (rank, 2 * pp - 1 - rank)
    count = {(kind, c): 0 for kind in "FIW" for c in (0, 1)}
    actions: list[Action] = []

    def add(kind: str, c: int) -> None:
        actions.append(Action(kind, chunk[c], count[kind, c]))
        count[kind, c] += 1

    n_padded = max(2 * pp - 1, n)
    for _ in range(2 * (pp - rank) - 1):
        add("F", 0)
    for _ in range(rank):
        add("F", 1)
        add("F", 0)
    for _ in range(pp - rank):
        add("F", 1)
        add("I", 1)
        add("W", 1)
    while count["F", 1] < count["F", 0] or count["F", 0] < n_padded:
        if count["F", 0] < n_padded:
            add("F", 0)
        add("I", 0)
        add("W", 0)
        add("F", 1)
        add("I", 1)
        add("W", 1)
    for _ in range(rank):
        add("I", 0)
        add("I", 1)
    for _ in range(pp - rank):
        add("I", 0)
        add("W", 0)
    while count["W", 1] < count["I", 1]:
        add("W", 1)
    while count["W", 0] < count["I", 0]:
        add("W", 0)
    return [a for a in actions if a.mb < n]


class _DualPipeOrder:
    """Builds one rank's DualPipe or DualPipeV order from its two chunks, following the eight
    phases of deepseek-ai/DualPipe's dualpipe/dualpipe.py."""

    def __init__(self, chunk_stages: tuple[int, int], mb_offsets: tuple[int, int]):
        self.stages, self.offsets = chunk_stages, mb_offsets
        self.forwards, self.backwards = [0, 0], [0, 0]
        self.deferred: deque[tuple[int, int]] = deque()  # (stage, mb) of I actions awaiting W
        self.actions: list[Action] = []
        self.phase = 0

    def _next_forward(self, c: int) -> tuple[int, int]:
        mb = self.offsets[c] + self.forwards[c]
        self.forwards[c] += 1
        return self.stages[c], mb

    def _next_backward(self, c: int) -> tuple[int, int]:
        mb = self.offsets[c] + self.backwards[c]
        self.backwards[c] += 1
        return self.stages[c], mb

    def forward(self, c: int) -> None:
        self.actions.append(Action("F", *self._next_forward(c), phase=self.phase))

    def backward(self, c: int, defer_weights: bool = False) -> None:
        stage, mb = self._next_backward(c)
        if defer_weights:
            self.deferred.append((stage, mb))
        self.actions.append(Action("I" if defer_weights else "B", stage, mb, phase=self.phase))

    def weights(self) -> None:
        stage, mb = self.deferred.popleft()
        self.actions.append(Action("W", stage, mb, phase=self.phase))

    def forward_backward(self, f: int, b: int) -> None:
        f_stage, f_mb = self._next_forward(f)
        b_stage, b_mb = self._next_backward(b)
        self.actions.append(Action("FB", f_stage, f_mb, b_stage, b_mb, phase=self.phase))

    def build(self, h: int, half_pp: int, half_n: int, middle: bool) -> list[Action]:
        """h: distance of this rank from the nearer end; half_pp: ranks per half of the pipe;
        half_n: micro-batches per chunk."""
        self.phase = 1
        for _ in range((half_pp - h - 1) * 2):
            self.forward(0)
        self.phase = 2
        for _ in range(h + 1):
            self.forward(0)
            self.forward(1)
        self.phase = 3
        for _ in range(half_pp - h - 1):
            self.backward(1, defer_weights=True)
            self.weights()
            self.forward(1)
        self.phase = 4
        for i in range(half_n - 2 * half_pp + h + 1):
            if i == 0 and middle:  # not overlapped, to shave the bubble
                self.forward(0)
                self.backward(1)
            else:
                self.forward_backward(0, 1)
            self.forward_backward(1, 0)
        self.phase = 5
        for _ in range(half_pp - h - 1):
            self.backward(1)
            self.forward_backward(1, 0)
        self.phase = 6
        defer = False
        for i in range(h + 1):  # weight deferral switches on half-way through
            if i == (h + 1) // 2 and h % 2 == 1:
                defer = True
            self.backward(1, defer)
            if i == (h + 1) // 2 and h % 2 == 0:
                defer = True
            self.backward(0, defer)
        self.phase = 7
        for _ in range(half_pp - h - 1):
            self.weights()
            self.backward(0, defer_weights=True)
        self.phase = 8
        for _ in range(h + 1):
            self.weights()
        assert not self.deferred and self.forwards == self.backwards == [half_n, half_n]
        return self.actions


def _dualpipe_v(rank: int, pp: int, n: int) -> list[Action]:
    """Chunk 0 is stage `rank` of the V, chunk 1 stage 2PP-1-rank; every micro-batch goes
    through both. In DualPipe's terms this pipe has 2PP ranks, of which this is rank `rank`."""
    order = _DualPipeOrder((rank, 2 * pp - 1 - rank), (0, 0))
    return order.build(h=rank, half_pp=pp, half_n=n, middle=rank == pp - 1)


def _dualpipe(rank: int, pp: int, n: int) -> list[Action]:
    """Chunk 0 is the chunk at distance h = min(rank, PP-1-rank) from its chain's entry: chain
    0's stage on the first half of the ranks, chain 1's on the second half; chunk 1 the other."""
    second_half = rank >= pp // 2
    h = min(rank, pp - 1 - rank)
    chain0_stage, chain1_stage = rank, pp + (pp - 1 - rank)
    chain0_mbs, chain1_mbs = 0, n // 2
    if second_half:
        stages, offsets = (chain1_stage, chain0_stage), (chain1_mbs, chain0_mbs)
    else:
        stages, offsets = (chain0_stage, chain1_stage), (chain0_mbs, chain1_mbs)
    order = _DualPipeOrder(stages, offsets)
    return order.build(h=h, half_pp=pp // 2, half_n=n // 2, middle=h == pp // 2 - 1)


@dataclass(frozen=True)
class Shape:
    """What a schedule is: how many virtual stages each rank holds, how many chains run through
    the model, and the order of each rank's actions."""
    stages_per_rank: int  # 1: one stage per rank; 2: a V, or DualPipe's two chains
    chains: int  # 2: DualPipe, half the micro-batches per chain, every model stage on two ranks
    order: Callable[[int, int, int], list[Action]]  # (rank, pp, micro-batches) -> that rank's actions


SHAPES = {
    "1f1b": Shape(1, 1, _one_f_one_b),
    "zbv": Shape(2, 1, _zbv),
    "dualpipev": Shape(2, 1, _dualpipe_v),
    "dualpipe": Shape(2, 2, _dualpipe),
}
SCHEDULES = tuple(SHAPES)


# --- simulation and printing ---------------------------------------------------------------------

@dataclass
class Costs:
    """Durations in arbitrary units; F&B is an overlapped pair (F + B when nothing hides)."""
    F: float = 1.0
    B: float = 2.0
    W: float = 1.0
    FB: float | None = None

    def of(self, action: Action) -> float:
        if action.kind == "FB":
            return self.FB if self.FB is not None else self.F + self.B
        return {"F": self.F, "B": self.B, "I": self.B - self.W, "W": self.W}[action.kind]


@dataclass
class Timeline:
    start: dict[int, list[float]] = field(default_factory=dict)  # per rank, per action
    end: dict[int, list[float]] = field(default_factory=dict)
    makespan: float = 0.0

    def bubble(self, rank: int, costs: Costs, orders: dict[int, list[Action]]) -> float:
        """Time the rank waits between its first and last action."""
        busy = sum(costs.of(a) for a in orders[rank])
        return self.end[rank][-1] - self.start[rank][0] - busy


def simulate(placement: Placement, orders: dict[int, list[Action]], costs: Costs = Costs()) -> Timeline:
    """Runs the orders on an ideal machine (free communication): an action starts when its rank is
    free and its inputs exist. Raises if the orders deadlock or miss a step."""
    done: dict[tuple[str, int, int], float] = {}  # ("F" | "B", stage, mb) -> finish time

    def ready(action: Action) -> float | None:
        need = []
        parts = [action.forward, action.backward] if action.kind == "FB" else [action]
        for a in parts:
            if a.kind == "F":
                prev = placement.prev(a.stage)
                if prev is not None:
                    need.append(("F", prev, a.mb))
            elif a.kind in ("B", "I"):
                nxt = placement.next(a.stage)
                need.append(("B", nxt, a.mb) if nxt is not None else ("F", a.stage, a.mb))
        if any(key not in done for key in need):
            return None
        return max((done[key] for key in need), default=0.0)

    position = {rank: 0 for rank in orders}
    clock = {rank: 0.0 for rank in orders}
    timeline = Timeline({r: [] for r in orders}, {r: [] for r in orders})
    while any(position[r] < len(orders[r]) for r in orders):
        progressed = False
        for rank in orders:
            while position[rank] < len(orders[rank]):
                action = orders[rank][position[rank]]
                inputs_at = ready(action)
                if inputs_at is None:
                    break
                start = max(clock[rank], inputs_at)
                clock[rank] = start + costs.of(action)
                timeline.start[rank].append(start)
                timeline.end[rank].append(clock[rank])
                for a in ([action.forward, action.backward] if action.kind == "FB" else [action]):
                    if a.kind in ("F", "B", "I"):
                        done[("F" if a.kind == "F" else "B", a.stage, a.mb)] = clock[rank]
                position[rank] += 1
                progressed = True
        if not progressed:
            stuck = {r: str(orders[r][position[r]]) for r in orders if position[r] < len(orders[r])}
            raise RuntimeError(f"the schedule deadlocks; each rank waits at {stuck}")
    timeline.makespan = max(clock.values())
    return timeline


def describe(schedule: str, pp: int, n_microbatches: int, costs: Costs = Costs()) -> str:
    """A readable printout: each rank's actions by phase, and a timeline on the ideal machine
    (one column per time unit; F = forward, B = backward, I = input grad, W = weight grad,
    X = overlapped F&B, . = idle)."""
    placement = Placement(schedule, pp)
    orders = build(schedule, pp, n_microbatches)
    timeline = simulate(placement, orders, costs)
    lines = [f"{schedule}: {pp} ranks, {placement.n_stages} virtual stages, {n_microbatches} micro-batches "
             f"(action = kind micro-batch . stage)"]
    for rank in range(pp):
        stages = ", ".join(f"{s} (model stage {placement.model_stage(s)})" for s in placement.stages_of(rank))
        lines.append(f"rank {rank}: stages {stages}")
        by_phase: dict[int, list[str]] = {}
        for a in orders[rank]:
            by_phase.setdefault(a.phase, []).append(str(a))
        for phase, names in by_phase.items():
            label = f"  phase {phase}: " if phase else "  "
            lines.append(label + " ".join(names))
    unit = min(costs.of(Action(k, 0, 0)) for k in "FIW")
    width = int(round(timeline.makespan / unit))
    lines.append(f"timeline (one column = {unit:g} unit; F=1, B=2, I=W=1, F&B={costs.of(Action('FB', 0, 0)):g}):")
    for rank in range(pp):
        row = ["."] * width
        for a, start, end in zip(orders[rank], timeline.start[rank], timeline.end[rank]):
            symbol = "X" if a.kind == "FB" else a.kind
            for t in range(int(round(start / unit)), int(round(end / unit))):
                row[t] = symbol
        lines.append(f"rank {rank}: {''.join(row)}")
    bubbles = [timeline.bubble(r, costs, orders) for r in range(pp)]
    lines.append(f"makespan {timeline.makespan:g}; bubble per rank {', '.join(f'{b:g}' for b in bubbles)}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Print a pipeline schedule.")
    parser.add_argument("--schedule", choices=SCHEDULES, default="dualpipe")
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, default=10)
    args = parser.parse_args()
    try:
        print(describe(args.schedule, args.pp, args.micro_batches))
    except ValueError as error:
        raise SystemExit(f"error: {error}")


if __name__ == "__main__":
    main()
