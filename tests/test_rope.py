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
