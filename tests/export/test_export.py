"""ONNX export (lbmamba.export, `lbmamba export`) and `lbmamba predict`: the standard-op scan against the
reference, exported files against PyTorch in onnxruntime, predictions through both engines, bad input."""

import json

import numpy as np
import onnx
import pytest
import timm
import torch

import lbmamba  # noqa: F401  (registers the models)
from conftest import make_inputs
from lbmamba import cli
from lbmamba.engine import UserError, export_model, predict, train
from lbmamba.export import OnnxModel, export_onnx, graph_stats, quantize_dynamic, read_metadata, selective_scan_onnx
from lbmamba.ops import selective_scan_ref

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- the scan form
@pytest.mark.parametrize("bc", ["variable", "grouped", "constant"])
@pytest.mark.parametrize("window,seqlen", [(1, 37), ("auto", 37), (8, 37), (16, 5), (4, 64)])
def test_the_standard_op_scan_equals_the_reference_in_float64(bc, window, seqlen):
    inputs = make_inputs(2, 8, seqlen, 4, bc=bc, dtype=torch.float64, seed=seqlen)
    want, want_last = selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True, window=window)
    got, got_last = selective_scan_onnx(**inputs, delta_softplus=True, return_last_state=True, window=window)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(got_last, want_last, rtol=1e-10, atol=1e-12)


def test_a_previous_state_enters_as_the_state_before_position_0():
    u, delta, A, B, C, D, z, bias = make_inputs(1, 4, 12, 3, dtype=torch.float64).values()
    whole = selective_scan_ref(u, delta, A, B, C, D, z, bias, True, True, window=1)
    _, state = selective_scan_onnx(u[..., :5], delta[..., :5], A, B[..., :5], C[..., :5], D, z[..., :5], bias, True,
                                   True, window=1)
    rest = selective_scan_onnx(u[..., 5:], delta[..., 5:], A, B[..., 5:], C[..., 5:], D, z[..., 5:], bias, True,
                               window=1, prev_state=state)
    assert torch.allclose(rest, whole[0][..., 5:], rtol=1e-10, atol=1e-12)


def test_the_blocked_scan_gives_the_states_and_decays_with_or_without_log_a():
    """blocked_scan along the positions (axis 1) against a plain loop, for a length that leaves the last block
    short; the decays from exp(CumSum(log a)) equal the per-position products."""
    from lbmamba.export.scan import blocked_scan

    g = torch.Generator().manual_seed(3)
    log_a = -torch.rand(2, 23, 3, 4, generator=g, dtype=torch.float64)
    x = torch.randn(2, 23, 3, 4, generator=g, dtype=torch.float64)
    a = log_a.exp()
    h, p, hs, ps = torch.zeros_like(x[:, 0]), torch.ones_like(x[:, 0]), [], []
    for t in range(23):
        h, p = a[:, t] * h + x[:, t], a[:, t] * p
        hs.append(h)
        ps.append(p)
    for kwargs in ({"log_a": log_a}, {}):
        got_h, got_p = blocked_scan(a, x, 5, **kwargs)
        assert torch.allclose(got_h, torch.stack(hs, 1), rtol=1e-12, atol=1e-14)
        assert torch.allclose(got_p, torch.stack(ps, 1), rtol=1e-12, atol=1e-14)
    assert blocked_scan(a, x, 5, log_a=log_a, decay=False)[1] is None


def test_inside_the_export_block_every_scan_call_is_the_standard_op_form_and_after_it_none():
    """The stand-in is set at selective_scan_fn itself: a layer whose module was imported inside the block, or
    that passes prev_state positionally (MIL's chunked bags), gets it too, and nothing stays switched."""
    import lbmamba.nn.mixer as mixer
    from lbmamba.export import onnx_scan
    from lbmamba.ops import selective_scan_fn

    u, delta, A, B, C, D, z, bias = make_inputs(1, 4, 12, 3).values()
    state = torch.zeros(1, 4, 3)
    with onnx_scan():
        got = selective_scan_fn(u, delta, A, B, C, D, z, bias, True, False, state, window=4)
        with pytest.raises(ValueError, match="selective_scan_onnx: position_offset"):
            selective_scan_fn(u, delta, A, B, C, window=4, position_offset=3)
    assert torch.allclose(got, selective_scan_fn(u, delta, A, B, C, D, z, bias, True, False, state, window=4),
                          rtol=1e-5, atol=1e-6)
    assert mixer.selective_scan_fn is selective_scan_fn
    selective_scan_fn(u, delta, A, B, C, window=4, position_offset=3)  # the real scan again: offsets allowed


# ----------------------------------------------------------------------------------------------- a digits classifier
_DIGITS_CONFIG = {"model": "lbvim_tiny_patch16_224", "model_kwargs": {"embed_dim": 16, "depth": 2, "patch_size": 8},
                  "img_size": 32, "in_chans": 1, "data": "digits"}


def _digit_images(folder, count=6):
    from PIL import Image
    from sklearn.datasets import load_digits

    folder.mkdir()
    digits = load_digits()
    for i in range(count):
        Image.fromarray((digits.images[i] * 255 / 16).astype(np.uint8)).resize((32, 32)).save(folder / f"d{i}.png")
    return folder


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A checkpoint in our format of a tiny digits classifier (random weights: exporting does not need training),
    its verified export, and digit images."""
    folder = tmp_path_factory.mktemp("digits")
    torch.manual_seed(0)
    model = timm.create_model(_DIGITS_CONFIG["model"], num_classes=10, img_size=32, in_chans=1,
                              **_DIGITS_CONFIG["model_kwargs"])
    checkpoint = folder / "best.pth"
    torch.save({"config": _DIGITS_CONFIG, "model": model.state_dict(), "num_classes": 10,
                "class_names": [str(i) for i in range(10)]}, checkpoint)
    threads = torch.get_num_threads()
    try:
        figures = export_model({"checkpoint": str(checkpoint), "output": str(folder / "model.onnx"), "threads": 1})
    finally:
        torch.set_num_threads(threads)
    return {"folder": folder, "checkpoint": checkpoint, "onnx": folder / "model.onnx", "figures": figures,
            "images": _digit_images(folder / "images")}


def test_the_export_holds_standard_ops_its_preprocessing_and_a_dynamic_batch(digits_run):
    figures = digits_run["figures"]
    assert figures["max_rel_error"] <= 1e-4 and figures["checked_batches"] == [1, 3]
    assert set(figures["phases"]) == {"trace", "translate", "optimize", "verify"}
    assert figures["export_seconds"] == pytest.approx(sum(p["wall_s"] for p in figures["phases"].values()), abs=0.05)
    assert 0 < figures["export_cpu_seconds"] and all(p["cpu_s"] >= 0 for p in figures["phases"].values())
    proto = onnx.load(str(digits_run["onnx"]))
    onnx.checker.check_model(proto, full_check=True)
    stats = graph_stats(proto)
    assert stats["domains"] == [""] and not {"Loop", "Scan", "If"} & set(stats["op_types"])
    assert figures["nodes"] == stats["nodes"] < 2000
    meta = read_metadata(str(digits_run["onnx"]))
    assert meta["task"] == "classification" and meta["class_names"] == [str(i) for i in range(10)]
    assert meta["mean"] == [0.5] and meta["std"] == [0.5] and meta["img_size"] == [32, 32] and meta["in_chans"] == 1
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # a named, dynamic batch axis


def test_predict_gives_the_same_classes_through_torch_and_onnxruntime(digits_run, tmp_path, capsys):
    by_torch = predict({"checkpoint": str(digits_run["checkpoint"]), "inputs": str(digits_run["images"]),
                        "output": str(tmp_path / "torch.csv"), "top_k": 3, "threads": 1})
    code = cli.main(["predict", "--checkpoint", str(digits_run["onnx"]), "--inputs", str(digits_run["images"]),
                     "--output", str(tmp_path / "ort.csv"), "--top-k", "3", "--set", "threads=1"])
    assert code == 0
    by_ort = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert by_torch["engine"] == "torch" and by_ort["engine"] == "onnxruntime" and by_ort["images"] == 6
    for a, b in zip(by_torch["predictions"], by_ort["predictions"]):
        assert a["classes"] == b["classes"] and np.allclose(a["scores"], b["scores"], atol=1e-4)
    rows = (tmp_path / "ort.csv").read_text().splitlines()
    assert rows[0] == "image,class_1,score_1,class_2,score_2,class_3,score_3" and len(rows) == 7


def test_dynamic_int8_keeps_the_top1_of_the_fp32_file(digits_run, tmp_path):
    quantized = quantize_dynamic(str(digits_run["onnx"]), str(tmp_path / "int8.onnx"))
    assert quantized["quantized_ops"]["MatMulInteger"] > 0 and quantized["bytes"] < digits_run["onnx"].stat().st_size
    assert graph_stats(onnx.load(str(tmp_path / "int8.onnx")))["domains"] == [""]
    images = np.random.default_rng(0).standard_normal((8, 1, 32, 32), dtype=np.float32)
    fp32, int8 = OnnxModel(str(digits_run["onnx"]), 1)(images), OnnxModel(str(tmp_path / "int8.onnx"), 1)(images)
    assert np.isfinite(int8).all() and np.abs(int8 - fp32).max() < 0.1 * np.abs(fp32).max()


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line_naming_the_problem(digits_run, tmp_path):
    with pytest.raises(UserError, match="unknown model 'lbvim_tinny'"):
        export_model({"model": "lbvim_tinny", "output": str(tmp_path / "m.onnx")})
    with pytest.raises(UserError, match="multiple of .*patch size 8, got 30"):
        export_model({"checkpoint": str(digits_run["checkpoint"]), "img_size": 30, "output": str(tmp_path / "m.onnx")})
    seg = tmp_path / "seg.pth"
    torch.save({"config": {"model": "lbvim_tiny_patch16_224", "neck": "none", "head_channels": 8, "crop_size": 32},
                "model": {}}, seg)
    with pytest.raises(UserError, match="holds a segmentation model .*seg train.*not a classification one"):
        predict({"checkpoint": str(seg), "inputs": str(digits_run["images"])})
    det = tmp_path / "det.pth"
    torch.save({"config": {"model": "lbvim_tiny_patch16_224", "rpn_post_nms_top_n_test": 10},
                "model": {}}, det)
    with pytest.raises(UserError, match="holds a detector, which cannot be exported"):
        export_model({"checkpoint": str(det), "output": str(tmp_path / "m.onnx")})
    with pytest.raises(UserError, match="engine onnxruntime needs an exported .onnx"):
        predict({"checkpoint": str(digits_run["checkpoint"]), "engine": "onnxruntime",
                 "inputs": str(digits_run["images"])})
    with pytest.raises(ValueError, match="optimize must be one of light, full, none, got 'fast'"):
        export_onnx(torch.nn.Identity(), str(tmp_path / "m.onnx"), img_size=(8, 8), in_chans=1, optimize="fast")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_predict_on_a_trained_default_run_gives_the_same_classes_through_both_engines(tmp_path, restore_globals):
    """`lbmamba train` (the digits default, shortened to one epoch of a small model), export, predict twice."""
    run = tmp_path / "run"
    train({"output": str(run), "epochs": 1, "warmup_epochs": 0, "progress": False, "device": "cpu",
           "model_kwargs": {"embed_dim": 16, "depth": 2, "patch_size": 8}, "batch_size": 128, "threads": 1})
    export_model({"checkpoint": str(run / "best.pth"), "output": str(tmp_path / "m.onnx"), "threads": 1})
    images = _digit_images(tmp_path / "images", 10)
    by_torch = predict({"checkpoint": str(run / "best.pth"), "inputs": str(images), "output": str(tmp_path / "t.csv")})
    by_ort = predict({"checkpoint": str(tmp_path / "m.onnx"), "inputs": str(images), "output": str(tmp_path / "o.csv")})
    assert [p["classes"] for p in by_torch["predictions"]] == [p["classes"] for p in by_ort["predictions"]]


@pytest.mark.slow
def test_nothing_is_written_when_onnxruntime_disagrees(tmp_path):
    model = timm.create_model("lbvim_tiny_patch16_224", img_size=16, patch_size=8, embed_dim=16, depth=1,
                              num_classes=3)
    with pytest.raises(Exception, match="above the tolerance 1e-12; nothing written"):
        export_onnx(model, str(tmp_path / "m.onnx"), img_size=(16, 16), in_chans=3, tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- every family
_TINY = {
    "lbvim_tiny_patch16_224": dict(patch_size=8, embed_dim=16, depth=2),
    "vim_tiny_patch16_224": dict(patch_size=8, embed_dim=16, depth=2),
    "uvim_tiny_patch16_224": dict(patch_size=8, embed_dim=16, depth=2),
    "vmamba_tiny_s1l8": dict(depths=(1, 1, 2, 1), dims=8),
    "lb_vmamba_tiny_s1l8": dict(depths=(1, 1, 2, 1), dims=8),
    "localvim_tiny": dict(patch_size=8, embed_dim=16, depth=2),
    "lb_localvim_tiny": dict(patch_size=8, embed_dim=16, depth=2),
    "plainmamba_l1": dict(patch_size=8, embed_dim=16, depth=2),
    "lb_plainmamba_l1": dict(patch_size=8, embed_dim=16, depth=2),
    "adventurer_tiny_patch16_224": dict(patch_size=8, embed_dim=16, depth=2, d_state=8, headdim=8),
    "lb_adventurer_tiny_patch16_224": dict(patch_size=8, embed_dim=16, depth=2, d_state=8, headdim=8),
}
_LB = ["lbvim_tiny_patch16_224", "lb_vmamba_tiny_s1l8", "lb_localvim_tiny", "lb_plainmamba_l1",
       "lb_adventurer_tiny_patch16_224"]
_GRID = ([(name, None) for name in _TINY if name not in _LB]
         + [(name, window) for name in _LB for window in (1, "auto", 8)])


def _export_and_compare(model, path, size):
    figures = export_onnx(model, str(path), img_size=(size, size), in_chans=3, tolerance=1e-4, threads=1)
    runner = OnnxModel(str(path), 1)
    for batch in (2, 5):
        images = torch.randn(batch, 3, size, size)
        with torch.no_grad():
            want = model(images).numpy()
        got = runner(images.numpy())
        assert got.shape == want.shape and np.abs(got - want).max() <= 1e-4 * np.abs(want).max()
    assert graph_stats(onnx.load(str(path)))["domains"] == [""]
    return figures


@pytest.mark.slow
@pytest.mark.parametrize("name,window", _GRID, ids=[f"{n}-w{w}" for n, w in _GRID])
def test_every_family_exports_and_matches_pytorch_at_two_batch_sizes(name, window, tmp_path):
    kwargs = dict(_TINY[name], img_size=64, num_classes=5)
    if window is not None:
        kwargs["window"] = window
    model = timm.create_model(name, **kwargs).eval()
    _export_and_compare(model, tmp_path / "m.onnx", 64)


@pytest.mark.slow
def test_a_segmentor_export_matches_pytorch_logits(tmp_path):
    from lbmamba.models import build_segmentor

    model = build_segmentor("lbvim_tiny_patch16_224", 4, img_size=32, neck="none", head_channels=8, aux_channels=8,
                            backbone_kwargs=dict(patch_size=4, embed_dim=16, depth=4)).eval()
    figures = _export_and_compare(model, tmp_path / "seg.onnx", 32)
    assert figures["max_rel_error"] <= 1e-4
