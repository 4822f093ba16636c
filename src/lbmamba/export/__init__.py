"""Deployment: ONNX export of lbmamba and timm image models that plain onnxruntime runs (see docs/deploy.md).

    from lbmamba.export import export_onnx, OnnxModel
    figures = export_onnx(model, "model.onnx", img_size=(224, 224), in_chans=3, metadata={"mean": [...]})
    logits = OnnxModel("model.onnx")(images)
"""

from .onnx import (
                   DEFAULT_OPSET,
                   METADATA_KEY,
                   ExportError,
                   OnnxModel,
                   export_onnx,
                   graph_stats,
                   quantize_dynamic,
                   read_metadata,
                   relative_error,
                   verify,
)
from .scan import onnx_scan, selective_scan_onnx

__all__ = ["export_onnx", "verify", "OnnxModel", "ExportError", "read_metadata", "graph_stats", "quantize_dynamic",
           "relative_error", "onnx_scan", "selective_scan_onnx", "METADATA_KEY", "DEFAULT_OPSET"]
