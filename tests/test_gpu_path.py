"""The GPU path's choices (issue 19 item 2) as pure functions fed CUDA-like devices and
capability flags, and what runs on the CPU: one precision decision, loss scaling only for fp16,
DataLoader settings, the AdamW implementation (same numbers as torch's default loop) and the
compile switch in the feature-cache key."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ijepa_toolkit.engine.utils import (
    PREFETCH_FACTOR,
    adamw,
    adamw_implementation,
    amp_dtype,
    autocast,
    clip_grad_norm,
    grad_scaler,
    loader_kwargs,
    maybe_compile,
    precision_name,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)  # (a device object needs no GPU)


@pytest.mark.parametrize(
    ("device", "bf16", "fp16", "supported", "expected"),
    [
        (CPU, True, False, True, None),  # the CPU always computes in float32
        (CPU, True, True, True, None),
        (CUDA, True, False, True, torch.bfloat16),
        (CUDA, True, False, False, torch.float16),  # no native bf16: fp16 (+ GradScaler)
        (CUDA, False, True, True, torch.float16),  # asked for fp16
        (CUDA, True, True, True, torch.float16),  # fp16 wins over bf16
        (CUDA, False, False, True, None),
    ],
)
def test_amp_dtype_is_the_one_decision(device, bf16, fp16, supported, expected):
    assert amp_dtype(device, bf16, fp16, bf16_supported=supported) == expected


def test_precision_names_are_the_cache_key_spellings():
    assert [precision_name(d) for d in (None, torch.bfloat16, torch.float16)] == [
        "float32", "bfloat16", "float16",
    ]  # fmt: skip


def test_autocast_on_cpu_computes_float32():
    a = torch.randn(4, 4)
    with autocast(CPU, True):
        assert (a @ a).dtype == torch.float32


def test_grad_scaler_only_for_float16():
    assert not grad_scaler(CPU, None).is_enabled()
    assert not grad_scaler(CPU, torch.bfloat16).is_enabled()
    assert grad_scaler(CPU, torch.float16).is_enabled()


def test_disabled_scaler_step_is_the_plain_step():
    """The pretraining and finetuning loops always go through the scaler: disabled (bf16, fp32),
    it must leave the update exactly as ``loss.backward(); optimizer.step()``."""
    results = []
    for scaled in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        scaler = grad_scaler(CPU, None)
        for step in range(3):
            loss = model(torch.randn(5, 8, generator=torch.Generator().manual_seed(step))).sum()
            if scaled:
                scaler.scale(loss).backward()
                scaler.unscale_(opt)
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            opt.zero_grad()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])


def test_loader_kwargs():
    assert loader_kwargs(0, CPU) == {"num_workers": 0, "pin_memory": False}
    assert loader_kwargs(0, CUDA) == {"num_workers": 0, "pin_memory": True}
    assert loader_kwargs(0, CUDA, pin_memory=False)["pin_memory"] is False
    assert loader_kwargs(2, CUDA) == {
        "num_workers": 2, "pin_memory": True, "persistent_workers": True,
        "prefetch_factor": PREFETCH_FACTOR,
    }  # fmt: skip


def test_persistent_workers_give_the_same_batches_every_epoch():
    data = TensorDataset(torch.arange(10.0))
    plain = DataLoader(data, batch_size=3)
    fast = DataLoader(data, batch_size=3, **loader_kwargs(2, CPU))
    for _ in range(2):  # the second epoch reuses the workers
        assert [b[0].tolist() for b in fast] == [b[0].tolist() for b in plain]


@pytest.mark.parametrize(
    ("on_cuda", "expected"),
    [
        ([True, True], {"fused": True, "foreach": None}),
        ([True, False], {"fused": None, "foreach": None}),  # a CPU tensor: no fused kernel
        ([False], {"fused": None, "foreach": None}),
        ([], {"fused": None, "foreach": None}),
    ],
)
def test_adamw_implementation(on_cuda, expected):
    assert adamw_implementation(on_cuda) == expected


def test_adamw_on_cpu_is_torch_default_loop_bit_for_bit():
    """The same numbers as ``torch.optim.AdamW`` (its per-tensor loop on the CPU), param groups
    (given as generators, as timm's layer-decay groups may be) included."""
    finals = []
    for build in (torch.optim.AdamW, adamw):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Linear(6, 2))
        groups = [
            {"params": (p for p in model[0].parameters()), "weight_decay": 0.05},
            {"params": list(model[1].parameters()), "weight_decay": 0.0, "lr": 3e-3},
        ]
        opt = build(groups, lr=1e-3, betas=(0.9, 0.95))
        for step in range(5):
            x = torch.randn(4, 6, generator=torch.Generator().manual_seed(step))
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert not opt.defaults["foreach"] and not opt.defaults["fused"]
    assert torch.equal(finals[1], finals[0])


def _grads(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (7, 300, 1)] + [
        torch.nn.Parameter(torch.zeros(3))  # no gradient: left out of the norm
    ]
    for p in params[:3]:
        p.grad = torch.randn(p.shape, generator=g)
    return params


@pytest.mark.parametrize("max_norm", [None, 0.0, float("inf"), 5.0, 100.0])
def test_clip_grad_norm_is_torchs_and_measuring_leaves_the_gradients(max_norm):
    ours, theirs = _grads(), _grads()
    before = [p.grad.clone() for p in ours[:3]]
    norm = clip_grad_norm(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm or float("inf"))
    assert torch.equal(norm, expected) and 5.0 < float(norm) < 100.0
    for p, q in zip(ours[:3], theirs[:3]):
        assert torch.equal(p.grad, q.grad)
    if max_norm in (None, 0.0, float("inf")):
        assert all(torch.equal(p.grad, b) for p, b in zip(ours, before))
    assert ours[3].grad is None


def test_compile_off_leaves_the_module_alone():
    model = torch.nn.Linear(2, 2)
    assert maybe_compile(model, False) is model
    assert getattr(model, "_compiled_call_impl", None) is None


def test_compiled_extraction_has_its_own_cache_key(tmp_path):
    from ijepa_toolkit.data.folder import SafeImageFolder
    from ijepa_toolkit.eval.features import cache_key

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"not read for the key")
    ds = SafeImageFolder(str(tmp_path))
    plain, parts = cache_key({"random_init": {}}, "last", ds, CPU)
    compiled, compiled_parts = cache_key({"random_init": {}}, "last", ds, CPU, compiled=True)
    assert parts["precision"] == "float32" and "compiled" not in parts
    assert compiled != plain and compiled_parts["compiled"] is True


# -- JPEG decode + resize on the device (features.gpu_decode), run here with the CPU decoder --


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """Two classes of smooth noisy photos-like JPEGs of varied sizes, one PNG, one corrupt file."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir()
        for i in range(3):
            h, w = rng.integers(70, 130, 2)
            blocks = np.kron(rng.random((h // 8 + 1, w // 8 + 1, 3)), np.ones((8, 8, 1)))[:h, :w]
            arr = (np.clip(blocks + rng.normal(0, 0.05, blocks.shape), 0, 1) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / c / f"{i}.jpg", quality=90)
    Image.fromarray(arr).save(root / "b" / "3.png")
    (root / "b" / "4.jpg").write_bytes(b"\xff\xd8\xff not a whole jpeg")
    return root


def _device_batch(root, data):
    from ijepa_toolkit.eval.features import _Indexed, build_eval_dataset, device_decode_dataset

    pil = build_eval_dataset(str(root), data)
    dev = device_decode_dataset(pil, data)
    indexed = _Indexed(dev, range(len(dev)))
    return pil, dev, dev.collate([indexed[i] for i in range(len(dev))])


def test_workers_read_bytes_and_batches_skip_unreadable(jpeg_folder):
    from ijepa_toolkit.eval.features import EvalDataSection

    pil, dev, (batch, targets, indices) = _device_batch(jpeg_folder, EvalDataSection(img_size=32))
    paths = [p for p, _ in pil.samples]
    jpeg = dev[0][0]  # a JPEG: its file's bytes, undecoded
    assert jpeg.dtype == torch.uint8 and jpeg.ndim == 1
    assert bytes(jpeg.tolist()) == open(paths[0], "rb").read()
    png = paths.index(str(jpeg_folder / "b" / "3.png"))
    assert dev[png][0].shape[0] == 3  # decoded by the worker
    corrupt = paths.index(str(jpeg_folder / "b" / "4.jpg"))
    assert indices.tolist() == [i for i in range(len(paths)) if i != corrupt]
    assert targets.tolist() == [pil.targets[i] for i in indices.tolist()]
    assert len(batch) == len(paths) - 1 and torch.equal(batch.items[0], jpeg)


def test_device_decode_matches_the_pil_path(jpeg_folder):
    """Measured: pixels differ by at most ~2/255 (resize rounding of PIL's uint8 bicubic), the
    features of a ViT by ~1e-4 relative L2 (cosine > 0.99999). Tolerances: 4/255 per pixel,
    1e-3 mean, 2e-3 relative L2 per feature vector."""
    from ijepa_toolkit.eval.features import EvalDataSection
    from ijepa_toolkit.models.vit import EncoderArch, create_encoder

    data = EvalDataSection(img_size=32, crop_ratio=0.875)
    pil, _, (batch, _, indices) = _device_batch(jpeg_folder, data)
    x_dev = batch.to(CPU)
    x_pil = torch.stack([pil[i][0] for i in indices.tolist()])
    assert x_dev.shape == x_pil.shape == (len(indices), 3, 32, 32)
    diff = ((x_dev - x_pil) * torch.tensor(data.std).view(1, 3, 1, 1)).abs()  # in [0, 1] units
    assert float(diff.max()) <= 4 / 255 and float(diff.mean()) <= 1e-3
    torch.manual_seed(0)
    arch = EncoderArch(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    encoder = create_encoder(arch).eval()
    with torch.no_grad():
        f_dev, f_pil = (encoder.forward_features(x).mean(1) for x in (x_dev, x_pil))
    assert float(((f_dev - f_pil).norm(dim=1) / f_pil.norm(dim=1)).max()) <= 2e-3


def test_gpu_decode_on_cpu_is_a_config_error(jpeg_folder, tmp_path, capsys):
    from ijepa_toolkit.eval import knn

    arch = "model.arch={img_size: 32, patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2}"
    status = knn.main([
        f"data.train_folder={jpeg_folder}", f"data.val_folder={jpeg_folder}", "data.img_size=32",
        "data.num_workers=0", "model.checkpoint=null", arch, "meta.device=cpu",
        "features.gpu_decode=true", f"features.cache_dir={tmp_path / 'cache'}",
        f"logging.folder={tmp_path / 'run'}", "logging.tensorboard=false",
    ])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err[-1].startswith("error: features.gpu_decode=true")
    assert "cpu" in err[-1] and not (tmp_path / "cache").exists()
