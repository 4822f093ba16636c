"""`extract_features`: patch images -> CLAM h5 feature files."""

import os
import warnings

import h5py
import numpy as np
import pytest
import torch

from lbmamba.data.mil import FeatureStore
from lbmamba.engine import UserError
from lbmamba.engine.features import build_encoder, extract_features

pytestmark = pytest.mark.usefixtures("one_thread")


def _write_patches(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    slides = {"slideA": ["512_0.png", "0_256.png", "0_0.png"], "slideB": ["p1.jpg", "p10.jpg", "p2.jpg"]}
    for slide, names in slides.items():
        os.makedirs(root / slide, exist_ok=True)
        for n in names:
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / slide / n)


def test_extract_h5_with_coords(tmp_path):
    _write_patches(tmp_path / "patches")
    args = dict(patches=str(tmp_path / "patches"), output=str(tmp_path / "out"), encoder="resnet18", device="cpu",
                progress=False)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        res = extract_features(dict(args, batch_size=2))
    assert res["slides_written"] == 2 and res["feat_dim"] == 512 and res["random_weights"]
    with h5py.File(tmp_path / "out" / "h5_files" / "slideA.h5") as f:
        assert f["features"].shape == (3, 512) and f["features"].dtype == np.float32
        assert f["coords"][()].tolist() == [[0, 0], [0, 256], [512, 0]]  # x-major, as CLAM writes them
    with h5py.File(tmp_path / "out" / "h5_files" / "slideB.h5") as f:
        assert f["coords"][()].tolist() == [[0, 0], [1, 0], [2, 0]] and f.attrs["coords_source"] == "index"
    # the output is a valid CLAM feature folder
    assert FeatureStore(str(tmp_path / "out")).shape("slideB") == (3, 512)
    # a checkpoint gives trained (here: saved) weights and no warning; existing slides are skipped
    import timm

    sd = timm.create_model("resnet18", pretrained=False).state_dict()
    torch.save({"model": sd}, tmp_path / "enc.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = extract_features(dict(args, encoder_checkpoint=str(tmp_path / "enc.pth")))
    assert res["slides_skipped_existing"] == 2 and not res["random_weights"]
    res = extract_features(dict(args, encoder_checkpoint=str(tmp_path / "enc.pth"), overwrite=True, pt_files=True))
    assert res["slides_written"] == 2 and os.path.isfile(tmp_path / "out" / "pt_files" / "slideA.pt")


def test_default_encoder_is_truncated_resnet50(tmp_path):
    encoder, info = build_encoder()
    assert info["feat_dim"] == 1024 and info["random_weights"]
    assert not any(".layer4" in name or name.startswith("layer4") for name, _ in encoder.named_parameters())
    with pytest.raises(UserError, match="encoder 'no_such_model_xyz'"):
        build_encoder("no_such_model_xyz")
    torch.save({"model": {"conv1.weight": torch.zeros(3)}}, tmp_path / "wrong.pth")
    with pytest.raises(UserError, match="does not fit encoder resnet50_trunc: .*missing key"):
        build_encoder(checkpoint=str(tmp_path / "wrong.pth"))


def test_extract_input_errors(tmp_path):
    with pytest.raises(UserError, match="needs --patches DIR and --output DIR"):
        extract_features({"patches": str(tmp_path)})
    with pytest.raises(UserError, match="no such directory"):
        extract_features({"patches": str(tmp_path / "nope"), "output": str(tmp_path / "out")})
    with pytest.raises(UserError, match="no slide folders inside"):
        extract_features({"patches": str(tmp_path), "output": str(tmp_path / "out")})
