"""The DeepSeekMoE router and aux-loss-free balancing (report section 2.1.2)."""
import pytest
import torch

from dsv3.model import ModelConfig, Router, update_expert_bias


def make_router(**overrides) -> Router:
    fields = dict(dim=16, n_routed_experts=16, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
                  route_scale=2.5, score_func="sigmoid", expert_bias=True, init_std=0.5)
    router = Router(ModelConfig(**{**fields, **overrides}))
    router.reset_parameters(torch.Generator().manual_seed(0))
    return router


def test_gates_are_normalised_raw_scores_times_route_scale():
    router = make_router()
    x = torch.randn(64, 16)
    gates, indices, scores = router(x)
    raw = torch.sigmoid(x @ router.weight.T).gather(1, indices)
    torch.testing.assert_close(gates, 2.5 * raw / raw.sum(-1, keepdim=True))
    torch.testing.assert_close(gates.sum(-1), torch.full((64,), 2.5))


def test_bias_changes_selection_but_never_gate_values():
    router = make_router(n_expert_groups=1, n_limited_groups=1)
    x = torch.randn(256, 16)
    gates, indices, scores = router(x)
    router.expert_bias[3] = 10.0  # expert 3 now wins every selection
    biased_gates, biased_indices, biased_scores = router(x)
    assert (biased_indices == 3).any(-1).all()
    assert not torch.equal(indices, biased_indices)
    torch.testing.assert_close(biased_scores, scores)  # affinities ignore the bias
    raw = scores.gather(1, biased_indices)  # gates come from the unbiased affinities of the picks
    torch.testing.assert_close(biased_gates, 2.5 * raw / raw.sum(-1, keepdim=True))


def test_selected_experts_lie_in_the_top_groups():
    router = make_router()
    router.expert_bias.copy_(torch.randn(16) * 0.1)
    x = torch.randn(500, 16)
    _, indices, scores = router(x)
    biased = (scores + router.expert_bias).view(500, 4, 4)
    group_scores = biased.topk(2, dim=-1).values.sum(-1)  # each group: sum of its top-2
    top_groups = group_scores.topk(2, dim=-1).indices
    chosen_groups = indices // 4
    assert all(set(c.tolist()) <= set(t.tolist()) for c, t in zip(chosen_groups, top_groups))
    # And within the kept groups, the picks are the top-k biased scores.
    for row in range(500):
        kept = torch.cat([torch.arange(g * 4, g * 4 + 4) for g in top_groups[row].tolist()])
        best = kept[(scores[row] + router.expert_bias)[kept].topk(4).indices]
        assert set(best.tolist()) == set(indices[row].tolist())


@pytest.mark.parametrize("score_func, expert_bias", [("sigmoid", True), ("sigmoid", False), ("softmax", True),
                                                     ("softmax", False)])
def test_group_score_follows_the_reference_rule(score_func, expert_bias):
    """DeepSeek-V3's reference keys the group score on the bias, not on the score function: with a
    bias, each group's top-2 sum of biased scores; without, its max. Routing here equals a direct
    transcription of that rule for all four combinations."""
    router = make_router(score_func=score_func, expert_bias=expert_bias)
    if expert_bias:
        router.expert_bias.copy_(torch.randn(16, generator=torch.Generator().manual_seed(1)) * 0.1)
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(2))
    _, indices, _ = router(x)
    logits = x @ router.weight.T
    scores = logits.sigmoid() if score_func == "sigmoid" else logits.softmax(dim=-1)
    if expert_bias:
        scores = scores + router.expert_bias
    grouped = scores.view(300, 4, 4)
    group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1) if expert_bias else grouped.amax(dim=-1)
    mask = torch.ones(300, 4, dtype=torch.bool).scatter_(1, group_scores.topk(2, dim=-1)[1], False)
    expected = grouped.masked_fill(mask.unsqueeze(-1), float("-inf")).flatten(1).topk(4, dim=-1)[1]
    assert torch.equal(indices, expected)


def test_softmax_routing_uses_group_max_and_unnormalised_gates():
    router = make_router(score_func="softmax", expert_bias=False, route_scale=16.0)
    x = torch.randn(200, 16)
    gates, indices, scores = router(x)
    probs = torch.softmax(x @ router.weight.T, dim=-1)
    torch.testing.assert_close(gates, 16.0 * probs.gather(1, indices))
    top_groups = probs.view(200, 4, 4).amax(-1).topk(2, dim=-1).indices
    assert all(set((i // 4).tolist()) <= set(t.tolist()) for i, t in zip(indices, top_groups))


def test_bias_update_rule_and_all_reduce_hook():
    router = make_router()
    router.tokens_per_expert.copy_(torch.tensor([4.0] * 8 + [2.0] * 4 + [6.0] * 4))  # mean 4
    seen = []

    def all_reduce(loads):  # stands for a sum over 2 identical ranks
        seen.append(loads.clone())
        loads.mul_(2)

    violation = update_expert_bias([router], gamma=0.01, all_reduce=all_reduce)
    assert len(seen) == 1 and seen[0].shape == (1, 16)
    expected = torch.tensor([0.0] * 8 + [0.01] * 4 + [-0.01] * 4)  # underloaded up, overloaded down
    torch.testing.assert_close(router.expert_bias, expected)
    assert violation.item() == pytest.approx((12 - 8) / 8)
    assert router.tokens_per_expert.sum() == 0  # counts restart for the next step


def test_bias_update_drives_a_skewed_router_toward_balance():
    """A router whose weights strongly prefer a few experts; the bias update alone rebalances it."""
    torch.manual_seed(0)
    router = make_router(n_expert_groups=1, n_limited_groups=1, init_std=0.1)
    with torch.no_grad():
        router.weight[:4] += 0.6 * torch.randn(16)  # experts 0-3 align with a common direction
    common = torch.randn(16)

    def step():
        x = torch.randn(512, 16) + common
        _, indices, _ = router(x)
        router.record_load(indices)
        return update_expert_bias([router], gamma=0.01).item()

    violations = [step() for _ in range(400)]
    first, last = sum(violations[:10]) / 10, sum(violations[-50:]) / 50
    assert first > 1.0
    assert last < 0.25 * first


def test_top_two_sum_equals_topk_bit_for_bit():
    """Random scores, rows with a tie for first place, and rows of equal values."""
    from dsv3.model.moe import top_two_sum

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(64, 8, 8, generator=generator)
    x[0, 0, 3] = x[0, 0, 5] = x[0, 0].max() + 0.5  # tie for first
    x[1, 2] = 0.25  # all equal
    x[2, 1, :2] = x[2, 1].max() + 1.0  # tie for first at the start
    assert torch.equal(top_two_sum(x), x.topk(2, dim=-1).values.sum(dim=-1))
