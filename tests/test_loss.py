"""The chunked head + cross-entropy against the plain form computed in float64."""
import pytest
import torch
import torch.nn.functional as F

from dsv3.model import loss
from dsv3.model.loss import linear_cross_entropy


def reference(h, weight, targets):
    """The plain form in float64: loss, and the gradients of h and weight."""
    h64, w64 = h.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    value = F.cross_entropy(F.linear(h64, w64).flatten(0, -2), targets.flatten())
    value.backward()
    return value, h64.grad, w64.grad


def relative_error(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("chunk_rows", [4096, 3, 1])  # one chunk; 3 rows per chunk (the last one shorter); 1 row
def test_loss_and_gradients_equal_the_plain_form(monkeypatch, chunk_rows):
    """In float64 the chunked loss and both gradients equal the plain form's to rounding; in float32
    within float32's rounding of sums over 96 logits and 10 rows (far under 1e-5)."""
    monkeypatch.setattr(loss, "CHUNK_ROWS", chunk_rows)
    generator = torch.Generator().manual_seed(0)
    for dtype, tolerance in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        h = torch.randn(2, 5, 16, generator=generator, dtype=dtype, requires_grad=True)
        weight = torch.randn(96, 16, generator=generator, dtype=dtype, requires_grad=True)
        targets = torch.randint(96, (2, 5), generator=generator)
        expected, grad_h, grad_w = reference(h, weight, targets)
        value = linear_cross_entropy(h, weight, targets)
        (3.0 * value).backward()  # the incoming gradient scales both
        assert value.dtype == dtype  # FP32 or wider
        assert abs(value.item() - expected.item()) <= max(tolerance, 2e-7) * expected.item()
        assert h.grad.dtype == dtype and weight.grad.dtype == dtype
        assert relative_error(h.grad, 3 * grad_h) < tolerance
        assert relative_error(weight.grad, 3 * grad_w) < tolerance


def test_without_gradients_only_the_loss_is_computed():
    h, weight = torch.randn(7, 8), torch.randn(32, 8, requires_grad=True)
    targets = torch.randint(32, (7,))
    with torch.no_grad():
        value = linear_cross_entropy(h, weight, targets)
    assert value.grad_fn is None
    assert value.item() == pytest.approx(reference(h, weight, targets)[0].item(), rel=1e-6)


def test_under_bf16_autocast_the_products_are_bf16():
    """Autocast on the CPU: the same loss as the plain form under the same autocast, within BF16's
    rounding of the logits (8 bits: 2^-8 relative per logit; the loss moves far less)."""
    generator = torch.Generator().manual_seed(1)
    h = torch.randn(64, 32, generator=generator, requires_grad=True)
    weight = torch.randn(128, 32, generator=generator, requires_grad=True)
    targets = torch.randint(128, (64,), generator=generator)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = linear_cross_entropy(h, weight, targets)
        plain = F.cross_entropy(F.linear(h, weight).float(), targets)
    value.backward()
    assert h.grad.dtype == torch.float32 and weight.grad.dtype == torch.float32
    assert value.item() == pytest.approx(plain.item(), rel=2**-8)
    expected = reference(h.to(torch.bfloat16).float(), weight.to(torch.bfloat16).float(), targets)
    assert relative_error(h.grad, expected[1]) < 2**-6  # BF16 gradients of the logits and products
    assert relative_error(weight.grad, expected[2]) < 2**-6
