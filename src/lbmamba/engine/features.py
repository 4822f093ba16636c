"""Patch-feature extraction for whole-slide MIL: patches read straight from the slides (at the coordinates of
`mil patch`, CLAM or TRIDENT), or folders of patch images (one per slide) -> one CLAM-layout
`h5_files/<slide>.h5` per slide (datasets `features` (n, feat_dim) float32 and `coords` (n, 2) int32).

    lbmamba mil extract --slides SLIDES/ --coords PATCHES/ --output FEATS/ --encoder-checkpoint resnet50.pth
    lbmamba mil extract --patches PATCHES/ --output FEATS/ --encoder-checkpoint resnet50.pth

From slides, one loader walks all of a process's slides in order (patches of consecutive slides share batches),
so the encoder never waits for a slide to open; a slide's file is written once its last patch is encoded. Under
torchrun the slides are dealt out among the processes (slide i to rank i mod world size), each slide written
whole by one process; a rerun skips slides whose file exists, so a stopped job continues.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..data.images import open_image
from ..data.mil import MILInputError
from ..data.slides import SlideError, find_coords_files, find_slides, open_slide, read_coords_file
from ..models.checkpoint import compare_state_dict, read_file, unwrap_state_dict
from .config import ConfigTable, Key
from .device import threads_key
from .distributed import gather_objects, session
from .errors import UserError, user_errors
from .files import atomic_save, write_h5
from .records import progress
from .runs import checkpoint_task, require_task

__all__ = ["EXTRACT", "extract_features", "build_encoder", "DEFAULT_ENCODER"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
DEFAULT_ENCODER = "resnet50_trunc"

EXTRACT = ConfigTable("mil extract", {
    "slides": Key(None, "folder of whole-slide images; patches are read from them at the coords", kind="str",
                  flag=True),
    "coords": Key(None, "coordinate files: `mil patch` / CLAM output (patches/<slide>.h5) or TRIDENT's "
                        "<slide>_patches.h5", kind="str", flag=True),
    "patches": Key(None, "instead of slides: one sub-folder of patch images per slide", kind="str", flag=True),
    "output": Key(None, "the feature folder to write (h5_files/ inside)", kind="str", flag=True, aliases=("--out",)),
    "encoder": Key(DEFAULT_ENCODER, "resnet50_trunc (ResNet-50 to stage 3 + average pooling, 1024-d, as CLAM) or any "
                                    "timm model name", flag=True),
    "encoder_checkpoint": Key(None, "encoder weights (.pth / .pt / .safetensors state dict); without them the weights "
                                    "are random (a warning says so)", kind="str", flag=True),
    "encoder_kwargs": Key({}, "keyword arguments of timm.create_model (JSON / YAML), e.g. '{\"init_values\": 1e-5, "
                              "\"dynamic_img_size\": true}'; '*_layer' values may name timm.layers / torch.nn classes "
                              "(\"SwiGLUPacked\", \"SiLU\")", flag=True),
    "pooling": Key("default", "default: the model's pooled features; cls_mean: class token + mean of the patch tokens "
                              "(Virchow-style, ViTs)", choices=("default", "cls_mean"), flag=True),
    "mean": Key(None, "normalisation mean (3 values); null: the encoder's pretrained config (ImageNet's)",
                kind="float_list", flag=True),
    "std": Key(None, "normalisation std (3 values); null: the encoder's pretrained config", kind="float_list",
               flag=True),
    "batch_size": Key(64, "patches per forward pass", positive=True, flag=True),
    "resize": Key(None, "resize patches to N x N first (from slides: default the coordinate file's target size)",
                  kind="int", positive=True, flag=True),
    "mpp": Key(None, "level-0 microns per pixel (TRIDENT coordinates of slides whose metadata lacks it)",
               kind="float", positive=True, flag=True),
    "skip_bad": Key(False, "from slides: skip (and count) slides that cannot be read and coordinate files without "
                           "their slide instead of stopping", flag=True),
    "overwrite": Key(False, "re-extract slides whose h5 file exists", flag=True),
    "pt_files": Key(False, "also write pt_files/<slide>.pt", flag=True, aliases=("--pt",)),
    "workers": Key(0, "data-loading worker processes", low=0, flag=True),
    "device": Key("auto", "auto | cpu | cuda | cuda:N (under torchrun: LOCAL_RANK's GPU)", flag=True),
    "threads": threads_key(),
    "progress": Key(True, "show progress bars", flag=True),
})


class _TakeLast(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[-1]


def _load_encoder_weights(target: nn.Module, checkpoint: str, name: str) -> int:
    """Load `checkpoint` into `target`; every weight of the target must be there with its shape (extra ones,
    e.g. a classifier or stage 4, are ignored). Returns how many checkpoint tensors were not used."""
    raw = read_file(checkpoint)
    kind = checkpoint_task(raw)
    if kind in ("segmentation", "detection", "mil"):  # the wrong kind of checkpoint, named as such
        require_task(raw, checkpoint, "classification", "mil extract --encoder-checkpoint", init_flag=False)
    state = unwrap_state_dict(raw)
    result = compare_state_dict(target, state)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.mismatched_keys:
        bad = [f"{k} {list(c)} vs {list(m)}" for k, c, m in result.mismatched_keys]
        raise UserError(
            f"encoder_checkpoint {checkpoint} does not fit encoder {name}: "
            + (f"{len(missing)} missing key(s) e.g. {missing[:5]}" if missing else "")
            + ("; " if missing and bad else "")
            + (f"mis-shaped: {bad[:5]}" if bad else "")
        )
    target.load_state_dict({k: v for k, v in state.items() if k not in result.unexpected_keys}, strict=False)
    return len(result.unexpected_keys)


class _ClsMean(nn.Module):
    """A ViT's class token and the mean of its patch tokens (after the prefix tokens), concatenated."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        tokens = self.net.forward_features(x)
        prefix = int(getattr(self.net, "num_prefix_tokens", 1))
        return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=-1)


def _resolve_layers(kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """Encoder kwargs as timm takes them: a string value of a `*_layer` key names a class of timm.layers or torch.nn
    (e.g. Virchow's mlp_layer="SwiGLUPacked", act_layer="SiLU")."""
    import timm.layers

    out = dict(kwargs)
    for key, value in kwargs.items():
        if key.endswith("_layer") and isinstance(value, str):
            name = value.rsplit(".", 1)[-1]
            found = getattr(timm.layers, name, None) or getattr(nn, name, None)
            if found is None:
                raise UserError(f"encoder_kwargs {key}={value!r}: no such class in timm.layers or torch.nn")
            out[key] = found
    return out


@user_errors()
def build_encoder(name: str = DEFAULT_ENCODER, checkpoint: Optional[str] = None,
                  kwargs: Optional[Mapping[str, Any]] = None, pooling: str = "default",
                  ) -> Tuple[nn.Module, Dict[str, Any]]:
    """(encoder mapping (B, 3, H, W) -> (B, feat_dim), info) with no weights downloaded.

    "resnet50_trunc": timm's ResNet-50 up to stage 3 (layer3, 1024 channels) + global average pooling,
    CLAM's encoder. Any other name: that timm model with its classifier removed (num_classes=0, pooled
    features). `checkpoint` is loaded into it; the classifier's and (for the truncated ResNet) stage 4's
    weights are ignored. Without a checkpoint the weights are random and the info says so. `kwargs` go to
    timm.create_model (e.g. UNI's init_values=1e-5, dynamic_img_size=True); pooling="cls_mean" gives a ViT's
    class token and the mean of its patch tokens concatenated (Virchow's 2 x width features).
    """
    import timm

    kwargs = _resolve_layers(kwargs or {})
    try:
        if name == DEFAULT_ENCODER:
            if pooling != "default":
                raise UserError(f"pooling {pooling!r} is for ViT encoders, not {name}")
            base = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(3,), **kwargs)
            encoder = nn.Sequential(_TakeLast(base), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            target = base
            cfg = timm.models.get_pretrained_cfg("resnet50")
        else:
            base = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
            encoder = target = base
            if pooling == "cls_mean":
                if not hasattr(base, "num_prefix_tokens"):
                    raise UserError(f"pooling cls_mean needs a ViT-style encoder with a class token; {name} has none")
                encoder = _ClsMean(base)
            cfg = getattr(base, "pretrained_cfg", None)
    except (RuntimeError, TypeError) as exc:  # timm: "Unknown model (...)", unexpected kwargs
        raise UserError(f"encoder {name!r}: {exc}") from exc
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    info = {"encoder": name, "random_weights": checkpoint is None,
            "mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))), "std": tuple(cfg.get("std", (0.229, 0.224, 0.225)))}
    if checkpoint is not None:
        info["ignored_keys"] = _load_encoder_weights(target, checkpoint, name)
    size = cfg.get("input_size", (3, 224, 224))[-1] if name != DEFAULT_ENCODER else 64
    with torch.no_grad():
        try:
            info["feat_dim"] = int(encoder.eval()(torch.zeros(1, 3, 64, 64)).shape[-1])
        except (RuntimeError, AssertionError):  # fixed-size models (ViTs without dynamic_img_size)
            info["feat_dim"] = int(encoder.eval()(torch.zeros(1, 3, size, size)).shape[-1])
    return encoder.eval(), info


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _parse_xy(stem: str) -> Optional[Tuple[int, int]]:
    m = re.search(r"(\d+)[_\-,](\d+)$", stem)
    return (int(m.group(1)), int(m.group(2))) if m else None


class _PatchImages(Dataset):
    def __init__(self, paths: List[str], size: Optional[int], mean, std):
        self.paths, self.size = paths, size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        try:
            im = open_image(self.paths[i], "RGB")  # the one reader of every command (16-bit, EXIF, CMYK ...)
            if self.size:
                im = im.resize((self.size, self.size), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.float32) / 255.0
        except (OSError, ValueError, SyntaxError) as exc:
            raise MILInputError(f"cannot read patch image {self.paths[i]}: {exc}") from exc
        x = torch.from_numpy(arr).permute(2, 0, 1)
        return (x - self.mean) / self.std


def _collate_images(batch):
    shapes = {tuple(x.shape) for x in batch}
    if len(shapes) > 1:
        raise MILInputError(f"patch images of different sizes in one slide {sorted(shapes)}; set resize")
    return torch.stack(batch)


def _patch_order(names: List[str]) -> Tuple[List[int], np.ndarray, str]:
    """(order of the files, coords (n, 2), where the coords came from): `<x>_<y>` file names give the
    coordinates, in CLAM's order (x-major: column by column, as its patching walks the grid with
    np.meshgrid(..., indexing="ij"); the order is the sequence a scan reads); otherwise natural name order
    and (running index, 0)."""
    xy = [_parse_xy(os.path.splitext(n)[0]) for n in names]
    if all(p is not None for p in xy):
        order = sorted(range(len(names)), key=lambda i: (xy[i][0], xy[i][1], names[i]))
        return order, np.array([xy[i] for i in order], dtype=np.int32), "filename"
    order = sorted(range(len(names)), key=lambda i: _natural_key(names[i]))
    return order, np.stack([np.arange(len(names)), np.zeros(len(names))], axis=1).astype(np.int32), "index"


class _SlidePatches(Dataset):
    """Every patch of a list of slides, slide after slide: item i is (normalised patch, slide index). Each worker
    opens a slide when it first needs it and keeps the last few open."""

    def __init__(self, jobs: List[Dict[str, Any]], mean, std, keep_open: int = 4):
        self.jobs = jobs
        self.starts = np.cumsum([0] + [len(j["coords"]) for j in jobs])
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.keep_open = keep_open
        self._open: Dict[int, Any] = {}

    def __len__(self):
        return int(self.starts[-1])

    def _slide(self, k: int):
        if k not in self._open:
            while len(self._open) >= self.keep_open:
                self._open.pop(next(iter(self._open))).close()
            self._open[k] = open_slide(self.jobs[k]["path"], mpp=self.jobs[k].get("mpp"))
        return self._open[k]

    def __getitem__(self, i):
        k = int(np.searchsorted(self.starts, i, side="right") - 1)
        job = self.jobs[k]
        x, y = job["coords"][i - self.starts[k]]
        arr = self._slide(k).read_patch(int(x), int(y), job["level"], job["size"], job["out_size"])
        t = torch.from_numpy(np.array(arr, dtype=np.float32)).permute(2, 0, 1).div_(255.0)
        return (t - self.mean) / self.std, k

    def __del__(self):
        for s in self._open.values():
            s.close()


def _collate_slide_patches(batch):
    return torch.stack([b[0] for b in batch]), torch.tensor([b[1] for b in batch], dtype=torch.long)


def _slide_job(slide: str, slide_path: str, coords_file: str, cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """What reading a slide's patches needs: its path, coords, level, size there, output size. SlideError when the
    slide or its coordinates cannot be used."""
    cf = read_coords_file(coords_file)
    if len(cf.coords) == 0:
        raise SlideError(f"coordinate file {coords_file}: no patches")
    with open_slide(slide_path, mpp=cfg["mpp"]) as s:
        if cf.patch_level is not None:
            if cf.patch_level >= s.level_count:
                raise SlideError(f"coordinate file {coords_file}: patch_level {cf.patch_level}, but slide {slide_path} "
                                 f"has {s.level_count} level(s)")
            level, size = cf.patch_level, cf.patch_size
            ps0 = cf.patch_size_level0 or round(size * s.level_downsamples[level])
        else:  # TRIDENT: the level-0 size is known, the level is ours to choose
            ps0 = cf.patch_size_level0
            if ps0 is None:
                raise SlideError(f"coordinate file {coords_file}: neither a patch_level nor a level-0 patch size "
                                 "(patch_size_level0, or level0_magnification and target_magnification)")
            level = s.best_level(ps0 / cf.patch_size)
            size = max(1, round(ps0 / s.level_downsamples[level]))
        dims = s.dimensions
    out_size = cfg["resize"] or cf.target_patch_size
    far = (cf.coords[:, 0] >= dims[0]) | (cf.coords[:, 1] >= dims[1]) | (cf.coords.min(1) < 0)
    if far.any():
        raise SlideError(f"coordinate file {coords_file}: {int(far.sum())} patch(es) outside slide {slide_path} "
                         f"({dims[0]} x {dims[1]}); is it this slide's file?")
    return {"slide": slide, "path": slide_path, "coords": cf.coords.astype(np.int32), "level": level, "size": size,
            "out_size": out_size, "patch_size_level0": int(ps0), "mpp": cfg["mpp"], "coords_file": coords_file}


def _extract_from_slides(cfg: Mapping[str, Any], net: nn.Module, info: Mapping[str, Any], dist) -> Dict[str, Any]:
    out = cfg["output"]
    slides = find_slides(cfg["slides"])
    coords = find_coords_files(cfg["coords"])
    orphans = sorted(set(coords) - set(slides))
    bad: Dict[str, str] = {}
    for name in orphans:  # coordinate files without their slide
        msg = f"coordinate file {coords[name]}: no slide {name!r} in {cfg['slides']}"
        if not cfg["skip_bad"]:
            raise SlideError(msg + " (--skip-bad skips such files)")
        bad[name] = msg
    names = [n for n in sorted(coords) if n in slides]
    if not names:
        raise UserError(f"no slide in {cfg['slides']} has a coordinate file in {cfg['coords']}")
    mine = names[dist.rank::dist.world_size]  # every rank derives the same deal from the same listing
    jobs, skipped = [], []
    for name in mine:
        if os.path.exists(os.path.join(out, "h5_files", name + ".h5")) and not cfg["overwrite"]:
            skipped.append(name)
            continue
        try:
            jobs.append(_slide_job(name, slides[name], coords[name], cfg))
        except SlideError as exc:
            if not cfg["skip_bad"]:
                raise
            bad[name] = str(exc)
    sizes = {j["out_size"] for j in jobs}
    if len(sizes) > 1:
        raise UserError(f"the coordinate files ask for different patch sizes {sorted(sizes)}; set resize")
    mean = tuple(cfg["mean"]) if cfg["mean"] else info["mean"]
    std = tuple(cfg["std"]) if cfg["std"] else info["std"]
    for key, value in (("mean", mean), ("std", std)):
        if len(value) != 3:
            raise UserError(f"{key} needs 3 values (R, G, B), got {list(value)}")
    written, n_patches, busy = [], 0, 0.0
    start = time.perf_counter()
    if jobs:
        ds = _SlidePatches(jobs, mean, std)
        loader = DataLoader(ds, batch_size=cfg["batch_size"], num_workers=cfg["workers"], shuffle=False,
                            collate_fn=_collate_slide_patches, pin_memory=dist.device.type == "cuda",
                            persistent_workers=False, prefetch_factor=4 if cfg["workers"] else None)
        pending: Dict[int, List[torch.Tensor]] = {}
        counts = [len(j["coords"]) for j in jobs]
        got = [0] * len(jobs)
        sync = torch.cuda.synchronize if dist.device.type == "cuda" else (lambda: None)
        with torch.inference_mode():
            for x, which in progress(loader, desc="patches", enabled=cfg["progress"] and dist.is_main):
                t0 = time.perf_counter()
                feats = net(x.to(dist.device, non_blocking=True)).float()
                sync()
                busy += time.perf_counter() - t0
                feats = feats.cpu()
                for k in which.unique().tolist():
                    part = feats[which == k]
                    pending.setdefault(k, []).append(part)
                    got[k] += len(part)
                    if got[k] == counts[k]:
                        job = jobs[k]
                        features = torch.cat(pending.pop(k)).numpy().astype(np.float32)
                        _write_features(out, job["slide"], features, job["coords"], cfg, info,
                                        {"patch_level": job["level"], "patch_size": job["size"],
                                         "patch_size_level0": job["patch_size_level0"],
                                         "target_patch_size": job["out_size"],
                                         "slide_path": os.path.abspath(job["path"]), "coords_source": "slide"})
                        written.append(job["slide"])
                        n_patches += counts[k]
    wall = time.perf_counter() - start
    mine_result = {"written": written, "skipped": skipped, "bad": bad, "patches": n_patches, "busy": busy,
                   "wall": wall}
    parts = gather_objects(mine_result, dist)
    all_bad: Dict[str, str] = {}
    for p in parts:
        all_bad.update(p["bad"])
    return {
        "slides_written": sum(len(p["written"]) for p in parts),
        "slides_skipped_existing": sum(len(p["skipped"]) for p in parts),
        "slides_bad": len(all_bad), "bad": all_bad,
        "patches": sum(p["patches"] for p in parts),
        "patches_per_s": round(n_patches / wall, 1) if wall > 0 and n_patches else None,
        "encoder_busy": round(busy / wall, 3) if wall > 0 and n_patches else None,
        "processes": dist.world_size,
    }


def _write_features(out: str, slide: str, features: np.ndarray, coords: np.ndarray, cfg: Mapping[str, Any],
                    info: Mapping[str, Any], attrs: Mapping[str, Any]) -> None:
    write_h5(os.path.join(out, "h5_files", slide + ".h5"), {"features": features, "coords": coords},
             {"encoder": cfg["encoder"], "feat_dim": features.shape[1], "random_weights": bool(info["random_weights"]),
              **attrs})
    if cfg["pt_files"]:
        atomic_save(torch.from_numpy(features), os.path.join(out, "pt_files", slide + ".pt"))


def _patch_folders(patches: str) -> List[str]:
    if not os.path.isdir(patches):
        raise UserError(f"patches: no such directory: {patches}")
    slides = [d for d in os.listdir(patches) if os.path.isdir(os.path.join(patches, d)) and not d.startswith(".")]
    slides.sort(key=_natural_key)
    if not slides:
        raise UserError(f"patches {patches}: no slide folders inside (expected one folder of patch images per slide)")
    return slides


def _extract_from_patches(cfg: Mapping[str, Any], net: nn.Module, info: Mapping[str, Any], dist) -> Dict[str, Any]:
    patches, out = cfg["patches"], cfg["output"]
    slides = _patch_folders(patches)
    mean = tuple(cfg["mean"]) if cfg["mean"] else info["mean"]
    std = tuple(cfg["std"]) if cfg["std"] else info["std"]
    written, skipped, empty, n_patches = [], [], [], 0
    for slide in progress(slides[dist.rank::dist.world_size], desc="slides", enabled=cfg["progress"] and dist.is_main):
        h5_path = os.path.join(out, "h5_files", slide + ".h5")
        if os.path.exists(h5_path) and not cfg["overwrite"]:
            skipped.append(slide)
            continue
        folder = os.path.join(patches, slide)
        names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
        if not names:
            empty.append(slide)
            continue
        order, coords, coords_source = _patch_order(names)
        paths = [os.path.join(folder, names[i]) for i in order]
        loader = DataLoader(_PatchImages(paths, cfg["resize"], mean, std),
                            batch_size=cfg["batch_size"], num_workers=cfg["workers"], collate_fn=_collate_images)
        with torch.inference_mode():
            batches = progress(loader, desc=slide, enabled=cfg["progress"] and dist.is_main)
            feats = [net(x.to(dist.device)).float().cpu() for x in batches]
        features = torch.cat(feats).numpy().astype(np.float32)
        _write_features(out, slide, features, coords, cfg, info, {"coords_source": coords_source})
        written.append(slide)
        n_patches += len(paths)
    parts = gather_objects({"written": len(written), "skipped": len(skipped), "empty": empty, "patches": n_patches},
                           dist)
    empty = [s for p in parts for s in p["empty"]]
    if empty and dist.is_main:
        warnings.warn(f"mil extract: {len(empty)} slide folder(s) hold no images and were skipped: "
                      f"{', '.join(empty[:10])}", stacklevel=1)
    return {"slides_written": sum(p["written"] for p in parts),
            "slides_skipped_existing": sum(p["skipped"] for p in parts), "slides_empty": len(empty),
            "patches": sum(p["patches"] for p in parts), "processes": dist.world_size}


@user_errors()
def extract_features(overrides: Optional[Mapping[str, Any]] = None,
                     config_path: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """Encode patches (the `EXTRACT` table's config) into `output/h5_files/<slide>.h5` (and pt_files/).

    From slides (`slides` + `coords`): the patches at each coordinate file's coords, read at its `patch_level`
    and `patch_size` (TRIDENT's files: the level that fits their level-0 patch size) and resized to its
    `target_patch_size` (or `resize`); coords stay in the file's (CLAM's) order.

    From patch images (`patches`): coordinates come from file names ending in `<x>_<y>` (e.g. `1024_2048.png`,
    in CLAM's x-major order); when a slide's names do not all carry them, files keep their natural name order
    and `coords` is (running index, 0).

    Slides already extracted are skipped unless `overwrite`. Under torchrun slide i goes to rank i mod world
    size; rank 0 returns the totals, the other ranks None.
    """
    cfg = EXTRACT.load(config_path, overrides)
    start = time.time()
    out = cfg["output"]
    from_slides = bool(cfg["slides"] or cfg["coords"])
    if from_slides and cfg["patches"]:
        raise UserError("give either --slides DIR --coords DIR (read patches from slides) or --patches DIR, not both")
    if from_slides and not (cfg["slides"] and cfg["coords"] and out):
        raise UserError("mil extract from slides needs --slides DIR, --coords DIR and --output DIR")
    if not from_slides and (not cfg["patches"] or not out):
        raise UserError("mil extract needs --patches DIR and --output DIR (or --slides DIR and --coords DIR)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"output {out} is a file, not a folder")
    if from_slides:  # the folders are checked before the encoder is built
        find_slides(cfg["slides"])
        find_coords_files(cfg["coords"])
    else:
        _patch_folders(cfg["patches"])
    with session(cfg["device"], cfg["threads"], EXTRACT.command, distributed=True) as dist:
        net, info = build_encoder(cfg["encoder"], cfg["encoder_checkpoint"], cfg["encoder_kwargs"], cfg["pooling"])
        if info["random_weights"] and dist.is_main:
            warnings.warn(
                f"mil extract: encoder {cfg['encoder']!r} has RANDOM weights (no pretrained weights are downloaded); "
                "the features are not meaningful for real slides. Give encoder_checkpoint with trained weights.",
                UserWarning, stacklevel=1,  # names this file: a caller's frame is contextlib's (user_errors)
            )
        net = net.to(dist.device)
        if from_slides:
            res = _extract_from_slides(cfg, net, info, dist)
        else:
            res = _extract_from_patches(cfg, net, info, dist)
    if not dist.is_main:
        return None
    return {
        "command": "mil extract", "output": os.path.abspath(out), "encoder": cfg["encoder"],
        "feat_dim": info["feat_dim"], "random_weights": info["random_weights"], **res,
        "device": str(dist.device), "wall_s": round(time.time() - start, 1),
    }
