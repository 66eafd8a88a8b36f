"""Images/s of a ViT-B/16 finetuning step at 224 px: the toolkit's ``train_one_epoch`` (timm ViT,
layer-decay AdamW, Mixup + soft-target CE, drop path, per-step schedule) next to a straightforward
reference loop (an official-I-JEPA-style ViT with manual ``softmax(q @ k^T * scale) @ v``
attention, one AdamW group, hard-label CE), same widths, same batch, in one run.

    PYTHONPATH=src python bench/finetune_step.py [--batch 8] [--iters 3] [--device auto]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from ijepa_toolkit.engine.distributed import resolve_device
from ijepa_toolkit.engine.logger import RunLogger
from ijepa_toolkit.finetune import recipe
from ijepa_toolkit.finetune.config import FinetuneConfig
from ijepa_toolkit.finetune.engine import StepOptions, TrainState, train_one_epoch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, for reference.py
from reference import RefViT  # noqa: E402

ARCH = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12)
CLASSES = 1000


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
    model = RefViT(**ARCH, num_classes=CLASSES, drop_path=0.1).to(device)
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
