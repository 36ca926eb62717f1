"""The DeepSeek-V3 model in plain PyTorch: no process groups, no FP8, no pipelines in here."""
from .config import ModelConfig
from .counting import ModelCounts, count
from .moe import MoE, Router, update_expert_bias
from .transformer import ModelOutput, Transformer, total_loss

__all__ = ["ModelConfig", "ModelCounts", "count", "MoE", "Router", "update_expert_bias",
           "ModelOutput", "Transformer", "total_loss"]
