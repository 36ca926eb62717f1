"""AdamW, and the variant DeepSeek-V3 trained with: moments stored in BF16 (report section 3.3.3);
the clipped step of every layout, and the optimizer's state by parameter name for checkpoints."""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_optimizer_state_dict

from dsv3.parallel.adamw import adamw_
from dsv3.parallel.zero import ZeroAdamW


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam whose moments are stored in `state_dtype`.

    The update is adamw_'s; with state_dtype=float32 it is torch.optim.AdamW's.
    """

    def __init__(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 state_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.state_dtype = state_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=self.state_dtype)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=self.state_dtype)
                state["step"] += 1
                adamw_(p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"].item(), group["lr"],
                       group["betas"], group["eps"], group["weight_decay"])
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


def clipped_step(optimizer: torch.optim.Optimizer, gradients, max_norm: float) -> torch.Tensor:
    """Reduces `gradients` (LocalGradients, AllReducedGradients or ShardedGradients: the layout's),
    scales them to a total 2-norm of at most max_norm, as clip_grad_norm_ does, and steps; returns
    the norm before clipping. torch's fused Adam(W) divides each gradient by its `grad_scale`
    tensor (the hook its loss scaler uses) while it updates, so there the clip factor goes in as
    that divisor and the gradients are not rewritten in a pass of their own first."""
    gradients.reduce()
    norm = gradients.norm()
    if isinstance(optimizer, torch.optim.Adam) and optimizer.defaults.get("fused"):
        optimizer.grad_scale = ((norm + 1e-6) / max_norm).clamp_min(1.0)  # 1 / clip_grad_norm_'s factor
        try:
            optimizer.step()
        finally:
            optimizer.grad_scale = None
    else:
        gradients.scale(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        optimizer.step()
    return norm


def moments(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state keyed by parameter name, each parameter's whole, whatever the layout."""
    if isinstance(optimizer, ZeroAdamW):  # keyed so already, gathered from the ranks' slices
        return optimizer.state_dict()
    return get_state_dict(model, optimizer)[1]


def load_moments(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Loads what `moments` returns (the per-parameter "state" of it; the rest is the config's)."""
    if isinstance(optimizer, ZeroAdamW):
        optimizer.load_state_dict(state)
    else:
        set_optimizer_state_dict(model, optimizer, {**get_state_dict(model, optimizer)[1], "state": state["state"]})
