"""Expert and data parallelism on real gloo ranks against the single-process reference."""
import pytest
import torch
import torch.distributed as dist

from dsv3.model import ModelConfig, Transformer, update_expert_bias
from dsv3.parallel.config import ParallelConfig
from dsv3.parallel.data_parallel import AllReducedGradients
from dsv3.parallel.expert_parallel import shard_experts
from dsv3.parallel.mesh import build_mesh, data_parallel_rank, resolve_layout, stage_group

from multirank import run_ranks

CFG = dict(vocab_size=97, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=3, n_dense_layers=1, n_heads=2,
           n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
           route_scale=2.5, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
           max_seq_len=32, mtp_depth=1, init_std=0.02)
BATCH, SEQ = 8, 16


def global_batch(step: int) -> torch.Tensor:
    return torch.randint(97, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step))


def build(ep_group=None) -> Transformer:
    with torch.device("meta"):
        model = Transformer(ModelConfig(**CFG))
        if ep_group is not None:
            shard_experts(model, ep_group)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    return model


def train_steps(model, batches, gradients=None, all_reduce=None, steps=3):
    """A few SGD steps with bias updates; returns per-step losses, grads of the first step, biases.
    `gradients` (reduce, norm, scale) clips as the trainer does; without: clip_grad_norm_."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses, first_grads = [], None
    for step in range(steps):
        tokens = batches(step)
        out = model(tokens[:, :-1], tokens[:, 1:])
        loss = out.total(0.3)
        loss.backward()
        if gradients is None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        else:
            gradients.reduce()
            norm = gradients.norm()
            gradients.scale(torch.clamp(1.0 / (norm + 1e-6), max=1.0))
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
        update_expert_bias(model.routers(), 0.01, all_reduce)
        losses.append((loss.detach(), norm.detach()))
    biases = [r.expert_bias.clone() for r in model.routers()]
    return losses, first_grads, biases


def parallel_worker(rank, world_size, ep):
    layout = resolve_layout(ParallelConfig(ep=ep), world_size, CFG["n_routed_experts"])
    mesh = build_mesh(layout, "cpu")
    stage = stage_group(mesh)
    model = build(mesh.get_group("ep"))
    gradients = AllReducedGradients(model, stage, mesh.get_group("dp"), mesh.get_group("ep"))
    data_rank, per_rank = data_parallel_rank(mesh), BATCH // layout.data_parallel

    def my_batch(step):
        return global_batch(step)[data_rank * per_rank:(data_rank + 1) * per_rank]

    def all_reduce(t):
        dist.all_reduce(t, group=stage)

    losses, grads, biases = train_steps(model, my_batch, gradients, all_reduce)
    mean_losses = []
    for loss, norm in losses:  # the global batch's loss is the mean of the ranks' losses
        total = loss.clone()
        dist.all_reduce(total)
        mean_losses.append((total / world_size, norm))
    first = model.layers["1"].ffn.experts.first_expert
    return {"losses": mean_losses, "grads": grads, "biases": biases, "first_expert": first}


@pytest.fixture(scope="module")
def reference():
    return train_steps(build(), global_batch)


@pytest.mark.parametrize("world_size, ep", [(2, 2), (4, 4), (4, 2), (2, 1)])
def test_expert_and_data_parallel_equal_single_process(tmp_path, reference, world_size, ep):
    ref_losses, ref_grads, ref_biases = reference
    results = run_ranks(parallel_worker, world_size, tmp_path, ep)
    local = CFG["n_routed_experts"] // ep
    for result in results:
        for (loss, norm), (ref_loss, ref_norm) in zip(result["losses"], ref_losses):
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=1e-6)
        first = result["first_expert"]
        for name, grad in result["grads"].items():
            expected = ref_grads[name]
            if ".experts." in name:  # this rank's slice of the layer's experts
                expected = expected[first:first + local]
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7, msg=name)
        for bias, first_rank_bias, ref_bias in zip(result["biases"], results[0]["biases"], ref_biases):
            assert torch.equal(bias, first_rank_bias)  # identical on every rank
            torch.testing.assert_close(bias, ref_bias, rtol=0, atol=0)  # and to the single process
    assert any(b.abs().sum() > 0 for b in ref_biases)


@pytest.mark.parametrize("pp, dp, ep, world, message", [
    (1, 0, 3, 4, "parallel.pp=1 x parallel.ep=3 does not divide the world size 4."),
    (1, 3, 1, 4, "parallel.pp=1 x parallel.dp=3 x parallel.ep=1 = 3 ranks, but the world size is 4."),
    (1, 1, 4, 4, None),
])
def test_impossible_layouts_fail_with_one_sentence(pp, dp, ep, world, message):
    if message is None:
        assert resolve_layout(ParallelConfig(pp=pp, dp=dp, ep=ep), world, 8).data_parallel == 4
        with pytest.raises(ValueError, match=r"model.n_routed_experts=6 cannot be split evenly over parallel.ep=4"):
            resolve_layout(ParallelConfig(ep=4), 4, 6)
        return
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        resolve_layout(ParallelConfig(pp=pp, dp=dp, ep=ep), world, 8)


STEPS, LR, BETAS, EPS, DECAY = 3, 1e-2, (0.9, 0.95), 1e-8, 0.1
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-7  # split batches vs one batch, as test_expert_and_data_parallel_equal_single_process


def snapshot(model, optimizer) -> dict:
    """By name: the parameter, its clipped gradient and its AdamW moments (zeros before the first step)."""
    out = {}
    for name, p in model.named_parameters():
        state, zeros = optimizer.state.get(p, {}), torch.zeros_like(p)
        out[name] = {"param": p.detach().clone(), "grad": zeros if p.grad is None else p.grad.clone(),
                     **{k: state.get(k, zeros).clone() for k in ("exp_avg", "exp_avg_sq")}}
    return out


def experts_of(state: dict, first: int, local: int) -> dict:
    """A whole-model snapshot cut to one rank's routed experts."""
    return {name: {k: v[first:first + local] if ".experts." in name else v for k, v in tensors.items()}
            for name, tensors in state.items()}


def zero_worker(rank, world_size, ep, starts):
    """One ZeRO-1 step from each snapshot in `starts`, so that every step starts where the reference's
    did; returns the norm, parameters and moments after each."""
    from dsv3.parallel.runtime import DistributedRuntime
    from dsv3.parallel.zero import build_zero_adamw
    from dsv3.train.optim import clipped_step

    layout = resolve_layout(ParallelConfig(ep=ep), world_size, CFG["n_routed_experts"])
    mesh = build_mesh(layout, "cpu")
    runtime = DistributedRuntime(layout, mesh, rank, data_parallel_rank(mesh), stage_group(mesh))
    model = build(runtime.ep_group)
    optimizer, gradients = build_zero_adamw(model, runtime, lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY,
                                            state_dtype=torch.float32)
    first, per_rank = model.layers["1"].ffn.experts.first_expert, BATCH // layout.data_parallel
    steps = []
    for step, start in enumerate(starts):
        start = experts_of(start, first, CFG["n_routed_experts"] // ep)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(start[name]["param"])
        optimizer.load_state_dict({"state": {n: {**s, "step": torch.tensor(float(step))} for n, s in start.items()}})
        tokens = global_batch(step)[runtime.data_rank * per_rank:(runtime.data_rank + 1) * per_rank]
        model(tokens[:, :-1], tokens[:, 1:]).total(0.3).backward()
        norm = clipped_step(optimizer, gradients, max_norm=0.5)
        moments = optimizer.state_dict()["state"]  # whole per-parameter moments, as checkpoints store them
        steps.append({"norm": norm, "state": {n: {"param": p.detach().clone(), **moments[n]}
                                              for n, p in model.named_parameters()}})
    return {"steps": steps, "first_expert": first,
            "moment_bytes": sum(b.exp_avg.numel() for b in optimizer.buckets) * 4}


def adam_ratio(state: dict, step: int) -> torch.Tensor:
    """r = m_hat / (sqrt(v_hat) + eps): an AdamW step moves a parameter by -lr * (r + weight_decay * p)."""
    return (state["exp_avg"] / (1 - BETAS[0] ** step)) / ((state["exp_avg_sq"] / (1 - BETAS[1] ** step)).sqrt() + EPS)


def assert_within(got: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    excess = (got - expected).abs() - bound
    assert excess.max() <= 0, f"{what}: off by up to {excess.max().item():.3g} beyond the bound"


@pytest.mark.parametrize("world_size, ep", [(2, 1), (4, 2)])
def test_zero1_steps_equal_unsharded_adamw(tmp_path, world_size, ep):
    """Each of 3 steps, from the same parameters and moments, against torch's AdamW on the whole batch.

    Bounds, with eps32 / 2 the relative error of one fp32 rounding:
    - the reduced, clipped gradient g differs from the one-process one by the batch split's summation
      order, |dg| <= GRAD_ATOL + GRAD_RTOL |g|;
    - so m = b1 m' + (1-b1) g differs by (1-b1) |dg|, and sqrt(v) = sqrt(b2 v' + (1-b2) g^2), which is
      sqrt(1-b2)-Lipschitz in g, by sqrt(1-b2) |dg|; each plus a few roundings of the old and new value;
    - the parameters do not follow tightly from g: r = m_hat / (sqrt(v_hat) + eps) is ill-conditioned
      where v is tiny (expert weights with gradients near eps move r by ~1e-3 here, p by ~4e-5). But r
      is bounded: by Cauchy-Schwarz over the gradients so far, |m_t| <= (1-b1) sqrt(S_t v_t / (1-b2)) with
      S_t = sum_{k<t} (b1^2/b2)^k, so |r| <= R_t = (1-b1)/(1-b1^t) sqrt(S_t (1-b2^t)/(1-b2)) = 1, 1.0004,
      1.001 for t = 1, 2, 3: a step moves p by at most lr (R_t + wd |p|). From the same p, ZeRO's step
      and torch's differ by lr |r_zero - r_torch| (<= 2 lr R_t), r computed from the moments each run
      holds, plus rounding: per run ~3 roundings of |p| and ~7 of lr |r| (decay, sqrt, bias corrections,
      eps, division, step, sum), ~6 more of lr |r| to recompute each r here: <= eps32 (3 |p| + 13 lr R_t),
      with |p| before the step <= |p| after + 2 lr."""
    model = build()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    gains = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": DECAY}, {"params": gains, "weight_decay": 0.0}],
                                  lr=LR, betas=BETAS, eps=EPS)
    states, norms = [snapshot(model, optimizer)], []  # before each step, and after the last
    for step in range(STEPS):
        tokens = global_batch(step)
        model(tokens[:, :-1], tokens[:, 1:]).total(0.3).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5))
        optimizer.step()
        states.append(snapshot(model, optimizer))
        optimizer.zero_grad()
    results = run_ranks(zero_worker, world_size, tmp_path, ep, states[:-1])
    local, eps32, R = CFG["n_routed_experts"] // ep, torch.finfo(torch.float32).eps, 1.001
    total_params = sum(p.numel() for p in model.parameters())
    for result in results:
        first = result["first_expert"]
        for step, (zero, norm) in enumerate(zip(result["steps"], norms), 1):
            torch.testing.assert_close(zero["norm"], norm, rtol=1e-5, atol=1e-6)
            before, after = experts_of(states[step - 1], first, local), experts_of(states[step], first, local)
            for name, got in zero["state"].items():
                old, new = before[name], after[name]
                dg = GRAD_ATOL + GRAD_RTOL * new["grad"].abs()
                assert_within(got["exp_avg"], new["exp_avg"],
                              (1 - BETAS[0]) * dg + eps32 * (old["exp_avg"].abs() + new["exp_avg"].abs()),
                              f"step {step} m of {name}")
                root, old_root = new["exp_avg_sq"].sqrt(), old["exp_avg_sq"].sqrt()
                assert_within(got["exp_avg_sq"].sqrt(), root, (1 - BETAS[1]) ** 0.5 * dg + eps32 * (old_root + root),
                              f"step {step} sqrt(v) of {name}")
                ratios = LR * (adam_ratio(got, step) - adam_ratio(new, step)).abs()
                rounding = eps32 * (3 * (new["param"].abs() + 2 * LR) + 13 * LR * R)
                assert_within(got["param"], new["param"], ratios + rounding, f"step {step} {name}")
        assert result["moment_bytes"] < 0.75 * total_params * 4  # each rank keeps a slice only


def runtime_worker(rank, world_size):
    """The collectives of a DistributedRuntime on a real process group of `world_size` ranks."""
    from dsv3.parallel.runtime import DistributedRuntime

    layout = resolve_layout(ParallelConfig(), world_size, CFG["n_routed_experts"])
    mesh = build_mesh(layout, "cpu")
    return collectives(DistributedRuntime(layout, mesh, rank, data_parallel_rank(mesh), stage_group(mesh)))


def collectives(runtime) -> dict:
    stage, pipeline = torch.arange(4.0), torch.arange(3.0) + 1
    runtime.sum_over_stage(stage)
    runtime.sum_over_pipeline(pipeline)
    runtime.barrier()
    return {"stage": stage, "pipeline": pipeline, "mean": runtime.mean_over_data_ranks(torch.tensor([2.0, 6.0])),
            "any": [runtime.any(flag, torch.device("cpu")) for flag in (False, True)],
            "sum": runtime.sum_over_ranks(7), "from_main": runtime.from_main({"rank": runtime.rank}),
            "layout": (runtime.layout.pp, runtime.layout.dp, runtime.layout.ep), "data_rank": runtime.data_rank,
            "is_main": runtime.is_main}


def test_single_process_runtime_collectives_are_those_of_one_rank(tmp_path):
    """The runtime of a single process does, without a process group, what each collective does on
    a group of one rank: sums and maxima of one value are the value."""
    from dsv3.parallel.runtime import Runtime

    single = collectives(Runtime())
    (one_rank,) = run_ranks(runtime_worker, 1, tmp_path)
    assert single.keys() == one_rank.keys()
    for key, value in single.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, one_rank[key]), key
        else:
            assert value == one_rank[key], key
    assert torch.equal(single["stage"], torch.arange(4.0)) and single["any"] == [False, True]
    assert single["sum"] == 7 and single["from_main"] == {"rank": 0} and single["layout"] == (1, 1, 1)


def zero_state_worker(rank, world_size):
    """Two ZeRO-1 steps in one optimizer, and the second step again in a new optimizer on a new
    model that loads the first one's state_dict after step 1."""
    from dsv3.parallel.runtime import DistributedRuntime
    from dsv3.parallel.zero import build_zero_adamw
    from dsv3.train.optim import clipped_step

    layout = resolve_layout(ParallelConfig(), world_size, CFG["n_routed_experts"])
    mesh = build_mesh(layout, "cpu")
    runtime = DistributedRuntime(layout, mesh, rank, data_parallel_rank(mesh), stage_group(mesh))
    per_rank = BATCH // world_size

    def zero(model):
        return build_zero_adamw(model, runtime, lr=LR, betas=BETAS, eps=EPS, weight_decay=DECAY,
                                state_dtype=torch.float32)

    def step(model, optimizer, gradients, n):
        tokens = global_batch(n)[rank * per_rank:(rank + 1) * per_rank]
        model(tokens[:, :-1], tokens[:, 1:]).total(0.3).backward()
        clipped_step(optimizer, gradients, 0.5)

    model = build()
    optimizer, gradients = zero(model)
    is_optimizer = isinstance(optimizer, torch.optim.Optimizer)
    grouped = sorted(id(p) for group in optimizer.param_groups for p in group["params"])
    every_parameter_once = grouped == sorted(id(p) for p in model.parameters())
    step(model, optimizer, gradients, 0)
    saved = optimizer.state_dict()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(model, optimizer, gradients, 1)

    again = build()
    with torch.no_grad():
        for name, p in again.named_parameters():
            p.copy_(params[name])
    loaded, loaded_gradients = zero(again)
    loaded.load_state_dict(saved)
    round_trip = loaded.state_dict()
    step(again, loaded, loaded_gradients, 1)
    return {"is_optimizer": is_optimizer, "every_parameter_once": every_parameter_once, "saved": saved,
            "round_trip": round_trip, "continued": dict(model.named_parameters()),
            "resumed": dict(again.named_parameters())}


def test_zero_adamw_is_an_optimizer_whose_state_dict_round_trips(tmp_path):
    for result in run_ranks(zero_state_worker, 2, tmp_path):
        assert result["is_optimizer"] and result["every_parameter_once"]
        saved, round_trip = result["saved"]["state"], result["round_trip"]["state"]
        assert saved.keys() == round_trip.keys() == result["continued"].keys()
        for name, moments in saved.items():
            assert moments["step"] == 1 and moments["exp_avg"].abs().sum() > 0, name
            for key, value in moments.items():
                assert torch.equal(round_trip[name][key], value), (name, key)
        for name, param in result["continued"].items():  # the step after loading is the one without
            assert torch.equal(result["resumed"][name], param), name
