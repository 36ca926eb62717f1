"""GPU fast paths against the CPU reference paths. Run on a CUDA machine; skipped elsewhere."""
import copy

import pytest
import torch

from dsv3.model import ModelConfig
from dsv3.model.attention import causal_attention
from dsv3.model.moe import RoutedExperts, grouped_mm_supported

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_hopper = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
    reason="needs an NVIDIA GPU of compute capability 9.0 or newer (Hopper): cuBLASLt has blockwise FP8 GEMMs "
           "only there")
needs_fp8_tensor_cores = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="needs a GPU with FP8 tensor cores (compute capability 8.9 or newer): the grouped FP8 kernels run there")


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


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="torch._grouped_mm's fused kernel needs compute capability 9.0")
def test_grouped_experts_gradients_equal_the_fp32_loop_on_gpu():
    """The BF16 routed experts' backward through torch._grouped_mm: every gradient within 1e-2 of
    the FP32 loop's on the CPU (the forward's bound: BF16 operands, FP32 accumulation; the same loop
    under BF16 autocast on the CPU is 0.55% off in every gradient), and exactly zero for the experts
    that got no rows. The BF16 step trains its experts through this."""
    counts = torch.tensor([0, 40, 3, 100, 0, 7, 64, 1, 9, 0, 33, 2, 5, 70, 11, 0])
    x = torch.randn(int(counts.sum()), 256)
    dy = torch.randn(int(counts.sum()), 256)
    initial = RoutedExperts(n_experts=16, dim=256, inter_dim=128, init_std=0.05)
    initial.reset_parameters(seed=0)  # on the CPU: a CUDA generator would draw other weights
    grads = {}
    for device in ("cuda", "cpu"):
        experts = copy.deepcopy(initial).to(device)
        x_in = x.to(device).requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
            y = experts._grouped(x_in, counts.to(device)) if device == "cuda" else experts._looped(x_in, counts)
        y.float().backward(dy.to(device))
        grads[device] = {"x": x_in.grad, **{name: getattr(experts, name).grad for name in ("w1", "w2", "w3")}}
    for name, reference in grads["cpu"].items():
        assert relative_error(grads["cuda"][name].cpu(), reference) < 1e-2, name
    for name in ("w1", "w2", "w3"):
        assert grads["cuda"][name][counts == 0].abs().max() == 0, name


def test_tiny_model_on_gpu_matches_cpu():
    from dsv3.parallel.runtime import Runtime
    from dsv3.train.build import build_model

    cfg = ModelConfig(vocab_size=512, dim=128, inter_dim=256, moe_inter_dim=64, n_layers=3, n_dense_layers=1,
                      n_heads=4, n_routed_experts=8, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1,
                      route_scale=2.5, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                      v_head_dim=32, max_seq_len=64, mtp_depth=1, init_std=0.02)
    cpu_model = build_model(cfg, torch.device("cpu"), 0, Runtime())
    gpu_model = build_model(cfg, torch.device("cuda"), 0, Runtime())
    gpu_model.load_state_dict(cpu_model.state_dict())  # CUDA and CPU generators draw different values
    tokens = torch.randint(cfg.vocab_size, (4, 65), generator=torch.Generator().manual_seed(0))
    reference = cpu_model(tokens[:, :-1], tokens[:, 1:])
    gpu_tokens = tokens.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = gpu_model(gpu_tokens[:, :-1], gpu_tokens[:, 1:])
    assert out.main_loss.item() == pytest.approx(reference.main_loss.item(), rel=1e-2)
    assert out.mtp_loss.item() == pytest.approx(reference.mtp_loss.item(), rel=1e-2)


def _fp8_data(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.exp(torch.randn(*shape[:-1], 1, generator=g))


def test_fp8_triton_kernels_equal_the_reference_on_gpu():
    from dsv3.fp8 import kernels, quant

    x, w = _fp8_data(300, 700).cuda(), _fp8_data(200, 260, seed=1).cuda()
    for power_of_two in (False, True):
        pairs = [(kernels.quantize_tiles(x, power_of_two), quant.quantize_tiles(x, power_of_two)),
                 (kernels.quantize_tiles_transposed(x, power_of_two), quant.quantize_tiles(x.t(), power_of_two)),
                 (kernels.quantize_wgrad_operands(x, x[:, :200], power_of_two),
                  quant.quantize_wgrad_operands(x, x[:, :200], power_of_two)),
                 (kernels.quantize_weight(w, power_of_two), quant.quantize_weight(w, power_of_two))]
        x_q, x_s = quant.quantize_tiles(x)  # an FP8 activation cache, dequantised on the way in
        for cols, warps in ((32, 4), (32, 1), (16, 1), (32, 2), (64, 2), (64, 4), (128, 8)):  # the sweep's programs
            pairs += [(kernels.quantize_tiles_transposed(x_q, power_of_two, x_scale=x_s, cols=cols, warps=warps),
                       quant.quantize_tiles_transposed(x_q, power_of_two, x_scale=x_s)),
                      (kernels.quantize_tiles_transposed(x, power_of_two, cols=cols, warps=warps),
                       quant.quantize_tiles(x.t(), power_of_two))]
        for rows, warps in ((16, 4), (32, 4), (16, 1), (32, 2), (64, 4)):
            pairs.append((kernels.quantize_tiles(x, power_of_two, rows, warps), quant.quantize_tiles(x, power_of_two)))
        for got, want in pairs:  # (q, s) pairs; the weight's: W's and W^T's
            for q, s, q_ref, s_ref in zip(got[::2], got[1::2], want[::2], want[1::2]):
                torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
                assert torch.equal(q.float(), q_ref.float())
        experts = [_fp8_data(3, 200, 384, seed=2).cuda(), _fp8_data(3, 200, 260, seed=3).cuda()]
        for got, want in zip(kernels.quantize_expert_blocks(experts, power_of_two),
                             quant.quantize_expert_blocks(experts, power_of_two)):
            assert got.shape == want.shape and torch.equal(got.float(), want.float())


@needs_hopper
def test_fp8_cublas_gemms_equal_the_emulation():
    from dsv3.fp8 import gemm, quant

    a, b = _fp8_data(300, 640, seed=2).cuda(), _fp8_data(400, 640, seed=3).cuda()
    a_q, a_s = quant.quantize_tiles(a)
    for b_q, b_s, blocks in [(*quant.quantize_blocks(b), True), (*quant.quantize_tiles(b), False)]:
        assert gemm.cublas_supported(a_q)
        out = gemm.gemm(a_q, a_s, b_q, b_s, blocks, torch.float32)[:, :400]
        reference = gemm.emulate(a_q.cpu(), a_s.cpu(), b_q.cpu(), b_s.cpu(), blocks)[:, :400]
        assert relative_error(out.cpu(), reference) < 4e-3  # cuBLASLt's output is BF16


def test_fp8_linear_on_gpu_equals_the_cpu_emulation():
    from dsv3.fp8.linear import FP8LinearFunction

    x, w, dy = _fp8_data(260, 384, seed=4), _fp8_data(200, 384, seed=5) * 0.05, _fp8_data(260, 200, seed=6)
    results = []
    for device in ("cpu", "cuda"):
        xd, wd = x.to(device).detach().requires_grad_(), w.to(device).detach().requires_grad_()
        y = FP8LinearFunction.apply(xd, wd, torch.float32, False)
        y.backward(dy.to(device))
        results.append([t.detach().cpu() for t in (y, xd.grad, wd.grad)])
    for cpu, gpu in zip(*results):
        assert relative_error(gpu, cpu) < 4e-3


@needs_hopper
def test_compiled_fp8_linear_equals_the_eager_one():
    """FP8Linear under torch.compile (Inductor quantises with its own fused kernels, padded and laid
    out for cuBLASLt) against eager (our Triton kernels), forward and backward, behind an RMSNorm as
    in the model. Both compute the same scales exactly (a max, then one division); a quotient may
    differ in its last bit where Inductor's division is not IEEE-rounded, which moves an element
    by one E4M3 step only when it sits on a rounding boundary: the results agree to 1e-3, where one
    wrong scale or layout is off by far more. Also opcheck on the cuBLASLt operator."""
    from torch import nn

    from dsv3.fp8 import gemm, quant
    from dsv3.fp8.linear import FP8Linear
    from dsv3.model.norm import RMSNorm

    torch.manual_seed(0)
    norm, linear = RMSNorm(384).cuda(), nn.Linear(384, 200, bias=False).cuda()
    linear.__class__ = FP8Linear
    x, dy = _fp8_data(4 * 260, 384, seed=7).cuda().view(4, 260, 384), _fp8_data(4 * 260, 200, seed=8).cuda()

    def run(fn):
        linear.weight.grad = None
        xd = x.detach().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = fn(xd)
        y.backward(dy.view(4, 260, 200).to(y.dtype))
        return [t.detach().float() for t in (y, xd.grad, linear.weight.grad)]

    eager = run(lambda t: linear(norm(t)))
    compiled = run(torch.compile(lambda t: linear(norm(t)), fullgraph=True))
    for name, got, want in zip(("y", "dx", "dw"), compiled, eager):
        assert relative_error(got, want) < 1e-3, name
    a_q, a_s = quant.quantize_tiles(x.view(-1, 384))
    b_q, b_s = quant.quantize_blocks(linear.weight.detach())
    torch.library.opcheck(gemm.scaled_mm, gemm.cublas_operands(a_q, a_s, b_q, b_s, True) + (True,),
                          test_utils=("test_autograd_registration", "test_faketensor"))


@needs_fp8_tensor_cores
def test_fp8_grouped_experts_on_gpu_equal_the_cpu_emulation():
    """Triton grouped GEMMs (Fprop, Dgrad, Wgrad) and SwiGLU kernels against the emulation,
    with an expert that gets no rows, one with several tiles and one with a partial tile."""
    from dsv3.fp8.linear import FP8ExpertsFunction

    # Tensor cores sum each 128-wide K group in reduced precision (report section 3.3.2), and the SwiGLU
    # output recomputed on the GPU may round to the neighbouring E4M3 value: 0.1-1.1% measured.
    tolerance = 2e-2

    counts = torch.tensor([0, 300, 5, 128, 77, 0, 1, 250])
    x = _fp8_data(int(counts.sum()), 256, seed=7)
    weights = [_fp8_data(8, 256, 384, seed=8) * 0.05, _fp8_data(8, 256, 384, seed=9) * 0.05,
               _fp8_data(8, 384, 256, seed=10) * 0.05]
    dy = _fp8_data(int(counts.sum()), 256, seed=11)
    results = []
    for device in ("cpu", "cuda"):
        leaves = [t.to(device).detach().requires_grad_() for t in (x, *weights)]
        y = FP8ExpertsFunction.apply(leaves[0], counts.to(device), *leaves[1:], torch.float32, False)
        y.backward(dy.to(device))
        results.append([t.detach().cpu() for t in (y, *(leaf.grad for leaf in leaves))])
    for name, cpu, gpu in zip(("y", "dx", "dw1", "dw3", "dw2"), *results):
        assert relative_error(gpu, cpu) < tolerance, name
    assert results[1][2][0].abs().sum() == 0 and results[1][2][5].abs().sum() == 0  # experts without rows


@needs_fp8_tensor_cores
def test_fp8_wgrad_configs_agree():
    """The grouped Wgrad kernel with one program per output block and with a persistent grid sums the
    same products in the same order: equal results, with an expert without rows and widths cut.
    Smaller blocks with one warpgroup issue narrower tensor-core products, whose FP32 sums may round
    in another order: equal to 1e-5 of the largest value (each is a sum of a few hundred FP32 terms)."""
    from dsv3.fp8 import kernels, quant
    from dsv3.fp8.groups import Groups

    counts = torch.tensor([0, 300, 5, 128, 77])
    operands = [quant.quantize_tiles_transposed(_fp8_data(510, width, seed=seed), False, Groups.of(counts, 510))
                for width, seed in ((384, 12), (512, 13))]
    a_t, a_s, b_t, b_s = (t.cuda() for pair in operands for t in pair)
    groups = Groups.of(counts.cuda(), 510)
    default = kernels.launch_grouped_wgrad(a_t, a_s, b_t, b_s, groups, 300, (250, 256))
    variants = [(kernels.WgradConfig(programs_per_sm=p), True) for p in (1, 2)]
    variants += [(kernels.WgradConfig(block_n=n, block_k=k, warps=4, stages=3, programs_per_sm=p), False)
                 for n, k, p in ((64, 128, 0), (128, 64, 0), (64, 64, 0), (64, 128, 2))]
    for config, bitwise in variants:
        for got, want in zip(kernels.launch_grouped_wgrad(a_t, a_s, b_t, b_s, groups, 300, (250, 256), config), default):
            assert got.shape == want.shape and got[0].abs().max() == 0, config
            if bitwise:
                assert torch.equal(got, want), config
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(), msg=str(config))


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_compiled_blocks_train_like_eager_blocks(tmp_path, precision):
    """Three steps of the tiny recipe with every block compiled: the losses of eager blocks, within
    BF16 autocast's rounding (fused kernels round intermediate values differently). In FP8 the
    layers' custom operators run inside the compiled graphs; a BF16 rounding that moves an input
    across an E4M3 rounding boundary (2^-4 apart, so for about one element in 16) changes that
    element by one E4M3 step, an error of the same mean size as BF16's, so the bound is the same."""
    from omegaconf import OmegaConf

    from dsv3.train.config import compose
    from dsv3.train.loop import Trainer

    runs = {}
    for setting in ("off", "on"):
        torch._dynamo.reset()  # compiled afresh: code another test compiled would push past Dynamo's recompile limit
        cfg = compose([f"train.run_dir={tmp_path / setting}", "data=synthetic", "train.wandb.mode=disabled",
                       "train.eval_every=0", "train.steps=3", f"train.compile={setting}",
                       f"precision={precision}"])
        runs[setting] = [r["loss"] for r in Trainer(OmegaConf.to_object(cfg)).run()]
    assert runs["on"] == pytest.approx(runs["off"], rel=2e-3)


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_cuda_graph_blocks_train_like_compiled_blocks(tmp_path, precision):
    """train.cuda_graphs=true: four steps, two of one micro-batch then two of two (a batch ramp:
    gradients kept from the graph's own memory, then added into buffers of their own), with a
    validation pass after each (graphs recorded without gradients too), give the losses of
    compiled blocks without graphs. Both run the same Inductor kernels (each run compiles afresh: a run that found the
    other's compiled code would recompile past Dynamo's limit and leave blocks eager); a graph
    replays them from the host's recording, so the figures may differ only by the order of atomic
    floating-point additions, which differs between any two runs (relative 1e-7 per addition in
    FP32; a few E4M3 roundings it moves across a boundary change a loss by far less than 1e-5).
    No block may have been left out of the graphs (Inductor counts each such skip), and the graphs
    must exist."""
    from omegaconf import OmegaConf
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    from dsv3.train.config import compose
    from dsv3.train.loop import Trainer

    runs = {}
    for graphs in (False, True):
        torch._dynamo.reset()
        counters.clear()
        cfg = compose([f"train.run_dir={tmp_path / str(graphs)}", "data=synthetic", "train.wandb.mode=disabled",
                       "train.eval_every=1", "train.eval_batches=2", "train.steps=4", "train.compile=on",
                       "train.global_batch_size=8", "train.micro_batch_size=4", "train.schedule.batch_ramp_start=4",
                       "train.schedule.batch_ramp_end=0.4", f"train.cuda_graphs={graphs}", f"precision={precision}"])
        history = Trainer(OmegaConf.to_object(cfg)).run()
        assert [r["batch_size"] for r in history] == [4, 4, 8, 8]
        runs[graphs] = [r["loss"] for r in history] + [r["val_loss"] for r in history if "val_loss" in r]
        if graphs:
            assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
            manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
            assert manager is not None and len(list(manager.get_roots())) > 0
    assert len(runs[True]) == 8, runs
    assert runs[True] == pytest.approx(runs[False], rel=1e-5)


def test_chunked_head_loss_on_gpu_equals_fp64_plain_form():
    """The head's chunked cross-entropy under BF16 autocast at a vocabulary of 32K, several chunks:
    loss and gradients against the plain form in float64 on the same BF16-rounded operands. The
    products round to BF16 (2^-8 relative), so the gradients land near 4e-3; the loss far under."""
    import torch.nn.functional as F

    from dsv3.model.loss import linear_cross_entropy

    generator = torch.Generator("cuda").manual_seed(0)
    h = torch.randn(8192, 512, device="cuda", generator=generator, requires_grad=True)
    weight = (0.05 * torch.randn(32768, 512, device="cuda", generator=generator)).requires_grad_()
    targets = torch.randint(32768, (8192,), device="cuda", generator=generator)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        value = linear_cross_entropy(h, weight, targets)
    value.backward()
    h64 = h.detach().bfloat16().double().requires_grad_()
    w64 = weight.detach().bfloat16().double().requires_grad_()
    expected = F.cross_entropy(F.linear(h64, w64), targets)
    expected.backward()
    assert abs(value.item() - expected.item()) < 2**-8 * expected.item()
    assert relative_error(h.grad, h64.grad) < 1e-2
    assert relative_error(weight.grad, w64.grad) < 1e-2


def test_clipped_fused_adamw_on_gpu_equals_clip_grad_norm_then_step():
    """The clip factor as fused AdamW's gradient divisor on the GPU, against clip_grad_norm_ and the
    same fused step: float32, a few ulps apart (a division where the reference multiplies)."""
    from dsv3.parallel.data_parallel import LocalGradients
    from dsv3.train.optim import clipped_step

    generator = torch.Generator("cuda").manual_seed(0)
    start = [torch.randn(256, 512, device="cuda", generator=generator), torch.randn(512, device="cuda", generator=generator)]
    grads = [torch.randn(p.shape, device="cuda", generator=generator) for p in start]
    results = []
    for ours in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = torch.optim.AdamW(params, lr=0.1, fused=True)
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            if ours:
                norm = clipped_step(optimizer, LocalGradients(params), 1.0)
            else:
                norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
        results.append((norm, params))
    assert results[1][0].item() == pytest.approx(results[0][0].item(), rel=1e-6)
    for a, b in zip(results[1][1], results[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
