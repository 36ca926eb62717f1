"""Pipelined training on real gloo ranks against the single-process reference: every schedule,
with MTP, the balance loss, expert parallelism and the overlapped F&B chunk."""
import pytest
import torch
import torch.distributed as dist

from dsv3.model import ModelConfig, Transformer
from dsv3.parallel.config import ParallelConfig
from dsv3.parallel.data_parallel import AllReducedGradients
from dsv3.parallel.expert_parallel import shard_experts
from dsv3.parallel.mesh import build_mesh, data_parallel_rank, pipeline_lines, resolve_layout, stage_group
from dsv3.parallel.p2p import StageLinks
from dsv3.parallel.pipeline import Pipeline
from dsv3.parallel.pipeline_cut import Cut, build_stage_module, split_layers
from dsv3.parallel.replicated import Replicas
from dsv3.parallel.schedules import Placement

from multirank import run_ranks

CFG = dict(vocab_size=97, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=4, n_dense_layers=1, n_heads=2,
           n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
           route_scale=2.5, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
           max_seq_len=32, mtp_depth=1, init_std=0.02, seq_aux_alpha=0.01)
MICRO_BATCHES, MICRO, SEQ, MTP_WEIGHT = 4, 2, 16, 0.3


def batch(data_rank: int, data_ranks: int) -> list[torch.Tensor]:
    """The micro-batches of one data rank: its contiguous slice of each global micro-batch."""
    out = []
    for mb in range(MICRO_BATCHES):
        tokens = torch.randint(97, (MICRO * data_ranks, SEQ + 1), generator=torch.Generator().manual_seed(mb))
        out.append(tokens[data_rank * MICRO:(data_rank + 1) * MICRO])
    return out


def reference(data_ranks: int) -> dict:
    """One process, the whole global batch: mean over micro-batches of the total loss."""
    model = Transformer(ModelConfig(**CFG))
    model.init_weights(seed=0)
    losses = torch.zeros(3)
    for mb in range(MICRO_BATCHES):
        tokens = torch.cat([batch(r, data_ranks)[mb] for r in range(data_ranks)])
        out = model(tokens[:, :-1], tokens[:, 1:])
        (out.total(MTP_WEIGHT) / MICRO_BATCHES).backward()
        losses += torch.stack([out.main_loss, out.mtp_loss, out.balance_loss]).detach() / MICRO_BATCHES
    loads = torch.stack([r.tokens_per_expert.clone() for r in model.routers()])
    return {"grads": {n: p.grad for n, p in model.named_parameters()}, "losses": losses, "loads": loads}


def pipeline_worker(rank, world_size, schedule, ep, overlap):
    layout = resolve_layout(ParallelConfig(pp=2, ep=ep), world_size, CFG["n_routed_experts"])
    mesh = build_mesh(layout, "cpu")
    placement = Placement(schedule, layout.pp)
    cut = Cut(placement, split_layers(CFG["n_layers"], placement.n_model_stages, []), mtp=True)
    pp_rank = mesh.get_local_rank("pp")
    with torch.device("meta"):
        model = build_stage_module(ModelConfig(**CFG), cut, pp_rank)
        if ep > 1:
            shard_experts(model, mesh.get_group("ep"))
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    lines, line = pipeline_lines(mesh)
    pipe = Pipeline(model, cut, pp_rank, StageLinks(placement, lines, line, torch.device("cpu")), overlap)
    replicas = Replicas(model, cut, lines, line)
    data_rank = data_parallel_rank(mesh)
    micro = [(t[:, :-1], t[:, 1:]) for t in batch(data_rank, layout.data_parallel)]
    sums = pipe.train_step(micro, MTP_WEIGHT)
    replicas.sum_gradients()
    AllReducedGradients(model, stage_group(mesh), mesh.get_group("dp"), mesh.get_group("ep")).reduce()
    dist.all_reduce(sums, group=mesh.get_group("pp"))  # each stage contributes its part
    sums /= layout.data_parallel
    dist.all_reduce(sums, group=stage_group(mesh))
    loads = {name: m.tokens_per_expert.clone() for name, m in model.named_modules() if name.endswith("router")}
    for t in loads.values():
        dist.all_reduce(t, group=stage_group(mesh))
        replicas.sum_router_loads(t)
    experts = {n: m.first_expert for n, m in model.named_modules() if hasattr(m, "first_expert")}
    return {"grads": {n: p.grad for n, p in model.named_parameters()}, "losses": sums, "loads": loads,
            "experts": experts}


def check(results, ref):
    seen = set()
    for result in results:
        torch.testing.assert_close(result["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        for name, grad in result["grads"].items():
            expected = ref["grads"][name]
            module = name.rsplit(".", 1)[0]
            if module in result["experts"]:  # this rank's slice of the routed experts
                first = result["experts"][module]
                expected = expected[first:first + grad.shape[0]]
            torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6, msg=name)
            seen.add(name)
        ref_routers = ref_loads_names()
        for name, load in result["loads"].items():
            torch.testing.assert_close(load, ref["loads"][ref_routers.index(name)])
    assert seen == set(ref["grads"]), "some parameters were held by no rank"


def ref_loads_names():
    model = Transformer(ModelConfig(**CFG))
    return [name for name, m in model.named_modules() if name.endswith("router")]


@pytest.mark.parametrize("schedule,overlap", [("1f1b", False), ("zbv", False), ("dualpipev", False),
                                              ("dualpipev", True), ("dualpipe", False), ("dualpipe", True)])
def test_pipeline_equals_single_process(schedule, overlap, tmp_path):
    check(run_ranks(pipeline_worker, 2, tmp_path, schedule, 1, overlap), reference(1))


@pytest.mark.parametrize("schedule", ["1f1b", "zbv", "dualpipev", "dualpipe"])
def test_pipeline_with_expert_parallel_equals_single_process(schedule, tmp_path):
    """pp=2 x ep=2 on 4 ranks, with the overlapped F&B (all-to-alls started asynchronously) where the
    schedule has one; zbv's split backward (input gradients first, weight gradients later) with the
    expert all-to-alls in both halves."""
    check(run_ranks(pipeline_worker, 4, tmp_path, schedule, 2, True), reference(2))
