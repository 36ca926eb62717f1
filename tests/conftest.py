import pytest
import torch

from dsv3.model import ModelConfig


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    """A small V3-shaped config: q-LoRA, 2 groups of 4 experts, top-2, bias on, MTP D=2."""
    return ModelConfig(vocab_size=97, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=3, n_dense_layers=1,
                       n_heads=2, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                       n_expert_groups=2, n_limited_groups=1, route_scale=2.5, q_lora_rank=16,
                       kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
                       max_seq_len=32, mtp_depth=2, init_std=0.02)


def build(cfg: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.float32):
    from dsv3.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed)
    return model.to(dtype)
