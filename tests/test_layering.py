"""The loader's layers import one way: io -> formats -> loader; models/ knows no file format."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "ijepa_toolkit"
FORMATS = PKG / "formats"
FORMAT_MODULES = sorted(
    p for p in FORMATS.glob("*.py") if p.name not in ("__init__.py", "canonical.py")
)


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Absolute names of the ``ijepa_toolkit`` modules (or names in them) ``path`` imports."""
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rsplit(".", 1)[0]
    )
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {name for name in found if name.split(".")[0] == "ijepa_toolkit"}


def test_import_resolution_sees_relative_imports():
    names = project_imports(FORMATS / "official.py")
    assert "ijepa_toolkit.io.read" in names and "ijepa_toolkit.formats.canonical" in names


def test_format_modules_exist():
    assert {p.stem for p in FORMAT_MODULES} >= {"official", "toolkit", "tiny_ijepa", "mae"}


@pytest.mark.parametrize("path", FORMAT_MODULES, ids=lambda p: p.stem)
def test_a_format_imports_only_io_errors_models_and_the_canonical_form(path):
    allowed = ("ijepa_toolkit.io", "ijepa_toolkit.errors", "ijepa_toolkit.models",
               "ijepa_toolkit.formats.canonical")  # fmt: skip
    others = {module_name(p) for p in FORMAT_MODULES} - {module_name(path)}
    for name in project_imports(path):
        assert name.startswith(allowed), f"{path.name} imports {name}"
        assert not any(name == o or name.startswith(o + ".") for o in others), name


def test_canonical_form_imports_no_format():
    formats = {module_name(p) for p in FORMAT_MODULES}
    for name in project_imports(FORMATS / "canonical.py"):
        assert not any(name.startswith(f) for f in formats), name


@pytest.mark.parametrize("path", sorted((PKG / "models").glob("*.py")), ids=lambda p: p.stem)
def test_models_know_no_loader_and_no_file_format(path):
    higher = ("ijepa_toolkit.loader", "ijepa_toolkit.formats", "ijepa_toolkit.io",
              "ijepa_toolkit.build", "ijepa_toolkit.export", "ijepa_toolkit.cli")  # fmt: skip
    for name in project_imports(path):
        assert not name.startswith(higher), f"models/{path.name} imports {name}"


@pytest.mark.parametrize("path", sorted((PKG / "io").glob("*.py")), ids=lambda p: p.stem)
def test_io_imports_only_errors_and_io(path):
    for name in project_imports(path):
        assert name.startswith(("ijepa_toolkit.io", "ijepa_toolkit.errors")), name


def test_no_checkpoint_module_left():
    assert not (PKG / "checkpoint.py").exists()
    assert not (PKG / "models" / "tiny_ijepa.py").exists()


PROTOCOLS = ("knn", "logistic", "linear", "rank", "depth")


@pytest.mark.parametrize("name", PROTOCOLS)
def test_a_protocol_imports_no_other_protocol(name):
    others = {f"ijepa_toolkit.eval.{p}" for p in PROTOCOLS if p != name}
    for imported in project_imports(PKG / "eval" / f"{name}.py"):
        assert not any(imported == o or imported.startswith(o + ".") for o in others), imported


LOWER = ("errors", "io", "models", "formats", "loader", "config", "data", "masks", "engine")
TOP = ("ijepa_toolkit.tables", "ijepa_toolkit.demo", "ijepa_toolkit.viz", "ijepa_toolkit.cli")


LOWER_FILES = sorted(
    p for part in LOWER for p in [*(PKG / part).glob("*.py"), PKG / f"{part}.py"] if p.exists()
)


@pytest.mark.parametrize("path", LOWER_FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_lower_layers_import_no_protocol_training_or_top_level_module(path):
    higher = tuple(f"ijepa_toolkit.{m}" for m in ("eval", "finetune", "pretrain", "runs", "build",
                                                 "export")) + TOP  # fmt: skip
    for name in project_imports(path):
        assert not name.startswith(higher), f"{path.relative_to(PKG)} imports {name}"
