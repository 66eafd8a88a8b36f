"""DiffMoE MLP (Shi et al., 2025): expert-choice routing over the batch's token pool in training,
dynamic capacity from a learned capacity predictor at evaluation.

Training (``module.train()``): the router scores every token of the batch (all images and
positions pooled, (T, E) softmax); each expert takes its top ``k = capacity * T / E`` tokens, so
every expert processes exactly ``k`` tokens and a token may go to 0..E experts; outputs are summed
weighted by the router score. A capacity predictor (a linear layer on the detached token) learns,
with binary cross-entropy, which experts chose each token; ``aux_loss`` holds that loss for the
training step to add.

Evaluation (``module.eval()``): no top-k over the pool (which would make a token's output depend
on the rest of the batch); token ``t`` goes to expert ``e`` when the capacity predictor's
probability exceeds ``threshold``, so the number of tokens per expert varies with the input.
``last_counts`` holds the tokens each expert processed in the latest forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn


class DiffMoEMlp(nn.Module):
    """Drop-in for a timm block's ``mlp``: (B, N, D) -> (B, N, D)."""

    def __init__(
        self, dim: int, hidden: int, num_experts: int = 4, capacity: float = 1.0,
        threshold: float = 0.5,
    ):  # fmt: skip
        super().__init__()
        self.num_experts, self.capacity = num_experts, capacity
        self.register_buffer("threshold", torch.tensor(float(threshold)))  # saved: eval routing
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(Mlp(dim, hidden) for _ in range(num_experts))
        self.capacity_predictor = nn.Linear(dim, num_experts)
        self.aux_loss = torch.zeros(())
        self.last_counts = torch.zeros(num_experts, dtype=torch.long)

    def route(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (T, E) boolean: which experts process each token (train: top-k per expert)."""
        if self.training:
            scores = self.router(tokens)
            k = max(1, min(len(tokens), int(self.capacity * len(tokens) / self.num_experts)))
            chosen = torch.zeros_like(scores, dtype=torch.bool)
            chosen.scatter_(0, scores.topk(k, dim=0).indices, True)
            logits = self.capacity_predictor(tokens.detach())
            self.aux_loss = F.binary_cross_entropy_with_logits(logits, chosen.float())
            return chosen
        return self.capacity_predictor(tokens).sigmoid() > self.threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        chosen = self.route(tokens)
        weights = self.router(tokens).softmax(dim=-1)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            idx = chosen[:, e].nonzero().squeeze(1)
            if len(idx):
                out = out.index_add(0, idx, weights[idx, e, None] * expert(tokens[idx]))
        self.last_counts = chosen.sum(0)
        return out.reshape(x.shape)


def moe_aux_loss(module: nn.Module) -> torch.Tensor:
    """Sum of the capacity-predictor BCE losses of the DiffMoE MLPs in ``module`` (0 if none)."""
    losses = [m.aux_loss for m in module.modules() if isinstance(m, DiffMoEMlp)]
    return torch.stack(losses).sum() if losses else torch.zeros(())
