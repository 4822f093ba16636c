"""Whole-slide images: reading them (OpenSlide, tiffslide), finding tissue and cutting a patch grid, reading
patches straight from the slides, and coordinate files in CLAM's and TRIDENT's layouts.

    slide = open_slide("a.svs")                       # OpenSlide's PyPI wheels, tiffslide for TIFFs it refuses
    grid = patch_grid(slide, PatchParams())           # tissue mask, level-0 coords, the level they are read at
    tile = slide.read_patch(x, y, grid.patch_level, grid.patch_size, 256)

Tissue is found as CLAM finds it (`create_patches_fp.py`): on a low-resolution copy of the slide, the
saturation channel (HSV), a median blur, a threshold (Otsu's, never below `sthresh`), a morphological
closing, then tissue regions smaller than `min_tissue_area` are dropped and holes smaller than
`min_hole_area` filled (both areas counted in patches of the target size). A patch of the grid at the target
pixel size (default 256 px at 0.5 um / px, i.e. 20x) is kept when at least `min_tissue_fraction` of it is
tissue. Patches are listed region by region, and in each region column by column (x-major), as CLAM lists
them.

Coordinate files (`<out>/patches/<slide>.h5`) are CLAM's: `coords` (n, 2) int32, the level-0 top-left corner
of each patch, with attributes `patch_level` and `patch_size` (the level the patch is read at and its size
there, CLAM's meaning), `patch_size_level0`, `target_patch_size` (the size the encoder sees),
`target_mpp`, `level0_mpp`. TRIDENT's `<slide>_patches.h5` (attributes `patch_size`,
`level0_magnification`, `target_magnification`) are read too.

Bad input raises `SlideError` (a `DataError`) naming the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .images import DataError

__all__ = [
    "SlideError",
    "SLIDE_EXTENSIONS",
    "Slide",
    "open_slide",
    "find_slides",
    "TissueParams",
    "PatchGrid",
    "segment_tissue",
    "otsu_threshold",
    "patch_grid",
    "CoordsFile",
    "read_coords_file",
    "find_coords_files",
    "draw_preview",
]

#: what `find_slides` lists (OpenSlide's formats; .tif / .tiff also through tiffslide)
SLIDE_EXTENSIONS = (".svs", ".ndpi", ".tif", ".tiff", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".ptif")
_TIFF_LIKE = (".tif", ".tiff", ".svs", ".ndpi", ".ptif", ".scn", ".bif")
#: microns per pixel of a 1x objective (40x = 0.25 um / px, 20x = 0.5 um / px)
MPP_AT_1X = 10.0


class SlideError(DataError):
    """A slide that cannot be used: unreadable, unsupported, without a pixel size, without tissue..."""


def _mpp_from(properties: Dict[str, str]) -> Tuple[Optional[float], str]:
    """(microns per pixel at level 0, where it came from) from the slide's properties, or (None, "")."""
    for key in ("openslide.mpp-x", "tiffslide.mpp-x", "aperio.MPP"):
        value = properties.get(key)
        try:
            mpp = float(value) if value not in (None, "") else 0.0
        except (TypeError, ValueError):
            mpp = 0.0
        if mpp > 0:
            return mpp, key
    for key in ("openslide.objective-power", "tiffslide.objective-power", "aperio.AppMag"):
        value = properties.get(key)
        try:
            power = float(value) if value not in (None, "") else 0.0
        except (TypeError, ValueError):
            power = 0.0
        if power > 0:
            return MPP_AT_1X / power, key
    return None, ""


class Slide:
    """An open whole-slide image, through OpenSlide or tiffslide (the same API; `backend` says which).

    Args:
        path: the slide file.
        mpp: microns per pixel at level 0; overrides (or stands in for missing) metadata.
        backend: "auto" (OpenSlide, then tiffslide for TIFF-based files it refuses), "openslide" or "tiffslide".
    """

    def __init__(self, path: str, mpp: Optional[float] = None, backend: str = "auto"):
        self.path = path
        self.name = slide_name(path)
        if not os.path.isfile(path):
            raise SlideError(f"slide {path}: no such file")
        self._handle, self.backend = _open_handle(path, backend)
        h = self._handle
        self.level_dimensions: List[Tuple[int, int]] = [tuple(int(v) for v in d) for d in h.level_dimensions]
        self.level_downsamples: List[float] = [float(d) for d in h.level_downsamples]
        self.properties = {str(k): v for k, v in dict(h.properties).items()}
        if mpp is not None:
            self.mpp, self.mpp_source = float(mpp), "--mpp"
        else:
            self.mpp, self.mpp_source = _mpp_from(self.properties)

    # ------------------------------------------------------------------ geometry
    @property
    def dimensions(self) -> Tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def magnification(self) -> Optional[float]:
        return MPP_AT_1X / self.mpp if self.mpp else None

    def require_mpp(self) -> float:
        if not self.mpp:
            raise SlideError(f"slide {self.path}: no pixel size in its metadata (neither mpp nor objective power); "
                             "give the level-0 microns per pixel with --mpp (e.g. --mpp 0.25 for a 40x scan)")
        return self.mpp

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is at most `downsample` (level 0 if none)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + 1e-3):
                best = i if d >= self.level_downsamples[best] else best
        return best

    # ------------------------------------------------------------------ pixels
    def read_region(self, location: Tuple[int, int], level: int, size: Tuple[int, int]) -> np.ndarray:
        """RGB uint8 (h, w, 3) of `size` (w, h) level pixels at level-0 `location` (x, y); empty (transparent)
        areas and areas outside the slide are white."""
        try:
            region = self._handle.read_region((int(location[0]), int(location[1])), int(level),
                                              (int(size[0]), int(size[1])))
        except Exception as exc:  # OpenSlideError, tifffile / zarr errors: a broken file
            raise SlideError(f"slide {self.path}: cannot read a region at {location} level {level}: "
                             f"{type(exc).__name__}: {exc}") from exc
        arr = np.asarray(region)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.shape[2] == 4:  # premultiplied RGBA (OpenSlide): composite on white
            alpha = arr[..., 3:4]
            if alpha.min() < 255:
                arr = np.minimum(arr[..., :3].astype(np.uint16) + (255 - alpha), 255).astype(np.uint8)
        return np.ascontiguousarray(arr[..., :3], dtype=np.uint8)

    def read_patch(self, x: int, y: int, level: int, size: int, out_size: Optional[int] = None) -> np.ndarray:
        """A square patch: `size` pixels at `level` from level-0 (x, y), resized to `out_size` (bilinear)."""
        arr = self.read_region((x, y), level, (size, size))
        if out_size and out_size != size:
            from PIL import Image

            arr = np.asarray(Image.fromarray(arr).resize((out_size, out_size), Image.BILINEAR))
        return arr

    def read_downsampled(self, downsample: float, strip: int = 2048) -> Tuple[np.ndarray, float]:
        """The whole slide at about `downsample` (level-0 pixels per output pixel): read from the best level in
        strips and resized; returns (RGB image, the exact downsample of its x axis)."""
        from PIL import Image

        level = self.best_level(downsample)
        w0, h0 = self.dimensions
        lw, lh = self.level_dimensions[level]
        ds_level = self.level_downsamples[level]
        out_w, out_h = max(1, round(w0 / downsample)), max(1, round(h0 / downsample))
        if (lw, lh) == (out_w, out_h):
            return self.read_region((0, 0), level, (lw, lh)), w0 / out_w
        out = np.empty((out_h, out_w, 3), np.uint8)
        rows_done = 0
        y = 0
        while y < lh:
            rows = min(strip, lh - y)
            part = self.read_region((0, round(y * ds_level)), level, (lw, rows))
            y_end_out = out_h if y + rows >= lh else round((y + rows) * out_h / lh)
            n_out = y_end_out - rows_done
            if n_out > 0:
                out[rows_done:y_end_out] = np.asarray(Image.fromarray(part).resize((out_w, n_out), Image.BILINEAR))
                rows_done = y_end_out
            y += rows
        return out, w0 / out_w

    def thumbnail(self, max_size: int = 1024) -> Tuple[np.ndarray, float]:
        """(RGB image of at most max_size pixels a side, level-0 pixels per thumbnail pixel)."""
        w0, h0 = self.dimensions
        return self.read_downsampled(max(1.0, max(w0, h0) / max_size))

    def close(self) -> None:
        self._handle.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def slide_name(path: str) -> str:
    """The slide id: the file name without its extension (`a.ome.tiff` -> `a.ome`)."""
    return os.path.splitext(os.path.basename(path))[0]


def _open_handle(path: str, backend: str):
    if backend not in ("auto", "openslide", "tiffslide"):
        raise ValueError(f"backend must be auto, openslide or tiffslide, got {backend!r}")
    errors = []
    if backend in ("auto", "openslide"):
        try:
            import openslide
        except ImportError as exc:  # the wheel or its library missing
            errors.append(f"openslide not available ({exc})")
        else:
            try:
                return openslide.OpenSlide(path), "openslide"
            except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError
                errors.append(f"openslide: {type(exc).__name__}: {exc}".strip())
    if backend == "tiffslide" or (backend == "auto" and path.lower().endswith(_TIFF_LIKE)):
        try:
            import tiffslide
        except ImportError as exc:
            errors.append(f"tiffslide not available ({exc})")
        else:
            try:
                return tiffslide.TiffSlide(path), "tiffslide"
            except Exception as exc:
                errors.append(f"tiffslide: {type(exc).__name__}: {exc}".strip())
    if any("not available" in e for e in errors) and len(errors) == sum("not available" in e for e in errors):
        raise SlideError(f"slide {path}: no slide reader installed; pip install 'lbmamba[wsi]' "
                         "(openslide-python, openslide-bin, tiffslide)")
    raise SlideError(f"slide {path}: unreadable or unsupported format ({'; '.join(errors)})")


def open_slide(path: str, mpp: Optional[float] = None, backend: str = "auto") -> Slide:
    return Slide(path, mpp=mpp, backend=backend)


def find_slides(folder: str, extensions=SLIDE_EXTENSIONS) -> Dict[str, str]:
    """{slide id: path} of the slide files in `folder` (not recursive), sorted by id."""
    if not os.path.isdir(folder):
        raise SlideError(f"slides: no such directory: {folder}")
    found: Dict[str, str] = {}
    dupes = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not name.lower().endswith(tuple(extensions)) or not os.path.isfile(path):
            continue
        stem = slide_name(name)
        if stem in found:
            dupes.append(stem)
        found[stem] = path
    if dupes:
        raise SlideError(f"slides {folder}: several files share the slide id(s) {sorted(set(dupes))[:10]}")
    return dict(sorted(found.items()))


# ---------------------------------------------------------------------- tissue and the patch grid
@dataclass
class TissueParams:
    """CLAM's segmentation and patching settings (areas in patches of the target size)."""

    patch_size: int = 256  # pixels a side at the target pixel size
    target_mpp: float = 0.5  # microns per pixel of the patches (0.5 = 20x)
    seg_downsample: float = 32.0  # segment on a copy about this many times smaller than level 0
    sthresh: int = 8  # saturation threshold (0-255); with Otsu, the threshold never goes below it
    use_otsu: bool = True
    median: int = 7  # median blur kernel (odd)
    close: int = 4  # morphological closing kernel (0: none)
    min_tissue_area: float = 4.0  # drop tissue regions smaller than this many patches
    min_hole_area: float = 1.0  # fill holes smaller than this many patches
    min_tissue_fraction: float = 0.5  # keep a patch with at least this share of tissue
    mpp_tolerance: float = 0.1  # a scan up to 10 % coarser than the target still counts as the target


@dataclass
class PatchGrid:
    coords: np.ndarray  # (n, 2) int32 level-0 top-left corners, in CLAM's order
    patch_level: int  # the level the patches are read at
    patch_size: int  # their size there
    patch_size_level0: int
    target_patch_size: int
    mask: np.ndarray  # the tissue mask (bool) at mask_downsample
    mask_downsample: float
    image: np.ndarray  # the RGB copy the mask was computed on
    regions: int = 0
    extra: Dict[str, float] = field(default_factory=dict)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values (the t maximising the between-class variance of <= t vs > t)."""
    hist = np.bincount(values.ravel().astype(np.int64), minlength=256)[:256].astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256, dtype=np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * levels)
    w1 = total - w0
    mu_t = m0[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu_t * w0 / total - m0) ** 2 / (w0 * w1 / total)
    between[~np.isfinite(between)] = -1
    return int(np.argmax(between))


def segment_tissue(rgb: np.ndarray, params: TissueParams, patch_area_px: float) -> Tuple[np.ndarray, int]:
    """(tissue mask of `rgb`, number of regions) by CLAM's recipe; `patch_area_px` is a patch's area in `rgb`
    pixels (the unit of the area filters)."""
    from PIL import Image, ImageFilter
    from scipy import ndimage

    sat_img = Image.fromarray(rgb).convert("HSV").getchannel(1)
    if params.median and params.median > 1:
        sat_img = sat_img.filter(ImageFilter.MedianFilter(int(params.median) | 1))  # odd, as cv2.medianBlur
    sat = np.asarray(sat_img)
    thr = max(otsu_threshold(sat), params.sthresh) if params.use_otsu else params.sthresh
    mask = sat > thr
    if params.close and params.close > 1:
        k = int(params.close)
        # pad so that the closing does not erode at the image border
        mask = ndimage.binary_closing(np.pad(mask, k), structure=np.ones((k, k), bool))[k:-k, k:-k]
    if params.min_hole_area > 0:
        holes = ndimage.binary_fill_holes(mask) & ~mask
        lab, n = ndimage.label(holes)
        if n:
            sizes = np.bincount(lab.ravel())
            small = sizes < params.min_hole_area * patch_area_px
            small[0] = False
            mask = mask | small[lab]
    lab, n = ndimage.label(mask)
    if n:
        sizes = np.bincount(lab.ravel())
        keep = sizes >= params.min_tissue_area * patch_area_px
        keep[0] = False
        mask = keep[lab]
        n = int(keep.sum())
    return mask, n


def patch_grid(slide: Slide, params: TissueParams) -> PatchGrid:
    """The tissue mask and the grid of tissue patches of `slide` (see the module docstring)."""
    from scipy import ndimage

    mpp0 = slide.require_mpp()
    if params.target_mpp < mpp0 * (1 - params.mpp_tolerance):
        raise SlideError(
            f"slide {slide.path}: target {params.target_mpp:g} um/px ({MPP_AT_1X / params.target_mpp:g}x) is finer "
            f"than the scan's {mpp0:g} um/px ({MPP_AT_1X / mpp0:g}x); choose a lower --magnification"
        )
    ratio = max(1.0, params.target_mpp / mpp0)  # within the tolerance: read at level 0 as it is
    ps0 = max(1, round(params.patch_size * ratio))
    level = slide.best_level(ps0 / params.patch_size)
    size_at_level = max(1, round(ps0 / slide.level_downsamples[level]))
    # segment at about seg_downsample, finer for small slides (a mask of ~1000 px a side) and coarse patches
    seg_ds = max(1.0, min(params.seg_downsample, ps0 / 4.0, max(slide.dimensions) / 1024))
    image, ds = slide.read_downsampled(seg_ds)
    mask, regions = segment_tissue(image, params, (ps0 / ds) ** 2)
    w0, h0 = slide.dimensions
    coords: List[Tuple[int, int]] = []
    if regions:
        # integral image of the mask: the tissue share of any level-0 rectangle in O(1)
        integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        mh, mw = mask.shape
        lab, _ = ndimage.label(mask)
        taken = set()
        for sl in ndimage.find_objects(lab):
            if sl is None:
                continue
            ys, xs = sl
            x_start = int(xs.start * ds) // ps0 * ps0
            y_start = int(ys.start * ds) // ps0 * ps0
            x_stop, y_stop = min(w0, int(np.ceil(xs.stop * ds))), min(h0, int(np.ceil(ys.stop * ds)))
            for x in range(x_start, x_stop, ps0):  # x-major, as CLAM's meshgrid(..., indexing="ij")
                if x + ps0 > w0:
                    continue
                for y in range(y_start, y_stop, ps0):
                    if y + ps0 > h0 or (x, y) in taken:
                        continue
                    a0, a1 = min(mw, int(x / ds)), min(mw, max(int(x / ds) + 1, int(round((x + ps0) / ds))))
                    b0, b1 = min(mh, int(y / ds)), min(mh, max(int(y / ds) + 1, int(round((y + ps0) / ds))))
                    area = (a1 - a0) * (b1 - b0)
                    if area <= 0:
                        continue
                    inside = integral[b1, a1] - integral[b0, a1] - integral[b1, a0] + integral[b0, a0]
                    if inside >= params.min_tissue_fraction * area:
                        coords.append((x, y))
                        taken.add((x, y))
    arr = np.asarray(coords, dtype=np.int32).reshape(-1, 2)
    return PatchGrid(arr, level, size_at_level, ps0, params.patch_size, mask, ds, image, regions)


def draw_preview(grid: PatchGrid, max_size: int = 1024):
    """A PIL image: the low-resolution copy, the tissue contours (green) and the patch grid (blue)."""
    from PIL import Image, ImageDraw
    from scipy import ndimage

    img = grid.image
    scale = min(1.0, max_size / max(img.shape[:2]))
    edge = grid.mask & ~ndimage.binary_erosion(grid.mask, iterations=max(1, round(1 / scale)))
    out = img.copy()
    out[edge] = (0, 200, 0)
    pil = Image.fromarray(out)
    if scale < 1:
        pil = pil.resize((max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale))), Image.BILINEAR)
    draw = ImageDraw.Draw(pil)
    f = scale / grid.mask_downsample
    for x, y in grid.coords:
        draw.rectangle([x * f, y * f, (x + grid.patch_size_level0) * f - 1, (y + grid.patch_size_level0) * f - 1],
                       outline=(30, 60, 220))
    return pil


# ---------------------------------------------------------------------- coordinate files
@dataclass
class CoordsFile:
    """A slide's patch coordinates (CLAM's `<slide>.h5` or TRIDENT's `<slide>_patches.h5`)."""

    path: str
    coords: np.ndarray  # (n, 2) int level-0
    patch_level: Optional[int]  # CLAM: the level to read at (None: choose from patch_size_level0)
    patch_size: int  # at patch_level (CLAM), or the target size (TRIDENT)
    patch_size_level0: Optional[int]
    target_patch_size: int  # the size the encoder sees before any resize


def read_coords_file(path: str) -> CoordsFile:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise SlideError(f"coordinate file {path}: no 'coords' dataset (found {sorted(f.keys())})")
            ds = f["coords"]
            coords = np.asarray(ds[()]).reshape(-1, 2).astype(np.int64)
            attrs = {**dict(ds.attrs), **dict(f.attrs)}
    except OSError as exc:
        raise SlideError(f"cannot read coordinate file {path}: {exc}") from exc
    if "patch_size" not in attrs:
        raise SlideError(f"coordinate file {path}: no 'patch_size' attribute (not a CLAM / TRIDENT coordinate file)")
    patch_size = int(attrs["patch_size"])
    level = int(attrs["patch_level"]) if "patch_level" in attrs else None
    ps0 = attrs.get("patch_size_level0")
    if ps0 is None and "level0_magnification" in attrs and "target_magnification" in attrs:  # TRIDENT
        ps0 = round(patch_size * float(attrs["level0_magnification"]) / float(attrs["target_magnification"]))
    target = int(attrs.get("target_patch_size", patch_size))
    return CoordsFile(path, coords, level, patch_size, int(ps0) if ps0 is not None else None, target)


def find_coords_files(folder: str) -> Dict[str, str]:
    """{slide id: path} of the coordinate files in `folder` or its `patches/` sub-folder: CLAM's `<slide>.h5`,
    TRIDENT's `<slide>_patches.h5`."""
    if not os.path.isdir(folder):
        raise SlideError(f"coords: no such directory: {folder}")
    sub = os.path.join(folder, "patches")
    where = sub if os.path.isdir(sub) else folder
    out = {}
    for name in sorted(os.listdir(where)):
        if name.endswith(".h5") and not name.startswith("."):
            stem = name[:-3]
            if stem.endswith("_patches"):
                stem = stem[: -len("_patches")]
            out[stem] = os.path.join(where, name)
    if not out:
        raise SlideError(f"coords {folder}: no coordinate files (<slide>.h5 or <slide>_patches.h5) there")
    return out
