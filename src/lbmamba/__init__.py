"""lbmamba: locally bi-directional Mamba (LBMamba) scans, layers and models."""

__version__ = "0.1.0"

from .ops import selective_scan_fn, selective_scan_ref

__all__ = ["selective_scan_fn", "selective_scan_ref", "__version__"]
