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


def slurm_test_cluster(answers, start: list[str], stop: list[str], not_here: str):
    """A generator for a module fixture: a SLURM test cluster that `answers()` is used as it is and
    left up; otherwise, only when DSV3_START_SLURM=1 asks for it (root: it installs and configures),
    `start` builds one, which `stop` removes after the module. Without one the tests skip with
    `not_here` as the reason (fail, with DSV3_REQUIRE_SLURM=1, as in CI)."""
    import os
    import subprocess

    if answers():
        yield
        return
    if os.environ.get("DSV3_START_SLURM") == "1":
        result = subprocess.run(start, capture_output=True, text=True, timeout=900)
        if result.returncode == 0:
            try:
                yield
            finally:
                subprocess.run(stop, capture_output=True, text=True, timeout=120)
            return
        not_here = f"could not start it: {result.stderr.strip() or result.stdout.strip()}"
    if os.environ.get("DSV3_REQUIRE_SLURM") == "1":
        pytest.fail(not_here)
    pytest.skip(not_here)
