"""Pipeline schedule orders: valid, equal to torch's where torch has them, phases and bubbles as
deepseek-ai/DualPipe's dualpipe.py and the report's Table 2 state them."""
from types import SimpleNamespace

import pytest

from dsv3.parallel.schedules import Costs, Placement, build, describe, simulate, validate

SHAPES = [(2, 4), (2, 7), (4, 8), (4, 11), (4, 16), (6, 12), (8, 20)]


def _flatten(actions):
    out = []
    for a in actions:
        out.append((a.kind, a.stage, a.mb, a.b_stage, a.b_mb) if a.kind == "FB" else (a.kind, a.stage, a.mb))
    return out


@pytest.mark.parametrize("schedule,pp,n", [(s, pp, n) for s in ("1f1b", "zbv", "dualpipev", "dualpipe")
                                            for pp, n in SHAPES if s != "dualpipe" or n % 2 == 0])
def test_every_micro_batch_runs_once_and_nothing_deadlocks(schedule, pp, n):
    placement = Placement(schedule, pp)
    orders = build(schedule, pp, n)
    simulate(placement, orders)  # raises on a deadlock
    for stage in range(placement.n_stages):
        rank = placement.rank(stage)
        forwards = [a.mb for a in orders[rank] if a.kind in ("F", "FB") and a.stage == stage]
        backwards = [a.b_mb if a.kind == "FB" else a.mb for a in orders[rank]
                     if (a.kind in ("B", "I") and a.stage == stage) or (a.kind == "FB" and a.b_stage == stage)]
        weights = [a.mb for a in orders[rank] if a.kind == "W" and a.stage == stage]
        inputs = [a.mb for a in orders[rank] if a.kind == "I" and a.stage == stage]
        chain = [mb for mb in range(n) if placement.entry_stage(mb, n) <= stage < placement.entry_stage(mb, n)
                 + placement.n_model_stages]
        assert forwards == chain and backwards == chain  # in micro-batch order, each once
        assert weights == inputs  # every deferred weight gradient is computed, first in first out


@pytest.mark.parametrize("schedule,ranks,model_stages,entries", [
    ("1f1b", [0, 1], [0, 1], [0, 0, 0, 0]),
    ("zbv", [0, 1, 1, 0], [0, 1, 2, 3], [0, 0, 0, 0]),
    ("dualpipev", [0, 1, 1, 0], [0, 1, 2, 3], [0, 0, 0, 0]),
    ("dualpipe", [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 2, 2]),
])
def test_placements_put_stages_where_the_module_doc_says(schedule, ranks, model_stages, entries):
    """pp=2, 4 micro-batches: each virtual stage's rank and model stage, each micro-batch's entry."""
    placement = Placement(schedule, 2)
    assert [placement.rank(s) for s in range(placement.n_stages)] == ranks
    assert [placement.model_stage(s) for s in range(placement.n_stages)] == model_stages
    assert placement.n_model_stages == max(model_stages) + 1
    assert [placement.entry_stage(mb, 4) for mb in range(4)] == entries


@pytest.mark.parametrize("schedule,torch_class", [("zbv", "ScheduleZBVZeroBubble"),
                                                  ("dualpipev", "ScheduleDualPipeV")])
@pytest.mark.parametrize("pp,n", SHAPES)
def test_orders_equal_torch_pipelining(schedule, torch_class, pp, n):
    """Our ZBV and DualPipeV orders are action for action torch.distributed.pipelining's."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    cls = getattr(schedules, torch_class, None)
    if cls is None:
        pytest.skip(f"this torch has no {torch_class}")
    kinds = {"FORWARD": "F", "FULL_BACKWARD": "B", "BACKWARD_INPUT": "I", "BACKWARD_WEIGHT": "W"}
    fake = SimpleNamespace(pp_group_size=pp, _n_microbatches=n, num_stages=2 * pp, _num_stages=2 * pp,
                           n_local_stages=2)
    ours = build(schedule, pp, n)
    for rank in range(pp):
        theirs = []
        for a in cls._calculate_single_rank_operations(fake, rank):
            if a is None:
                continue
            if a.sub_actions:
                f, b = a.sub_actions
                theirs.append(("FB", f.stage_index, f.microbatch_index, b.stage_index, b.microbatch_index))
            else:
                theirs.append((kinds[a.computation_type.name], a.stage_index, a.microbatch_index))
        assert _flatten(ours[rank]) == theirs


@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev"])
@pytest.mark.parametrize("pp,n", [(2, 4), (4, 8), (4, 14), (8, 16), (8, 30)])
def test_dualpipe_phase_counts_match_recipe(schedule, pp, n):
    """dualpipe.py: with h = min(r, PP-1-r) (DualPipeV: PP counts the 2 x ranks of the V) the eight
    phases hold (PP/2-h-1)*2 F0; h+1 x (F0 F1); PP/2-h-1 x (B1 W F1); n/2-PP+h+1 x (F0B1, F1B0);
    PP/2-h-1 x (B1, F1B0); h+1 x (B1 B0); PP/2-h-1 x (W B0); h+1 W."""
    if schedule == "dualpipe":
        half_pp, half_n = pp // 2, n // 2
    else:
        half_pp, half_n = pp, n
    orders = build(schedule, pp, n)
    for rank in range(pp):
        h = min(rank, pp - 1 - rank) if schedule == "dualpipe" else rank
        by_phase = {p: [a for a in orders[rank] if a.phase == p] for p in range(1, 9)}
        assert len(by_phase[1]) == (half_pp - h - 1) * 2
        assert [a.kind for a in by_phase[2]] == ["F", "F"] * (h + 1)
        assert [a.kind for a in by_phase[3]] == ["I", "W", "F"] * (half_pp - h - 1)
        main_rounds = half_n - 2 * half_pp + h + 1
        middle = h == half_pp - 1
        expected = ["FB", "FB"] * main_rounds
        if middle:  # the middle ranks do not overlap the first pair
            expected = ["F", "B", "FB"] + expected[2:]
        assert [a.kind for a in by_phase[4]] == expected
        assert [a.kind for a in by_phase[5]] == ["B", "FB"] * (half_pp - h - 1)
        assert len(by_phase[6]) == 2 * (h + 1)
        assert [a.kind for a in by_phase[7]] == ["W", "I"] * (half_pp - h - 1)
        assert [a.kind for a in by_phase[8]] == ["W"] * (h + 1)


@pytest.mark.parametrize("pp,n", [(2, 8), (4, 8), (4, 12), (8, 16)])
def test_bubbles_match_recipe_formulas(pp, n):
    """On the ideal machine with F=1, B=2, W=1 and an F&B pair of 3, the longest idle time of a
    rank is Table 2's bubble: 1F1B (PP-1)(F+B); DualPipe (PP/2-1)(F&B+B-3W) with PP ranks;
    DualPipeV the same with PP = 2 x ranks (it is DualPipe cut in half)."""
    costs = Costs(F=1, B=2, W=1, FB=3)
    expected = {"1f1b": (pp - 1) * 3, "dualpipe": (pp // 2 - 1) * (3 + 2 - 3), "dualpipev": (pp - 1) * (3 + 2 - 3)}
    for schedule, bubble in expected.items():
        placement = Placement(schedule, pp)
        orders = build(schedule, pp, n)
        timeline = simulate(placement, orders, costs)
        assert max(timeline.bubble(r, costs, orders) for r in range(pp)) == bubble, schedule


@pytest.mark.parametrize("schedule,pp,n,words", [
    ("dualpipe", 3, 12, "even parallel.pp"),
    ("dualpipe", 4, 9, "even number of micro-batches"),
    ("dualpipe", 4, 6, "at least 8 micro-batches"),
    ("dualpipev", 2, 3, "at least 4 micro-batches"),
    ("zbv", 4, 7, "at least 8 micro-batches"),
    ("1f1b", 4, 3, "at least 4 micro-batches"),
    ("1f1b", 1, 3, "parallel.pp >= 2"),
    ("gpipe", 2, 4, "is not one of"),
])
def test_invalid_settings_fail_with_one_sentence(schedule, pp, n, words):
    with pytest.raises(ValueError, match=words) as error:
        validate(schedule, pp, n)
    assert str(error.value).count(". ") == 0 and str(error.value).endswith(".")


def test_printout_names_every_rank_and_phase():
    text = describe("dualpipe", 4, 10)
    assert "rank 0: stages 0 (model stage 0), 7 (model stage 3)" in text
    assert "rank 3: stages 3 (model stage 3), 4 (model stage 0)" in text
    assert "phase 4: F3.0+B6.7" in text
    assert text.splitlines()[-1] == "makespan 32; bubble per rank 2, 1, 1, 2"
