"""The recipe's schedules at every boundary (report section 4.2), and the BF16-moment AdamW."""
import math

import pytest
import torch

from dsv3.parallel.schedules import SCHEDULES, validate
from dsv3.train.config import ScheduleConfig
from dsv3.train.optim import AdamW
from dsv3.train.schedule import Schedule, plan, steps_for

V3_TOKENS = 14_800_000_000_000
SEQ = 4096


def v3() -> Schedule:
    cfg = ScheduleConfig(batch_ramp_start=3072)
    return Schedule(cfg, V3_TOKENS, SEQ, global_batch=15360, batch_unit=1)


def test_v3_boundaries_fall_on_the_reports_token_counts():
    s = v3()
    for fraction, tokens in ((s.cfg.decay_start, 10e12), (s.cfg.decay_end, 14.3e12),
                             (s.cfg.final_start, 14.633e12), (s.cfg.batch_ramp_end, 469e9),
                             (s.cfg.mtp_switch, 10e12), (s.cfg.bias_freeze, 14.3e12)):
        assert fraction * V3_TOKENS == pytest.approx(tokens, rel=2e-4)


def test_learning_rate_at_each_boundary():
    s, c, T = v3(), v3().cfg, V3_TOKENS
    assert s.lr(0) == 0
    assert s.lr(int(c.warmup * T / 2)) == pytest.approx(2.2e-4 / 2, rel=1e-6)
    assert s.lr(int(c.warmup * T)) == pytest.approx(2.2e-4)
    assert s.lr(int(c.decay_start * T) - 1) == 2.2e-4  # constant until 10T
    middle = (c.decay_start + c.decay_end) / 2 * T
    assert s.lr(int(middle)) == pytest.approx((2.2e-4 + 2.2e-5) / 2, rel=1e-6)  # cosine half-way
    quarter = (c.decay_start + 0.25 * (c.decay_end - c.decay_start)) * T
    expected = 2.2e-5 + (2.2e-4 - 2.2e-5) * 0.5 * (1 + math.cos(math.pi / 4))
    assert s.lr(int(quarter)) == pytest.approx(expected, rel=1e-6)
    assert s.lr(int(c.decay_end * T)) == pytest.approx(2.2e-5)
    assert s.lr(int(c.final_start * T) - 1) == 2.2e-5  # held for 333B tokens
    assert s.lr(int(c.final_start * T) + 1) == 7.3e-6  # then 7.3e-6 for 167B
    assert s.lr(T) == 7.3e-6


def test_mtp_weight_and_bias_speed_switch_where_the_report_says():
    s, c, T = v3(), v3().cfg, V3_TOKENS
    assert s.mtp_weight(int(c.mtp_switch * T) - 1) == 0.3 and s.mtp_weight(int(c.mtp_switch * T) + 1) == 0.1
    assert s.bias_update_speed(int(c.bias_freeze * T) - 1) == 1e-3
    assert s.bias_update_speed(int(c.bias_freeze * T) + 1) == 0.0


def test_batch_ramp_in_whole_micro_batches():
    cfg = ScheduleConfig(batch_ramp_start=3072)
    s = Schedule(cfg, V3_TOKENS, SEQ, global_batch=15360, batch_unit=64)
    ramp = cfg.batch_ramp_end * V3_TOKENS
    assert s.batch_size(0) == 3072
    assert s.batch_size(int(ramp / 2)) == (3072 + 15360) // 2 // 64 * 64
    assert s.batch_size(int(ramp)) == 15360
    sizes = [s.batch_size(int(ramp * i / 100)) for i in range(101)]
    assert all(b % 64 == 0 for b in sizes) and sizes == sorted(sizes)


def test_v3_run_takes_about_243k_steps():
    assert steps_for(v3()) == pytest.approx(243_000, rel=0.01)  # docs/recipe.md: derived from report section 4.2


def test_a_run_given_in_steps_takes_exactly_those_steps_with_a_ramp():
    cfg = ScheduleConfig(batch_ramp_start=16, batch_ramp_end=0.3)
    s = plan(cfg, steps=500, tokens=0, seq_len=128, global_batch=64, batch_unit=8)
    assert steps_for(s) == 500
    assert s.batch_size(0) == 16 and s.batch_size(s.total_tokens) == 64


def run_batches(s: Schedule, steps: int) -> list[int]:
    """The global batch of each step, read as the Trainer reads it."""
    sizes, tokens = [], 0
    for _ in range(steps):
        sizes.append(s.batch_size(tokens))
        tokens += sizes[-1] * s.seq_len
    return sizes


def test_reported_dualpipe_ramp_runs_even_micro_batch_counts():
    """The report: schedule=v3's ramp from 32 to 64 sequences, 4 per micro-batch step, pp=2 with
    dualpipe, train.steps=2600. Unrounded, step 22 has 36 sequences, 9 micro-batches."""
    cfg, unit = ScheduleConfig(batch_ramp_start=32), 4
    assert run_batches(plan(cfg, 2600, 0, 128, 64, unit), 22)[-1] // unit == 9  # the ramp without a pipeline
    s = plan(cfg, 2600, 0, 128, 64, unit, pipeline=("dualpipe", 2))  # as the Trainer plans a pipelined run
    assert steps_for(s) == 2600
    sizes = run_batches(s, 2600)
    assert sizes[21] // unit == 8 and sizes[-1] == 64
    for size in sizes:
        validate("dualpipe", 2, size // unit)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("pp", [2, 4])
def test_every_batch_of_the_ramp_suits_the_pipeline_schedule(schedule, pp):
    """A ramp from 1 micro-batch, below every schedule's minimum, to 24, each of its batches checked."""
    cfg, unit = ScheduleConfig(batch_ramp_start=4, batch_ramp_end=0.5), 4
    s = plan(cfg, 300, 0, 128, 96, unit, pipeline=(schedule, pp))
    assert steps_for(s) == 300
    sizes = run_batches(s, 300)
    assert set(sizes) == s.batch_sizes() and sizes == sorted(sizes) and sizes[-1] == 96
    assert len(s.batch_sizes()) > 5  # a ramp, not one size
    for size in s.batch_sizes():
        validate(schedule, pp, size // unit)


def test_bf16_moment_adamw():
    torch.manual_seed(0)
    params = [torch.randn(64, 32), torch.randn(32)]
    grads = [[torch.randn_like(p) for p in params] for _ in range(20)]

    def run(optimizer_class, **kwargs):
        weights = [p.clone().requires_grad_() for p in params]
        optimizer = optimizer_class(weights, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, **kwargs)
        for step_grads in grads:
            for w, g in zip(weights, step_grads):
                w.grad = g.clone()
            optimizer.step()
        return weights, optimizer

    reference, _ = run(torch.optim.AdamW, foreach=False)
    exact, _ = run(AdamW, state_dtype=torch.float32)
    for a, b in zip(exact, reference):  # with fp32 moments it is torch's AdamW
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    bf16, optimizer = run(AdamW, state_dtype=torch.bfloat16)
    assert all(s["exp_avg"].dtype == torch.bfloat16 and s["exp_avg_sq"].dtype == torch.bfloat16
               for s in optimizer.state.values())
    for a, b, start in zip(bf16, reference, params):
        assert ((a - b).norm() / (b - start).norm()).item() < 0.02  # the update differs by < 2%


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])  # clipping, and a norm under the limit
def test_clipped_step_equals_clip_grad_norm_then_step(max_norm):
    """torch's fused AdamW with the clip factor as its gradient divisor, and the foreach path,
    against clip_grad_norm_ + step: float32, so within a few ulps of each parameter (dividing by
    1/c instead of multiplying by c rounds differently; the update's sqrt and division stay
    within 1e-6 relative)."""
    from dsv3.parallel.data_parallel import LocalGradients
    from dsv3.train.optim import clipped_step

    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 7, generator=generator), torch.randn(11, generator=generator)]
    grads = [torch.randn(p.shape, generator=generator) for p in start]
    results = {}
    for name, fused in (("reference", False), ("fused", True), ("foreach", False)):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = torch.optim.AdamW(params, lr=0.1, fused=fused, foreach=not fused and name == "foreach")
        for _ in range(2):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            if name == "reference":
                norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                optimizer.step()
            else:
                norm = clipped_step(optimizer, LocalGradients(params), max_norm)
        assert getattr(optimizer, "grad_scale", None) is None  # nothing left behind for a later step
        results[name] = norm, params
    for name in ("fused", "foreach"):
        assert results[name][0].item() == pytest.approx(results["reference"][0].item(), rel=1e-6)
        for ours, reference in zip(results[name][1], results["reference"][1]):
            torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
