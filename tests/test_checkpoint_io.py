"""Reading every supported format, strict loading, refusing bad files, atomic saving."""

from __future__ import annotations

import os
import pathlib
import stat
import time
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ijepa_toolkit import (
    CheckpointError,
    export_encoder,
    inspect_checkpoint,
    load_encoder,
    save_checkpoint,
)
from ijepa_toolkit.io.read import read_checkpoint
from ijepa_toolkit.io.save import STALE_TEMP_AGE_S


@pytest.fixture(scope="module")
def reference_tokens(images):
    enc = load_encoder(Path(__file__).parent / "fixtures" / "ijepa_vit_p8_d64.pth.tar", num_heads=4)
    with torch.no_grad():
        return enc.forward_features(images)


def _tokens(path, images, **kwargs):
    enc = load_encoder(path, num_heads=4, **kwargs)
    with torch.no_grad():
        return enc.forward_features(images)


# --- formats -----------------------------------------------------------------------------------


def test_official_checkpoint(ckpt_path, images, expected, reference_tokens):
    assert (reference_tokens - expected["target_encoder_tokens"]).abs().max() < 1e-5
    assert read_checkpoint(ckpt_path).keys() >= {"encoder", "target_encoder", "predictor"}


@pytest.mark.parametrize("prefix", ["", "module."])
def test_bare_state_dict(tmp_path, target_sd, images, reference_tokens, prefix):
    path = tmp_path / "bare.pth"
    torch.save({prefix + k: v for k, v in target_sd.items()}, path)
    assert torch.equal(_tokens(path, images), reference_tokens)
    assert inspect_checkpoint(path)["format"] == "state_dict"


def test_model_key_with_prefix_and_head(tmp_path, target_sd, images, reference_tokens, caplog):
    sd = {"encoder." + k: v for k, v in target_sd.items()}
    sd["head.weight"] = torch.randn(10, 64)
    sd["head.bias"] = torch.zeros(10)
    path = tmp_path / "finetuned.pth"
    torch.save({"model": sd, "epoch": 7, "args": {"lr": 0.1}}, path)
    caplog.set_level("INFO", logger="ijepa_toolkit")
    enc = load_encoder(path, num_heads=4)
    with torch.no_grad():
        assert torch.equal(enc.forward_features(images), reference_tokens)
    assert "head.weight" not in enc.state_dict()
    assert "format=model" in caplog.text and "epoch=7" in caplog.text
    assert "ignored 2 other tensors" in caplog.text


def test_state_dict_key(tmp_path, target_sd, images, reference_tokens):
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in target_sd.items()}}, path)
    assert torch.equal(_tokens(path, images), reference_tokens)


def test_safetensors_export_and_plain_safetensors(
    tmp_path, ckpt_path, target_sd, images, reference_tokens
):
    out = tmp_path / "enc.safetensors"
    export_encoder(ckpt_path, out, num_heads=4)
    assert torch.equal(_tokens(out, images), reference_tokens)
    plain = tmp_path / "plain.safetensors"
    save_file(target_sd, str(plain))
    assert torch.equal(_tokens(plain, images), reference_tokens)
    # recognised by content, whatever the suffix
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(plain.read_bytes())
    assert torch.equal(_tokens(renamed, images), reference_tokens)


def test_legacy_torch_save_format(tmp_path, official_ckpt, images, reference_tokens):
    path = tmp_path / "legacy.pth.tar"
    torch.save(official_ckpt, path, _use_new_zipfile_serialization=False)
    assert torch.equal(_tokens(path, images), reference_tokens)


def test_which_is_validated(ckpt_path, tmp_path, target_sd):
    with pytest.raises(ValueError, match="which"):
        load_encoder(ckpt_path, which="predictor", num_heads=4)
    path = tmp_path / "bare.pth"
    torch.save(target_sd, path)
    with pytest.raises(ValueError, match="which"):
        load_encoder(path, which="ema", num_heads=4)


def test_missing_submodel_is_named(tmp_path, official_ckpt):
    del official_ckpt["target_encoder"]
    path = tmp_path / "no_target.pth"
    torch.save(official_ckpt, path)
    with pytest.raises(CheckpointError, match="no 'target_encoder' weights.*'encoder'"):
        load_encoder(path, num_heads=4)
    assert load_encoder(path, which="encoder", num_heads=4) is not None


# --- strict loading ----------------------------------------------------------------------------


def _save(tmp_path, sd, name="sd.pth"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


def test_missing_tensor_is_listed(tmp_path, target_sd):
    del target_sd["blocks.3.attn.proj.weight"]
    path = _save(tmp_path, target_sd)
    with pytest.raises(CheckpointError, match=r"missing: blocks\.3\.attn\.proj\.weight") as e:
        load_encoder(path, num_heads=4)
    assert str(path) in str(e.value)


def test_unexpected_tensor_is_listed(tmp_path, target_sd):
    target_sd["blocks.0.attn.gate"] = torch.zeros(64)
    path = _save(tmp_path, target_sd)
    with pytest.raises(CheckpointError, match=r"unexpected: blocks\.0\.attn\.gate") as e:
        load_encoder(path, num_heads=4)
    assert str(path) in str(e.value)


def test_wrong_shape_is_listed(tmp_path, target_sd):
    target_sd["blocks.1.mlp.fc2.weight"] = torch.zeros(64, 128)
    path = _save(tmp_path, target_sd)
    with pytest.raises(CheckpointError, match=r"wrong shape: blocks\.1\.mlp\.fc2\.weight"):
        load_encoder(path, num_heads=4)


def test_missing_first_block_tensor_is_named(tmp_path, target_sd):
    del target_sd["blocks.0.mlp.fc1.weight"]
    path = _save(tmp_path, target_sd)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.fc1\.weight"):
        load_encoder(path, num_heads=4)


def test_no_blocks_at_all(tmp_path, target_sd):
    sd = {k: v for k, v in target_sd.items() if not k.startswith("blocks.")}
    path = _save(tmp_path, sd)
    with pytest.raises(CheckpointError, match=r"missing key 'blocks\.0"):
        load_encoder(path, num_heads=4)


def test_nan_weight_is_refused(tmp_path, target_sd):
    target_sd["blocks.2.attn.qkv.weight"][0, 0] = float("nan")
    path = _save(tmp_path, target_sd)
    with pytest.raises(CheckpointError, match=r"'blocks\.2\.attn\.qkv\.weight' holds NaN"):
        load_encoder(path, num_heads=4)


def test_unknown_width_needs_num_heads(ckpt_path):
    with pytest.raises(CheckpointError, match="width 64 .*pass num_heads") as e:
        load_encoder(ckpt_path)
    assert str(ckpt_path) in str(e.value)
    with pytest.raises(CheckpointError, match="not divisible"):
        load_encoder(ckpt_path, num_heads=5)


# --- atomic save -------------------------------------------------------------------------------


def test_save_checkpoint_writes_and_overwrites(tmp_path):
    path = tmp_path / "sub" / "ckpt.pth"
    save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)
    assert read_checkpoint(path)["epoch"] == 1
    save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    loaded = read_checkpoint(path)
    assert loaded["epoch"] == 2 and torch.equal(loaded["w"], torch.zeros(3))
    assert sorted(os.listdir(path.parent)) == ["ckpt.pth", "ckpt.pth.sha256"]


def test_save_checkpoint_removes_only_stale_temp_files(tmp_path):
    path = tmp_path / "ckpt.pth"
    stale = tmp_path / ".ckpt.pth.abc123.tmp"  # a write killed hours ago
    stale.write_bytes(b"half a checkpoint")
    old = time.time() - STALE_TEMP_AGE_S - 60
    os.utime(stale, (old, old))
    (tmp_path / ".ckpt.pth.live42.tmp").write_bytes(b"a concurrent writer at work")
    (tmp_path / ".other.pth.xyz.tmp").write_bytes(b"another file's write")
    os.utime(tmp_path / ".other.pth.xyz.tmp", (old, old))
    save_checkpoint({"epoch": 3}, path)
    assert sorted(os.listdir(tmp_path)) == [
        ".ckpt.pth.live42.tmp",
        ".other.pth.xyz.tmp",
        "ckpt.pth",
        "ckpt.pth.sha256",
    ]
    assert read_checkpoint(path)["epoch"] == 3


def test_save_checkpoint_failure_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    save_checkpoint({"epoch": 1}, path)
    before = path.read_bytes()

    def crash(obj, f, *args, **kwargs):
        f.write(b"partial checkpoint bytes")
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert read_checkpoint(path)["epoch"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pth", "ckpt.pth.sha256"]  # the old pair


def test_save_checkpoint_file_mode_follows_umask(tmp_path):
    old = os.umask(0o027)
    try:
        save_checkpoint({"epoch": 1}, tmp_path / "ckpt.pth")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "ckpt.pth").stat().st_mode) == 0o640


# --- bad inputs --------------------------------------------------------------------------------


class _RunsShell:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _TouchesFile:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (pathlib.Path.touch, (self.target,))


@pytest.mark.parametrize("payload", [_RunsShell, _TouchesFile])
@pytest.mark.parametrize("legacy", [False, True])
def test_malicious_pickle_is_refused(tmp_path, payload, legacy):
    pwned = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    torch.save(
        {"target_encoder": payload(pwned), "epoch": 1},
        path,
        _use_new_zipfile_serialization=not legacy,
    )
    for load in (read_checkpoint, load_encoder, inspect_checkpoint):
        with pytest.raises(CheckpointError, match="refused") as e:
            load(path)
        assert str(e.value).startswith(f"{path}: ")
        assert "\n" not in str(e.value)
    assert not pwned.exists()


def _truncated(tmp_path, ckpt_path):
    data = ckpt_path.read_bytes()
    return data[: len(data) // 2]


BAD_FILES = {
    "missing": (None, "no such file"),
    "truncated": (_truncated, "truncated or corrupt"),
    "text": (lambda *_: b"epoch: 300\nlr: 0.001\n", "not a PyTorch checkpoint"),
    "empty": (lambda *_: b"", "empty file"),
    "probe_head": ("probe", r"no encoder weights found .*head\.weight"),
    "list": ("list", "expected a dict"),
    "zip": ("zip", "not a PyTorch checkpoint .*zip archive"),
    "bad_safetensors": (
        lambda *_: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ",
        "safetensors",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_raise_checkpoint_error_naming_the_path(tmp_path, ckpt_path, case):
    make, message = BAD_FILES[case]
    path = tmp_path / f"{case}.pth.tar"
    if make == "probe":
        torch.save({"head.weight": torch.randn(10, 64), "head.bias": torch.randn(10)}, path)
    elif make == "list":
        torch.save([torch.zeros(2)], path)
    elif make == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("notes.txt", "not weights")
    elif make is not None:
        path.write_bytes(make(tmp_path, ckpt_path))
    for load in (load_encoder, inspect_checkpoint):
        with pytest.raises(CheckpointError, match=message) as e:
            load(path)
        text = str(e.value)
        assert text.startswith(f"{path}: ")
        assert "\n" not in text and len(text) < 300


def test_directory_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        load_encoder(tmp_path)


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


def test_inspect_official_checkpoint(ckpt_path):
    info = inspect_checkpoint(ckpt_path)
    assert info["format"] == "ijepa" and info["epoch"] == 300
    assert set(info["submodels"]) == {"target_encoder", "encoder", "predictor"}
    target = info["submodels"]["target_encoder"]
    assert target["tensors"] == 53 and target["pos_embed"] == "sincos"
    assert target["arch"]["embed_dim"] == 64 and target["arch"]["depth"] == 4
    assert target["arch"]["num_heads"] is None  # width 64: not a standard width
    assert info["submodels"]["predictor"]["arch"]["predictor_embed_dim"] == 32
    assert {"opt", "scaler", "lr"} <= set(info["other_keys"])
    assert info["meta"]["loss"] == pytest.approx(0.123)
