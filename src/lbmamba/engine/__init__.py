"""Training, evaluation and benchmarking loops: plain functions driven by a config dict.

    from lbmamba.engine import train, evaluate, bench, load_config
    result = train(load_config(overrides={"epochs": 5}))   # the digits default, 5 epochs

No argument parsing lives here (that is `lbmamba.cli`). Every entry point returns the final figures as
a JSON-able dict (None on ranks other than 0 under torchrun) and raises `UserError` for bad input.
"""

from .errors import TrainingDivergedError, UserError  # first: the modules below import it

from .config import DEFAULTS, apply_overrides, config_fingerprint, load_config, parse_override  # noqa: E402
from .classification import evaluate, train  # noqa: E402
from .bench import bench  # noqa: E402

__all__ = [
    "UserError",
    "TrainingDivergedError",
    "DEFAULTS",
    "load_config",
    "apply_overrides",
    "parse_override",
    "config_fingerprint",
    "train",
    "evaluate",
    "bench",
]
