"""NYU-Depth v2 readers on small files written here in each distributed format."""

from __future__ import annotations

import io
import tarfile

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import savemat

from ijepa_toolkit.data.nyu import (
    DepthDataError,
    DepthPairs,
    DepthSample,
    DepthTarShards,
    NYUFolder,
    NYULabeledMat,
    build_depth_reader,
    read_split_indices,
)

H, W = 12, 16


def scenes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(n, H, W, 3) uint8 images and (n, H, W) float32 depths in metres."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    depths = rng.uniform(0.5, 9.5, (n, H, W)).astype(np.float32)
    return images, depths


def write_labeled_mat(path, images, depths):
    """The v7.3 layout as h5py sees MATLAB's column-major arrays: (N, 3, W, H) and (N, W, H)."""
    with h5py.File(path, "w") as f:
        f["images"] = images.transpose(0, 3, 2, 1)
        f["depths"] = depths.transpose(0, 2, 1)
        f["labels"] = np.zeros((len(images), W, H), dtype=np.uint16)


def write_splits_hdf5(path, train, test):
    with h5py.File(path, "w") as f:  # MATLAB v7.3 stores an n x 1 column as (1, n)
        f["trainNdxs"] = np.asarray(train, dtype=np.float64)[None]
        f["testNdxs"] = np.asarray(test, dtype=np.float64)[None]


def test_labeled_mat_reads_lazily_with_eigen_style_splits(tmp_path):
    images, depths = scenes(6)
    write_labeled_mat(tmp_path / "nyu_depth_v2_labeled.mat", images, depths)
    write_splits_hdf5(tmp_path / "splits.mat", train=[1, 3, 4, 6], test=[2, 5])
    train = build_depth_reader("mat", tmp_path / "nyu_depth_v2_labeled.mat", "train", "splits.mat")
    test = build_depth_reader("mat", tmp_path / "nyu_depth_v2_labeled.mat", "test", "splits.mat")
    assert len(train) == 4 and len(test) == 2
    s = test[1]  # 1-based index 5
    assert s.image.shape == (H, W, 3) and s.depth.shape == (H, W) and s.depth.dtype == np.float32
    np.testing.assert_array_equal(s.image, images[4])
    np.testing.assert_array_equal(s.depth, depths[4])
    assert s.name == "nyu_depth_v2_labeled.mat[5]"
    np.testing.assert_array_equal(train[3].image, images[5])


def test_split_indices_from_matlab_v5_and_text(tmp_path):
    savemat(tmp_path / "splits.mat", {"trainNdxs": np.array([[1], [2], [7]]), "testNdxs": [[3]]})
    assert read_split_indices(tmp_path / "splits.mat", "trainNdxs").tolist() == [0, 1, 6]
    assert read_split_indices(tmp_path / "splits.mat", "testNdxs").tolist() == [2]
    (tmp_path / "test.txt").write_text("3\n4 9\n")
    assert read_split_indices(tmp_path / "test.txt", "testNdxs").tolist() == [2, 3, 8]
    with pytest.raises(DepthDataError, match="no variable 'valNdxs'"):
        read_split_indices(tmp_path / "splits.mat", "valNdxs")
    (tmp_path / "zero.txt").write_text("0 1\n")
    with pytest.raises(DepthDataError, match="1-based"):
        read_split_indices(tmp_path / "zero.txt", "testNdxs")


def test_labeled_mat_bad_input(tmp_path):
    images, depths = scenes(3)
    write_labeled_mat(tmp_path / "a.mat", images, depths)
    with pytest.raises(DepthDataError, match=r"split entries \[4\] \(1-based\) are beyond its 3"):
        NYULabeledMat(tmp_path / "a.mat", [0, 3])
    with h5py.File(tmp_path / "b.mat", "w") as f:  # depth maps smaller than the images
        f["images"] = images.transpose(0, 3, 2, 1)
        f["depths"] = depths[:, :8, :8].transpose(0, 2, 1)
    with pytest.raises(DepthDataError, match="disagree in count or size"):
        NYULabeledMat(tmp_path / "b.mat", [0])


def write_png_folder(root, images, depths, names):
    """BTS layout: ``<scene>/rgb_*.jpg`` and 16-bit ``sync_depth_*.png`` in millimetres."""
    lines = []
    for img, d, name in zip(images, depths, names):
        (root / "scene").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / "scene" / f"rgb_{name}.jpg", quality=95)
        mm = np.round(d * 1000).astype(np.uint16)
        Image.fromarray(mm).save(root / "scene" / f"sync_depth_{name}.png")
        lines.append(f"/scene/rgb_{name}.jpg /scene/sync_depth_{name}.png 518.8579")
    return lines


def test_png_folder_round_trips_16bit_millimetres(tmp_path):
    images, depths = scenes(3)
    depths[0, 0, :4] = 0.0  # no measurement
    lines = write_png_folder(tmp_path, images, depths, ["00001", "00002", "00003"])
    (tmp_path / "nyu_test.txt").write_text("\n".join(lines) + "\n\n")
    png = tmp_path / "scene" / "sync_depth_00001.png"
    with Image.open(png) as im:
        assert im.mode == "I;16"  # really 16-bit, not clipped to 8 bits
        assert np.asarray(im).max() > 255
    ds = build_depth_reader("folder", tmp_path, "test", "nyu_test.txt")
    assert len(ds) == 3 and ds[0].name == "scene/rgb_00001.jpg"
    s = ds[0]
    assert s.depth.dtype == np.float32 and s.depth.shape == (H, W)
    np.testing.assert_allclose(s.depth, np.round(depths[0] * 1000) / 1000, rtol=0, atol=1e-6)
    assert np.abs(s.depth - depths[0]).max() <= 0.0005 + 1e-6  # millimetre quantisation
    assert (s.depth[0, :4] == 0).all()
    with Image.open(tmp_path / "scene" / "rgb_00001.jpg") as im:
        np.testing.assert_array_equal(s.image, np.asarray(im.convert("RGB")))


def test_png_folder_bad_input(tmp_path):
    images, depths = scenes(2)
    lines = write_png_folder(tmp_path, images, depths, ["00001", "00002"])
    split = tmp_path / "nyu_train.txt"
    split.write_text("\n".join([*lines, "/scene/rgb_00009.jpg /scene/sync_depth_00009.png 518.8"]))
    with pytest.raises(
        DepthDataError, match=r"2 listed file\(s\) missing, e\.g\. line 3: .*rgb_00009"
    ):
        NYUFolder(split, tmp_path)
    split.write_text("scene/rgb_00001.jpg\n")
    with pytest.raises(DepthDataError, match=r"nyu_train.txt:1: expected 'rgb depth \[focal\]'"):
        NYUFolder(split, tmp_path)
    Image.fromarray(np.zeros((H // 2, W), dtype=np.uint16)).save(tmp_path / "scene" / "small.png")
    split.write_text("scene/rgb_00001.jpg scene/small.png 518.8\n")
    with pytest.raises(
        DepthDataError, match=r"small.png: depth map is 6x16 but the image is 12x16"
    ):
        NYUFolder(split, tmp_path)[0]
    Image.fromarray(np.zeros((H, W), dtype=np.uint8)).save(tmp_path / "scene" / "eight.png")
    split.write_text("scene/rgb_00001.jpg scene/eight.png 518.8\n")
    with pytest.raises(DepthDataError, match="mode L; expected single-channel 16-bit"):
        NYUFolder(split, tmp_path)[0]


def add_member(tf, name, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_shard(path, images, depths, keys, skip_depth_of=None):
    with tarfile.open(path, "w") as tf:
        for img, d, key in zip(images, depths, keys):
            add_member(tf, f"{key}.jpg", _jpeg(img))
            if key != skip_depth_of:
                buf = io.BytesIO()
                np.save(buf, d)
                add_member(tf, f"{key}.depth.npy", buf.getvalue())


def test_tar_shards(tmp_path):
    images, depths = scenes(5)
    write_shard(tmp_path / "test-000000.tar", images[:3], depths[:3], ["k/a0", "k/a1", "k/a2"])
    write_shard(tmp_path / "test-000001.tar", images[3:], depths[3:], ["b0", "b1"])
    ds = build_depth_reader("tar", tmp_path, "test", "test-*.tar")
    assert len(ds) == 5
    assert [ds[i].name for i in (0, 4)] == ["test-000000.tar:k/a0", "test-000001.tar:b1"]
    s = ds[4]
    np.testing.assert_array_equal(s.depth, depths[4])
    with Image.open(io.BytesIO(_jpeg(images[4]))) as im:
        np.testing.assert_array_equal(s.image, np.asarray(im.convert("RGB")))


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_tar_shard_bad_input(tmp_path):
    images, depths = scenes(2)
    write_shard(tmp_path / "s.tar", images, depths, ["x0", "x1"], skip_depth_of="x1")
    with pytest.raises(DepthDataError, match="sample 'x1' has no 'depth.npy' member"):
        DepthTarShards([tmp_path / "s.tar"])
    with pytest.raises(DepthDataError, match="no tar shard matches"):
        build_depth_reader("tar", tmp_path, "train", "train-*.tar")
    write_shard(tmp_path / "m.tar", images, depths[:, :6], ["y0", "y1"])
    with pytest.raises(DepthDataError, match="y0: depth map is 6x16 but the image is 12x16"):
        DepthTarShards([tmp_path / "m.tar"])[0]


class ListReader(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def test_pairs_crop_and_flip_keep_image_and_depth_aligned():
    depth = np.arange(H * W, dtype=np.float32).reshape(H, W)
    image = np.repeat((depth % 256).astype(np.uint8)[..., None], 3, axis=2)
    pairs = DepthPairs(ListReader([DepthSample(image, depth, "s")]), patch_size=4,
                       crop_size=(8, 12))  # fmt: skip
    mean, std = pairs.mean, pairs.std
    seen_flip = set()
    torch.manual_seed(0)
    for _ in range(20):
        out = pairs[0]
        assert out["image"].shape == (3, 8, 12) and out["depth"].shape == (1, 8, 12)
        pixels = ((out["image"] * std + mean) * 255).round()[0]
        torch.testing.assert_close(pixels, out["depth"][0] % 256, rtol=0, atol=0)
        seen_flip.add(bool(out["depth"][0, 0, 0] > out["depth"][0, 0, -1]))
    assert seen_flip == {True, False}
    evals = DepthPairs(ListReader([DepthSample(image, depth, "s")]), patch_size=8, input_scale=0.5)
    out = evals[0]
    assert out["image"].shape == (3, 8, 8) and out["depth"].shape == (1, H, W)
    assert out["rgb"].shape == (H, W, 3)
