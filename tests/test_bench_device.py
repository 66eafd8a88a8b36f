"""The device check (bench/device.py) at its tiny CPU size, so it cannot rot before a GPU run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "device.py"


@pytest.fixture(scope="module")
def device_bench():
    spec = importlib.util.spec_from_file_location("bench_device", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def measured(part: dict) -> None:
    """A measurement: positive throughput and FLOPs, or an explicit reason it was skipped."""
    if "skipped" in part:
        assert isinstance(part["skipped"], str) and part["skipped"]
        return
    assert part["items_per_s"] > 0 and part["calls_per_s"] > 0 and part["timed_calls"] >= 1
    assert part["flops_per_call"] > 0 and part["tflops_per_s"] > 0


def test_tiny_run_writes_every_part(device_bench, tmp_path):
    out = tmp_path / "device.json"
    assert device_bench.main(["--size", "tiny", "--device", "cpu", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    env = results["environment"]
    assert env["device_type"] == "cpu" and env["torch"] and env["timm"]
    parts = results["parts"]
    assert set(parts) == {"extraction", "finetune", "pretrain"}
    extraction = parts["extraction"]
    for key in ("toolkit_fp32", "hf_transformers"):
        measured(extraction[key])
    assert extraction["toolkit_fp32"]["mfu"] is None  # no peak for the CPU
    # the counted FLOPs (attention as matmuls) are the docstring's formula, per image
    per_image = extraction["toolkit_fp32"]["flops_per_call"] / extraction["batch"]
    assert per_image == extraction["formula_flops_per_image"]
    measured(parts["finetune"])
    assert parts["finetune"]["grad_checkpointing"] is True
    measured(parts["pretrain"])
    assert "--official-src" in parts["pretrain"]["official"]["skipped"]
    assert 0 < parts["pretrain"]["context_tokens"] and 0 < parts["pretrain"]["target_tokens"]


def test_a_failing_part_is_recorded_and_fails_the_run(device_bench, tmp_path, monkeypatch):
    def broken(size, device):
        raise RuntimeError("finetune step broke")

    monkeypatch.setattr(device_bench, "bench_finetune", broken)
    monkeypatch.setattr(device_bench, "bench_extraction", lambda size, device: {"skipped": "x"})
    monkeypatch.setattr(device_bench, "bench_pretrain", lambda *a: {"skipped": "x"})
    out = tmp_path / "device.json"
    assert device_bench.main(["--size", "tiny", "--device", "cpu", "--out", str(out)]) == 1
    assert "finetune step broke" in json.loads(out.read_text())["parts"]["finetune"]["error"]


def test_peak_table_matches_nvidia_names(device_bench):
    table = {key: (bf16, fp32) for key, bf16, fp32 in device_bench.PEAK_TFLOPS}
    names = {"NVIDIA H200": "H200", "NVIDIA H200 NVL": "H200 NVL", "NVIDIA H100 80GB HBM3": "H100",
             "NVIDIA H100 PCIe": "H100 PCIe", "NVIDIA A100-SXM4-80GB": "A100"}  # fmt: skip
    for name, key in names.items():
        first = next(k for k, _, _ in device_bench.PEAK_TFLOPS if k in name)
        assert table[first] == table[key], name
