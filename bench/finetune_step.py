"""Images/s of a ViT-B/16 finetuning step at 224 px: the toolkit's ``train_one_epoch`` (timm ViT,
layer-decay AdamW, Mixup + soft-target CE, drop path, per-step schedule) next to a straightforward
reference loop (an official-I-JEPA-style ViT with manual ``softmax(q @ k^T * scale) @ v``
attention, one AdamW group, hard-label CE), same widths, same batch, in one run.

    PYTHONPATH=src python bench/finetune_step.py [--batch 8] [--iters 3] [--device auto]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from ijepa_toolkit.engine.distributed import resolve_device
from ijepa_toolkit.engine.logger import RunLogger
from ijepa_toolkit.finetune import recipe
from ijepa_toolkit.finetune.config import FinetuneConfig
from ijepa_toolkit.finetune.engine import StepOptions, TrainState, train_one_epoch
from ijepa_toolkit.models.pos_embed import sincos_2d

ARCH = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
CLASSES = 1000


class RefAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class RefBlock(nn.Module):
    def __init__(self, dim: int, heads: int, drop_path: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop_path = drop_path

    def _drop(self, x):
        if not self.training or self.drop_path == 0.0:
            return x
        keep = 1.0 - self.drop_path
        mask = x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)
        return x * mask / keep

    def forward(self, x):
        x = x + self._drop(self.attn(self.norm1(x)))
        return x + self._drop(self.mlp(self.norm2(x)))


class RefViT(nn.Module):
    """The official I-JEPA encoder layout (+ mean pool and a linear head)."""

    def __init__(self, img_size, patch_size, embed_dim, depth, num_heads, drop_path=0.1):
        super().__init__()
        grid = img_size // patch_size
        self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, (grid, grid)), requires_grad=False)
        rates = [drop_path * i / (depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(RefBlock(embed_dim, num_heads, r) for r in rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, CLASSES)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x).mean(dim=1))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def toolkit_rate(args, device: torch.device, data: TensorDataset) -> float:
    cfg = FinetuneConfig()
    cfg.model.arch, cfg.finetune.drop_path = dict(ARCH), 0.1
    cfg.optimization.warmup_epochs = 0.0
    model = recipe.build_classifier(cfg, CLASSES).to(device)
    optimizer = recipe.build_optimizer(recipe.param_groups(model, cfg.optimization),
                                       cfg.optimization, 1e-4)  # fmt: skip
    scheduler = recipe.build_scheduler(optimizer, cfg.optimization, args.iters, 1e-4)
    amp = torch.bfloat16 if device.type == "cuda" else None
    opts = StepOptions(
        device=device, amp_dtype=amp, scaler=torch.amp.GradScaler(device.type, enabled=False),
        mixup=recipe.build_mixup(cfg.mixup, CLASSES), log_freq=10**9,
    )  # fmt: skip
    criterion, log, state = recipe.build_criterion(cfg.mixup), RunLogger(".", False), TrainState()
    split = args.warmup * args.batch
    for part in (range(split), range(split, len(data))):  # untimed warmup steps, then timed ones
        loader = DataLoader(Subset(data, part), batch_size=args.batch)
        opts.steps_per_epoch, state.batch = len(loader), 0
        synchronize(device)
        start = time.perf_counter()
        train_one_epoch(model, criterion, loader, optimizer, scheduler, state, opts, log)
        synchronize(device)
    return args.iters * args.batch / (time.perf_counter() - start)


def reference_rate(args, device: torch.device, data: TensorDataset) -> float:
    model = RefViT(**ARCH).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    model.train()
    start = None
    for i, (x, y) in enumerate(DataLoader(data, batch_size=args.batch)):
        if i == args.warmup:
            synchronize(device)
            start = time.perf_counter()
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda"):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return args.iters * args.batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=3, help="timed steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    n = (args.warmup + args.iters) * args.batch
    data = TensorDataset(torch.randn(n, 3, 224, 224), torch.randint(0, CLASSES, (n,)))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"ViT-B/16 224px finetuning step, batch {args.batch}, {args.iters} timed steps after "
          f"{args.warmup} warmup, {name}, {torch.get_num_threads()} threads")  # fmt: skip
    ref = reference_rate(args, device, data)
    print(f"reference (manual attention, plain loop): {ref:.2f} img/s")
    ours = toolkit_rate(args, device, data)
    print(f"toolkit train_one_epoch:                 {ours:.2f} img/s")
    print(f"ratio toolkit / reference: {ours / ref:.2f}x")


if __name__ == "__main__":
    main()
