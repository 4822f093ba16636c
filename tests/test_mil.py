"""LB-MambaMIL: models, CLAM-layout loading, metrics, the digits-bags run, bad input, the `mil` CLI."""

from __future__ import annotations

import csv
import json
import os
import warnings

import h5py
import numpy as np
import pytest
import torch

from lbmamba.data.mil import (
    FeatureStore,
    MILBagDataset,
    make_digits_bags,
    make_folds,
    read_labels,
    read_split_file,
    write_split_file,
)
from lbmamba.engine import UserError
from lbmamba.engine.mil import (
    MILTrainConfig,
    accuracy,
    build_encoder,
    evaluate_mil_checkpoint,
    extract_features,
    macro_f1,
    roc_auc,
    train_mil,
)
from lbmamba.models.mil import MODEL_NAMES, create_mil_model, sr_permutation, sr_reorder, sr_restore

TINY = dict(embed_dim=16, d_state=4, depth=2, attn_dim=8, rate=3)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models are fastest on one thread (and the CPU is shared)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------- models
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shapes_and_gradients(name):
    torch.manual_seed(0)
    model = create_mil_model(name, in_dim=12, num_classes=3, **TINY)
    bag = torch.randn(23, 12)
    logits, scores = model(bag, return_attention=True)
    assert logits.shape == (1, 3) and scores.shape == (1, 23)
    assert model(bag.unsqueeze(0)).shape == (1, 3)
    logits.logsumexp(-1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert model.config["model"] == name
    rebuilt = create_mil_model(**model.config)
    rebuilt.load_state_dict(model.state_dict())


@pytest.mark.parametrize("length,rate", [(1, 3), (7, 3), (10, 5), (23, 10), (9, 1), (4, 10)])
def test_sr_reorder_is_an_inverted_permutation(length, rate):
    perm = sr_permutation(length, rate)
    k = -(-length // rate)
    assert perm.numel() == k * rate
    real = perm[perm >= 0]
    assert sorted(real.tolist()) == list(range(length))  # every position exactly once
    assert (perm < 0).sum() == k * rate - length  # the rest is padding
    # the re-ordered sequence visits position (i * rate + j) at slot (j * k + i)
    expected = [i * rate + j for j in range(rate) for i in range(k)]
    assert perm.tolist() == [p if p < length else -1 for p in expected]
    x = torch.randn(2, 5, length)
    assert torch.equal(sr_restore(sr_reorder(x, rate), rate, length), x)
    assert torch.equal(sr_reorder(x, rate)[..., perm >= 0], x[..., real])


@pytest.mark.parametrize("lb,plain", [("lb", "mamba"), ("lb-srmamba", "srmamba")])
def test_window_one_equals_plain_scan(lb, plain):
    torch.manual_seed(1)
    a = create_mil_model(lb, in_dim=12, window=1, **TINY).eval()
    b = create_mil_model(plain, in_dim=12, **TINY).eval()
    b.load_state_dict(a.state_dict())
    bag = torch.randn(37, 12)
    torch.testing.assert_close(a(bag), b(bag), rtol=1e-5, atol=1e-6)
    # and a real window changes the result
    c = create_mil_model(lb, in_dim=12, window=4, **TINY).eval()
    c.load_state_dict(a.state_dict())
    assert not torch.allclose(c(bag), b(bag), atol=1e-6)


def test_model_input_errors():
    model = create_mil_model("lb", in_dim=12, **TINY)
    with pytest.raises(ValueError, match="12-d"):
        model(torch.randn(5, 10))
    with pytest.raises(ValueError, match="empty bag"):
        model(torch.randn(0, 12))
    with pytest.raises(ValueError, match="model must be one of"):
        create_mil_model("transmil")


def test_timm_registration():
    import timm

    for name in ("mambamil_lb", "mambamil_lb_srmamba", "mambamil_mamba", "mambamil_bimamba", "mambamil_srmamba", "abmil"):
        model = timm.create_model(name, in_dim=8, num_classes=3, embed_dim=16, attn_dim=8)
        assert model(torch.randn(6, 8)).shape == (1, 3)


# ---------------------------------------------------------------------- data
def _write_bag(root, slide, feats, fmt):
    if fmt == "pt":
        os.makedirs(os.path.join(root, "pt_files"), exist_ok=True)
        torch.save(torch.as_tensor(feats), os.path.join(root, "pt_files", slide + ".pt"))
    else:
        os.makedirs(os.path.join(root, "h5_files"), exist_ok=True)
        with h5py.File(os.path.join(root, "h5_files", slide + ".h5"), "w") as f:
            f.create_dataset("features", data=np.asarray(feats, dtype=np.float32))
            f.create_dataset("coords", data=np.stack([np.arange(len(feats)) * 256, np.zeros(len(feats))], 1).astype(np.int32))


def _write_labels(path, rows):
    with open(path, "w", newline="") as handle:
        w = csv.writer(handle)
        w.writerow(["case_id", "slide_id", "label"])
        for s, y in rows:
            w.writerow([s, s, y])


def test_loader_reads_pt_and_h5_and_uneven_splits(tmp_path):
    rng = np.random.default_rng(0)
    bags = {"a": rng.normal(size=(5, 6)), "b": rng.normal(size=(9, 6)), "c": rng.normal(size=(3, 6))}
    _write_bag(tmp_path, "a", bags["a"].astype(np.float32), "pt")
    _write_bag(tmp_path, "b", bags["b"], "h5")
    _write_bag(tmp_path, "c", bags["c"], "h5")
    _write_bag(tmp_path, "c", bags["c"].astype(np.float32), "pt")
    store = FeatureStore(str(tmp_path))
    assert store.path("a")[0] == "pt" and store.path("b")[0] == "h5" and store.path("c")[0] == "pt"
    assert store.shape("b") == (9, 6)
    ds = MILBagDataset(store, ["a", "b", "c"], [0, 1, 0])
    for i, s in enumerate("abc"):
        feats, label, slide = ds[i]
        assert slide == s and feats.dtype == torch.float32
        np.testing.assert_allclose(feats.numpy(), bags[s], rtol=1e-6)
    assert store.coords("b").shape == (9, 2) and store.coords("a") is None
    # sub-sampling keeps a sorted subset
    sub = MILBagDataset(store, ["b"], [1], max_instances=4)
    feats, _, _ = sub[0]
    rows = [int(np.argmin(np.abs(bags["b"] - r.numpy()).sum(1))) for r in feats]
    assert len(rows) == 4 and rows == sorted(set(rows))

    # CLAM-style split file: an unnamed index column, columns of different lengths, blank cells
    split_csv = tmp_path / "splits_0.csv"
    split_csv.write_text(",train,val,test\n0,a,b,c\n1,x,,\n2,y,,\n")
    assert read_split_file(str(split_csv)) == {"train": ["a", "x", "y"], "val": ["b"], "test": ["c"]}
    write_split_file(str(tmp_path / "splits_1.csv"), {"train": ["p", "q", "r"], "val": [], "test": ["s"]})
    assert read_split_file(str(tmp_path / "splits_1.csv")) == {"train": ["p", "q", "r"], "val": [], "test": ["s"]}

    labels_csv = tmp_path / "labels.csv"
    _write_labels(labels_csv, [("s1", "LUSC"), ("s2", "LUAD"), ("s3", "LUSC")])
    table = read_labels(str(labels_csv))
    assert table.class_names == ["LUAD", "LUSC"] and table.labels == [1, 0, 1]
    _write_labels(labels_csv, [("s1", "10"), ("s2", "2"), ("s3", "0")])
    assert read_labels(str(labels_csv)).class_names == ["0", "2", "10"]


def test_make_folds_is_stratified_and_disjoint():
    ids = [f"s{i}" for i in range(23)]
    labels = [i % 3 == 0 for i in range(23)]
    folds = make_folds(ids, [int(y) for y in labels], 5, seed=3)
    assert sorted(s for f in folds for s in f["test"]) == sorted(ids)
    for f in folds:
        assert not set(f["train"]) & set(f["val"]) and not set(f["train"]) & set(f["test"])
        assert sorted(f["train"] + f["val"] + f["test"]) == sorted(ids)
        assert len({int(s[1:]) % 3 == 0 for s in f["train"]}) == 2


# ---------------------------------------------------------------------- metrics
def test_metrics_agree_with_sklearn():
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 60))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        score = np.round(rng.random(n), 1)  # ties
        probs = np.stack([1 - score, score], 1)
        assert roc_auc(y, probs) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
        c = int(rng.integers(3, 6))
        y = rng.integers(0, c, n)
        y[:c] = np.arange(c)
        logits = rng.normal(size=(n, c)).round(1)
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        assert roc_auc(y, probs) == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-12)
        pred = rng.integers(0, c - 1, n)  # the last class is never predicted
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert macro_f1(y, pred) == pytest.approx(f1_score(y, pred, average="macro"), abs=1e-12)
        assert accuracy(y, pred) == pytest.approx(accuracy_score(y, pred))
    assert np.isnan(roc_auc([1, 1, 1], np.array([[0.2, 0.8]] * 3)))


# ---------------------------------------------------------------------- the digits-bags run
def test_digits_bags_reach_auc(tmp_path):
    """The shipped digits-bags data set (5 parts of 80 bags) and model, two folds on a short schedule."""
    paths = make_digits_bags(str(tmp_path / "digits"), seed=0)
    assert os.path.isdir(tmp_path / "digits" / "h5_files")
    cfg = MILTrainConfig(
        features=paths["features"], labels=paths["labels"], splits=paths["splits"], fold_indices=[0, 1], model="lb",
        depth=2, embed_dim=64, drop_rate=0.25, lr=5e-4, epochs=6, patience=2, min_epochs=3,
        out=str(tmp_path / "run"), progress=False, device="cpu",
    )
    summary = train_mil(cfg)
    assert summary["folds"] == 2 and summary["classes"] == ["negative", "positive"]
    assert summary["auc_mean"] >= 0.9, summary
    files = sorted(os.listdir(tmp_path / "run"))
    assert files == ["fold_0.pt", "fold_1.pt", "summary.csv"]  # no temp files left behind
    rows = list(csv.reader(open(tmp_path / "run" / "summary.csv")))
    assert [r[0] for r in rows[1:]] == ["0", "1", "mean", "std", "mean±std"]
    ckpt = torch.load(tmp_path / "run" / "fold_0.pt", weights_only=True)
    assert ckpt["config"]["model"] == "lb" and ckpt["class_names"] == ["negative", "positive"]
    res = evaluate_mil_checkpoint(str(tmp_path / "run" / "fold_0.pt"), paths["features"], paths["labels"],
                                  paths["splits"], fold=0, split="test", device="cpu", progress=False)
    assert res["auc"] == pytest.approx(summary["per_fold"][0]["auc"])
    assert res["n"] == 80


# ---------------------------------------------------------------------- bad input
@pytest.fixture
def tiny_data(tmp_path):
    """8 slides (4 per class) of 4-d features, h5 layout, and a labels CSV."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        y = i % 2
        _write_bag(tmp_path / "feats", f"s{i}", rng.normal(size=(int(rng.integers(3, 7)), 4)) + y, "h5")
        rows.append((f"s{i}", ["benign", "tumor"][y]))
    _write_labels(tmp_path / "labels.csv", rows)
    return tmp_path


def _cfg(tmp_path, **kw):
    base = dict(features=str(tmp_path / "feats"), labels=str(tmp_path / "labels.csv"), folds=4, model="abmil",
                embed_dim=8, epochs=1, patience=1, min_epochs=1, out=str(tmp_path / "run"), progress=False, device="cpu")
    base.update(kw)
    return MILTrainConfig(**base)


def test_missing_feature_files(tiny_data):
    _write_labels(tiny_data / "labels.csv", [(f"s{i}", ["benign", "tumor"][i % 2]) for i in range(8)]
                  + [("ghost1", "tumor"), ("ghost2", "benign")])
    with pytest.raises(UserError, match=r"2 slide\(s\).*no feature file.*ghost1, ghost2.*--skip-missing"):
        train_mil(_cfg(tiny_data))
    with pytest.warns(UserWarning, match="leaving out 2"):
        summary = train_mil(_cfg(tiny_data, skip_missing=True))
    assert summary["skipped_missing"] == 2 and summary["folds"] == 4


def test_feature_dimension_mismatch(tiny_data):
    _write_bag(tiny_data / "feats", "s3", np.ones((4, 5)), "h5")
    with pytest.raises(UserError, match="feature dimension differs between bags.*4-d.*5-d.*s3"):
        train_mil(_cfg(tiny_data))


def test_feature_dimension_vs_model(tiny_data):
    summary = train_mil(_cfg(tiny_data, fold_indices=[0]))
    ckpt = os.path.join(summary["out_dir"], "fold_0.pt")
    for i in range(8):
        _write_bag(tiny_data / "other", f"s{i}", np.ones((3, 6)), "pt")
    with pytest.raises(UserError, match="model expects 4-d.*6-d"):
        evaluate_mil_checkpoint(ckpt, str(tiny_data / "other"), str(tiny_data / "labels.csv"), device="cpu", progress=False)


def test_empty_bag(tiny_data):
    _write_bag(tiny_data / "feats", "s5", np.zeros((0, 4)), "h5")
    with pytest.raises(UserError, match=r"1 empty bag\(s\).*s5"):
        train_mil(_cfg(tiny_data))


def test_single_class_training_split(tiny_data):
    split_dir = tiny_data / "splits"
    write_split_file(str(split_dir / "splits_0.csv"), {"train": ["s0", "s2", "s4"], "val": ["s6", "s1"], "test": ["s3", "s5", "s7"]})
    with pytest.raises(UserError, match=r"fold 0: the training split has only one class \('benign'"):
        train_mil(_cfg(tiny_data, splits=str(split_dir), folds=None))


def test_unlabelled_split_slides_and_bad_csv(tiny_data):
    write_split_file(str(tiny_data / "splits" / "splits_0.csv"), {"train": ["s0", "s1", "nope"], "val": ["s2"], "test": ["s3"]})
    with pytest.raises(UserError, match="not in .*labels.csv: nope"):
        train_mil(_cfg(tiny_data, splits=str(tiny_data / "splits"), folds=None))
    (tiny_data / "bad.csv").write_text("slide,label\ns0,a\n")
    with pytest.raises(UserError, match="needs a 'slide_id' column"):
        train_mil(_cfg(tiny_data, labels=str(tiny_data / "bad.csv")))


# ---------------------------------------------------------------------- the CLI
def _cli(argv, capsys):
    from lbmamba.cli import main

    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_train_eval_and_clean_errors(tiny_data, capsys):
    code, out, err = _cli(["mil", "train", "--features", str(tiny_data / "feats"), "--labels", str(tiny_data / "labels.csv"),
                           "--folds", "4", "--fold-indices", "1", "--model", "lb", "--embed-dim", "8", "--layers", "1",
                           "--epochs", "2", "--min-epochs", "1", "--out", str(tiny_data / "cli"), "--no-progress",
                           "--device", "cpu"], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["command"] == "mil train" and summary["model"] == "lb" and summary["folds"] == 1
    assert os.path.isfile(tiny_data / "cli" / "splits" / "splits_1.csv")
    code, out, err = _cli(["mil", "eval", "--checkpoint", str(tiny_data / "cli" / "fold_1.pt"), "--features",
                           str(tiny_data / "feats"), "--labels", str(tiny_data / "labels.csv"), "--splits",
                           str(tiny_data / "cli" / "splits"), "--fold", "1", "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["command"] == "mil eval" and res["n"] == 2 and res["split"] == "test"
    code, out, err = _cli(["mil", "train", "--features", str(tiny_data / "nowhere"), "--labels",
                           str(tiny_data / "labels.csv"), "--no-progress"], capsys)
    assert code == 1 and "lbmamba mil train: error: --features: no such directory" in err and "Traceback" not in err


# ---------------------------------------------------------------------- extraction
def _write_patches(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for slide, names in {"slideA": ["512_0.png", "0_256.png", "0_0.png"], "slideB": ["p1.jpg", "p10.jpg", "p2.jpg"]}.items():
        os.makedirs(root / slide, exist_ok=True)
        for n in names:
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / slide / n)


def test_extract_h5_with_coords(tmp_path):
    _write_patches(tmp_path / "patches")
    with pytest.warns(UserWarning, match="RANDOM weights"):
        res = extract_features(str(tmp_path / "patches"), str(tmp_path / "out"), encoder="resnet18", batch_size=2,
                               device="cpu", progress=False)
    assert res["slides_written"] == 2 and res["feat_dim"] == 512 and res["random_weights"]
    with h5py.File(tmp_path / "out" / "h5_files" / "slideA.h5") as f:
        assert f["features"].shape == (3, 512) and f["features"].dtype == np.float32
        assert f["coords"][()].tolist() == [[0, 0], [512, 0], [0, 256]]  # row by row
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
        res = extract_features(str(tmp_path / "patches"), str(tmp_path / "out"), encoder="resnet18",
                               encoder_checkpoint=str(tmp_path / "enc.pth"), device="cpu", progress=False)
    assert res["slides_skipped_existing"] == 2 and not res["random_weights"]


def test_default_encoder_is_truncated_resnet50():
    encoder, info = build_encoder()
    assert info["feat_dim"] == 1024 and info["random_weights"]
    assert not any(name.startswith("net.layer4") or name.startswith("0.net.layer4") for name, _ in encoder.named_parameters())
    with pytest.raises(UserError, match="--encoder"):
        build_encoder("no_such_model_xyz")
