"""``ijepa-export`` / ``ijepa-inspect``: output, files written, exit codes, one-line errors.

The real processes (the installed console scripts and ``python -m ijepa_toolkit.cli``) are started
all at once by one module fixture, since each pays the torch/timm import (~3 s); the remaining
checks call the entry points in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ijepa_toolkit import load_encoder
from ijepa_toolkit.cli import export_main, inspect_main, main

BAD_KINDS = ("missing", "evil", "probe")


class _RunsShell:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def make_bad(kind: str, folder: Path) -> Path:
    """A checkpoint that must be refused: absent, a code-running pickle, or a probe head only."""
    path = folder / f"{kind}.pth.tar"
    if kind == "evil":
        torch.save({"target_encoder": _RunsShell(folder / "pwned")}, path)
    elif kind == "probe":
        torch.save({"head.weight": torch.randn(10, 64), "head.bias": torch.randn(10)}, path)
    return path  # "missing": never written


MODULE = [sys.executable, "-m", "ijepa_toolkit.cli"]


def entry_point(command: str) -> list:
    """The installed console script ``ijepa-COMMAND``, else ``python -m ijepa_toolkit.cli``."""
    script = Path(sys.executable).parent / f"ijepa-{command}"
    return [script] if script.exists() else [*MODULE, command]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ckpt_path):
    """name -> (CompletedProcess-like result, paths used); all processes run concurrently."""
    folder = tmp_path_factory.mktemp("cli")
    bad = {kind: make_bad(kind, folder) for kind in BAD_KINDS}
    out = folder / "export" / "enc.safetensors"
    export_args = [ckpt_path, out, "--which", "encoder", "--num-heads", "4"]
    commands = {
        "inspect": [*entry_point("inspect"), ckpt_path],
        "export": [*entry_point("export"), *export_args],
        **{f"bad-{k}": [*MODULE, "inspect", p] for k, p in bad.items()},
    }
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    pipe = subprocess.PIPE
    procs = {
        name: subprocess.Popen([str(a) for a in cmd], stdout=pipe, stderr=pipe, text=True, env=env)
        for name, cmd in commands.items()
    }
    results = {}
    try:
        for name, proc in procs.items():
            stdout, stderr = proc.communicate(timeout=180)
            results[name] = subprocess.CompletedProcess(
                commands[name], proc.returncode, stdout, stderr
            )
    finally:  # a hung command must not outlive the tests
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return {"results": results, "folder": folder, "bad": bad, "out": out}


def test_inspect_prints_summary(runs, ckpt_path):
    r = runs["results"]["inspect"]
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.startswith(f"{ckpt_path}\n")
    assert "format: ijepa" in out
    assert "epoch:  300" in out
    for name in ("target_encoder: 53 tensors", "encoder: 53 tensors", "predictor: 32 tensors"):
        assert name in out
    assert "arch: ViT depth=4 width=64 patch=8" in out
    assert "pos_embed: sincos" in out
    assert "lr=0.001" in out
    assert r.stderr == ""


def test_export_writes_files_and_logs(runs, ckpt_path, images, context_encoder):
    r, out = runs["results"]["export"], runs["out"]
    assert r.returncode == 0, r.stderr
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert r.stdout.splitlines()[0] == f"wrote {out}"
    assert r.stdout.splitlines()[1].startswith(f"wrote {out.with_suffix('.json')}")
    # the loader's log line, plain, on stderr
    assert r.stderr.startswith(f"loaded encoder from {ckpt_path}: format=ijepa")
    assert len(r.stderr.strip().splitlines()) == 1
    with torch.no_grad():
        assert torch.equal(
            load_encoder(out, num_heads=4).forward_features(images),
            context_encoder.forward_features(images),
        )


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_checkpoint_is_one_error_line(runs, kind):
    r = runs["results"][f"bad-{kind}"]
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {runs['bad'][kind]}: ")
    assert r.stdout == ""
    assert not (runs["folder"] / "pwned").exists()


def test_error_messages_say_what_is_wrong(runs):
    results = runs["results"]
    assert "no such file" in results["bad-missing"].stderr
    assert "refused" in results["bad-evil"].stderr
    assert "no encoder weights" in results["bad-probe"].stderr


def test_console_scripts_are_installed():
    for command in ("inspect", "export"):
        script = Path(sys.executable).parent / f"ijepa-{command}"
        if not script.exists():
            pytest.skip(f"{script.name} not installed beside {sys.executable}")
        assert f"ijepa_toolkit.cli import {command}_main" in script.read_text()


# --- in-process --------------------------------------------------------------------------------


def test_inspect_json(ckpt_path, capsys):
    assert inspect_main([str(ckpt_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "ijepa" and info["epoch"] == 300
    assert info["submodels"]["target_encoder"]["arch"]["patch_size"] == 8
    assert info["submodels"]["target_encoder"]["pos_embed"] == "sincos"


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_export_bad_checkpoint_in_process(tmp_path, kind, capsys):
    path = make_bad(kind, tmp_path)
    with pytest.raises(SystemExit) as e:
        export_main([str(path), str(tmp_path / "out.safetensors")])
    assert e.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"error: {path}: ") and captured.err.count("\n") == 1
    assert not (tmp_path / "out.safetensors").exists() and not (tmp_path / "pwned").exists()


def test_nonstandard_width_error_mentions_num_heads(ckpt_path, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        export_main([str(ckpt_path), str(tmp_path / "enc.safetensors")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {ckpt_path}: ") and "num_heads" in err
    assert err.count("\n") == 1


def test_export_in_process_logs_loaded_line(ckpt_path, tmp_path, capsys):
    out = tmp_path / "enc.safetensors"
    assert main(["export", str(ckpt_path), str(out), "--num-heads", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"wrote {out}\n")
    assert captured.err.startswith(f"loaded target_encoder from {ckpt_path}")


def test_usage_errors(capsys):
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    with pytest.raises(SystemExit) as e:
        main(["inspect"])  # missing argument: argparse's usage message
    assert e.value.code == 2
    assert "usage: ijepa-inspect" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        export_main(["a.pth", "b.safetensors", "--which", "predictor"])
    assert e.value.code == 2
