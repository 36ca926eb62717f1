"""Multi-head Latent Attention (DeepSeek-V3 report section 2.1.1, eqs 1-11).

Queries go through an optional low-rank latent c_q; keys and values through a latent c_kv of
width kv_lora_rank. A single 64-d rotary key k_rope is shared by all heads. Per head the query
and key are [nope ; rope] (192-d with the V3 shape) while values are 128-d.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .norm import RMSNorm
from .rope import RotaryEmbedding


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal softmax(q k^T * scale) v over (batch, heads, seq, dim), accumulated in fp32.

    MLA's q/k (192) and v (128) head dims differ, which PyTorch's flash kernel refuses; SDPA then
    picks cuDNN's fused kernel, which takes them as they are (on an H100 it ran 2.1x faster than
    flash on v zero-padded to 192: benchmarks/RESULTS.md), or its exact math fallback on the CPU.
    """
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding):
        super().__init__()
        self.cfg = cfg
        self.rope = rope  # shared with every layer; not owned
        h, nope, rope_dim = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        if cfg.q_lora_rank == 0:
            self.w_q = nn.Linear(cfg.dim, h * cfg.qk_head_dim, bias=False)
        else:
            self.w_dq = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)  # W^{DQ}
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.w_uq = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)  # W^{UQ} and W^{QR}
        self.w_dkv = nn.Linear(cfg.dim, cfg.kv_lora_rank + rope_dim, bias=False)  # W^{DKV} and W^{KR}
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.w_ukv = nn.Linear(cfg.kv_lora_rank, h * (nope + cfg.v_head_dim), bias=False)  # W^{UK}, W^{UV}
        self.w_o = nn.Linear(h * cfg.v_head_dim, cfg.dim, bias=False)
        self.softmax_scale = cfg.softmax_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        batch, seq, _ = x.shape
        h, nope, rope_dim = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim

        if cfg.q_lora_rank == 0:
            q = self.w_q(x)
        else:
            c_q = self.q_norm(self.w_dq(x))
            q = self.w_uq(c_q)
        q_nope, q_rope = q.view(batch, seq, h, cfg.qk_head_dim).split([nope, rope_dim], dim=-1)
        q_rope = self.rope(q_rope)

        c_kv, k_rope = self.w_dkv(x).split([cfg.kv_lora_rank, rope_dim], dim=-1)
        k_rope = self.rope(k_rope.unsqueeze(2))  # one rotary key, shared by every head
        kv = self.w_ukv(self.kv_norm(c_kv)).view(batch, seq, h, nope + cfg.v_head_dim)
        k_nope, v = kv.split([nope, cfg.v_head_dim], dim=-1)

        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, -1, h, -1)], dim=-1)
        out = causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.softmax_scale)
        return self.w_o(out.transpose(1, 2).reshape(batch, seq, h * cfg.v_head_dim))
