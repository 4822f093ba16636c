"""Layers built on the scan: the Mamba-1 mixer, SRMamba, RMSNorm / add+norm, the residual block and
attention pooling."""

from .attention_pool import AttentionPoolHead
from .block import Block
from .mixer import SCAN_TYPES, Mamba
from .norm import RMSNorm, add_norm, rms_norm
from .srmamba import SRMamba, sr_permutation, sr_reorder, sr_restore

__all__ = ["Mamba", "SCAN_TYPES", "SRMamba", "sr_reorder", "sr_restore", "sr_permutation", "RMSNorm", "rms_norm",
           "add_norm", "Block", "AttentionPoolHead"]
