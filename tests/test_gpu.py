"""GPU fast paths against the CPU reference paths. Run on a CUDA machine; skipped elsewhere."""
import pytest
import torch

from dsv3.model import ModelConfig
from dsv3.model.attention import causal_attention
from dsv3.model.moe import RoutedExperts, grouped_mm_supported

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_fused_attention_with_mla_head_dims_equals_fp64_math():
    generator = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(2, 8, 512, 192, device="cuda", generator=generator, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(2, 8, 512, 128, device="cuda", generator=generator, dtype=torch.bfloat16)
    out = causal_attention(q, k, v, scale=192 ** -0.5)
    assert out.shape == (2, 8, 512, 128)
    logits = (q.double() @ k.double().transpose(-1, -2)) * 192 ** -0.5
    logits = logits.masked_fill(torch.ones(512, 512, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
    reference = logits.softmax(-1) @ v.double()
    assert relative_error(out, reference) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="torch._grouped_mm's fused kernel needs compute capability 9.0")
def test_grouped_experts_equal_the_loop_on_gpu():
    experts = RoutedExperts(n_experts=16, dim=256, inter_dim=128, init_std=0.05).cuda()
    experts.reset_parameters(seed=0)
    counts = torch.tensor([0, 40, 3, 100, 0, 7, 64, 1, 9, 0, 33, 2, 5, 70, 11, 0], device="cuda")
    x = torch.randn(int(counts.sum()), 256, device="cuda")
    assert grouped_mm_supported(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        grouped, looped = experts._grouped(x, counts), experts._looped(x, counts)
    reference = experts.cpu()._looped(x.cpu().double().float(), counts.cpu())  # fp32 on the CPU
    assert relative_error(grouped.cpu(), looped.cpu().float()) < 1e-2
    assert relative_error(grouped.cpu(), reference) < 1e-2


def test_tiny_model_on_gpu_matches_cpu():
    from dsv3.train.loop import build_model

    cfg = ModelConfig(vocab_size=512, dim=128, inter_dim=256, moe_inter_dim=64, n_layers=3, n_dense_layers=1,
                      n_heads=4, n_routed_experts=8, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
                      route_scale=2.5, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                      v_head_dim=32, max_seq_len=64, mtp_depth=1, init_std=0.02)
    cpu_model = build_model(cfg, torch.device("cpu"), seed=0)
    gpu_model = build_model(cfg, torch.device("cuda"), seed=0)
    gpu_model.load_state_dict(cpu_model.state_dict())  # CUDA and CPU generators draw different values
    tokens = torch.randint(cfg.vocab_size, (4, 65), generator=torch.Generator().manual_seed(0))
    reference = cpu_model(tokens[:, :-1], tokens[:, 1:])
    gpu_tokens = tokens.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu_model(gpu_tokens[:, :-1], gpu_tokens[:, 1:])
    assert out.main_loss.item() == pytest.approx(reference.main_loss.item(), rel=1e-2)
    assert out.mtp_loss.item() == pytest.approx(reference.mtp_loss.item(), rel=1e-2)
