"""The DeepSeek-V3 Transformer: pre-norm blocks of MLA + (dense FFN | DeepSeekMoE), a final norm,
an untied output head, and D sequential multi-token-prediction modules (report sections 2.1-2.2)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from .attention import MLA
from .config import ModelConfig
from .loss import linear_cross_entropy
from .mlp import MLP
from .moe import MoE, RoutedExperts, Router
from .norm import RMSNorm
from .rope import RotaryEmbedding


class Block(nn.Module):
    """h = x + MLA(norm(x)); out = h + FFN(norm(h)). Returns the MoE balance loss (0 if dense)."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = MLA(cfg, rope)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if moe else MLP(cfg.dim, cfg.inter_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.attention(x)
        if isinstance(self.ffn, MoE):
            ffn_out, balance_loss = self.ffn(self.ffn_norm(h))
        else:
            ffn_out, balance_loss = self.ffn(self.ffn_norm(h)), h.new_zeros((), dtype=torch.float32)
        return h + ffn_out, balance_loss

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.attn_norm(x))


class MTPModule(nn.Module):
    """Depth-k prediction: h'_i = M_k [enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)], then one block.

    The embedding comes first in the concatenation, as DeepSeek-V3's released weights expect.
    The shared embedding and output head belong to the Transformer, not to this module.
    """

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.dim, cfg.dim, bias=False)
        self.block = Block(cfg, rope, moe=True)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)  # in front of the shared head

    def forward(self, h_prev: torch.Tensor, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h_prev)], dim=-1))
        return self.block(h)


def total_loss(main, mtp, balance, mtp_weight: float):
    """The training objective, L_main + lambda L_MTP + L_balance, of tensors or of their values."""
    return main + mtp_weight * mtp + balance


@dataclass
class ModelOutput:
    main_loss: torch.Tensor  # next-token cross-entropy
    mtp_losses: list[torch.Tensor]  # cross-entropy of depth k = 1..D
    balance_loss: torch.Tensor  # sequence-wise balance loss, summed over MoE layers (MTP's included)

    @property
    def mtp_loss(self) -> torch.Tensor:
        """(1/D) sum_k L_MTP^k; the trainer multiplies it by lambda."""
        if not self.mtp_losses:
            return self.main_loss.new_zeros(())
        return torch.stack(self.mtp_losses).mean()

    def total(self, mtp_weight: float) -> torch.Tensor:
        return total_loss(self.main_loss, self.mtp_loss, self.balance_loss, mtp_weight)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.rope = RotaryEmbedding(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        # A dict keyed by the layer's index, so a pipeline stage that keeps some layers keeps their names.
        self.layers = nn.ModuleDict(
            {str(i): Block(cfg, self.rope, moe=i >= cfg.n_dense_layers) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, self.rope) for _ in range(cfg.mtp_depth))

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        """tokens: (batch, seq). Without targets, returns next-token logits (batch, seq, vocab).

        With targets (batch, seq), where targets[:, i] = t_{i+1}, returns a ModelOutput. MTP
        depth k at position i sees Emb(t_{i+k}) and predicts t_{i+k+1} = targets[:, i+k], so it
        covers positions 0 .. seq-1-k.
        """
        h = self.embed(tokens)
        balance_loss = h.new_zeros((), dtype=torch.float32)
        for layer in self.layers.values():
            h, layer_loss = layer(h)
            balance_loss = balance_loss + layer_loss
        if targets is None:
            return self.head(self.norm(h))
        out = self.losses(h, tokens, targets)
        out.balance_loss = out.balance_loss + balance_loss
        return out

    def losses(self, h: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor) -> ModelOutput:
        """The head of the model: main loss from the last layer's output h, then the MTP modules
        (whose balance losses the output carries).

        Each depth takes the tensor the shared head saw one depth earlier: depth 1 the output of the
        final norm, depth k > 1 that of depth k-1's norm. Megatron-Core trains MTP this way
        (NVIDIA/Megatron-LM, megatron/core/transformer/multi_token_prediction.py), and vLLM runs
        DeepSeek-V3's released MTP module on the final-normed hidden state (vllm-project/vllm,
        vllm/model_executor/models/deepseek_mtp.py and deepseek_v2.py). The report (section 2.2,
        eq. 21) calls h^0 the representation given by the main model, without saying which.
        """
        h = self.norm(h)
        main_loss = linear_cross_entropy(h, self.head.weight, targets)
        mtp_losses, balance_loss = [], h.new_zeros((), dtype=torch.float32)
        for k, module in enumerate(self.mtp, start=1):
            out, layer_loss = module(h[:, :-1], self.embed(tokens[:, k:]))  # h^{k-1} holds seq-k+1 positions
            balance_loss = balance_loss + layer_loss
            h = module.norm(out)
            mtp_losses.append(linear_cross_entropy(h, self.head.weight, targets[:, k:]))
        return ModelOutput(main_loss, mtp_losses, balance_loss)

    def blocks(self) -> list[Block]:
        """Every transformer block, main layers then MTP (the unit torch.compile is applied to)."""
        return [*self.layers.values(), *(m.block for m in self.mtp)]

    def routers(self) -> list[Router]:
        """Every MoE router, main layers then MTP, in a fixed order (the bias update relies on it)."""
        return [m for m in self.modules() if isinstance(m, Router)]

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """N(0, init_std) for every matrix, ones for norm gains, zero router biases.

        Every tensor draws from a stream keyed by the seed and its name, and every routed expert
        by its global index, so how the model is cut (pipeline stages, expert shards) and the
        order of initialisation do not change a single value.
        """
        self.rope.reset_parameters(self.rope.cos.device)
        for name, module in self.named_modules():
            if isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, RoutedExperts):
                module.reset_parameters(seed=_stream(seed, name))
            elif isinstance(module, Router):
                module.reset_parameters(_generator(seed, name, module.weight.device))
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, self.cfg.init_std,
                                generator=_generator(seed, name, module.weight.device))


def _stream(seed: int, name: str) -> int:
    return (seed * 2654435761 + zlib.crc32(name.encode())) % (2**63)


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(_stream(seed, name))
    return generator
