"""Slides -> `mil patch` -> `mil extract --slides` -> `mil train` / `mil eval` -> `mil heatmap`, on generated slides."""

import json
import os
import shutil
import warnings

import h5py
import numpy as np
import pytest
import torch

pytest.importorskip("tifffile")
pytest.importorskip("openslide")

from lbmamba.cli import main
from lbmamba.data.mil import FeatureStore
from lbmamba.data.slides import open_slide
from lbmamba.data.synthetic_slides import Blob, SlideScene, write_slide_tiff
from lbmamba.engine import UserError, extract_features, heatmap, patch_slides
from lbmamba.models.mil import create_mil_model

pytestmark = pytest.mark.usefixtures("one_thread")

ENCODER = dict(encoder="test_resnet", device="cpu", progress=False, batch_size=16)


def _scenes():
    return {
        "a": SlideScene(1024, 768, [Blob(300, 380, 200, 150), Blob(760, 400, 160, 220, textured=True)], seed=1),
        "b": SlideScene(1024, 768, [Blob(520, 380, 300, 200)], seed=2),
    }


@pytest.fixture(scope="module")
def slide_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("wsi")
    os.makedirs(root / "slides")
    for name, scene in _scenes().items():
        write_slide_tiff(str(root / "slides" / f"{name}.tiff"), scene, mpp=0.25)
    return root


@pytest.fixture(scope="module")
def patched(slide_dir):
    out = slide_dir / "patches"
    res = patch_slides(dict(slides=str(slide_dir / "slides"), output=str(out), patch_size=32, progress=False))
    assert res["slides_written"] == 2
    return out


def test_patch_writes_clam_coordinate_files_and_previews(slide_dir, patched):
    scenes = _scenes()
    for name in ("a", "b"):
        with h5py.File(patched / "patches" / f"{name}.h5") as f:
            coords = f["coords"][()]
            assert coords.dtype == np.int32 and coords.shape[1] == 2
            assert (f.attrs["patch_level"], f.attrs["patch_size"], f.attrs["patch_size_level0"]) == (1, 32, 64)
            assert f.attrs["target_mpp"] == 0.5 and f.attrs["level0_mpp"] == pytest.approx(0.25)
        expected = scenes[name].tissue_area() / 64**2
        assert abs(len(coords) - expected) <= 0.15 * expected
        assert os.path.getsize(patched / "previews" / f"{name}.png") > 0
    summary = json.loads((patched / "patch_summary.json").read_text())
    assert {s["slide"] for s in summary["per_slide"]} == {"a", "b"}


def test_patch_resumes_a_half_done_folder_with_workers(slide_dir, patched, tmp_path):
    out = tmp_path / "p"
    shutil.copytree(patched, out)
    os.remove(out / "patches" / "b.h5")
    before = (out / "patches" / "a.h5").stat().st_mtime_ns
    res = patch_slides(dict(slides=str(slide_dir / "slides"), output=str(out), patch_size=32, progress=False,
                            workers=2))
    assert (res["slides_written"], res["slides_skipped_existing"]) == (1, 1)
    assert (out / "patches" / "a.h5").stat().st_mtime_ns == before
    with h5py.File(out / "patches" / "b.h5") as f, h5py.File(patched / "patches" / "b.h5") as g:
        np.testing.assert_array_equal(f["coords"][()], g["coords"][()])


def test_patch_bad_slides_one_line_or_skipped(tmp_path, capsys):
    slides = tmp_path / "slides"
    os.makedirs(slides)
    scene = _scenes()["b"]
    write_slide_tiff(str(slides / "good.tiff"), scene, mpp=0.25)
    write_slide_tiff(str(slides / "nometa.tiff"), scene, mpp=None)
    write_slide_tiff(str(slides / "white.tiff"), SlideScene(512, 512, []), mpp=0.25)
    (slides / "junk.svs").write_bytes(b"junk")
    args = ["mil", "patch", "--slides", str(slides), "--output", str(tmp_path / "out"), "--patch-size", "32",
            "--no-progress"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "junk.svs: unreadable or unsupported format" in err and "--skip-bad" in err
    assert main(args + ["--skip-bad"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # good.tiff was patched before the first run stopped at junk.svs: this run keeps it
    assert (res["slides_written"], res["slides_skipped_existing"], res["slides_bad"]) == (0, 1, 3)
    assert "give the level-0 microns per pixel with --mpp" in res["bad"]["nometa"]
    assert "no tissue found" in res["bad"]["white"]
    # --mpp stands in for the missing metadata; a target above the scan's magnification is refused
    res = patch_slides(dict(slides=str(slides), output=str(tmp_path / "out"), patch_size=32, progress=False,
                            skip_bad=True, mpp=0.25))
    assert res["slides_written"] == 1 and "nometa" not in res["bad"]  # nometa now; good is kept
    with pytest.raises(UserError, match=r"good.tiff: target 0.125 um/px \(80x\) is finer than the scan's"):
        patch_slides(dict(slides=str(slides), output=str(tmp_path / "o2"), magnification=80, progress=False))


def test_extract_from_slides_equals_extract_from_patch_images(slide_dir, patched, tmp_path):
    import timm

    weights = tmp_path / "enc.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), weights)
    enc = dict(ENCODER, encoder_checkpoint=str(weights))
    res = extract_features(dict(enc, slides=str(slide_dir / "slides"), coords=str(patched),
                                output=str(tmp_path / "f"), pt_files=True))
    assert res["slides_written"] == 2 and res["feat_dim"] == 96 and 0 < res["encoder_busy"] <= 1
    # the same patches written as images, named x_y.png
    from PIL import Image

    for name in ("a", "b"):
        with h5py.File(patched / "patches" / f"{name}.h5") as f:
            coords, level, size = f["coords"][()], int(f.attrs["patch_level"]), int(f.attrs["patch_size"])
        os.makedirs(tmp_path / "imgs" / name)
        with open_slide(str(slide_dir / "slides" / f"{name}.tiff")) as s:
            for x, y in coords:
                patch = s.read_patch(int(x), int(y), level, size)
                Image.fromarray(patch).save(tmp_path / "imgs" / name / f"{x}_{y}.png")
    extract_features(dict(enc, patches=str(tmp_path / "imgs"), output=str(tmp_path / "g")))
    for name in ("a", "b"):
        with h5py.File(tmp_path / "f" / "h5_files" / f"{name}.h5") as f, \
                h5py.File(tmp_path / "g" / "h5_files" / f"{name}.h5") as g:
            # the image folder is sorted x-major; the slide path keeps the coordinate file's (CLAM's) order
            order = np.lexsort((f["coords"][:, 1], f["coords"][:, 0]))
            np.testing.assert_array_equal(f["coords"][()][order], g["coords"][()])
            np.testing.assert_allclose(f["features"][()][order], g["features"][()], rtol=1e-4, atol=1e-5)
            assert f.attrs["patch_size_level0"] == 64 and f.attrs["coords_source"] == "slide"
    assert torch.load(tmp_path / "f" / "pt_files" / "a.pt", weights_only=True).shape[1] == 96
    # a rerun skips finished slides
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = extract_features(dict(ENCODER, slides=str(slide_dir / "slides"), coords=str(patched),
                                    output=str(tmp_path / "f")))
    assert (res["slides_written"], res["slides_skipped_existing"]) == (0, 2)


def test_extract_orphan_coordinates_and_encoder_options(slide_dir, patched, tmp_path):
    coords = tmp_path / "coords"
    shutil.copytree(patched / "patches", coords)
    shutil.copy(coords / "a.h5", coords / "lost.h5")
    args = dict(ENCODER, slides=str(slide_dir / "slides"), coords=str(coords), output=str(tmp_path / "f"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match=r"lost.h5: no slide 'lost' in .*--skip-bad"):
            extract_features(args)
        res = extract_features(dict(args, skip_bad=True, encoder="test_vit", pooling="cls_mean", resize=32,
                                    encoder_kwargs={"img_size": 32}, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5]))
    assert res["slides_written"] == 2 and res["slides_bad"] == 1 and "lost" in res["bad"]
    import timm

    width = timm.create_model("test_vit", pretrained=False, num_classes=0, img_size=32).num_features
    assert res["feat_dim"] == 2 * width  # class token + mean of patch tokens
    with pytest.raises(UserError, match="cls_mean needs a ViT-style encoder"):
        extract_features(dict(args, output=str(tmp_path / "g"), pooling="cls_mean", skip_bad=True))
    with pytest.raises(UserError, match="either --slides DIR --coords DIR .* or --patches DIR"):
        extract_features(dict(args, patches=str(tmp_path)))


def test_trident_layout_is_read(slide_dir, patched, tmp_path):
    """TRIDENT's job folder: <mag>x_<size>px_0px_overlap/patches/<slide>_patches.h5 (attributes patch_size,
    level0_magnification, target_magnification) and features_<encoder>/<slide>.h5."""
    job = tmp_path / "job" / "20x_32px_0px_overlap"
    os.makedirs(job / "patches")
    with h5py.File(patched / "patches" / "a.h5") as f:
        coords = f["coords"][()]
    with h5py.File(job / "patches" / "a_patches.h5", "w") as f:
        ds = f.create_dataset("coords", data=coords)
        ds.attrs.update(patch_size=32, level0_magnification=40, target_magnification=20)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = extract_features(dict(ENCODER, slides=str(slide_dir / "slides"), coords=str(job),
                                    output=str(tmp_path / "f")))
    assert res["slides_written"] == 1
    os.makedirs(job / "features_test_resnet")
    shutil.copy(tmp_path / "f" / "h5_files" / "a.h5", job / "features_test_resnet" / "a.h5")
    store = FeatureStore(str(tmp_path / "job"))
    assert store.slide_ids() == ["a"] and store.shape("a") == (len(coords), 96)
    np.testing.assert_array_equal(store.coords("a").numpy(), coords)
    assert FeatureStore(str(job / "features_test_resnet")).slide_ids() == ["a"]


def _checkpoint(path, in_dim=96):
    model = create_mil_model("lb", in_dim=in_dim, num_classes=2, depth=1, embed_dim=16)
    torch.save({"format": "lbmamba-mil", "config": model.config, "model": model.state_dict(),
                "class_names": ["neg", "pos"]}, path)
    return model


def test_heatmap_draws_attention_and_top_patches(slide_dir, patched, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract_features(dict(ENCODER, slides=str(slide_dir / "slides"), coords=str(patched),
                              output=str(tmp_path / "f")))
    model = _checkpoint(tmp_path / "fold_0.pt")
    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label\na,pos\nb,neg\n")
    res = heatmap(dict(checkpoint=str(tmp_path / "fold_0.pt"), slides=str(slide_dir / "slides"),
                       features=str(tmp_path / "f"), output=str(tmp_path / "h"), labels=str(labels), top_k=3,
                       thumbnail_size=512, device="cpu", progress=False))
    assert res["slides_drawn"] == 2 and res["slides_bad"] == 0
    from PIL import Image

    with Image.open(tmp_path / "h" / "a_heatmap.png") as im:
        assert im.size == (512, 384 + 28)  # the thumbnail and the caption bar
    info = json.loads((tmp_path / "h" / "heatmaps.json").read_text())["slides"]["a"]
    store = FeatureStore(str(tmp_path / "f"))
    with torch.no_grad():
        logits, scores = model(store.load("a"), return_attention=True)
    weights = torch.softmax(scores, -1)[0]
    top = torch.argsort(weights, descending=True)[:3]
    coords = store.coords("a")
    assert [(t["x"], t["y"]) for t in info["top"]] == [tuple(coords[i].tolist()) for i in top]
    assert info["top"][0]["weight"] == pytest.approx(float(weights[top[0]]), rel=1e-5)
    assert info["probs"]["pos"] == pytest.approx(float(torch.softmax(logits, -1)[0, 1]), rel=1e-5)
    assert info["label"] == "pos" and info["patch_size_level0"] == 64
    tops = sorted(os.listdir(tmp_path / "h" / "a_top"))
    assert len(tops) == 3 and tops[0].startswith(f"00_{info['top'][0]['x']}_{info['top'][0]['y']}")
    with Image.open(tmp_path / "h" / "a_top" / tops[0]) as im:
        assert im.size == (32, 32)
    # a feature file without its slide: one line naming it, or skipped
    os.makedirs(tmp_path / "s2")
    shutil.copy(slide_dir / "slides" / "a.tiff", tmp_path / "s2" / "a.tiff")
    with pytest.raises(UserError, match=r"slide 'b': no slide file"):
        heatmap(dict(checkpoint=str(tmp_path / "fold_0.pt"), slides=str(tmp_path / "s2"), features=str(tmp_path / "f"),
                     output=str(tmp_path / "h2"), slide_ids=["a", "b"], device="cpu", progress=False))


@pytest.mark.slow
def test_end_to_end_slides_to_auc_and_heatmap(tmp_path):
    """Positive slides carry a striped texture in one blob: patch -> extract -> mil train (LB) -> mil eval ->
    heatmap gives an AUC well above chance, and the heatmap's top patches lie on the texture more often than
    chance."""
    from lbmamba.engine import evaluate_mil, train_mil

    os.makedirs(tmp_path / "slides")
    scenes, rows = {}, ["slide_id,label"]
    for i in range(16):
        positive = i % 2 == 0
        scenes[f"s{i:02d}"] = scene = SlideScene.random(1024, 1024, blobs=3, positive=positive, seed=100 + i,
                                                        radius=(0.1, 0.16))
        write_slide_tiff(str(tmp_path / "slides" / f"s{i:02d}.tiff"), scene, mpp=0.25)
        rows.append(f"s{i:02d},{'tumour' if positive else 'normal'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    slides, labels = str(tmp_path / "slides"), str(tmp_path / "labels.csv")
    res = patch_slides(dict(slides=slides, output=str(tmp_path / "patches"), patch_size=32, progress=False,
                            workers=2))
    assert res["slides_written"] == 16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract_features(dict(ENCODER, slides=slides, coords=str(tmp_path / "patches"), output=str(tmp_path / "f")))
    summary = train_mil(dict(features=str(tmp_path / "f"), labels=labels, model="lb", folds=4, epochs=20,
                             stop_epoch=5, patience=5, embed_dim=32, lr=5e-4, output=str(tmp_path / "run"),
                             device="cpu", progress=False, prefer="h5"))
    assert summary["auc_mean"] >= 0.8
    ev = evaluate_mil(dict(checkpoint=str(tmp_path / "run" / "fold_0.pt"), features=str(tmp_path / "f"),
                           labels=labels, device="cpu", progress=False))
    assert ev["n"] == 16 and ev["auc"] >= 0.8
    hm = heatmap(dict(checkpoint=str(tmp_path / "run" / "fold_0.pt"), slides=slides, features=str(tmp_path / "f"),
                      output=str(tmp_path / "h"), top_k=3, device="cpu", progress=False, thumbnail_size=256))
    info = json.loads((tmp_path / "h" / "heatmaps.json").read_text())["slides"]
    on_texture, chance = [], []
    for name, scene in scenes.items():
        if not any(b.textured for b in scene.blobs):
            continue
        textured = scene.render_mask(0, 0, scene.width, scene.height, 1, textured_only=True)
        coords = FeatureStore(str(tmp_path / "f")).coords(name).numpy() + 32
        chance.append(textured[coords[:, 1], coords[:, 0]].mean())
        on_texture += [bool(textured[t["y"] + 32, t["x"] + 32]) for t in info[name]["top"]]
    print(f"AUC mean {summary['auc_mean']:.3f}, eval AUC {ev['auc']:.3f}, top patches on the texture "
          f"{np.mean(on_texture):.2f} vs chance {np.mean(chance):.2f}")
    assert hm["slides_drawn"] == 16
    assert np.mean(on_texture) > np.mean(chance) + 0.2, (np.mean(on_texture), np.mean(chance))


@pytest.mark.slow
def test_torchrun_shares_the_slides_out(slide_dir, patched, tmp_path):
    """Two processes: slide i to rank i mod 2, each file written whole by one; the same features as one process;
    a rerun skips finished slides."""
    import timm

    from conftest import torchrun_lbmamba

    weights = tmp_path / "enc.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), weights)
    args = ["mil", "extract", "--slides", slide_dir / "slides", "--coords", patched, "--encoder", "test_resnet",
            "--encoder-checkpoint", weights, "--device", "cpu", "--no-progress", "--threads", "1"]
    proc = torchrun_lbmamba([*args, "--output", tmp_path / "ddp"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (res["processes"], res["slides_written"], res["slides_skipped_existing"]) == (2, 2, 0)
    extract_features(dict(ENCODER, slides=str(slide_dir / "slides"), coords=str(patched), output=str(tmp_path / "one"),
                          encoder_checkpoint=str(weights)))
    for name in ("a", "b"):
        with h5py.File(tmp_path / "ddp" / "h5_files" / f"{name}.h5") as f, \
                h5py.File(tmp_path / "one" / "h5_files" / f"{name}.h5") as g:
            np.testing.assert_array_equal(f["coords"][()], g["coords"][()])
            np.testing.assert_allclose(f["features"][()], g["features"][()], rtol=1e-4, atol=1e-5)
    proc = torchrun_lbmamba([*args, "--output", tmp_path / "ddp"])
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (res["slides_written"], res["slides_skipped_existing"]) == (0, 2)
