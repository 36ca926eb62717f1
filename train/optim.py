"""AdamW, and the variant DeepSeek-V3 trained with: moments stored in BF16 (report section 3.3.3)."""
from __future__ import annotations

import math

import torch


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam whose moments are stored in `state_dtype`.

    The update runs in fp32 on the fp32 master weights; only the stored moments are rounded, which
    halves their memory in BF16. With state_dtype=float32 it is torch.optim.AdamW's update.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 state_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.state_dtype = state_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, weight_decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                state["step"] += 1
                step = state["step"].item()
                grad = p.grad.float()
                exp_avg = state["exp_avg"].float().lerp_(grad, 1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                p.mul_(1 - lr * weight_decay)
                denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
                p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
        return None


def build_optimizer(model: torch.nn.Module, lr: float, betas: tuple[float, float], eps: float,
                    weight_decay: float, state_dtype: str, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on every matrix and embedding, none on the 1-d norm gains.
    FP32 moments use torch's (fused on CUDA); BF16 moments use AdamW above."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if state_dtype == "bfloat16":
        return AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, state_dtype=torch.bfloat16)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type == "cuda")


def clipped_step(optimizer: torch.optim.Optimizer, parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Scales the gradients to a total 2-norm of at most max_norm, as clip_grad_norm_ does, and
    steps; returns the norm before clipping. torch's fused Adam(W) divides each gradient by its
    `grad_scale` tensor (the hook its loss scaler uses) while it updates, so there the clip factor
    goes in as that divisor and the gradients are not rewritten in a pass of their own first."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if isinstance(optimizer, torch.optim.Adam) and optimizer.defaults.get("fused"):
        optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp_min(1.0)  # 1 / clip_grad_norm_'s factor
        try:
            optimizer.step()
        finally:
            optimizer.grad_scale = None
    else:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, norm)
        optimizer.step()
    return norm
