"""Generated whole-slide images for tests, demos and benchmarks: pyramidal tiled TIFFs (tifffile) of
tissue-like blobs on a white background, any size (written tile by tile, never whole in memory).

    scene = SlideScene.random(width=4096, height=4096, blobs=6, positive=True, seed=0)
    write_slide_tiff("pos_0.tiff", scene, mpp=0.5)

Each blob is an ellipse of pink-purple "tissue" with a fine noise; in a positive scene some blobs carry a
dark striped texture (the "label" a MIL model can learn). The same scene renders at every pyramid level
from its description, so levels agree. Resolution tags (pixels per centimetre) carry the pixel size;
`mpp=None` writes a slide without them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import numpy as np

__all__ = ["Blob", "SlideScene", "write_slide_tiff"]

_TISSUE = np.array([200.0, 120.0, 180.0], np.float32)  # H&E-ish pink
_STRIPES = np.array([90.0, 40.0, 120.0], np.float32)  # dark purple texture
_WHITE = np.array([243.0, 243.0, 243.0], np.float32)


_TEXTURES: dict = {}


def _noise_texture(seed: int, size: int = 1024) -> np.ndarray:
    """A (size, size) float32 noise in [-0.5, 0.5), the same for the same seed (cached)."""
    if seed not in _TEXTURES:
        _TEXTURES[seed] = (np.random.default_rng(seed).random((size, size), dtype=np.float32) - 0.5)
    return _TEXTURES[seed]


@dataclass
class Blob:
    cx: float
    cy: float
    rx: float
    ry: float
    textured: bool = False  # carries the positive texture


@dataclass
class SlideScene:
    width: int
    height: int
    blobs: List[Blob] = field(default_factory=list)
    stripe_period: float = 12.0  # level-0 pixels
    seed: int = 0

    @staticmethod
    def random(width: int, height: int, blobs: int = 5, positive: bool = False, seed: int = 0,
               radius: Tuple[float, float] = (0.06, 0.14), textured_blobs: int = 1) -> "SlideScene":
        """`blobs` ellipses placed at random (radii a share of the shorter side); a positive scene has its first
        `textured_blobs` blobs textured."""
        rng = np.random.default_rng(seed)
        side = min(width, height)
        out = []
        for i in range(blobs):
            rx, ry = (rng.uniform(*radius, size=2) * side)
            cx = rng.uniform(rx + 0.02 * side, width - rx - 0.02 * side)
            cy = rng.uniform(ry + 0.02 * side, height - ry - 0.02 * side)
            out.append(Blob(float(cx), float(cy), float(rx), float(ry), textured=positive and i < textured_blobs))
        return SlideScene(width, height, out, seed=seed)

    def tissue_area(self) -> float:
        """Level-0 pixel area covered by blobs (overlaps counted once, estimated on a grid)."""
        step = max(1, min(self.width, self.height) // 1024)
        return float(self.render_mask(0, 0, self.width, self.height, step).sum()) * step * step

    def render_mask(self, x0: float, y0: float, w: int, h: int, ds: float, textured_only: bool = False) -> np.ndarray:
        xs = x0 + (np.arange(w, dtype=np.float64) + 0.5) * ds
        ys = y0 + (np.arange(h, dtype=np.float64) + 0.5) * ds
        mask = np.zeros((h, w), bool)
        for b in self.blobs:
            if textured_only and not b.textured:
                continue
            if xs[-1] < b.cx - b.rx or xs[0] > b.cx + b.rx or ys[-1] < b.cy - b.ry or ys[0] > b.cy + b.ry:
                continue
            mask |= ((xs[None, :] - b.cx) / b.rx) ** 2 + ((ys[:, None] - b.cy) / b.ry) ** 2 <= 1.0
        return mask

    def render(self, x0: float, y0: float, w: int, h: int, ds: float = 1.0) -> np.ndarray:
        """RGB uint8 (h, w, 3): the region of level-0 origin (x0, y0), `w` x `h` pixels `ds` level-0 pixels apart."""
        tissue = self.render_mask(x0, y0, w, h, ds)
        if not tissue.any():
            return np.broadcast_to(_WHITE.astype(np.uint8), (h, w, 3)).copy()
        xs = x0 + (np.arange(w, dtype=np.float64) + 0.5) * ds
        ys = y0 + (np.arange(h, dtype=np.float64) + 0.5) * ds
        # a fixed noise texture indexed by level-0 coordinates: the same across tile boundaries; weaker at coarse
        # levels (where it would average away)
        texture = _noise_texture(self.seed)
        xi, yi = np.floor(xs).astype(np.int64) % texture.shape[1], np.floor(ys).astype(np.int64) % texture.shape[0]
        noise = texture[yi[:, None], xi[None, :]] * np.float32(30.0 / max(1.0, ds) ** 0.5)
        colour = _TISSUE + noise[..., None]
        textured = self.render_mask(x0, y0, w, h, ds, textured_only=True)
        if textured.any():
            if ds < self.stripe_period / 3:
                phase = ((xs[None, :] + ys[:, None]) % self.stripe_period) / self.stripe_period
                colour = np.where((textured & (phase < 0.5))[..., None], _STRIPES, colour)
            else:  # too coarse to resolve: the average colour
                colour = np.where(textured[..., None], 0.5 * (_STRIPES + colour), colour)
        out = np.where(tissue[..., None], colour, _WHITE)
        return out.clip(0, 255).astype(np.uint8)


def write_slide_tiff(path: str, scene: SlideScene, mpp: Optional[float] = 0.5, tile: int = 256,
                     min_level_size: int = 256, compression: str = "zlib") -> List[Tuple[int, int]]:
    """A tiled pyramidal TIFF of `scene`: level i is 2**i times smaller, down to `min_level_size` pixels; levels
    as successive pages (OpenSlide's generic-tiff and tiffslide read it). Returns the level sizes (w, h)."""
    import tifffile

    sizes = []
    w, h, ds = scene.width, scene.height, 1
    while True:
        sizes.append((w, h, ds))
        if max(w, h) // 2 < min_level_size:
            break
        w, h, ds = w // 2, h // 2, ds * 2

    def tiles(level_w: int, level_h: int, ds_: int):
        for ty in range(0, level_h, tile):
            for tx in range(0, level_w, tile):
                region = scene.render(tx * ds_, ty * ds_, tile, tile, ds_)
                yield region

    with tifffile.TiffWriter(path, bigtiff=scene.width * scene.height * 3 > 2**31) as tw:
        for i, (lw, lh, ds_) in enumerate(sizes):
            kwargs = {}
            if mpp is not None:
                r = 1e4 / (mpp * ds_)
                kwargs = dict(resolution=(r, r), resolutionunit="CENTIMETER")
            tw.write(tiles(lw, lh, ds_), shape=(lh, lw, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     compression=compression, subfiletype=0 if i == 0 else 1, metadata=None, **kwargs)
    return [(lw, lh) for lw, lh, _ in sizes]
