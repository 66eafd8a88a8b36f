"""Iterations/s of one I-JEPA pretraining step: this toolkit vs an official-style reference.

The reference is written the way the official code is: manual attention (``q @ k^T``, softmax),
per-mask Python loops in the encoder, the predictor and ``apply_masks``, and a per-parameter
Python loop for the EMA update. Both start from the same weights and masks; the first step's
losses are printed so the two can be seen to compute the same thing. The two steps are timed
alternately in one run, which prints both rates and their ratio.

    python bench/pretrain_step.py [--model vit_tiny] [--batch 8] [--iters 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ijepa_toolkit.config import load_config
from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.models.pos_embed import sincos_2d
from ijepa_toolkit.pretrain.train import PretrainConfig, Pretrainer

REPO = Path(__file__).resolve().parents[1]


# -- official-style reference --------------------------------------------------------------------
class RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), RefAttention(dim, heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), RefMlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, patch, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)


def ref_apply_masks(x, masks):
    all_x = []
    for m in masks:
        mask_keep = m.unsqueeze(-1).repeat(1, 1, x.size(-1))
        all_x += [torch.gather(x, dim=1, index=mask_keep)]
    return torch.cat(all_x, dim=0)


def ref_repeat_interleave_batch(x, b, repeat):
    n = len(x) // b
    return torch.cat(
        [torch.cat([x[i * b : (i + 1) * b] for _ in range(repeat)], dim=0) for i in range(n)]
    )


class RefEncoder(nn.Module):
    def __init__(self, grid, patch, dim, depth, heads):
        super().__init__()
        self.patch_embed = RefPatchEmbed(patch, dim)
        self.pos_embed = nn.Parameter(sincos_2d(dim, (grid, grid)), requires_grad=False)
        self.blocks = nn.ModuleList(RefBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, masks=None):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
        if masks is not None:
            x = ref_apply_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class RefPredictor(nn.Module):
    def __init__(self, grid, dim, pdim, depth, heads):
        super().__init__()
        self.predictor_embed = nn.Linear(dim, pdim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pdim))
        self.predictor_pos_embed = nn.Parameter(sincos_2d(pdim, (grid, grid)), requires_grad=False)
        self.predictor_blocks = nn.ModuleList(RefBlock(pdim, heads) for _ in range(depth))
        self.predictor_norm = nn.LayerNorm(pdim, eps=1e-6)
        self.predictor_proj = nn.Linear(pdim, dim)

    def forward(self, x, masks_x, masks):
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


class RefStep:
    """The official ``train_step`` (fp32 on the CPU): schedules, forward, AdamW, EMA loop."""

    def __init__(self, trainer: Pretrainer):
        arch, parch = trainer.encoder.arch, trainer.predictor.arch
        grid = arch.img_size // arch.patch_size
        self.encoder = RefEncoder(grid, arch.patch_size, arch.embed_dim, arch.depth, arch.num_heads)
        self.target = RefEncoder(grid, arch.patch_size, arch.embed_dim, arch.depth, arch.num_heads)
        self.predictor = RefPredictor(grid, arch.embed_dim, parch.predictor_embed_dim,
                                      parch.depth, parch.num_heads)  # fmt: skip
        self.encoder.load_state_dict(trainer.encoder.state_dict())
        self.target.load_state_dict(trainer.target_encoder.state_dict())
        self.predictor.load_state_dict(trainer.predictor.state_dict())
        for p in self.target.parameters():
            p.requires_grad = False
        groups = [
            {"params": [p for n, p in m.named_parameters() if "bias" not in n and p.ndim != 1]}
            for m in (self.encoder, self.predictor)
        ] + [
            {"params": [p for n, p in m.named_parameters() if "bias" in n or p.ndim == 1],
             "WD_exclude": True, "weight_decay": 0}
            for m in (self.encoder, self.predictor)
        ]  # fmt: skip
        self.optimizer = torch.optim.AdamW(groups)
        self.schedules, self.step = trainer.schedules, 0

    def __call__(self, imgs, masks_enc, masks_pred) -> float:
        lr, wd, m = self.schedules.at(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
            if not g.get("WD_exclude"):
                g["weight_decay"] = wd
        with torch.no_grad():
            h = self.target(imgs)
            h = F.layer_norm(h, (h.size(-1),))
            h = ref_apply_masks(h, masks_pred)
            h = ref_repeat_interleave_batch(h, len(imgs), repeat=len(masks_enc))
        z = self.predictor(self.encoder(imgs, masks_enc), masks_enc, masks_pred)
        loss = F.smooth_l1_loss(z, h)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        with torch.no_grad():
            for param_q, param_k in zip(self.encoder.parameters(), self.target.parameters()):
                param_k.data.mul_(m).add_((1.0 - m) * param_q.detach().data)
        self.step += 1
        return loss.item()


# -- benchmark -------------------------------------------------------------------------------
def make_trainer(model: str, batch: int, folder: Path) -> Pretrainer:
    data = folder / "images" / "x"
    data.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(batch):
        Image.fromarray(rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)).save(data / f"{i}.png")
    overrides = [
        f"model.model_name={model}", "model.patch_size=16", "model.arch=null",
        "model.pred_depth=6", "model.pred_emb_dim=192", "mask.min_keep=10",
        "data.dataset=imagefolder", f"data.root_path={folder / 'images'}", "data.crop_size=224",
        f"data.batch_size={batch}", "logging.rankme_freq=0", "logging.tensorboard=false",
        f"logging.folder={folder / 'run'}",
    ]  # fmt: skip
    cfg = load_config(PretrainConfig, REPO / "configs/pretrain/tiny_cpu.yaml", overrides)
    return Pretrainer(cfg, DistInfo())


def interleaved_rates(fn_a, fn_b, iters: int) -> tuple[float, float]:
    """Iterations/s of two step functions timed alternately (after one warm-up step each), so
    both see the same background load."""
    fn_a(), fn_b()
    spent = [0.0, 0.0]
    for _ in range(iters):
        for i, fn in enumerate((fn_a, fn_b)):
            start = time.perf_counter()
            fn()
            spent[i] += time.perf_counter() - start
    return iters / spent[0], iters / spent[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(args.model, args.batch, Path(tmp))
        reference = RefStep(trainer)
        imgs = torch.randn(args.batch, 3, 224, 224)
        groups = trainer.sample_masks(args.batch)
        trainer.sample_masks = lambda n: groups  # the same masks for both
        ((_, masks_enc, masks_pred),) = groups
        ours_loss = trainer.train_step(imgs)["loss"]
        ref_loss = reference(imgs, masks_enc, masks_pred)
        print(f"first-step loss: toolkit {ours_loss:.6f}  reference {ref_loss:.6f}")
        assert math.isclose(ours_loss, ref_loss, rel_tol=1e-4), "the two steps disagree"
        ours, ref = interleaved_rates(
            lambda: trainer.train_step(imgs),
            lambda: reference(imgs, masks_enc, masks_pred),
            args.iters,
        )
        trainer.log.close()
    sizes = f"context {masks_enc[0].shape[1]} / target {masks_pred[0].shape[1]} x 4 patches"
    arch = trainer.encoder.arch
    print(f"{args.model}/16 (width {arch.embed_dim}, depth {arch.depth}) at 224, batch "
          f"{args.batch}, {args.threads} threads, {sizes}")  # fmt: skip
    print(f"toolkit   {ours:.3f} it/s")
    print(f"reference {ref:.3f} it/s")
    print(f"ratio     {ours / ref:.2f}x")


if __name__ == "__main__":
    main()
