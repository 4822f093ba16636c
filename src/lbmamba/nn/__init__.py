"""Layers built on the scan: the Mamba-1 mixer, RMSNorm / add+norm, and the residual block."""

from .block import Block
from .mixer import SCAN_TYPES, Mamba
from .norm import RMSNorm, add_norm, rms_norm

__all__ = ["Mamba", "SCAN_TYPES", "RMSNorm", "rms_norm", "add_norm", "Block"]
