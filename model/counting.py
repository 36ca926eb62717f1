"""Parameter and FLOP counts from the config alone, for sizing runs and for MFU.

Conventions (ours; docs/recipe.md, model table):
- totals include the embedding and the output head; activated counts take the top-k routed experts
  plus the shared experts of each MoE layer. The router bias is a buffer, not a parameter.
- model FLOPs per token = 3 x forward (forward + backward), where forward = 2 x activated GEMM
  parameters (the head included, the embedding lookup not) + causal attention,
  2 * n_heads * (qk_head_dim + v_head_dim) * seq / 2 per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


@dataclass(frozen=True)
class ModelCounts:
    total_params: int  # main model, embedding and head included, MTP excluded
    activated_params: int  # per token, main model
    mtp_params: int  # unique to the MTP modules (the embedding and head are shared)
    mtp_activated_params: int
    flop_per_token: float  # model FLOPs per trained token, main model, forward + backward
    mtp_flop_per_token: float  # added by the MTP modules, their use of the shared head included


def _attention_params(cfg: ModelConfig) -> int:
    h = cfg.n_heads
    if cfg.q_lora_rank == 0:
        q = cfg.dim * h * cfg.qk_head_dim
    else:
        q = cfg.dim * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * cfg.qk_head_dim
    kv = (cfg.dim * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
          + cfg.kv_lora_rank * h * (cfg.qk_nope_head_dim + cfg.v_head_dim))
    return q + kv + h * cfg.v_head_dim * cfg.dim


def _attention_norm_params(cfg: ModelConfig) -> int:
    return cfg.kv_lora_rank + (cfg.q_lora_rank if cfg.q_lora_rank else 0)


def _moe_params(cfg: ModelConfig, experts: int) -> int:
    """Router + `experts` routed experts + shared experts."""
    expert = 3 * cfg.dim * cfg.moe_inter_dim
    return cfg.n_routed_experts * cfg.dim + experts * expert + cfg.n_shared_experts * expert


def count(cfg: ModelConfig, seq_len: int | None = None) -> ModelCounts:
    seq_len = seq_len or cfg.max_seq_len
    embed = head = cfg.vocab_size * cfg.dim
    attn = _attention_params(cfg)
    block = attn + 2 * cfg.dim  # two pre-norms
    dense_ffn = 3 * cfg.dim * cfg.inter_dim
    moe_total, moe_active = _moe_params(cfg, cfg.n_routed_experts), _moe_params(cfg, cfg.n_activated_experts)

    layers = cfg.n_layers * block + cfg.n_dense_layers * dense_ffn
    total = embed + head + cfg.dim + layers + cfg.n_moe_layers * moe_total
    activated = embed + head + cfg.dim + layers + cfg.n_moe_layers * moe_active

    mtp_extra = 2 * cfg.dim * cfg.dim + 3 * cfg.dim  # eh_proj, enorm, hnorm, final norm
    mtp_total = cfg.mtp_depth * (mtp_extra + block + moe_total)
    mtp_active = cfg.mtp_depth * (mtp_extra + block + moe_active)

    # Forward FLOPs: 2 per GEMM weight a token meets, plus causal attention's QK^T and PV.
    attn_gemm = attn - _attention_norm_params(cfg)
    attn_core = 2 * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    layer_forward = 2 * attn_gemm + attn_core
    forward = (cfg.n_layers * layer_forward + 2 * cfg.n_dense_layers * dense_ffn
               + 2 * cfg.n_moe_layers * moe_active + 2 * head)
    mtp_forward = cfg.mtp_depth * (2 * 2 * cfg.dim * cfg.dim + layer_forward + 2 * moe_active + 2 * head)
    return ModelCounts(total, activated, mtp_total, mtp_active, 3 * forward, 3 * mtp_forward)
