"""One recognition per file for load and inspect; the toolkit's and ijepa-export's files carry
their head count; drop path through timm's ``drop_path_rate``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _tiny_pretrain import CONFIG, tiny_overrides

from ijepa_toolkit import (
    CheckpointError,
    export_encoder,
    inspect_checkpoint,
    load_encoder,
    load_predictor,
    save_checkpoint,
)
from ijepa_toolkit.config import load_config
from ijepa_toolkit.data.digits import build_digits_imagefolder
from ijepa_toolkit.engine.distributed import DistInfo
from ijepa_toolkit.formats import FORMATS, recognise
from ijepa_toolkit.io.read import read_raw
from ijepa_toolkit.models.vit import EncoderArch
from ijepa_toolkit.models.vit_variants import create_variant_encoder
from ijepa_toolkit.pretrain.train import PretrainConfig, Pretrainer


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> tuple[Path, Path]:
    return build_digits_imagefolder(tmp_path_factory.mktemp("digits"), size=32, per_class=4)


# (model.arch, predictor width, expected heads): heads written in arch, or taken from the named
# size (model_name vit_tiny: 3 heads) when arch overrides the width only
ARCHS = {
    "heads_in_arch": ("{embed_dim: 32, depth: 2, num_heads: 4}", 16, 4),
    "heads_of_model_name": ("{embed_dim: 48, depth: 2}", 24, 3),
}


@pytest.mark.parametrize("case", list(ARCHS))
def test_pretrain_checkpoint_of_nonstandard_width_loads_without_num_heads(digits, tmp_path, case):
    arch, pred_width, heads = ARCHS[case]
    overrides = {"model.arch": arch, "model.pred_emb_dim": pred_width}
    cfg = load_config(PretrainConfig, CONFIG, tiny_overrides(digits, tmp_path, **overrides))
    trainer = Pretrainer(cfg, DistInfo())
    trainer.save(loss=0.5)  # the toolkit's own checkpoint writer
    trainer.log.close()
    path = trainer.ckpt_path
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for which in ("target_encoder", "encoder"):
            enc = load_encoder(path, which=which)  # no num_heads
            assert enc.arch.num_heads == heads and enc.blocks[0].attn.num_heads == heads
            live = getattr(trainer, which).eval()
            assert torch.equal(enc.forward_features(images), live.forward_features(images))
    assert load_predictor(path).predictor_blocks[0].attn.num_heads == heads
    info = inspect_checkpoint(path)
    assert info["format"] == "toolkit"
    assert info["submodels"]["target_encoder"]["arch"]["num_heads"] == heads
    # the same weights without the config: the width alone does not say the heads
    obj = read_raw(path).obj
    del obj["config"]
    save_checkpoint(obj, tmp_path / "no_config.pth")
    with pytest.raises(CheckpointError, match="pass num_heads"):
        load_encoder(tmp_path / "no_config.pth")


def test_export_spec_gives_the_heads(ckpt_path, tmp_path, images, target_encoder):
    out = tmp_path / "enc.safetensors"
    export_encoder(ckpt_path, out, num_heads=4)
    with torch.no_grad():
        tokens = load_encoder(out).forward_features(images)  # heads from enc.json
    assert torch.equal(tokens, target_encoder.forward_features(images))
    out.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match="pass num_heads"):
        load_encoder(out)


def _files(tmp_path: Path, official: dict, target_sd: dict) -> dict:
    """format name -> a file of that format (the same target encoder in each)."""
    from safetensors.torch import save_file

    files = {name: tmp_path / f"{name}.pth" for name in ("ijepa", "model", "state_dict")}
    torch.save(official, files["ijepa"])
    torch.save({"model": target_sd, "epoch": 3}, files["model"])
    torch.save(target_sd, files["state_dict"])
    files["safetensors"] = tmp_path / "enc.safetensors"
    save_file(target_sd, str(files["safetensors"]))
    return files


def test_load_and_inspect_share_one_recognition(tmp_path, official_ckpt, target_sd, caplog):
    caplog.set_level("INFO", logger="ijepa_toolkit")
    for name, path in _files(tmp_path, official_ckpt, target_sd).items():
        fmt = recognise(read_raw(path))
        assert fmt.NAME == name
        assert inspect_checkpoint(path)["format"] == name
        load_encoder(path, num_heads=4)
        assert f"format={name}," in caplog.records[-1].getMessage()
    assert len({f.NAME for f in FORMATS}) == len(FORMATS)


def test_unknown_layout_is_named(tmp_path):
    path = tmp_path / "notes.pth"
    torch.save({"epoch": 3, "notes": "no weights"}, path)
    for load in (load_encoder, inspect_checkpoint):
        with pytest.raises(CheckpointError, match=r"no encoder weights found .*epoch, notes"):
            load(path)


def test_drop_path_rates_are_timms_linear_rule(ckpt_path, images):
    enc = load_encoder(ckpt_path, num_heads=4, drop_path_rate=0.3)
    depth = len(enc.blocks)
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in enc.blocks]
    assert rates == pytest.approx([0.3 * i / (depth - 1) for i in range(depth)], abs=1e-7)
    assert all(getattr(b.drop_path2, "drop_prob", 0.0) == r for b, r in zip(enc.blocks, rates))
    plain = load_encoder(ckpt_path, num_heads=4)
    with torch.no_grad():  # eval: drop path is off, the same function as without it
        assert torch.equal(enc.forward_features(images), plain.forward_features(images))
        enc.train()
        runs = []
        for _ in range(2):
            torch.manual_seed(0)
            runs.append(enc.forward_features(images.repeat(8, 1, 1, 1)))
    assert torch.equal(runs[0], runs[1])  # same seed, same dropped paths
    assert not torch.allclose(runs[0][:2], plain.forward_features(images))


def test_inspect_reads_variant_encoders_like_the_loader(tmp_path):
    arch = EncoderArch(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4)
    enc = create_variant_encoder(arch, pos_kind="rope", num_registers=2)
    path = tmp_path / "rope.pth"
    save_checkpoint({"target_encoder": enc.state_dict(), "epoch": 1}, path)
    entry = inspect_checkpoint(path)["submodels"]["target_encoder"]
    assert entry["pos_embed"] == "rope" and entry["arch"]["depth"] == 2
    assert entry["arch"]["num_heads"] is None  # width 32: not a standard width
    loaded = load_encoder(path, num_heads=4)
    assert loaded.pos_kind == "rope" and loaded.arch.img_size == entry["arch"]["img_size"]
