"""Parameter and FLOP counts: docs/recipe.md's figures, and the formulas against real modules."""
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from dsv3.model import ModelConfig, Transformer, count
from dsv3.train.config import compose

from conftest import build


def recipe(name: str) -> ModelConfig:
    return OmegaConf.to_object(compose([f"model={name}"]).model)


def module_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_v3_671b_matches_the_report():
    cfg = recipe("v3_671b")
    counts = count(cfg, seq_len=4096)
    assert counts.total_params / 1e9 == pytest.approx(671.03, abs=0.005)  # docs/recipe.md (report: 671B / 37B)
    assert counts.activated_params / 1e9 == pytest.approx(37.55, abs=0.005)
    assert counts.mtp_params / 1e9 == pytest.approx(11.5, rel=0.015)  # README_WEIGHTS: 11.5B unique
    assert counts.flop_per_token / 1e9 == pytest.approx(250.0, rel=0.02)  # docs/recipe.md, our count
    assert counts.mtp_flop_per_token / 1e9 == pytest.approx(10.2, rel=0.02)

    with torch.device("meta"):  # the real modules, without allocating a byte
        model = Transformer(cfg)
    mtp = module_params(model.mtp)
    assert module_params(model) - mtp == counts.total_params
    assert mtp == counts.mtp_params


@pytest.mark.parametrize("name, total, activated", [("v2_lite_16b", 15.7, 2.66), ("v2_236b", 235.7, 21.4)])
def test_v2_shapes_match_recipe_counts(name, total, activated):
    cfg = recipe(name)
    counts = count(cfg)
    assert counts.total_params / 1e9 == pytest.approx(total, abs=0.05)
    assert counts.activated_params / 1e9 == pytest.approx(activated, abs=0.05)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert module_params(model) - module_params(model.mtp) == counts.total_params


def test_small_recipe_is_in_its_size_class():
    counts = count(recipe("small"))
    assert 0.5e9 <= counts.total_params <= 1.0e9


def test_activated_params_equal_modules_minus_unpicked_experts(tiny_cfg):
    model = build(tiny_cfg)
    counts = count(tiny_cfg)
    expert = 3 * tiny_cfg.dim * tiny_cfg.moe_inter_dim
    unpicked = (tiny_cfg.n_routed_experts - tiny_cfg.n_activated_experts) * expert
    mtp = module_params(model.mtp)
    assert module_params(model) - mtp - tiny_cfg.n_moe_layers * unpicked == counts.activated_params
    assert mtp - tiny_cfg.mtp_depth * unpicked == counts.mtp_activated_params


@pytest.mark.parametrize("mtp_depth", [0, 2])
def test_flops_equal_a_measured_forward(tiny_cfg, mtp_depth):
    """torch's FLOP counter over a real forward. GEMMs must match exactly; the counter charges
    attention without the causal mask, twice the causal FLOPs that the formula counts."""
    cfg = ModelConfig(**{**vars(tiny_cfg), "mtp_depth": mtp_depth})
    model = build(cfg)
    batch, seq = 2, 16
    tokens = torch.randint(cfg.vocab_size, (batch, seq + 1))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # with gradients on, the head's
        model(tokens[:, :-1], tokens[:, 1:])  # loss also runs its two backward products in the forward
    counts = count(cfg, seq_len=seq)

    def causal_attention(length):  # per token, as in the formula
        return 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * length / 2

    main_forward = counts.flop_per_token / 3
    expected = batch * seq * (main_forward + cfg.n_layers * causal_attention(seq))
    for k in range(1, mtp_depth + 1):  # depth k runs on seq - k positions
        depth_gemms = counts.mtp_flop_per_token / 3 / mtp_depth - causal_attention(seq)
        expected += batch * (seq - k) * (depth_gemms + 2 * causal_attention(seq - k))
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)
