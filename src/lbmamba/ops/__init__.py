"""The LB selective scan: one public function, several backends behind it."""

from ._checks import resolve_window
from .compat import mamba_inner_fn, selective_state_update, selective_window_update
from .reference import selective_scan_ref
from .scan import BACKENDS, available_backends, choose_backend, selective_scan_fn

__all__ = ["selective_scan_fn", "selective_scan_ref", "resolve_window", "available_backends", "choose_backend",
           "BACKENDS", "selective_state_update", "selective_window_update", "mamba_inner_fn"]
