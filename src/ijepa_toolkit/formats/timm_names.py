"""timm pretrained names (``vit_huge_patch14_gap_224.in1k_ijepa``, ...) -> the cached weights file.

Resolution follows timm's own pretrained config (``timm.models.get_pretrained_cfg``) and never
downloads: with an ``hf_hub_id`` the file is looked up in the huggingface_hub cache
(``$HF_HOME/hub``; ``hf_hub_filename``, else ``model.safetensors`` then ``pytorch_model.bin``, the
order timm tries); with a ``url`` (timm 1.0's I-JEPA entries point at the official
``.pth.tar`` releases) it is the torch hub cache timm downloads into,
``$TORCH_HOME/hub/checkpoints/<file name of the url>``. The file found is then read like any
other (an official release: its ``target_encoder`` by default; timm's own
``create_model(pretrained=True)`` takes the context ``encoder``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from ..errors import CheckpointError

HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def locate(name: str) -> Optional[Path]:
    """The cached weights file of the timm pretrained name ``name``; None if timm has no such
    name. ``CheckpointError`` saying where to put the file when it is not in the cache."""
    if os.sep in name or "/" in name:
        return None
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        return None
    if cfg.hf_hub_id:
        return _hub_file(name, cfg.hf_hub_id, cfg.hf_hub_filename)
    return _url_file(name, cfg.url)


def _hub_file(name: str, repo: str, filename: Optional[str]) -> Path:
    from huggingface_hub import constants, try_to_load_from_cache

    for file in (filename,) if filename else HUB_FILES:
        found = try_to_load_from_cache(repo, file)
        if isinstance(found, str):
            return Path(found)
    raise CheckpointError(
        f"timm model {name}: weights not in the Hugging Face cache ({constants.HF_HUB_CACHE}); "
        f"download them once with huggingface_hub.hf_hub_download({repo!r}, "
        f"{(filename or HUB_FILES[0])!r}) or pass the file's path instead of the name"
    )


def _url_file(name: str, url: str) -> Path:
    import torch.hub

    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if not path.is_file():
        raise CheckpointError(
            f"timm model {name}: weights not in timm's cache; put {url} at {path} "
            "(timm.create_model(name, pretrained=True) downloads it there), or pass a file path"
        )
    return path
