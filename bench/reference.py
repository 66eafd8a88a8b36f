"""Official-I-JEPA-style reference ViT pieces for the benchmarks, written the way the official code
is: manual attention (``softmax(q @ k^T * scale) @ v``), plain Python loops over the masks in
``ref_apply_masks``, ``ref_repeat_interleave_batch`` and the predictor, fixed 2D sin-cos position
embeddings. Parameter names match the toolkit's encoder and predictor, so ``copy_of`` loads their
weights as they are.

Not a package module: the bench scripts (run as ``python bench/X.py``) put ``bench/`` on
``sys.path`` and import it as ``from reference import ...``.
"""

from __future__ import annotations

import torch
from torch import nn

from ijepa_toolkit.models.pos_embed import sincos_2d


class RefAttention(nn.Module):
    """(B, N, dim) -> (B, N, dim), attention written out as in the official code."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class RefMlp(nn.Module):
    """(B, N, dim) -> (B, N, dim): fc1, GELU, fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    """(B, N, dim) -> (B, N, dim) pre-norm transformer block; ``drop_path`` > 0 drops each
    sample's residual branches with that probability in training (stochastic depth)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), RefAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), RefMlp(dim, int(dim * mlp_ratio))
        self.drop_path = drop_path

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        mask = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)
        return x * mask / keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._drop(self.attn(self.norm1(x)))
        return x + self._drop(self.mlp(self.norm2(x)))


class RefPatchEmbed(nn.Module):
    """(B, 3, H, W) images -> (B, H*W / patch**2, dim) patch tokens (row-major)."""

    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def ref_apply_masks(x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
    """(B, N, D) tokens, masks of (B, K) indices -> (len(masks)*B, K, D), mask-major."""
    all_x = []
    for m in masks:
        mask_keep = m.unsqueeze(-1).repeat(1, 1, x.size(-1))
        all_x += [torch.gather(x, dim=1, index=mask_keep)]
    return torch.cat(all_x, dim=0)


def ref_repeat_interleave_batch(x: torch.Tensor, b: int, repeat: int) -> torch.Tensor:
    """(N*b, ...) -> (N*repeat*b, ...): each block of b rows repeated ``repeat`` times."""
    n = len(x) // b
    return torch.cat(
        [torch.cat([x[i * b : (i + 1) * b] for _ in range(repeat)], dim=0) for i in range(n)]
    )


def ref_grad_norms(named_params) -> list[float]:
    """The official ``grad_logger``'s work each step: the 2-norm of every weight gradient (not
    biases, not 1-D tensors), each read back as a Python float."""
    return [
        float(torch.norm(p.grad))
        for n, p in named_params
        if p.grad is not None and not (n.endswith(".bias") or p.ndim == 1)
    ]


def with_weights_of(ref: nn.Module, toolkit_module: nn.Module) -> nn.Module:
    """``ref`` with the toolkit module's weights loaded (strict: the parameter names match)."""
    ref.load_state_dict(toolkit_module.state_dict())
    return ref


class RefEncoder(nn.Module):
    """The official I-JEPA encoder: (B, 3, img_size, img_size) images -> (B, N, embed_dim)
    final-norm tokens, or (len(masks)*B, K, embed_dim) with ``masks`` of (B, K) patch indices.
    Drop-path rates rise linearly from 0 to ``drop_path`` over the blocks."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):  # fmt: skip
        super().__init__()
        grid = img_size // patch_size
        self.patch_embed = RefPatchEmbed(patch_size, embed_dim)
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, (grid, grid)), requires_grad=False)
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(RefBlock(embed_dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    @classmethod
    def copy_of(cls, encoder: nn.Module) -> RefEncoder:
        """A reference encoder with the shape (``.arch``) and weights of a toolkit encoder."""
        a = encoder.arch
        ref = cls(a.img_size, a.patch_size, a.embed_dim, a.depth, a.num_heads, a.mlp_ratio)
        return with_weights_of(ref, encoder)

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = self.patch_embed(x) + self.pos_embed
        if masks is not None:
            x = ref_apply_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class RefViT(RefEncoder):
    """The official encoder + mean pool + linear head: (B, 3, H, W) -> (B, num_classes) logits."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int,
                 num_heads: int, num_classes: int, drop_path: float = 0.0):  # fmt: skip
        super().__init__(img_size, patch_size, embed_dim, depth, num_heads, drop_path=drop_path)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(super().forward(x).mean(dim=1))


class RefPredictor(nn.Module):
    """The official I-JEPA predictor: ``x`` (len(masks_x)*B, Kc, dim) context tokens, ``masks_x``
    the context (B, Kc) and ``masks`` the target (B, Kt) patch indices ->
    (len(masks)*len(masks_x)*B, Kt, dim) predictions, mask-major."""

    def __init__(self, grid: int, dim: int, pdim: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0):  # fmt: skip
        super().__init__()
        self.predictor_embed = nn.Linear(dim, pdim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pdim))
        self.predictor_pos_embed = nn.Parameter(sincos_2d(pdim, (grid, grid)), requires_grad=False)
        self.predictor_blocks = nn.ModuleList(
            RefBlock(pdim, heads, mlp_ratio) for _ in range(depth)
        )
        self.predictor_norm = nn.LayerNorm(pdim, eps=1e-6)
        self.predictor_proj = nn.Linear(pdim, dim)

    @classmethod
    def copy_of(cls, predictor: nn.Module) -> RefPredictor:
        """A reference predictor with the shape (``.arch``) and weights of a toolkit predictor."""
        a = predictor.arch
        ref = cls(a.grid, a.embed_dim, a.predictor_embed_dim, a.depth, a.num_heads, a.mlp_ratio)
        return with_weights_of(ref, predictor)

    def forward(self, x: torch.Tensor, masks_x: list[torch.Tensor],
                masks: list[torch.Tensor]) -> torch.Tensor:  # fmt: skip
        b = len(x) // len(masks_x)
        x = self.predictor_embed(x)
        x_pos = self.predictor_pos_embed.repeat(b, 1, 1)
        x = x + ref_apply_masks(x_pos, masks_x)
        _, n_ctxt, d = x.shape
        pos = self.predictor_pos_embed.repeat(b, 1, 1)
        pos = ref_apply_masks(pos, masks)
        pos = ref_repeat_interleave_batch(pos, b, repeat=len(masks_x))
        pred_tokens = self.mask_token.repeat(pos.size(0), pos.size(1), 1) + pos
        x = x.repeat(len(masks), 1, 1)
        x = torch.cat([x, pred_tokens], dim=1)
        for blk in self.predictor_blocks:
            x = blk(x)
        x = self.predictor_norm(x)
        return self.predictor_proj(x[:, n_ctxt:])
