"""lbmamba: locally bi-directional Mamba (LBMamba) scans, layers and models."""

__version__ = "0.1.0"

from .ops import selective_scan_fn, selective_scan_ref

__all__ = ["selective_scan_fn", "selective_scan_ref", "__version__"]

from . import models  # noqa: F401  (importing it registers the model families with timm)
from .models import load_checkpoint

__all__ += ["load_checkpoint"]
