"""I-JEPA finetuning and evaluation toolkit.

>>> import ijepa_toolkit as ijt
>>> enc = ijt.load_encoder("IN1K-vit.h.14-300e.pth.tar")   # timm VisionTransformer, eval mode
>>> feats = enc(images)                                      # (B, D) mean of final-norm tokens
"""

from .errors import CheckpointError
from .export import export_encoder
from .io.save import save_checkpoint
from .loader import inspect_checkpoint, load_encoder, load_predictor
from .models.vit import apply_masks, encode_masked

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "apply_masks",
    "encode_masked",
    "export_encoder",
    "inspect_checkpoint",
    "load_encoder",
    "load_predictor",
    "save_checkpoint",
]
