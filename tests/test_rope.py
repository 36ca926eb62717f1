"""RoPE and YaRN against report section 4.3 and an independent complex-number reference."""
import math

import pytest
import torch

from dsv3.model import ModelConfig
from dsv3.model.rope import RotaryEmbedding, rope_frequencies, yarn_correction_range


def v3(**overrides) -> ModelConfig:
    fields = dict(dim=64, n_heads=2, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                  kv_lora_rank=512, max_seq_len=4096, original_seq_len=4096)
    return ModelConfig(**{**fields, **overrides})


def test_yarn_ramp_indices_match_recipe():
    assert yarn_correction_range(v3(max_seq_len=4096 * 40)) == (10, 23)


def test_yarn_blends_only_between_the_ramp_indices():
    plain = rope_frequencies(v3())
    yarn = rope_frequencies(v3(max_seq_len=4096 * 40))
    torch.testing.assert_close(yarn[:10], plain[:10], rtol=0, atol=0)  # high frequencies kept
    torch.testing.assert_close(yarn[24:], plain[24:] / 40, rtol=1e-6, atol=0)  # low ones divided by s
    ratio = yarn[10:24] / plain[10:24]
    assert torch.all(ratio[1:] < ratio[:-1])  # a monotone blend from 1 toward 1/40 in between
    assert torch.all((ratio <= 1) & (ratio >= 1 / 40))


def test_plain_rope_frequencies_at_the_pretraining_context():
    freqs = rope_frequencies(v3())
    expected = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    torch.testing.assert_close(freqs, expected.float())


def test_mscale_squared_softmax_factor():
    base = 192 ** -0.5
    assert v3().softmax_scale == pytest.approx(base)  # no YaRN at 4K
    sqrt_t = 0.1 * math.log(40) + 1
    assert sqrt_t == pytest.approx(1.3689, abs=1e-4)
    assert v3(max_seq_len=32768).softmax_scale / base == pytest.approx(1.8739, abs=1e-4)
    assert v3(max_seq_len=32768, mscale=0.707).softmax_scale / base == pytest.approx(1.5896, abs=1e-4)


def test_rotation_matches_complex_interleaved_reference():
    cfg = v3(qk_rope_head_dim=16, max_seq_len=64)
    rope = RotaryEmbedding(cfg)
    x = torch.randn(2, 64, 3, 16)
    angles = torch.outer(torch.arange(64, dtype=torch.float32), rope_frequencies(cfg))
    freqs_cis = torch.polar(torch.ones_like(angles), angles).view(1, 64, 1, 8)
    reference = torch.view_as_real(torch.view_as_complex(x.view(2, 64, 3, 8, 2)) * freqs_cis).flatten(-2)
    torch.testing.assert_close(rope(x), reference, rtol=1e-5, atol=1e-5)


def test_scores_depend_only_on_relative_position():
    cfg = v3(qk_rope_head_dim=16, max_seq_len=64)
    rope = RotaryEmbedding(cfg)
    q, k = torch.randn(16), torch.randn(16)
    seq = torch.zeros(1, 64, 1, 16)

    def score(i, j):
        qs, ks = seq.clone(), seq.clone()
        qs[0, i, 0], ks[0, j, 0] = q, k
        return (rope(qs)[0, i, 0] * rope(ks)[0, j, 0]).sum()

    torch.testing.assert_close(score(10, 3), score(40, 33), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(score(10, 3), score(10, 4))


def test_sequence_longer_than_the_table_is_refused():
    rope = RotaryEmbedding(v3(qk_rope_head_dim=16, max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        rope(torch.randn(1, 9, 1, 16))


def yarn_reference(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Float64 RoPE frequencies and softmax scale past the original context L, written from the YaRN
    paper and DeepSeek-V3's inference code: pair j of base frequency theta_j = base^(-2j/d) turns
    r_j = L theta_j / 2pi times over L; the pair index where r_j = n is d ln(L / 2pi n) / (2 ln base).
    Pairs up to the one turning beta_fast times keep theta_j, those from the one turning beta_slow
    times on get theta_j / s, and a linear ramp in the pair index blends between; the logits are
    scaled by mscale^2 / sqrt(d_qk), mscale = 0.1 m ln s + 1."""
    d, base, length, s = cfg.qk_rope_head_dim, cfg.rope_theta, cfg.original_seq_len, cfg.rope_factor
    theta = torch.tensor([base ** (-2 * j / d) for j in range(d // 2)], dtype=torch.float64)

    def pair_turning(n):
        return d * math.log(length / (2 * math.pi * n)) / (2 * math.log(base))

    low, high = max(math.floor(pair_turning(cfg.beta_fast)), 0), min(math.ceil(pair_turning(cfg.beta_slow)), d - 1)
    ramp = torch.tensor([min(max((j - low) / max(high - low, 1e-3), 0.0), 1.0) for j in range(d // 2)],
                        dtype=torch.float64)
    freqs = theta / s * ramp + theta * (1 - ramp)
    mscale = 0.1 * cfg.mscale * math.log(s) + 1
    return freqs, mscale ** 2 / math.sqrt(cfg.qk_head_dim)


def test_attention_with_yarn_equals_the_float64_reference():
    """A 64-token forward of a model whose original context is 32 tokens (rope_factor 4, mscale
    0.707): its rotary tables and MLA output against float64 MLA with the reference's frequencies and
    scale. 16 channel pairs at base 10^4: pair 0 keeps its frequency, pairs 1-2 are blended, 3-15
    divided by 4. Bounds: the tables' angles are FP32 products of position <= 63 and frequency, good
    to ~64 eps32 = 1e-5; MLA as tests/test_model.py's FP32-vs-float64 comparison. Without YaRN the
    reference output moves far beyond that bound."""
    from conftest import build
    from test_model import naive_mla

    cfg = ModelConfig(vocab_size=97, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=1, n_dense_layers=1, n_heads=2,
                      q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=32, v_head_dim=6,
                      max_seq_len=64, original_seq_len=32, rope_factor=4.0, mscale=0.707, mtp_depth=0,
                      init_std=0.3)  # attention far from uniform, so positions matter
    assert cfg.yarn
    freqs, scale = yarn_reference(cfg)
    theta = torch.tensor([10000 ** (-2 * j / 32) for j in range(16)], dtype=torch.float64)
    ratio = freqs / theta
    assert ratio[0] == 1 and 1 / 4 < ratio[2] < ratio[1] < 1 and torch.all(ratio[3:] == 1 / 4)
    model = build(cfg)
    angles = torch.outer(torch.arange(64, dtype=torch.float64), freqs)
    torch.testing.assert_close(model.rope.cos.double(), angles.cos(), rtol=0, atol=1e-5)
    torch.testing.assert_close(model.rope.sin.double(), angles.sin(), rtol=0, atol=1e-5)
    attn = model.layers["0"].attn
    x = torch.randn(2, 64, cfg.dim, generator=torch.Generator().manual_seed(0))
    expected = naive_mla(attn, x, freqs, scale)
    torch.testing.assert_close(attn(x).double(), expected, rtol=1e-4, atol=1e-6)
    for wrong in (naive_mla(attn, x, theta, scale), naive_mla(attn, x, freqs, cfg.qk_head_dim ** -0.5)):
        assert (wrong - expected).abs().max() > 100 * 1e-4 * expected.abs().max()  # each half matters
