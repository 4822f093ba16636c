"""Training, evaluation and benchmarking: one module per task on one training loop (`loop.fit`) and one set of run
helpers.

    from lbmamba.engine import train, evaluate, bench, train_mil, evaluate_mil, extract_features, train_seg
    result = train({"epochs": 5})            # the digits default, 5 epochs
    summary = train_mil({"model": "lb"})     # the digits-bags MIL demo
    scores = train_seg({"iters": 300})       # UperNet on the generated digit scenes
    boxes = train_det({"iters": 100})        # Cascade Mask R-CNN on the generated digit scenes

Every command is a plain function `command(overrides=None, config_path=None)` over its config table
(`TRAIN`, `EVAL`, `BENCH`, `MIL_TRAIN`, `MIL_EVAL`, `EXTRACT`, `SEG_TRAIN`, `SEG_EVAL`, `SEG_PREDICT`, `DET_TRAIN`,
`DET_EVAL`, `DET_PREDICT`):
the table's defaults <- the YAML file at `config_path` <- `overrides`. It returns the final figures as a
JSON-able dict (None on ranks other than 0 under torchrun) and raises `UserError` for bad input. Each training
command is a `loop.Task` that `loop.fit` runs (docs/architecture.md shows how to add one). No argument parsing
lives here (that is `lbmamba.cli`).
"""

from .bench import BENCH, bench
from .classification import EVAL, TRAIN, evaluate, train
from .config import ConfigTable, Key
from .detection import DET_EVAL, DET_PREDICT, DET_TRAIN, evaluate_det, predict_det, train_det
from .errors import TrainingDivergedError, UserError
from .export import EXPORT, PREDICT, export_model, predict
from .features import EXTRACT, extract_features
from .mil import MIL_EVAL, MIL_TRAIN, evaluate_mil, train_mil
from .segmentation import SEG_EVAL, SEG_PREDICT, SEG_TRAIN, evaluate_seg, predict_seg, train_seg
from .wsi import HEATMAP, PATCH, heatmap, patch_slides

__all__ = [
    "UserError",
    "TrainingDivergedError",
    "ConfigTable",
    "Key",
    "TRAIN",
    "EVAL",
    "BENCH",
    "MIL_TRAIN",
    "MIL_EVAL",
    "EXTRACT",
    "SEG_TRAIN",
    "SEG_EVAL",
    "SEG_PREDICT",
    "train",
    "evaluate",
    "bench",
    "train_mil",
    "evaluate_mil",
    "extract_features",
    "train_seg",
    "evaluate_seg",
    "predict_seg",
    "DET_TRAIN",
    "DET_EVAL",
    "DET_PREDICT",
    "train_det",
    "evaluate_det",
    "predict_det",
    "PATCH",
    "HEATMAP",
    "patch_slides",
    "heatmap",
    "EXPORT",
    "PREDICT",
    "export_model",
    "predict",
]
