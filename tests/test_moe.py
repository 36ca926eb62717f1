"""The MoE layer against a per-token reference; the grouped path against the loop; eqs 17-20."""
import pytest
import torch
import torch.nn.functional as F

from dsv3.model import MoE, ModelConfig
from dsv3.model.moe import RoutedExperts, sequence_balance_loss


@pytest.fixture
def moe(tiny_cfg) -> MoE:
    layer = MoE(tiny_cfg)
    generator = torch.Generator().manual_seed(0)
    for p in layer.parameters():
        torch.nn.init.normal_(p, 0, 0.2, generator=generator)
    layer.router.expert_bias.copy_(torch.randn(tiny_cfg.n_routed_experts, generator=generator) * 0.05)
    return layer


def test_moe_equals_per_token_reference(moe, tiny_cfg):
    x = torch.randn(3, 10, tiny_cfg.dim)
    out, _ = moe(x)
    gates, indices, _ = moe.router(x.view(-1, tiny_cfg.dim))
    experts = moe.experts
    reference = []
    for token, token_gates, token_experts in zip(x.view(-1, tiny_cfg.dim), gates, indices):
        y = moe.shared_experts(token)
        for g, e in zip(token_gates, token_experts):
            h = F.silu(token @ experts.w1[e]) * (token @ experts.w3[e])
            y = y + g * (h @ experts.w2[e])
        reference.append(y)
    torch.testing.assert_close(out.view(-1, tiny_cfg.dim), torch.stack(reference), rtol=1e-5, atol=1e-6)


def test_moe_counts_tokens_over_micro_batches(moe, tiny_cfg):
    moe.train()
    for _ in range(3):
        moe(torch.randn(2, 5, tiny_cfg.dim))
    assert moe.router.tokens_per_expert.sum().item() == 3 * 2 * 5 * tiny_cfg.n_activated_experts
    moe.eval()
    moe(torch.randn(2, 5, tiny_cfg.dim))
    assert moe.router.tokens_per_expert.sum().item() == 3 * 2 * 5 * tiny_cfg.n_activated_experts


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_grouped_path_equals_loop_with_empty_experts():
    experts = RoutedExperts(n_experts=5, dim=8, inter_dim=12, init_std=0.3)
    experts.reset_parameters(seed=1)
    counts = torch.tensor([3, 0, 7, 1, 0])
    x = torch.randn(int(counts.sum()), 8, requires_grad=True)
    grouped = experts._grouped(x, counts)
    grouped.square().sum().backward()
    grad_grouped = [p.grad.clone() for p in (x, experts.w1, experts.w2, experts.w3)]
    for p in (x, *experts.parameters()):
        p.grad = None
    looped = experts._looped(x, counts)
    looped.square().sum().backward()
    torch.testing.assert_close(grouped, looped, rtol=1e-5, atol=1e-6)
    for a, p in zip(grad_grouped, (x, experts.w1, experts.w2, experts.w3)):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)


def test_expert_init_does_not_depend_on_sharding():
    full = RoutedExperts(n_experts=8, dim=4, inter_dim=6, init_std=1.0)
    full.reset_parameters(seed=7)
    shard = RoutedExperts(n_experts=4, dim=4, inter_dim=6, init_std=1.0, first_expert=4)
    shard.reset_parameters(seed=7)
    for name in ("w1", "w2", "w3"):
        torch.testing.assert_close(getattr(shard, name), getattr(full, name)[4:], rtol=0, atol=0)


def test_sequence_balance_loss_equals_hand_computation():
    """L = alpha * sum_i f_i P_i per sequence, f_i = N_r/(K_r T) * #selections, P_i = mean_t s'_{i,t}."""
    torch.manual_seed(0)
    batch, seq, n_experts, k, alpha = 3, 7, 6, 2, 1e-3
    scores = torch.rand(batch, seq, n_experts)
    indices = scores.topk(k, dim=-1).indices
    per_sequence = []
    for b in range(batch):
        total = 0.0
        for i in range(n_experts):
            f = n_experts / (k * seq) * sum(int(i in indices[b, t].tolist()) for t in range(seq))
            p = sum(scores[b, t, i].item() / scores[b, t].sum().item() for t in range(seq)) / seq
            total += f * p
        per_sequence.append(alpha * total)
    expected = sum(per_sequence) / batch
    assert sequence_balance_loss(scores, indices, alpha).item() == pytest.approx(expected, rel=1e-6)
    # Perfectly uniform routing gives alpha exactly (f_i = 1, P_i = 1/N).
    uniform_scores = torch.ones(1, n_experts, n_experts)
    round_robin = torch.stack([torch.tensor([t, (t + 1) % n_experts]) for t in range(n_experts)]).unsqueeze(0)
    assert sequence_balance_loss(uniform_scores, round_robin, alpha).item() == pytest.approx(alpha)


def test_balance_loss_reaches_router_gradients(moe, tiny_cfg):
    """The router weight's gradient of the balance loss against the derivative written out in
    float64, without autograd. Per sequence b of T tokens, with z = x W^T, s = sigmoid(z),
    S_t = sum_j s_tj and c_ti = alpha / (B T) f_bi (the selection counts f carry no gradient):
    dL/ds_ti = c_ti / S_t - sum_j c_tj s_tj / S_t^2, dL/dz = dL/ds s (1 - s), dL/dW = (dL/dz)^T x."""
    batch, seq = 2, 6
    x = torch.randn(batch, seq, tiny_cfg.dim, generator=torch.Generator().manual_seed(1))
    _, balance = moe(x)
    balance.backward()
    _, indices, _ = moe.router(x.view(-1, tiny_cfg.dim))  # the same selection (deterministic)
    n_experts, k, alpha = tiny_cfg.n_routed_experts, tiny_cfg.n_activated_experts, tiny_cfg.seq_aux_alpha
    flat, weight = x.view(-1, tiny_cfg.dim).double(), moe.router.weight.detach().double()
    s = torch.sigmoid(flat @ weight.T)  # (B T, E)
    counts = torch.zeros(batch, n_experts, dtype=torch.float64)
    for b in range(batch):
        for e in indices.view(batch, seq * k)[b].tolist():
            counts[b, e] += 1
    f = n_experts / (k * seq) * counts
    total = s.sum(-1, keepdim=True)
    expected_loss = alpha * (f * (s / total).view(batch, seq, n_experts).mean(1)).sum(-1).mean()
    c = (alpha / (batch * seq) * f).repeat_interleave(seq, dim=0)  # (B T, E), row t of sequence t // T
    ds = c / total - (c * s).sum(-1, keepdim=True) / total**2
    expected_grad = (ds * s * (1 - s)).T @ flat
    assert balance.item() == pytest.approx(expected_loss.item(), rel=1e-5)
    # FP32 forward and backward: each entry sums 12 tokens' terms of a few roundings each, and the two
    # terms of dL/ds cancel in part, so entries are good to ~12 x 8 x eps32 ~ 1e-5 of the largest.
    grad = moe.router.weight.grad.double()
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-5 * expected_grad.abs().max().item())
    assert expected_grad.abs().max() > 0


def test_model_config_rejects_impossible_routing():
    with pytest.raises(ValueError, match="n_routed_experts=10 must divide into model.n_expert_groups=4"):
        ModelConfig(n_routed_experts=10, n_expert_groups=4, n_limited_groups=1)
    with pytest.raises(ValueError, match="n_activated_experts=5 exceeds"):
        ModelConfig(n_routed_experts=8, n_expert_groups=4, n_limited_groups=2, n_activated_experts=5)


def test_rows_per_expert_equals_bincount_without_waiting_for_the_device():
    from dsv3.model.moe import rows_per_expert

    generator = torch.Generator().manual_seed(0)
    for n_experts in (1, 7, 64):
        flat = torch.randint(0, n_experts, (1000,), generator=generator)
        flat[:3] = n_experts - 1
        assert torch.equal(rows_per_expert(flat, n_experts), torch.bincount(flat, minlength=n_experts))
    assert torch.equal(rows_per_expert(torch.tensor([2, 2]), 5), torch.tensor([0, 0, 2, 0, 0]))  # empty experts


def test_gathered_rows_have_the_gradients_of_plain_indexing():
    """The dispatch's sort (k copies of each token) and the combine's restore, against plain
    indexing, whose backward scatter-adds: float64, so equal to rounding."""
    from dsv3.model.moe import GatherRows, sort_by_expert

    generator = torch.Generator().manual_seed(0)
    tokens, k, n_experts = 9, 3, 4
    indices = torch.stack([torch.randperm(n_experts, generator=generator)[:k] for _ in range(tokens)])
    order, restore, _ = sort_by_expert(indices, n_experts)
    weights = torch.randn(tokens * k, 5, dtype=torch.float64, generator=generator)
    cases = [(tokens, lambda x: GatherRows.apply(x, order // k, restore, k), lambda x: x[order // k]),  # sort
             (tokens * k, lambda x: GatherRows.apply(x, restore, order, 1), lambda x: x[restore])]  # combine
    for rows, gathered, plain in cases:
        x = torch.randn(rows, 5, dtype=torch.float64, generator=generator, requires_grad=True)
        ours = gathered(x)
        (grad,) = torch.autograd.grad((ours * weights).sum(), x)
        (expected,) = torch.autograd.grad((plain(x) * weights).sum(), x)
        assert torch.equal(ours, plain(x))
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
