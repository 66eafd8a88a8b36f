"""DiffMoE MLP (Shi et al., 2025) as theAdamColton/diffmoe runs it (``diffmoe/diffmoe.py`` at the
commit elucidating-featurenorm-ijepa pins; docs/diffmoe.md).

- Gate: ``(tanh(router(x)) + 1) / 2`` per expert, a bias-free linear router (not a softmax).
- Training (``module.train()``): expert-choice routing over the batch's token pool (all images
  and positions, (T, E) gate scores); each expert takes its top ``k = int(T * capacity) // E``
  tokens, so a token may go to 0..E experts; the output is the gate-weighted sum of the experts.
- Capacity predictor: a 2-layer MLP (``Linear(D, D)``, tanh-GELU, ``Linear(D, E)``) on the
  detached token learns, with binary cross-entropy, which experts chose each token; ``aux_loss``
  holds that loss for the training step to add.
- Eval threshold: per expert, the k-th largest predicted probability of each training batch
  (averaged over ranks), tracked by a moving average (``beta`` 0.95, initialised by the first
  batch) in the ``threshold`` buffer. In evaluation token ``t`` goes to expert ``e`` when its
  predicted probability is ``>= threshold[e]``, so the number of tokens per expert varies with the
  input and a token's output does not depend on the rest of the batch.
- Padding (packed rows): ``padding`` (B, N) bool, set for a forward, gives padding tokens gate
  0 in training (they are routed last and add nothing), keeps them out of the BCE (mean over the
  other tokens) and never routes them in evaluation, as the seed's ``padding_mask``; ``k`` and
  the threshold still count every token, as there.
- Experts are timm ``Mlp``s with the seed's tanh-approximated GELU. The module receives the
  block's normalised tokens and returns the MLP branch (the timm block adds the residual).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

TanhGELU = partial(nn.GELU, approximate="tanh")


class DiffMoEMlp(nn.Module):
    """Drop-in for a timm block's ``mlp``: (B, N, D) -> (B, N, D).

    ``threshold`` is the eval threshold of every expert until the first training step sets the
    moving average; ``last_counts`` (E,) the tokens each expert processed in the latest forward.
    """

    def __init__(
        self, dim: int, hidden: int, num_experts: int = 4, capacity: float = 1.0,
        threshold: float = 0.5, beta: float = 0.95,
    ):  # fmt: skip
        super().__init__()
        self.num_experts, self.capacity, self.beta = num_experts, capacity, beta
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(
            Mlp(dim, hidden, act_layer=TanhGELU) for _ in range(num_experts)
        )
        self.capacity_predictor = nn.Sequential(
            nn.Linear(dim, dim), TanhGELU(), nn.Linear(dim, num_experts)
        )
        self.register_buffer("threshold", torch.full((num_experts,), float(threshold)))
        self.register_buffer("threshold_initialized", torch.zeros((), dtype=torch.bool))
        self.aux_loss = torch.zeros(())
        self.last_counts = torch.zeros(num_experts, dtype=torch.long)
        self.padding: Optional[torch.Tensor] = None  # (B, N) bool: padding of the next inputs

    def gate(self, tokens: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (T, E) mixing weights in [0, 1]."""
        return (torch.tanh(self.router(tokens)) + 1) / 2

    def route(self, tokens: torch.Tensor, weights: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """(T, D) -> (T, E) boolean: which experts process each token (train: top-k per expert of
        the ``weights``). ``pad`` (T,) bool: padding tokens, never routed in evaluation, gate 0
        and out of the BCE in training (the seed's ``padding_mask``)."""
        if not self.training:
            return (self.capacity_predictor(tokens).sigmoid() >= self.threshold) & ~pad[:, None]
        k = max(1, min(len(tokens), int(len(tokens) * self.capacity) // self.num_experts))
        chosen = torch.zeros(len(tokens), self.num_experts, dtype=torch.bool, device=tokens.device)
        chosen.scatter_(0, weights.topk(k, dim=0).indices, True)
        logits = self.capacity_predictor(tokens.detach())
        bce = F.binary_cross_entropy_with_logits(logits, chosen.to(logits.dtype), reduction="none")
        self.aux_loss = bce.mean(-1)[~pad].sum() / (~pad).sum().clamp(min=1)
        self.update_threshold(logits.detach().float().sigmoid().sort(dim=0).values[-k])
        return chosen

    @torch.no_grad()
    def update_threshold(self, batch_threshold: torch.Tensor) -> None:
        """Moving average of the (E,) per-expert thresholds (mean over ranks first)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch_threshold)
            batch_threshold = batch_threshold / dist.get_world_size()
        if not bool(self.threshold_initialized):
            self.threshold.copy_(batch_threshold)
            self.threshold_initialized.fill_(True)
        else:
            self.threshold.lerp_(batch_threshold.to(self.threshold.dtype), 1.0 - self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        pad = torch.zeros(len(tokens), dtype=torch.bool, device=x.device)
        if self.padding is not None:
            pad = self.padding.reshape(-1).to(x.device)
        weights = self.gate(tokens).masked_fill(pad[:, None], 0)
        chosen = self.route(tokens, weights, pad)
        out = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            idx = chosen[:, e].nonzero().squeeze(1)
            if len(idx):
                out = out.index_add(0, idx, weights[idx, e, None] * expert(tokens[idx]))
        self.last_counts = chosen.sum(0)
        return out.reshape(x.shape)


def moe_aux_loss(module: nn.Module) -> torch.Tensor:
    """Mean over the DiffMoE MLPs in ``module`` of their capacity-predictor BCE (0 if none), as
    the seed's encoder averages it over its blocks."""
    losses = [m.aux_loss for m in module.modules() if isinstance(m, DiffMoEMlp)]
    return torch.stack(losses).mean() if losses else torch.zeros(())
