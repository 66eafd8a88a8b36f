"""The featurenorm seed's ``validate`` mode: one linear probe per encoder layer, all trained at
once (theAdamColton/elucidating-featurenorm-ijepa@eb093c217f3b475981c84332245530fd17bc30c3,
``src/validate.py``: ``validate``, ``MultiDepthClassifier``).

Features: the target encoder in eval mode on centre crops, the mean over the tokens of the patch
embeddings (layer 0, positions added) and of each block's output (layer i; before the final
norm). Probes: per layer a (classes, D) weight initialised uniform in +-1/sqrt(D) and a zero bias,
one cross entropy averaged over images and layers, AdamW (lr 1e-3, torch's defaults otherwise),
shuffled batches of 2048, 50 epochs; top-1 of each layer on the validation images.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..data.folder import SafeImageFolder, collate_skip_none
from ..data.transforms import eval_transform
from ..engine.utils import autocast


@torch.no_grad()
def layer_features(
    encoder: torch.nn.Module, folder: Path, image_size: int, device: torch.device,
    batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, int]:  # fmt: skip
    """(N, depth + 1, D) token means of every layer, (N,) labels and the class count of an image
    folder (resize to ``image_size``, centre crop; the global RNG is untouched)."""
    ds = SafeImageFolder(folder, transform=eval_transform(image_size, crop_ratio=1.0))
    loader = DataLoader(ds, batch_size=batch_size, collate_fn=collate_skip_none,
                        generator=torch.Generator())  # fmt: skip
    layers: list = []
    hooks = [encoder.blocks[0].register_forward_pre_hook(
        lambda _m, args: layers.append(args[0].float().mean(dim=1)))]  # fmt: skip
    hooks += [block.register_forward_hook(lambda _m, _a, out: layers.append(out.float().mean(1)))
              for block in encoder.blocks]  # fmt: skip
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for images, targets in loader:
            layers.clear()
            with autocast(device):
                encoder.forward_features(images.to(device))
            feats.append(torch.stack(layers, dim=1).cpu())
            labels.append(targets)
    finally:
        for hook in hooks:
            hook.remove()
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(labels), len(ds.classes)


def layer_probe(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
    num_classes: int, lr: float = 1e-3, epochs: int = 50, batch_size: int = 2048, seed: int = 0,
) -> list[float]:  # fmt: skip
    """Top-1 (%) on ``val`` of one linear probe per layer of (N, L, D) features, trained jointly
    as the seed's ``MultiDepthClassifier``."""
    layers, dim = train_x.shape[1:]
    g = torch.Generator().manual_seed(seed)
    weights = (torch.rand(layers, num_classes, dim, generator=g) * 2 - 1) * dim**-0.5
    weights.requires_grad_(True)
    biases = torch.zeros(layers, num_classes, requires_grad=True)
    optimizer = torch.optim.AdamW([weights, biases], lr=lr)

    def logits(x: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, L, classes)
        return torch.einsum("bld,lcd->blc", x, weights) + biases

    for _ in range(epochs):
        for rows in torch.randperm(len(train_x), generator=g).split(batch_size):
            out = logits(train_x[rows])
            loss = F.cross_entropy(out.reshape(-1, num_classes),
                                   train_y[rows].repeat_interleave(layers))  # fmt: skip
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    with torch.no_grad():
        correct = logits(val_x).argmax(-1) == val_y[:, None]
    return (correct.float().mean(0) * 100).tolist()
