"""Whole-slide bags in the CLAM layout: feature files, labels, split files, folds, the digits-bags set."""

import numpy as np
import pytest
import torch

from conftest import write_bag, write_labels
from lbmamba.data.mil import (
    FeatureStore,
    MILBagDataset,
    MILInputError,
    digits_bags,
    make_folds,
    read_labels,
    read_split_file,
)


def test_loader_reads_pt_and_h5_and_uneven_splits(tmp_path):
    rng = np.random.default_rng(0)
    bags = {"a": rng.normal(size=(5, 6)), "b": rng.normal(size=(9, 6)), "c": rng.normal(size=(3, 6))}
    write_bag(tmp_path, "a", bags["a"].astype(np.float32), "pt")
    write_bag(tmp_path, "b", bags["b"], "h5")
    write_bag(tmp_path, "c", bags["c"], "h5")
    write_bag(tmp_path, "c", bags["c"].astype(np.float32), "pt")
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


def test_split_files_and_labels(tmp_path):
    # CLAM-style split file: an unnamed index column, columns of different lengths, blank cells
    split_csv = tmp_path / "splits_0.csv"
    split_csv.write_text(",train,val,test\n0,a,b,c\n1,x,,\n2,y,,\n")
    assert read_split_file(str(split_csv)) == {"train": ["a", "x", "y"], "val": ["b"], "test": ["c"]}
    from lbmamba.engine.mil import write_split_file

    write_split_file(str(tmp_path / "splits_1.csv"), {"train": ["p", "q", "r"], "val": [], "test": ["s"]})
    assert read_split_file(str(tmp_path / "splits_1.csv")) == {"train": ["p", "q", "r"], "val": [], "test": ["s"]}
    labels_csv = tmp_path / "labels.csv"
    write_labels(labels_csv, [("s1", "LUSC"), ("s2", "LUAD"), ("s3", "LUSC")])
    table = read_labels(str(labels_csv))
    assert table.class_names == ["LUAD", "LUSC"] and table.labels == [1, 0, 1]
    write_labels(labels_csv, [("s1", "10"), ("s2", "2"), ("s3", "0")])
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


def test_digits_bags_are_deterministic_and_disjoint():
    a, b = digits_bags(folds=3, bags_per_fold=10, seed=1), digits_bags(folds=3, bags_per_fold=10, seed=1)
    assert a.labels == b.labels and all(np.array_equal(a.features[s], b.features[s]) for s in a.features)
    assert len(a.features) == 30 and set(a.labels.values()) == {"positive", "negative"}
    for split in a.splits:
        assert len(split["test"]) == len(split["val"]) == 10 and not set(split["train"]) & set(split["test"])
        assert all(8 <= len(a.features[s]) <= 32 and a.features[s].shape[1] == 64 for s in split["test"])
    with pytest.raises(MILInputError, match="folds must be an int >= 3"):
        digits_bags(folds=2)
