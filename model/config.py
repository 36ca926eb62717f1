"""The model's shape, as one typed config (report sections 2.1 and 4.2; docs/recipe.md).

Field names follow DeepSeek-V3's ``inference/model.py`` ``ModelArgs`` so a released
``config_*.json`` reads across one to one. Hydra builds this dataclass from ``recipes/model/*.yaml``;
``__post_init__`` runs on the final values and rejects shapes the model cannot build.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class ModelConfig:
    vocab_size: int = 1024
    dim: int = 128
    inter_dim: int = 256  # width of the dense SwiGLU FFNs (the first n_dense_layers)
    moe_inter_dim: int = 64  # width of one routed or shared expert
    n_layers: int = 4
    n_dense_layers: int = 1
    n_heads: int = 4
    # DeepSeekMoE
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    n_expert_groups: int = 1  # groups for node-limited routing (one group = one node)
    n_limited_groups: int = 1  # groups a token may reach
    score_func: str = "sigmoid"  # "sigmoid" (V3) or "softmax" (V2)
    route_scale: float = 1.0
    expert_bias: bool = True  # aux-loss-free balancing: a per-expert bias used only for selection
    seq_aux_alpha: float = 1e-4  # weight of the sequence-wise balance loss (eqs 17-20); 0 turns it off
    # MLA
    q_lora_rank: int = 0  # 0: queries are projected directly, no low-rank compression
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # RoPE / YaRN: YaRN is active when max_seq_len exceeds original_seq_len
    max_seq_len: int = 128
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: int = 32
    beta_slow: int = 1
    mscale: float = 1.0
    # Multi-token prediction depth D (0 turns MTP off)
    mtp_depth: int = 1
    norm_eps: float = 1e-6
    init_std: float = 0.006

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"Invalid model config: {message}")

        for name in ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_seq_len"):
            check(getattr(self, name) > 0, f"model.{name} must be positive, got {getattr(self, name)}.")
        check(0 <= self.n_dense_layers <= self.n_layers,
              f"model.n_dense_layers={self.n_dense_layers} must lie in [0, model.n_layers={self.n_layers}].")
        check(self.q_lora_rank >= 0, f"model.q_lora_rank must be >= 0, got {self.q_lora_rank}.")
        check(self.mtp_depth >= 0, f"model.mtp_depth must be >= 0, got {self.mtp_depth}.")
        check(self.qk_rope_head_dim % 2 == 0,
              f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates channel pairs).")
        check(self.score_func in ("sigmoid", "softmax"),
              f"model.score_func must be 'sigmoid' or 'softmax', got {self.score_func!r}.")
        if self.n_dense_layers < self.n_layers or self.mtp_depth > 0:  # some layer is an MoE
            check(self.n_routed_experts > 0 and self.n_shared_experts >= 0,
                  "model.n_routed_experts must be positive when any layer is an MoE.")
            check(1 <= self.n_activated_experts <= self.n_routed_experts,
                  f"model.n_activated_experts={self.n_activated_experts} must lie in "
                  f"[1, model.n_routed_experts={self.n_routed_experts}].")
            check(self.n_expert_groups >= 1 and self.n_routed_experts % self.n_expert_groups == 0,
                  f"model.n_routed_experts={self.n_routed_experts} must divide into "
                  f"model.n_expert_groups={self.n_expert_groups} equal groups.")
            check(1 <= self.n_limited_groups <= self.n_expert_groups,
                  f"model.n_limited_groups={self.n_limited_groups} must lie in "
                  f"[1, model.n_expert_groups={self.n_expert_groups}].")
            per_group = self.n_routed_experts // self.n_expert_groups
            check(self.n_activated_experts <= self.n_limited_groups * per_group,
                  f"model.n_activated_experts={self.n_activated_experts} exceeds the "
                  f"{self.n_limited_groups * per_group} experts in model.n_limited_groups={self.n_limited_groups} groups.")
            if self.n_expert_groups > 1 and self.expert_bias:
                check(per_group >= 2, "with model.expert_bias a group is scored by its top-2 experts, "
                      f"so each of the model.n_expert_groups={self.n_expert_groups} groups needs at least 2.")
        check(self.route_scale > 0, f"model.route_scale must be positive, got {self.route_scale}.")
        check(self.seq_aux_alpha >= 0, f"model.seq_aux_alpha must be >= 0, got {self.seq_aux_alpha}.")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def yarn(self) -> bool:
        """YaRN frequency blending and the mscale^2 logit factor are on past the original context."""
        return self.max_seq_len > self.original_seq_len

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim ** -0.5
        if self.yarn:
            mscale = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale *= mscale * mscale
        return scale
