"""Reading whole-slide images, tissue segmentation and the patch grid, on pyramidal TIFFs the tests write."""

import numpy as np
import pytest

pytest.importorskip("tifffile")
pytest.importorskip("openslide")
pytest.importorskip("tiffslide")

from lbmamba.data.slides import (
    SlideError,
    TissueParams,
    find_coords_files,
    find_slides,
    open_slide,
    otsu_threshold,
    patch_grid,
)
from lbmamba.data.synthetic_slides import Blob, SlideScene, write_slide_tiff


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("slides")
    scene = SlideScene(1536, 1024, [Blob(400, 500, 260, 200), Blob(1150, 450, 220, 300, textured=True)])
    write_slide_tiff(str(root / "blobs.tiff"), scene, mpp=0.25)
    write_slide_tiff(str(root / "nometa.tiff"), scene, mpp=None)
    write_slide_tiff(str(root / "empty.tiff"), SlideScene(1024, 1024, []), mpp=0.25)
    (root / "broken.svs").write_bytes(b"not a slide at all")
    return root, scene


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_slide_levels_pixel_size_and_pixels(slides, backend):
    root, scene = slides
    with open_slide(str(root / "blobs.tiff"), backend=backend) as s:
        assert s.backend == backend and s.level_dimensions == [(1536, 1024), (768, 512), (384, 256)]
        assert s.level_downsamples == [1.0, 2.0, 4.0] and s.mpp == pytest.approx(0.25) and s.magnification == 40
        region = s.read_region((1100, 400), 0, (64, 32))
        assert region.shape == (32, 64, 3) and region.dtype == np.uint8
        np.testing.assert_array_equal(region, scene.render(1100, 400, 64, 32, 1))
        assert s.best_level(2.0) == 1 and s.best_level(3.9) == 1 and s.best_level(100) == 2
        patch = s.read_patch(300, 400, 1, 32, 16)
        assert patch.shape == (16, 16, 3)
        thumb, ds = s.thumbnail(256)
        assert max(thumb.shape[:2]) == 256 and ds == pytest.approx(6.0)


def test_pixel_size_missing_override_and_bad_files(slides):
    root, _ = slides
    with open_slide(str(root / "nometa.tiff")) as s:
        assert s.mpp is None
        with pytest.raises(SlideError, match=r"nometa.tiff: no pixel size .*--mpp"):
            s.require_mpp()
    with open_slide(str(root / "nometa.tiff"), mpp=0.5) as s:
        assert s.mpp == 0.5 and s.mpp_source == "--mpp"
    with pytest.raises(SlideError, match=r"broken.svs: unreadable or unsupported format"):
        open_slide(str(root / "broken.svs"))
    with pytest.raises(SlideError, match="no such file"):
        open_slide(str(root / "nope.svs"))
    assert list(find_slides(str(root))) == ["blobs", "broken", "empty", "nometa"]
    with pytest.raises(SlideError, match="coords: no such directory"):
        find_coords_files(str(root / "nope"))


def test_otsu_splits_two_modes():
    values = np.concatenate([np.full(500, 10), np.full(300, 200)]).astype(np.uint8)
    t = otsu_threshold(values)
    assert 10 <= t < 200
    assert otsu_threshold(np.zeros(10, np.uint8)) == 0


def test_grid_covers_the_blobs(slides):
    root, scene = slides
    with open_slide(str(root / "blobs.tiff")) as s:
        grid = patch_grid(s, TissueParams(patch_size=32, target_mpp=0.5))
    # 32 px at 0.5 um/px = 64 level-0 px, read at level 1 (downsample 2) as 32 px
    assert (grid.patch_level, grid.patch_size, grid.patch_size_level0) == (1, 32, 64)
    assert grid.regions == 2
    expected = scene.tissue_area() / 64**2
    assert abs(len(grid.coords) - expected) <= 0.15 * expected
    assert grid.coords.dtype == np.int32 and (grid.coords % 64 == 0).all()
    assert len({tuple(c) for c in grid.coords}) == len(grid.coords)
    # every kept patch's centre lies in (or next to) a blob
    inside = scene.render_mask(0, 0, 1536, 1024, 1)
    centres = grid.coords + 32
    assert inside[centres[:, 1], centres[:, 0]].mean() > 0.95
    # CLAM's order: region by region, x-major in each (the first region: non-decreasing x)
    first = grid.coords[grid.coords[:, 0] < 768]
    assert (np.diff(first[:, 0]) >= 0).all()


def test_no_tissue_and_target_finer_than_scan(slides):
    root, _ = slides
    with open_slide(str(root / "empty.tiff")) as s:
        grid = patch_grid(s, TissueParams(patch_size=32))
    assert grid.regions == 0 and len(grid.coords) == 0
    with open_slide(str(root / "blobs.tiff")) as s:
        with pytest.raises(SlideError, match=r"blobs.tiff: target 0.125 um/px \(80x\) is finer than the scan's"):
            patch_grid(s, TissueParams(target_mpp=0.125))
