"""Images of every mode read right by the one reader, wherever images are read; labels that differ only
in case or spaces refused; annotations that cannot be used removed and counted."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from lbmamba.data import DataError
from lbmamba.data.detection import CocoDetectionDataset
from lbmamba.data.images import SafeImageDataset, check_image_folder, open_image
from lbmamba.data.mil import MILInputError, read_labels
from lbmamba.data.segmentation import read_image


def _png16_rgb(path, pixels: np.ndarray) -> None:
    """A 48-bit RGB PNG (PIL writes none), chunk by chunk."""
    h, w, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    with open(path, "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _images(folder):
    """{name: (path, the RGB uint8 array every reader must give)} of one image per mode."""
    out = {}
    grey16 = (np.arange(48, dtype=np.uint32).reshape(6, 8) * 1300 + 100).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "grey16.png")  # mode I;16 (opens as I;16)
    expected = np.repeat(np.round(grey16 / 257.0).astype(np.uint8)[..., None], 3, axis=2)
    out["grey16"] = (folder / "grey16.png", expected)
    rgb16 = np.stack([grey16, 65535 - grey16, np.full_like(grey16, 40000)], axis=2)
    _png16_rgb(folder / "rgb16.png", rgb16)
    out["rgb16"] = (folder / "rgb16.png", (rgb16 >> 8).astype(np.uint8))  # PIL keeps the high bytes
    palette = Image.new("P", (8, 6))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putdata([1] * 24 + [0] * 24)
    palette.save(folder / "palette.png")
    want = np.zeros((6, 8, 3), np.uint8)
    want[:3] = (10, 20, 30)
    out["palette"] = (folder / "palette.png", want)
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(folder / "cmyk.tif")
    out["cmyk"] = (folder / "cmyk.tif", np.tile(np.array([255, 0, 0], np.uint8), (6, 8, 1)))
    Image.new("LA", (8, 6), (100, 40)).save(folder / "grey_alpha.png")
    out["grey_alpha"] = (folder / "grey_alpha.png", np.full((6, 8, 3), 100, np.uint8))
    # EXIF orientation 6: stored 12 wide x 8 high, left half red; every viewer shows it 8 wide x 12 high,
    # turned clockwise, the red half on top
    stored = np.zeros((8, 12, 3), np.uint8)
    stored[:, :6] = (255, 0, 0)
    stored[:, 6:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(folder / "turned.png", exif=exif)
    out["exif"] = (folder / "turned.png", np.rot90(stored, k=-1))
    return out


def test_every_mode_is_read_as_every_viewer_shows_it(tmp_path):
    for name, (path, expected) in _images(tmp_path).items():
        got = read_image(path)  # segmentation and detection loaders, seg / det predict
        assert got.dtype == np.uint8 and got.shape == expected.shape, name
        assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1, name
        assert np.array_equal(np.asarray(open_image(path)), got), name
    with Image.open(tmp_path / "grey16.png") as img:  # what the old reader did: a flat white image
        assert img.mode.startswith("I") and (np.asarray(img.convert("RGB")) == 255).mean() > 0.95


def test_classification_and_detection_loaders_read_the_same(tmp_path):
    images = _images(tmp_path)
    dataset = SafeImageDataset([(str(path), 0) for path, _ in images.values()])
    for k, (name, (path, _)) in enumerate(images.items()):
        image, target, bad = dataset[k]
        assert bad == 0 and np.array_equal(np.asarray(image), read_image(path)), name
    path, expected = images["grey16"]
    ann = {"images": [{"id": 1, "file_name": path.name, "width": 8, "height": 6}],
           "categories": [{"id": 1, "name": "thing"}],
           "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 3, 3], "iscrowd": 0}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    image, _ = CocoDetectionDataset(tmp_path, tmp_path / "ann.json").read(0)
    assert np.array_equal(image, expected)


def test_mil_extract_reads_16_bit_patches_as_8_bit(tmp_path):
    """`mil extract`'s features of a 16-bit patch equal those of the same patch stored in 8 bits."""
    from lbmamba.engine.features import extract_features

    values = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 61 + 500).astype(np.uint16)
    for slide, data in (("wide", values), ("narrow", np.round(values / 257.0).astype(np.uint8))):
        (tmp_path / "p" / slide).mkdir(parents=True)
        Image.fromarray(data).save(tmp_path / "p" / slide / "0_0.png")
    with pytest.warns(UserWarning, match="RANDOM weights") as record:
        extract_features(dict(patches=str(tmp_path / "p"), output=str(tmp_path / "out"), encoder="resnet18",
                              device="cpu", progress=False, threads=1))
    assert all(w.filename.endswith("features.py") for w in record)  # our code, not contextlib's
    import h5py

    with h5py.File(tmp_path / "out" / "h5_files" / "wide.h5") as a, h5py.File(tmp_path / "out" / "h5_files" /
                                                                                "narrow.h5") as b:
        assert np.array_equal(a["features"][()], b["features"][()])


# ------------------------------------------------------------------------------------------ labels
def test_labels_that_differ_only_in_case_or_spaces_are_an_error_naming_both(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("slide_id,label\na,positive\nb,negative\nc,Positive \nd,positive\n")
    with pytest.raises(MILInputError) as info:
        read_labels(str(path))
    assert str(info.value) == (f"--labels {path}: labels that differ only in letter case or spaces: 'Positive' "
                               "(1 slide) and 'positive' (2 slides); fix the CSV, or set merge_label_spellings=true "
                               "to count each group as one class")
    table = read_labels(str(path), merge_spellings=True)
    assert table.class_names == ["negative", "positive"] and table.labels == [1, 0, 1, 1]


def test_class_folders_and_category_names_that_differ_only_in_case_are_refused(tmp_path):
    for name in ("Cat", "cat"):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "train" / name / "x.png")
    with pytest.raises(DataError, match=r"differ only in letter case or spaces: 'Cat' and 'cat'"):
        check_image_folder(str(tmp_path / "train"))
    ann = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "Dog"}, {"id": 2, "name": "dog "}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    with pytest.raises(DataError, match=r"categories of .*ann\.json: .*'Dog' and 'dog '"):
        CocoDetectionDataset(tmp_path, tmp_path / "ann.json")


# ------------------------------------------------------------------------------------------ annotations
def test_non_finite_boxes_and_degenerate_polygons_are_removed_and_counted(tmp_path):
    Image.new("RGB", (20, 20)).save(tmp_path / "a.png")
    good = [2, 2, 8, 8]
    anns = [{"bbox": good, "segmentation": [[2, 2, 10, 2, 10, 10, 2, 10]]},
            {"bbox": [float("nan"), 2, 5, 5]},
            {"bbox": [1, 1, float("inf"), 4]},
            {"bbox": good, "segmentation": [[2, 2, 9, 9]]},  # two points
            {"bbox": good, "segmentation": [[2, 2, 10, float("nan"), 10, 10]]},
            {"bbox": [30, 30, 5, 5]}]  # outside the image: the zero-size count
    ann = {"images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 20}],
           "categories": [{"id": 1, "name": "thing"}],
           "annotations": [dict(a, id=k, image_id=1, category_id=1, iscrowd=0) for k, a in enumerate(anns)]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))  # json writes NaN / Infinity, as some tools do
    dataset = CocoDetectionDataset(tmp_path, tmp_path / "ann.json")
    assert (dataset.removed_boxes, dataset.nonfinite_boxes, dataset.degenerate_polygons) == (1, 2, 2)
    _, target = dataset.read(0)
    assert target["boxes"].tolist() == [[2.0, 2.0, 10.0, 10.0]] and target["masks"][0].sum() > 0
