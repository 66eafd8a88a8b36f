"""Every entrypoint refuses a missing data folder before it builds any model (ViT-H configs).

A ViT-H random init takes about a minute and 5.7 GB here, so the folder check must come first:
the test makes building any timm ``VisionTransformer`` fail loudly, then runs each entrypoint's
``main`` with the shipped ViT-H config, a random init (no checkpoint needed) and a missing
folder. Passing means: exit 2, one ``error:`` line naming the data key, and no model built.
"""

from __future__ import annotations

import importlib

import pytest
import timm.models.vision_transformer as timm_vit

RANDOM_INIT = ["model.checkpoint=null"]
CASES = [
    ("ijepa_toolkit.eval.linear", "linprobe/in1k", RANDOM_INIT),
    ("ijepa_toolkit.eval.logistic", "logistic/in1k_1pct", RANDOM_INIT),
    ("ijepa_toolkit.eval.knn", "knn/digits",
     [*RANDOM_INIT, "model.arch={model_name: vit_huge, patch_size: 14}"]),
    ("ijepa_toolkit.finetune.run", "finetune/vit_h14_in1k", RANDOM_INIT),
    ("ijepa_toolkit.eval.depth", "depth/nyu_vith14_linear", RANDOM_INIT),
    ("ijepa_toolkit.pretrain.train", "pretrain/in1k_vith14_ep300", []),  # always a random init
]  # fmt: skip
KEY = "data.train_folder"


class ModelBuilt(AssertionError):
    pass


@pytest.fixture
def no_model_building(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise ModelBuilt("a VisionTransformer was built before the data folder was checked")

    monkeypatch.setattr(timm_vit.VisionTransformer, "__init__", refuse)


@pytest.mark.parametrize("module, config, overrides", CASES, ids=[c[1] for c in CASES])
def test_missing_data_folder_is_refused_before_any_model_is_built(
    module, config, overrides, tmp_path, capsys, no_model_building
):
    main = importlib.import_module(module).main
    missing = tmp_path / "no_such_folder"
    argv = ["--fname", config, f"{KEY}={missing}", *overrides,
            f"logging.folder={tmp_path / 'run'}"]  # fmt: skip
    rc = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and "Traceback" not in err, err
    assert len(errors) == 1 and KEY in errors[0] and str(missing) in errors[0], err
