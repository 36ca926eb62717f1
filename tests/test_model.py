"""The Transformer: MLA against a naive reference, causality, MTP offsets, init, and overfitting."""
import copy

import pytest
import torch
import torch.nn.functional as F

from dsv3.model import ModelConfig
from dsv3.model.rope import rope_frequencies

from conftest import build


def naive_mla(attn, x, freqs=None, softmax_scale=None):
    """MLA written out per head in float64 with an explicit mask, complex RoPE and softmax; RoPE's
    frequencies and the logit scale are the model's unless given."""
    cfg = attn.cfg
    freqs = rope_frequencies(cfg).double() if freqs is None else freqs
    softmax_scale = cfg.softmax_scale if softmax_scale is None else softmax_scale
    b, s, _ = x.shape
    h, nope, rdim = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    w = {name: p.double() for name, p in attn.named_parameters()}
    x = x.double()

    def rms(v, gain):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * gain

    def rope(v):  # v: (b, s, heads, rdim); adjacent channel pairs as complex numbers
        angles = torch.outer(torch.arange(s, dtype=torch.float64), freqs)
        rot = torch.polar(torch.ones_like(angles), angles).view(1, s, 1, -1)
        return torch.view_as_real(torch.view_as_complex(v.reshape(b, s, -1, rdim // 2, 2).contiguous()) * rot).flatten(-2)

    if cfg.q_lora_rank:
        q = rms(x @ w["w_dq.weight"].T, w["q_norm.weight"]) @ w["w_uq.weight"].T
    else:
        q = x @ w["w_q.weight"].T
    q = q.view(b, s, h, nope + rdim)
    kv_all = x @ w["w_dkv.weight"].T
    c_kv, k_rope = kv_all[..., :cfg.kv_lora_rank], kv_all[..., cfg.kv_lora_rank:]
    kv = (rms(c_kv, w["kv_norm.weight"]) @ w["w_ukv.weight"].T).view(b, s, h, nope + cfg.v_head_dim)
    q = torch.cat([q[..., :nope], rope(q[..., nope:])], -1)
    k = torch.cat([kv[..., :nope], rope(k_rope.unsqueeze(2)).expand(b, s, h, rdim)], -1)
    v = kv[..., nope:]
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * softmax_scale
    logits = logits.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.einsum("bhij,bjhd->bihd", logits.softmax(-1), v).reshape(b, s, h * cfg.v_head_dim)
    return out @ w["w_o.weight"].T


def test_mla_equals_naive_reference(tiny_cfg):
    model = build(tiny_cfg)
    attn = model.layers["0"].attn
    x = torch.randn(2, 12, tiny_cfg.dim)
    torch.testing.assert_close(attn(x).double(), naive_mla(attn, x), rtol=1e-4, atol=1e-6)


def test_mla_without_q_lora(tiny_cfg):
    cfg = ModelConfig(**{**vars(tiny_cfg), "q_lora_rank": 0})
    model = build(cfg)
    attn = model.layers["0"].attn
    assert not hasattr(attn, "w_dq") and attn.w_q.weight.shape == (cfg.n_heads * cfg.qk_head_dim, cfg.dim)
    x = torch.randn(2, 12, cfg.dim)
    torch.testing.assert_close(attn(x).double(), naive_mla(attn, x), rtol=1e-4, atol=1e-6)


def test_next_token_logits_are_causal(tiny_cfg):
    model = build(tiny_cfg).eval()
    tokens = torch.randint(tiny_cfg.vocab_size, (1, 20))
    changed = tokens.clone()
    changed[0, 12] = (tokens[0, 12] + 1) % tiny_cfg.vocab_size
    a, b = model(tokens), model(changed)
    # Equal up to rounding: grouping tokens by expert changes GEMM shapes, hence summation order.
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=1e-6)
    assert (a[:, 12] - b[:, 12]).abs().max() > 1e-3


def test_mtp_depth_k_predicts_token_i_plus_k_plus_1_without_leaking_it(tiny_cfg):
    """Depth k at position i may see t_0..t_{i+k} and must score t_{i+k+1} = targets[:, i+k]."""
    model = build(tiny_cfg).eval()
    seq = 16
    tokens = torch.randint(tiny_cfg.vocab_size, (1, seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def mtp_logits(inp):
        h = model.embed(inp)
        for layer in model.layers.values():
            h, _ = layer(h)
        h, logits = model.norm(h), []
        for k, module in enumerate(model.mtp, start=1):
            h = module.norm(module(h[:, :-1], model.embed(inp[:, k:]))[0])
            logits.append(model.head(h))
        return logits

    logits = mtp_logits(inputs)
    out = model(inputs, targets)
    for k, depth_logits in enumerate(logits, start=1):
        assert depth_logits.shape[1] == seq - k
        expected = F.cross_entropy(depth_logits[0], tokens[0, k + 1:])  # t_{i+k+1} for i = 0..seq-1-k
        torch.testing.assert_close(out.mtp_losses[k - 1], expected)
        # Changing t_j moves no depth-k logit at positions i < j - k: t_{i+k+1} is never an input.
        j = 10
        changed = inputs.clone()
        changed[0, j] = (inputs[0, j] + 1) % tiny_cfg.vocab_size
        moved = mtp_logits(changed)[k - 1]
        torch.testing.assert_close(moved[:, :j - k], depth_logits[:, :j - k], rtol=0, atol=1e-6)
        assert (moved[:, j - k] - depth_logits[:, j - k]).abs().max() > 1e-3


def reference_mtp_losses(model, tokens, targets, normed_input: bool) -> list[torch.Tensor]:
    """MTP losses in float64 with the norms written out; depth k is fed the head's input at depth
    k-1 (normed_input) or the un-normed output of the main model and of depth k-1."""
    model = copy.deepcopy(model).double()

    def rms(v, norm):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight

    h = model.embed(tokens)
    for layer in model.layers.values():
        h, _ = layer(h)
    prev, losses = (rms(h, model.norm) if normed_input else h), []
    for k, module in enumerate(model.mtp, start=1):
        emb = model.embed(tokens[:, k:])
        x = torch.cat([rms(emb, module.enorm), rms(prev[:, :-1], module.hnorm)], -1) @ module.eh_proj.weight.T
        out, _ = module.block(x)
        logits = rms(out, module.norm) @ model.head.weight.T
        losses.append(F.cross_entropy(logits.flatten(0, 1), targets[:, k:].flatten()))
        prev = rms(out, module.norm) if normed_input else out
    return losses


def test_mtp_depth_1_takes_the_final_normed_hidden_state(tiny_cfg):
    """With norm gains away from 1, feeding the final norm's output (as Megatron-Core trains and vLLM
    runs DeepSeek-V3's MTP weights) and feeding the un-normed hidden state give different losses."""
    model = build(tiny_cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.empty_like(p).uniform_(0.3, 3.0, generator=generator))
    tokens = torch.randint(tiny_cfg.vocab_size, (2, 17), generator=generator)
    out = model(tokens[:, :-1], tokens[:, 1:])
    normed = reference_mtp_losses(model, tokens[:, :-1], tokens[:, 1:], normed_input=True)
    unnormed = reference_mtp_losses(model, tokens[:, :-1], tokens[:, 1:], normed_input=False)
    for k in range(tiny_cfg.mtp_depth):
        torch.testing.assert_close(out.mtp_losses[k].double(), normed[k], rtol=1e-5, atol=1e-5)
        assert (out.mtp_losses[k].double() - unnormed[k]).abs() > 1e-3


def test_total_loss_combines_main_mtp_and_balance(tiny_cfg):
    """Main, MTP and balance losses recomputed in float64 from the model's own logits and router
    scores: cross-entropy of the next-token logits, of each depth's logits against t_{i+k+1}, and
    per MoE layer (main and MTP) the sequence-wise balance loss of report eqs 17-20,
    alpha sum_i f_i P_i with f_i = N_r / (K_r T) #selections in the sequence and P_i the sequence's
    mean of s_i / sum_j s_j, averaged over sequences; total = main + lambda mean_k MTP_k + balance."""
    cfg = ModelConfig(**{**vars(tiny_cfg), "seq_aux_alpha": 0.01})  # a balance term that weighs in the total
    model = build(cfg)
    batch, seq = 2, 16
    tokens = torch.randint(cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    routed = []  # (indices, scores) of every router call, main layers then MTP depths, in order
    hooks = [r.register_forward_hook(lambda m, args, out: routed.append((out[1], out[2].detach())))
             for r in model.routers()]
    out = model(inputs, targets)
    for hook in hooks:
        hook.remove()
    assert len(out.mtp_losses) == cfg.mtp_depth and len(routed) == cfg.n_moe_layers + cfg.mtp_depth

    with torch.no_grad():
        logits = [model(inputs)]
        h = model.embed(inputs)
        for layer in model.layers.values():
            h, _ = layer(h)
        for k, module in enumerate(model.mtp, start=1):
            h, _ = module(h[:, :-1], model.embed(inputs[:, k:]))
            logits.append(model.head(module.norm(h)))

    def cross_entropy(z, t):
        z = z.double().flatten(0, 1)
        return (z.logsumexp(-1) - z.gather(1, t.reshape(-1, 1)).squeeze(1)).mean()

    main = cross_entropy(logits[0], targets)
    mtp = [cross_entropy(logits[k], targets[:, k:]) for k in range(1, cfg.mtp_depth + 1)]
    balance = torch.zeros((), dtype=torch.float64)
    n, top = cfg.n_routed_experts, cfg.n_activated_experts
    for indices, scores in routed:
        length = scores.shape[0] // batch  # seq for the main layers, seq - k at MTP depth k
        scores = scores.double().view(batch, length, n)
        for b in range(batch):
            selections = torch.zeros(n, dtype=torch.float64)
            for e in indices.view(batch, length * top)[b].tolist():
                selections[e] += 1
            f = n / (top * length) * selections
            p = (scores[b] / scores[b].sum(-1, keepdim=True)).mean(0)
            balance += cfg.seq_aux_alpha * (f * p).sum() / batch
    # Every figure is an FP32 reduction of the same FP32 values (logits over 97 classes, means over
    # <= 32 tokens, sums over 8 experts): relative error <~ 40 eps32 = 5e-6; 1e-5 leaves room.
    tight = dict(rtol=1e-5, atol=0)
    torch.testing.assert_close(out.main_loss.double(), main, **tight)
    for got, expected in zip(out.mtp_losses, mtp):
        torch.testing.assert_close(got.double(), expected, **tight)
    torch.testing.assert_close(out.balance_loss.double(), balance, **tight)
    torch.testing.assert_close(out.total(0.3).double(), main + 0.3 * sum(mtp) / cfg.mtp_depth + balance, **tight)
    assert balance > 1e-3 * main  # the balance term is not lost in the total's rounding


def test_init_follows_the_recipe_and_is_reproducible(tiny_cfg):
    cfg = ModelConfig(**{**vars(tiny_cfg), "init_std": 0.006, "dim": 64, "vocab_size": 512})
    model = build(cfg, seed=3)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.equal(p, torch.ones_like(p)), name  # norm gains
        elif p.numel() >= 4096:
            assert abs(p.std().item() - 0.006) < 0.0006, name
    assert all(torch.equal(r.expert_bias, torch.zeros_like(r.expert_bias)) for r in model.routers())
    again, other = build(cfg, seed=3), build(cfg, seed=4)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    assert not torch.equal(model.embed.weight, other.embed.weight)
    assert "layers.1.ffn.router.expert_bias" in model.state_dict()  # biases are checkpointed


def test_tiny_model_overfits_a_repeated_batch(tiny_cfg):
    torch.manual_seed(0)
    model = build(tiny_cfg)
    tokens = torch.randint(tiny_cfg.vocab_size, (4, 33))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        out = model(tokens[:, :-1], tokens[:, 1:])
        loss = out.total(0.3)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.main_loss.item())
    assert losses[0] > 4.0  # about ln(97)
    assert losses[-1] < 0.1 * losses[0]


def test_bf16_autocast_forward_and_backward(tiny_cfg):
    """Under BF16 autocast the loss and every gradient track the FP32 model: products round to 8
    bits (2^-8 relative per operand), so the loss lands within 1% and each parameter's gradient
    within 10% (relative norm) of FP32's, while FP32 master gradients come back for every
    parameter. A path that skipped autocast or dropped a gradient fails one of these."""
    model = build(tiny_cfg)
    tokens = torch.randint(tiny_cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model(tokens[:, :-1], tokens[:, 1:])
    out.total(0.3).backward()
    fp32 = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = model(tokens[:, :-1], tokens[:, 1:])
    bf16.total(0.3).backward()
    assert bf16.main_loss.item() == pytest.approx(out.main_loss.item(), rel=1e-2)
    assert bf16.main_loss.item() != out.main_loss.item()  # the products did run in BF16
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        if fp32[name].norm() > 0:
            assert (p.grad - fp32[name]).norm() < 0.1 * fp32[name].norm(), name
