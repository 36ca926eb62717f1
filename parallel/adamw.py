"""The AdamW update, one place for every optimizer of the project (the BF16-moment variant
DeepSeek-V3 trained with included: report section 3.3.3)."""
from __future__ import annotations

import math

import torch


@torch.no_grad()
def adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, step: int,
           lr: float, betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One decoupled-weight-decay Adam update of `param` (step counts from 1), in place.

    The arithmetic runs in fp32 on the fp32 `param`; only the stored moments are rounded to their
    own dtype, which halves their memory in BF16. With fp32 moments it is torch.optim.AdamW's update.
    """
    beta1, beta2 = betas
    grad = grad.float()
    avg = exp_avg.float().lerp_(grad, 1 - beta1)
    avg_sq = exp_avg_sq.float().mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    exp_avg.copy_(avg)
    exp_avg_sq.copy_(avg_sq)
    param.mul_(1 - lr * weight_decay)
    denom = (avg_sq.sqrt() / math.sqrt(1 - beta2 ** step)).add_(eps)
    param.addcdiv_(avg, denom, value=-lr / (1 - beta1 ** step))
