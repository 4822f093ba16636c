"""Patch-feature extraction for whole-slide MIL: folders of patch images (one per slide) -> one CLAM-layout
`h5_files/<slide>.h5` per slide (datasets `features` (n, feat_dim) float32 and `coords` (n, 2) int32).

    lbmamba mil extract --patches PATCHES/ --output FEATS/ --encoder-checkpoint resnet50.pth
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
from ..models.checkpoint import compare_state_dict, read_file, unwrap_state_dict
from .config import ConfigTable, Key
from .device import threads_key
from .distributed import session
from .errors import UserError, user_errors
from .files import atomic_save, write_h5
from .records import progress
from .runs import checkpoint_task, require_task

__all__ = ["EXTRACT", "extract_features", "build_encoder", "DEFAULT_ENCODER"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
DEFAULT_ENCODER = "resnet50_trunc"

EXTRACT = ConfigTable("mil extract", {
    "patches": Key(None, "one sub-folder of patch images per slide", kind="str", flag=True),
    "output": Key(None, "the feature folder to write (h5_files/ inside)", kind="str", flag=True, aliases=("--out",)),
    "encoder": Key(DEFAULT_ENCODER, "resnet50_trunc (ResNet-50 to stage 3 + average pooling, 1024-d, as CLAM) or any "
                                    "timm model name", flag=True),
    "encoder_checkpoint": Key(None, "encoder weights (.pth / .pt / .safetensors state dict); without them the weights "
                                    "are random (a warning says so)", kind="str", flag=True),
    "batch_size": Key(64, "patches per forward pass", positive=True, flag=True),
    "resize": Key(None, "resize patches to N x N first", kind="int", positive=True, flag=True),
    "overwrite": Key(False, "re-extract slides whose h5 file exists", flag=True),
    "pt_files": Key(False, "also write pt_files/<slide>.pt", flag=True, aliases=("--pt",)),
    "workers": Key(0, "data-loading worker processes", low=0, flag=True),
    "device": Key("auto", "auto | cpu | cuda | cuda:N", flag=True),
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


@user_errors()
def build_encoder(name: str = DEFAULT_ENCODER, checkpoint: Optional[str] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """(encoder mapping (B, 3, H, W) -> (B, feat_dim), info) with no weights downloaded.

    "resnet50_trunc": timm's ResNet-50 up to stage 3 (layer3, 1024 channels) + global average pooling,
    CLAM's encoder. Any other name: that timm model with its classifier removed (num_classes=0, pooled
    features). `checkpoint` is loaded into it; the classifier's and (for the truncated ResNet) stage 4's
    weights are ignored. Without a checkpoint the weights are random and the info says so.
    """
    import timm

    try:
        if name == DEFAULT_ENCODER:
            base = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(3,))
            encoder = nn.Sequential(_TakeLast(base), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            target = base
            cfg = timm.models.get_pretrained_cfg("resnet50")
        else:
            base = timm.create_model(name, pretrained=False, num_classes=0)
            encoder = target = base
            cfg = getattr(base, "pretrained_cfg", None)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise UserError(f"encoder {name!r}: {exc}") from exc
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    info = {"encoder": name, "random_weights": checkpoint is None,
            "mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))), "std": tuple(cfg.get("std", (0.229, 0.224, 0.225)))}
    if checkpoint is not None:
        info["ignored_keys"] = _load_encoder_weights(target, checkpoint, name)
    with torch.no_grad():
        info["feat_dim"] = int(encoder.eval()(torch.zeros(1, 3, 64, 64)).shape[-1])
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


@user_errors()
def extract_features(overrides: Optional[Mapping[str, Any]] = None,
                     config_path: Optional[str] = None) -> Dict[str, Any]:
    """Encode every patch image (the `EXTRACT` table's config) into `output/h5_files/<slide>.h5`.

    Coordinates come from file names ending in `<x>_<y>` (e.g. `1024_2048.png`, in CLAM's x-major order);
    when a slide's names do not all carry them, files keep their natural name order and `coords` is
    (running index, 0). Slides already extracted are skipped unless `overwrite`.
    """
    cfg = EXTRACT.load(config_path, overrides)
    start = time.time()
    patches, out = cfg["patches"], cfg["output"]
    if not patches or not out:
        raise UserError("mil extract needs --patches DIR and --output DIR")
    if not os.path.isdir(patches):
        raise UserError(f"patches: no such directory: {patches}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"output {out} is a file, not a folder")
    slides = [d for d in os.listdir(patches) if os.path.isdir(os.path.join(patches, d)) and not d.startswith(".")]
    slides.sort(key=_natural_key)
    if not slides:
        raise UserError(f"patches {patches}: no slide folders inside (expected one folder of patch images per slide)")
    with session(cfg["device"], cfg["threads"], EXTRACT.command, distributed=False) as dist:
        net, info = build_encoder(cfg["encoder"], cfg["encoder_checkpoint"])
        if info["random_weights"]:
            warnings.warn(
                f"mil extract: encoder {cfg['encoder']!r} has RANDOM weights (no pretrained weights are downloaded); "
                "the features are not meaningful for real slides. Give encoder_checkpoint with trained weights.",
                UserWarning, stacklevel=1,  # names this file: a caller's frame is contextlib's (user_errors)
            )
        net = net.to(dist.device)
        written, skipped, empty, n_patches = [], [], [], 0
        for slide in progress(slides, desc="slides", enabled=cfg["progress"]):
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
            loader = DataLoader(_PatchImages(paths, cfg["resize"], info["mean"], info["std"]),
                                batch_size=cfg["batch_size"], num_workers=cfg["workers"], collate_fn=_collate_images)
            with torch.inference_mode():
                batches = progress(loader, desc=slide, enabled=cfg["progress"])
                feats = [net(x.to(dist.device)).float().cpu() for x in batches]
            features = torch.cat(feats).numpy().astype(np.float32)
            write_h5(h5_path, {"features": features, "coords": coords},
                     {"encoder": cfg["encoder"], "feat_dim": features.shape[1], "coords_source": coords_source,
                      "random_weights": bool(info["random_weights"])})
            if cfg["pt_files"]:
                atomic_save(torch.from_numpy(features), os.path.join(out, "pt_files", slide + ".pt"))
            written.append(slide)
            n_patches += len(paths)
    if empty:
        warnings.warn(f"mil extract: {len(empty)} slide folder(s) hold no images and were skipped: "
                      f"{', '.join(empty[:10])}", stacklevel=1)
    return {
        "command": "mil extract", "output": os.path.abspath(out), "encoder": cfg["encoder"],
        "feat_dim": info["feat_dim"], "random_weights": info["random_weights"], "slides_written": len(written),
        "slides_skipped_existing": len(skipped), "slides_empty": len(empty), "patches": n_patches,
        "device": str(dist.device), "wall_s": round(time.time() - start, 1),
    }
