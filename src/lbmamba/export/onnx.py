"""Export a PyTorch image model to an ONNX file that plain onnxruntime runs, check it, and run it.

`export_onnx` traces the model with PyTorch's dynamo-based exporter (`torch.onnx.export(..., dynamo=True)`),
with every lbmamba scan switched to the standard-op form of `lbmamba.export.scan` (no custom op, no custom
domain), a dynamic batch axis and the image size fixed (the LB window follows from it). It then checks the
file (`onnx.checker`, ops of the default domain only), runs it in onnxruntime on random batches of two sizes
and compares the outputs with the PyTorch model (with its real scan backend): above `tolerance` (relative to the
largest output) the export fails and nothing is written at `path` (the file is written beside it under a
temporary name and renamed only when it verified). The preprocessing the model expects (mean, std, image
size, class names, ...) is stored in the file's metadata under the key "lbmamba" as JSON.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import tempfile
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

from .scan import onnx_scan

__all__ = ["ExportError", "export_onnx", "OnnxModel", "read_metadata", "graph_stats", "quantize_dynamic",
           "relative_error", "verify", "METADATA_KEY", "DEFAULT_OPSET"]

METADATA_KEY = "lbmamba"
#: opset 18: onnxruntime >= 1.14 and TensorRT >= 8.6 accept it; the exporter's lowest well-supported opset
DEFAULT_OPSET = 18
#: the example batch of the trace (torch.export treats sizes 0 and 1 as constants, so not 1)
_TRACE_BATCH = 2
#: batch sizes the export is checked with in onnxruntime: one other than the trace's shows the batch is dynamic
_CHECK_BATCHES = (1, 3)
_STANDARD_DOMAINS = ("", "ai.onnx")


class ExportError(RuntimeError):
    """The model cannot be exported, or the exported file does not reproduce it (one line)."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def graph_stats(proto) -> Dict[str, Any]:
    """nodes, op types (sorted by count) and the domains of a ModelProto."""
    counts: Dict[str, int] = {}
    domains = set()
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        domains.add(node.domain)
    for function in proto.functions:
        domains.add(function.domain)
        for node in function.node:
            domains.add(node.domain)
    return {"nodes": len(proto.graph.node), "functions": len(proto.functions),
            "op_types": dict(sorted(counts.items(), key=lambda kv: -kv[1])), "domains": sorted(domains)}


def _session(path: str, threads: Optional[int] = None, level: Optional[str] = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = int(threads)
    if level is not None:
        levels = ort.GraphOptimizationLevel
        options.graph_optimization_level = {"disable": levels.ORT_DISABLE_ALL, "basic": levels.ORT_ENABLE_BASIC,
                                            "extended": levels.ORT_ENABLE_EXTENDED, "all": levels.ORT_ENABLE_ALL}[level]
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    """max |got - want| / max |want| (the error relative to the output's scale)."""
    scale = float(np.abs(want).max()) or 1.0
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max() / scale)


def _light_optimize(model) -> None:
    """The cheap part of onnxscript's optimiser, in place on an onnx_ir Model: inline functions, fold constants,
    drop Identity and unused nodes, lift constants to initializers, deduplicate them, eliminate common
    subexpressions. onnxscript's own `optimize` adds its pattern rewriter, twice: on LBVim-T's graph that is
    about 110 s of CPU (it grows faster than the node count) for 7 % fewer nodes and no measurable change in
    onnxruntime's latency (onnxruntime fuses and simplifies the graph itself when it loads it)."""
    import onnx_ir.passes.common as passes
    from onnxscript.optimizer import fold_constants

    passes.InlinePass()(model)
    fold_constants(model, onnx_shape_inference=True)
    for step in (passes.IdentityEliminationPass(), passes.RemoveUnusedNodesPass(),
                 passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                 passes.DeduplicateInitializersPass(), passes.CommonSubexpressionEliminationPass(),
                 passes.RemoveUnusedNodesPass(), passes.OutputFixPass(), passes.NameFixPass()):
        step(model)


class _Clock:
    """Wall and CPU seconds of named phases (CPU: this process, all its threads)."""

    def __init__(self):
        self.phases: Dict[str, Dict[str, float]] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.phases[name] = {"wall_s": round(time.perf_counter() - wall, 2),
                                 "cpu_s": round(time.process_time() - cpu, 2)}

    def total(self, key: str) -> float:
        return round(sum(p[key] for p in self.phases.values()), 2)


#: optimisers export_onnx accepts: "light" (default, see _light_optimize), "full" (onnxscript's), "none"
OPTIMIZERS = ("light", "full", "none")


def export_onnx(model: nn.Module, path: str, *, img_size: Sequence[int], in_chans: int,
                metadata: Optional[Mapping[str, Any]] = None, opset: int = DEFAULT_OPSET, tolerance: float = 1e-4,
                threads: Optional[int] = None, seed: int = 0, optimize: str = "light") -> Dict[str, Any]:
    """Export `model` ((batch, in_chans, H, W) float images -> one tensor) to `path`, verified; see the module doc.

    Returns the figures: export_seconds (wall, tracing to verified file), export_cpu_seconds, phases (wall and
    CPU seconds of torch.export's trace, the translation to ONNX, the optimiser, the verification), nodes,
    op_types, bytes, max_rel_error, checked_batches, opset.
    Raises ExportError (nothing at `path`) when it cannot export or the check fails."""
    import onnx

    if optimize not in OPTIMIZERS:
        raise ValueError(f"export_onnx: optimize must be one of {', '.join(OPTIMIZERS)}, got {optimize!r}")
    height, width = int(img_size[0]), int(img_size[1])
    model = model.eval()
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(_TRACE_BATCH, in_chans, height, width, generator=generator)
    clock = _Clock()
    # the trace runs on a copy: layers that cache index tensors per input shape would otherwise keep the
    # tracer's tensors, and the model would fail (or differ) in eager mode afterwards
    traced = copy.deepcopy(model)
    try:
        with onnx_scan(), torch.no_grad():
            with clock("trace"):
                traced(example)  # fills the layers' index-table caches with real tensors: the trace keeps them
                exported = torch.export.export(
                    traced, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},))
            with clock("translate"):
                program = torch.onnx.export(exported, (example,), None, dynamo=True, opset_version=opset,
                                            input_names=["images"], output_names=["output"], verbose=False,
                                            optimize=optimize == "full")
    except Exception as exc:  # the exporter raises many types; all mean "this model does not export"
        raise ExportError(f"the model cannot be exported to ONNX ({_first_line(exc)})") from exc
    del traced, exported
    with clock("optimize"):
        if optimize == "light":
            _light_optimize(program.model)
        proto = program.model_proto
        if proto.functions:  # helper functions of the exporter's library: inline them, leave no custom domain
            proto = onnx.inliner.inline_local_functions(proto)
    props = {p.key: p.value for p in proto.metadata_props}
    props[METADATA_KEY] = json.dumps(dict(metadata or {}, img_size=[height, width], in_chans=in_chans))
    del proto.metadata_props[:]
    for key, value in props.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "lbmamba"
    stats = graph_stats(proto)
    foreign = [d for d in stats["domains"] if d not in _STANDARD_DOMAINS]
    if foreign:
        raise ExportError(f"the exported graph uses non-standard op domains {foreign}; onnxruntime alone cannot run it")
    try:
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ExportError(f"the exported graph fails onnx.checker ({_first_line(exc)})") from exc

    target = os.path.abspath(os.path.expanduser(path))
    folder = os.path.dirname(target)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        with clock("verify"):
            onnx.save_model(proto, tmp)
            error, checked = verify(model, tmp, in_chans, height, width, threads=threads, seed=seed)
        if not error <= tolerance:
            raise ExportError(f"onnxruntime's output differs from PyTorch's by {error:.3g} (relative), above the "
                              f"tolerance {tolerance:g}; nothing written to {target}")
        size = os.path.getsize(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"output": target, "export_seconds": clock.total("wall_s"), "export_cpu_seconds": clock.total("cpu_s"),
            "phases": clock.phases, "nodes": stats["nodes"], "op_types": stats["op_types"], "bytes": size,
            "max_rel_error": error, "checked_batches": list(checked), "opset": opset}


def verify(model: nn.Module, onnx_path: str, in_chans: int, height: int, width: int, *,
           batches: Sequence[int] = _CHECK_BATCHES, threads: Optional[int] = None, seed: int = 0):
    """(largest relative error, batches) of the ONNX file against `model` on random batches of each size."""
    session = _session(onnx_path, threads)
    generator = torch.Generator().manual_seed(seed + 1)
    worst = 0.0
    for batch in batches:
        images = torch.randn(batch, in_chans, height, width, generator=generator)
        with torch.no_grad():
            want = model(images).float().numpy()
        got = session.run(None, {"images": images.numpy()})[0]
        if got.shape != want.shape:
            raise ExportError(f"onnxruntime gave shape {got.shape} for a batch of {batch}, PyTorch {want.shape}")
        error = relative_error(got, want)
        worst = max(worst, error) if np.isfinite(error) else float("inf")
    return worst, tuple(batches)


def quantize_dynamic(source: str, target: str) -> Dict[str, Any]:
    """onnxruntime's dynamic int8 quantisation of the MatMul weights (activations quantised per batch at run
    time), written to `target` atomically. Returns bytes and the ops quantised."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    folder = os.path.dirname(os.path.abspath(target))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        ort_quantize_dynamic(source, tmp, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        import onnx

        proto = onnx.load(tmp)
        stats = graph_stats(proto)
        # DynamicQuantizeLinear + MatMulInteger: ops of the default ONNX domain (no com.microsoft contrib ops)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"bytes": os.path.getsize(target), "nodes": stats["nodes"],
            "quantized_ops": {k: v for k, v in stats["op_types"].items() if "Integer" in k or "Quant" in k}}


def read_metadata(path: str) -> Dict[str, Any]:
    """The "lbmamba" metadata of an exported file ({} when there is none)."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    return {}


class OnnxModel:
    """An exported model in onnxruntime: `model(images (batch, C, H, W) float32 array) -> output array`."""

    def __init__(self, path: str, threads: Optional[int] = None, level: Optional[str] = None):
        self.path = path
        self.session = _session(path, threads, level)
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        self.metadata: Dict[str, Any] = json.loads(meta) if meta else {}
        self.input_name = self.session.get_inputs()[0].name

    @property
    def class_names(self) -> List[str]:
        return list(self.metadata.get("class_names") or [])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(images, dtype=np.float32)})[0]
