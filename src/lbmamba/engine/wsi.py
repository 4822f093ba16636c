"""From whole-slide images to MIL input and back: `mil patch` (tissue segmentation and a patch grid per slide,
CLAM's coordinate files) and `mil heatmap` (a model's per-patch attention drawn over the slide).

    lbmamba mil patch --slides SLIDES/ --output PATCHES/                 # PATCHES/patches/<slide>.h5 + previews/
    lbmamba mil extract --slides SLIDES/ --coords PATCHES/ --output FEATS/ --encoder-checkpoint resnet50.pth
    lbmamba mil train --features FEATS/ --labels slides.csv --model lb
    lbmamba mil heatmap --checkpoint RUN/fold_0.pt --slides SLIDES/ --features FEATS/ --output HEATMAPS/

Slides are independent jobs: `workers` processes patch them side by side, a slide's files are written whole
(atomically) and a rerun skips slides already done, so a stopped job continues where it stopped. A bad slide
(unreadable, no pixel size, no tissue, a target finer than the scan) stops the command with one line naming
the file, or with `skip_bad` is skipped and counted.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from ..data.mil import FeatureStore, MILInputError, read_labels
from ..data.slides import (
    MPP_AT_1X,
    SlideError,
    TissueParams,
    draw_preview,
    find_slides,
    open_slide,
    patch_grid,
)
from .config import ConfigTable, Key
from .device import threads_key
from .distributed import session
from .errors import UserError, user_errors
from .files import atomic_path, write_h5, write_json
from .records import progress

__all__ = ["PATCH", "HEATMAP", "patch_slides", "heatmap"]

_DEFAULTS = TissueParams()

PATCH = ConfigTable("mil patch", {
    "slides": Key(None, "folder of whole-slide images (.svs .ndpi .tif(f) .mrxs ...)", kind="str", flag=True),
    "output": Key(None, "where patches/<slide>.h5 and previews/<slide>.png go", kind="str", flag=True,
                  aliases=("--out",)),
    "patch_size": Key(_DEFAULTS.patch_size, "patch size in pixels at the target magnification", positive=True,
                      flag=True),
    "magnification": Key(20.0, "target magnification (20 = 0.5 um per pixel); ignored when target_mpp is set",
                         positive=True, flag=True),
    "target_mpp": Key(None, "target microns per pixel (overrides magnification)", kind="float", positive=True,
                      flag=True),
    "mpp": Key(None, "level-0 microns per pixel of every slide (for slides whose metadata lacks it)", kind="float",
               positive=True, flag=True),
    "seg_downsample": Key(_DEFAULTS.seg_downsample, "segment tissue on a copy about N times smaller than level 0",
                          positive=True, flag=True),
    "sthresh": Key(_DEFAULTS.sthresh, "saturation threshold 0-255 (with Otsu: the lowest threshold allowed)", low=0,
                   flag=True),
    "use_otsu": Key(_DEFAULTS.use_otsu, "Otsu's threshold on the saturation channel", flag=True),
    "median": Key(_DEFAULTS.median, "median blur kernel size on the segmentation copy (1: none)", positive=True,
                  flag=True),
    "close": Key(_DEFAULTS.close, "morphological closing kernel size (0: none)", low=0, flag=True),
    "min_tissue_area": Key(_DEFAULTS.min_tissue_area, "drop tissue regions smaller than this many patches", low=0,
                           flag=True),
    "min_hole_area": Key(_DEFAULTS.min_hole_area, "fill holes in the tissue smaller than this many patches", low=0,
                         flag=True),
    "min_tissue_fraction": Key(_DEFAULTS.min_tissue_fraction, "keep a patch with at least this share of tissue",
                               low=0, flag=True),
    "preview": Key(True, "write previews/<slide>.png (thumbnail, tissue contours, patch grid)", flag=True),
    "workers": Key(1, "slides patched side by side (processes)", positive=True, flag=True),
    "overwrite": Key(False, "patch slides again whose coordinate file exists", flag=True),
    "skip_bad": Key(False, "skip (and count) slides that cannot be patched instead of stopping", flag=True),
    "progress": Key(True, "show progress bars", flag=True),
})


def _tissue_params(cfg: Mapping[str, Any]) -> TissueParams:
    target = cfg["target_mpp"] if cfg["target_mpp"] else MPP_AT_1X / cfg["magnification"]
    return TissueParams(patch_size=cfg["patch_size"], target_mpp=target, seg_downsample=cfg["seg_downsample"],
                        sthresh=cfg["sthresh"], use_otsu=cfg["use_otsu"], median=cfg["median"], close=cfg["close"],
                        min_tissue_area=cfg["min_tissue_area"], min_hole_area=cfg["min_hole_area"],
                        min_tissue_fraction=cfg["min_tissue_fraction"])


def coords_path(output: str, slide: str) -> str:
    return os.path.join(output, "patches", slide + ".h5")


def patch_one(path: str, output: str, params: TissueParams, mpp: Optional[float], preview: bool) -> Dict[str, Any]:
    """Patch one slide into `output` (patches/<slide>.h5, previews/<slide>.png); SlideError when it cannot be."""
    start = time.time()
    with open_slide(path, mpp=mpp) as slide:
        grid = patch_grid(slide, params)
        if grid.regions == 0 or len(grid.coords) == 0:
            raise SlideError(f"slide {path}: no tissue found ({grid.regions} tissue region(s), 0 patches); check the "
                             "segmentation settings (sthresh, min_tissue_area) or leave the slide out")
        attrs = {"patch_level": grid.patch_level, "patch_size": grid.patch_size,
                 "patch_size_level0": grid.patch_size_level0, "target_patch_size": grid.target_patch_size,
                 "target_mpp": params.target_mpp, "level0_mpp": slide.mpp,
                 "level0_magnification": MPP_AT_1X / slide.mpp, "target_magnification": MPP_AT_1X / params.target_mpp,
                 "mpp_source": slide.mpp_source, "level_dim": slide.dimensions, "name": slide.name,
                 "slide_path": os.path.abspath(path), "backend": slide.backend}
        if preview:
            img = draw_preview(grid)
            target = os.path.join(output, "previews", slide.name + ".png")
            with atomic_path(target) as tmp:
                img.save(tmp, format="PNG")
        write_h5(coords_path(output, slide.name), {"coords": grid.coords.astype(np.int32)}, attrs)
        return {"slide": slide.name, "patches": int(len(grid.coords)), "regions": grid.regions,
                "seconds": round(time.time() - start, 3)}


def _patch_job(args) -> Tuple[str, Optional[Dict[str, Any]], Optional[str]]:
    name, path, output, params, mpp, preview = args
    try:
        return name, patch_one(path, output, params, mpp, preview), None
    except SlideError as exc:
        return name, None, str(exc)


@user_errors()
def patch_slides(overrides: Optional[Mapping[str, Any]] = None,
                 config_path: Optional[str] = None) -> Dict[str, Any]:
    """Tissue segmentation and a patch grid for every slide in `slides` (the `PATCH` table's config)."""
    cfg = PATCH.load(config_path, overrides)
    start = time.time()
    if not cfg["slides"] or not cfg["output"]:
        raise UserError("mil patch needs --slides DIR and --output DIR")
    if os.path.exists(cfg["output"]) and not os.path.isdir(cfg["output"]):
        raise UserError(f"output {cfg['output']} is a file, not a folder")
    slides = find_slides(cfg["slides"])
    if not slides:
        raise UserError(f"slides {cfg['slides']}: no slide files there (looked for .svs .ndpi .tif .tiff .mrxs ...)")
    params = _tissue_params(cfg)
    todo = {s: p for s, p in slides.items() if cfg["overwrite"] or not os.path.isfile(coords_path(cfg["output"], s))}
    jobs = [(s, p, cfg["output"], params, cfg["mpp"], cfg["preview"]) for s, p in todo.items()]
    done: List[Dict[str, Any]] = []
    bad: Dict[str, str] = {}

    def handle(name, result, error):
        if error is not None:
            if not cfg["skip_bad"]:
                raise UserError(error + " (--skip-bad skips such slides)")
            bad[name] = error
        else:
            done.append(result)

    if cfg["workers"] > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=min(cfg["workers"], len(jobs))) as pool:
            futures = [pool.submit(_patch_job, job) for job in jobs]
            try:
                for fut in progress(as_completed(futures), total=len(futures), desc="slides",
                                    enabled=cfg["progress"]):
                    handle(*fut.result())
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    else:
        for job in progress(jobs, desc="slides", enabled=cfg["progress"]):
            handle(*_patch_job(job))
    n = sum(d["patches"] for d in done)
    result = {
        "command": "mil patch", "output": os.path.abspath(cfg["output"]), "slides": len(slides),
        "slides_written": len(done), "slides_skipped_existing": len(slides) - len(todo), "slides_bad": len(bad),
        "bad": bad, "patches": n, "patch_size": params.patch_size, "target_mpp": params.target_mpp,
        "seconds_per_slide": round(float(np.mean([d["seconds"] for d in done])), 3) if done else None,
        "wall_s": round(time.time() - start, 1),
    }
    write_json(os.path.join(cfg["output"], "patch_summary.json"),
               {**result, "per_slide": sorted(done, key=lambda d: d["slide"])})
    return result


# ---------------------------------------------------------------------- heatmaps
HEATMAP = ConfigTable("mil heatmap", {
    "checkpoint": Key(None, "<run>/fold_<k>.pt of `lbmamba mil train`", kind="str", flag=True),
    "slides": Key(None, "folder of the whole-slide images", kind="str", flag=True),
    "features": Key(None, "feature folder with coords (h5_files/ of `mil extract` or CLAM; TRIDENT's "
                          "features_<encoder>/)", kind="str", flag=True),
    "output": Key(None, "where <slide>_heatmap.png, <slide>_top/ and heatmaps.json go", kind="str", flag=True,
                  aliases=("--out",)),
    "slide_ids": Key(None, "only these slides (default: every slide with features and a slide file)",
                     kind="str_list", flag=True),
    "labels": Key(None, "CSV with slide_id,label: the true labels go into heatmaps.json and the captions", kind="str",
                  flag=True),
    "top_k": Key(8, "save this many highest-attention patches per slide as images", low=0, flag=True),
    "thumbnail_size": Key(2048, "longest side of the heatmap image in pixels", positive=True, flag=True),
    "alpha": Key(0.5, "opacity of the colour map over the thumbnail", low=0, flag=True),
    "cmap": Key("jet", "matplotlib colour map", flag=True),
    "scale": Key("rank", "rank: colour by the patch's attention percentile within the slide (as CLAM); minmax: by "
                         "the attention weight scaled to 0-1", choices=("rank", "minmax"), flag=True),
    "mpp": PATCH.keys["mpp"],
    "skip_bad": Key(False, "skip (and count) slides that cannot be drawn instead of stopping", flag=True),
    "device": Key("auto", "auto | cpu | cuda | cuda:N", flag=True),
    "threads": threads_key(),
    "progress": Key(True, "show progress bars", flag=True),
})


def _feature_attrs(store: FeatureStore, slide: str) -> Dict[str, Any]:
    fmt, path = store.path(slide)
    if fmt != "h5":
        return {}
    import h5py

    with h5py.File(path, "r") as f:
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}


def _patch_size_level0(coords: np.ndarray, attrs: Mapping[str, Any]) -> int:
    """The level-0 patch size: the feature file's attribute, else the smallest spacing of the coordinates."""
    if "patch_size_level0" in attrs:
        return int(attrs["patch_size_level0"])
    steps = []
    for axis in (0, 1):
        values = np.unique(coords[:, axis])
        if len(values) > 1:
            steps.append(int(np.diff(values).min()))
    if not steps:
        raise SlideError("cannot tell the patch size: one patch and no patch_size_level0 attribute")
    return min(steps)


def attention_weights(model: torch.nn.Module, feats: torch.Tensor) -> Tuple[np.ndarray, np.ndarray]:
    """(class probabilities (n_classes,), attention-pooling weights (n,) summing to 1) of one bag."""
    with torch.no_grad():
        logits, scores = model(feats, return_attention=True)
    probs = torch.softmax(logits.float(), dim=-1)[0]
    weights = torch.softmax(scores.float(), dim=-1)[0]
    return probs.cpu().numpy(), weights.cpu().numpy()


def draw_heatmap(thumb: np.ndarray, thumb_ds: float, coords: np.ndarray, values: np.ndarray, ps0: int, cmap: str,
                 alpha: float, caption: str):
    """A PIL image: `values` (0-1, one per patch) as a colour map over `thumb`, with a caption bar."""
    import matplotlib
    from PIL import Image, ImageDraw

    h, w = thumb.shape[:2]
    heat = np.full((h, w), np.nan, np.float32)
    for (x, y), v in zip(coords, values):
        x0, y0 = int(x / thumb_ds), int(y / thumb_ds)
        x1, y1 = max(x0 + 1, int(round((x + ps0) / thumb_ds))), max(y0 + 1, int(round((y + ps0) / thumb_ds)))
        heat[y0:y1, x0:x1] = v
    colours = matplotlib.colormaps[cmap](np.nan_to_num(heat))[..., :3] * 255.0
    valid = ~np.isnan(heat)[..., None]
    out = np.where(valid, (1 - alpha) * thumb + alpha * colours, thumb).clip(0, 255).astype(np.uint8)
    bar = 28
    canvas = Image.new("RGB", (w, h + bar), (255, 255, 255))
    canvas.paste(Image.fromarray(out), (0, bar))
    ImageDraw.Draw(canvas).text((6, 8), caption, fill=(0, 0, 0))
    return canvas


@user_errors()
def heatmap(overrides: Optional[Mapping[str, Any]] = None, config_path: Optional[str] = None) -> Dict[str, Any]:
    """Per-patch attention of a `mil train` checkpoint drawn over each slide (the `HEATMAP` table's config):
    <output>/<slide>_heatmap.png (the colour map, predicted class and score), <output>/<slide>_top/ (the top_k
    patches as PNG, rank_x_y.png) and <output>/heatmaps.json (per slide: probabilities, prediction, top patches)."""
    from .mil import load_mil_checkpoint

    cfg = HEATMAP.load(config_path, overrides)
    start = time.time()
    for key in ("checkpoint", "slides", "features", "output"):
        if not cfg[key]:
            raise UserError(f"mil heatmap needs --{key.replace('_', '-')}")
    store = FeatureStore(cfg["features"], prefer="h5")
    slides = find_slides(cfg["slides"])
    names = list(cfg["slide_ids"]) if cfg["slide_ids"] else [s for s in store.slide_ids() if s in slides]
    if not names:
        raise UserError(f"no slide in {cfg['slides']} has a feature file in {cfg['features']}")
    with session(cfg["device"], cfg["threads"], HEATMAP.command, distributed=False) as dist:
        model, meta = load_mil_checkpoint(cfg["checkpoint"], dist.device)
        class_names = list(meta.get("class_names") or range(model.num_classes))
        truth = read_labels(cfg["labels"], class_names=class_names).as_dict() if cfg["labels"] else {}
        results: Dict[str, Any] = {}
        bad: Dict[str, str] = {}
        for name in progress(names, desc="slides", enabled=cfg["progress"]):
            try:
                results[name] = _heatmap_one(name, slides, store, model, class_names, truth, cfg, dist.device)
            except (SlideError, MILInputError) as exc:
                if not cfg["skip_bad"]:
                    raise UserError(f"{exc} (--skip-bad skips such slides)") from exc
                bad[name] = str(exc)
    write_json(os.path.join(cfg["output"], "heatmaps.json"), {"checkpoint": os.path.abspath(cfg["checkpoint"]),
                                                              "class_names": class_names, "slides": results})
    return {"command": "mil heatmap", "output": os.path.abspath(cfg["output"]), "slides_drawn": len(results),
            "slides_bad": len(bad), "bad": bad,
            "predictions": {s: r["predicted"] for s, r in results.items()}, "wall_s": round(time.time() - start, 1)}


def _heatmap_one(name: str, slides: Mapping[str, str], store: FeatureStore, model, class_names, truth, cfg,
                 device) -> Dict[str, Any]:
    from PIL import Image

    if name not in slides:
        raise SlideError(f"slide {name!r}: no slide file in {cfg['slides']}")
    if name not in store:
        raise MILInputError(f"slide {name!r}: no feature file under {cfg['features']}")
    coords_t = store.coords(name)
    if coords_t is None:
        raise MILInputError(f"feature file {store.path(name)[1]}: no coords (pt files carry none; give the h5 files)")
    coords = coords_t.numpy().astype(np.int64)
    feats = store.load(name)
    if len(feats) != len(coords):
        raise MILInputError(f"feature file {store.path(name)[1]}: {len(feats)} features but {len(coords)} coords")
    if feats.shape[1] != model.in_dim:
        raise MILInputError(f"feature file {store.path(name)[1]}: {feats.shape[1]}-d features, the model expects "
                            f"{model.in_dim}-d")
    probs, weights = attention_weights(model, feats.to(device))
    attrs = _feature_attrs(store, name)
    ps0 = _patch_size_level0(coords, attrs)
    if cfg["scale"] == "rank":
        values = (np.argsort(np.argsort(weights)) + 0.5) / len(weights)
    else:
        span = weights.max() - weights.min()
        values = (weights - weights.min()) / span if span > 0 else np.full_like(weights, 0.5)
    pred = int(np.argmax(probs))
    caption = f"{name}: predicted {class_names[pred]} ({probs[pred]:.3f})"
    if name in truth:
        caption += f", true {class_names[truth[name]]}"
    out = cfg["output"]
    top = np.argsort(-weights, kind="stable")[: cfg["top_k"]]
    with open_slide(slides[name], mpp=cfg["mpp"]) as slide:
        thumb, ds = slide.thumbnail(cfg["thumbnail_size"])
        img = draw_heatmap(thumb, ds, coords, values, ps0, cfg["cmap"], cfg["alpha"], caption)
        with atomic_path(os.path.join(out, f"{name}_heatmap.png")) as tmp:
            img.save(tmp, format="PNG")
        size = int(attrs.get("target_patch_size", min(ps0, 256)))
        level = slide.best_level(ps0 / size)
        at_level = max(1, round(ps0 / slide.level_downsamples[level]))
        top_dir = os.path.join(out, f"{name}_top")
        for rank, i in enumerate(top):
            x, y = int(coords[i, 0]), int(coords[i, 1])
            patch = slide.read_patch(x, y, level, at_level, size)
            with atomic_path(os.path.join(top_dir, f"{rank:02d}_{x}_{y}.png")) as tmp:
                Image.fromarray(patch).save(tmp, format="PNG")
    return {"predicted": class_names[pred], "score": float(probs[pred]),
            "probs": {str(c): float(p) for c, p in zip(class_names, probs)},
            "label": class_names[truth[name]] if name in truth else None, "patches": int(len(coords)),
            "patch_size_level0": ps0,
            "top": [{"x": int(coords[i, 0]), "y": int(coords[i, 1]), "weight": float(weights[i])} for i in top]}
