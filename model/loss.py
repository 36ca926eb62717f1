"""The output head and its cross-entropy, a chunk of tokens at a time.

The plain form, F.cross_entropy(F.linear(h, W).float(), t), holds the logits of every token in the
batch several times over (BF16, their FP32 copy, the saved log-softmax, its gradient): with a 32K
vocabulary and 16K tokens that is 1 + 2 + 2 + 2 GiB, 23 GiB at a 100K vocabulary. Here the logits
live one chunk of CHUNK_ROWS tokens at a time, and the gradients of h and W are computed in the
same pass, while the chunk's logits exist; backward only scales them by the incoming gradient.
The same three matrix products as the plain form. On a GPU the work between them (log-sum-exp,
loss, softmax minus one-hot) is one compiled kernel that reads the BF16 logits and writes their
BF16 gradient, instead of seven passes over FP32 copies.
"""
import functools

import torch

# Tokens per chunk. The FP32 weight-gradient accumulator (vocab x dim) is read and written once per
# chunk, which costs under ~15% of the chunk's products at 4096 rows; logits per chunk: 4096 x vocab.
CHUNK_ROWS = 4096


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of cross_entropy(h @ weight.T, targets): h (..., dim), weight (vocab, dim),
    targets (...). Under autocast the products run in its dtype, as F.linear would; log-sum-exp
    and the loss are FP32 (or h's dtype if wider)."""
    h, targets = h.flatten(0, -2), targets.flatten()
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, targets, dtype)
    with torch.autocast(device, enabled=False):
        return _chunks(h.to(dtype), weight.to(dtype), targets, grads=False)[0] / h.shape[0]


def loss_and_logit_gradient(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits (rows, vocab) and targets (rows,): the summed loss, and softmax(logits) - one_hot
    (the gradient of that sum) in the logits' dtype. Arithmetic in FP32 or wider."""
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = wide.logsumexp(-1, keepdim=True)
    target = targets[:, None]
    hit = torch.arange(wide.shape[-1], device=wide.device) == target
    loss = (lse - wide.gather(1, target)).sum()
    return loss, ((wide - lse).exp() - hit.to(wide.dtype)).to(logits.dtype)


@functools.cache
def _compiled_loss_and_logit_gradient():
    return torch.compile(loss_and_logit_gradient, dynamic=False)


def _chunks(h: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, grads: bool):
    """Summed loss and, with grads, its gradients for h (h's dtype) and for w (FP32 or wider)."""
    n, wide = h.shape[0], torch.promote_types(h.dtype, torch.float32)
    fused = _compiled_loss_and_logit_gradient() if h.is_cuda else loss_and_logit_gradient
    loss = torch.zeros((), device=h.device, dtype=wide)
    grad_h = torch.empty_like(h) if grads else None
    grad_w = torch.zeros(w.shape, device=w.device, dtype=wide) if grads else None
    for start in range(0, n, CHUNK_ROWS):
        x = h[start:start + CHUNK_ROWS]
        chunk_loss, g = fused(x @ w.T, targets[start:start + CHUNK_ROWS])
        loss += chunk_loss
        if grads:
            grad_h[start:start + CHUNK_ROWS] = g @ w
            grad_w += g.T @ x
    return loss, grad_h, grad_w


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, dtype):
        with torch.autocast(h.device.type, enabled=False):
            loss, grad_h, grad_w = _chunks(h.to(dtype), weight.to(dtype), targets, grads=True)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes, ctx.n = (h.dtype, weight.dtype), h.shape[0]
        return loss / ctx.n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        scale = grad_loss / ctx.n  # to the gradients of the mean
        return (grad_h * scale).to(h_dtype), (grad_w * scale).to(w_dtype), None, None
