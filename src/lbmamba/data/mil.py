"""Whole-slide-image bags in the CLAM layout, loaded lazily; split files; the digits-bags data set (made in
memory; `lbmamba.engine.mil` writes it in this layout).

On disk (CLAM's layout, see docs/mil.md):

    FEATURES/pt_files/<slide_id>.pt   a float tensor (n_patches, feat_dim), and/or
    FEATURES/h5_files/<slide_id>.h5   datasets `features` (n_patches, feat_dim), `coords` (n_patches, 2)
    labels.csv                        at least `slide_id,label` (labels may be strings)
    SPLITS/splits_<k>.csv             columns train,val,test of slide ids, of different lengths

`FEATURES` may also be a folder of .pt / .h5 files itself, or TRIDENT's output: a folder holding one
`features_<encoder>/` (`<slide_id>.h5` with `features` and `coords`), directly or one level down (e.g. the job
folder with `20x_256px_0px_overlap/features_uni_v1/`). A bag is read only when it is asked for
(`MILBagDataset.__getitem__` opens the file; h5 bags are sliced, .pt bags memory-mapped), so data sets
of thousands of 100k x 1024 bags need no more memory than one bag.

Bad input raises `MILInputError` (a `DataError`) with a message that names the file, slide or column.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, WeightedRandomSampler

from .images import DataError, same_spelling_groups

__all__ = [
    "MILInputError",
    "FeatureStore",
    "MILBagDataset",
    "LabelTable",
    "read_labels",
    "read_split_file",
    "find_split_files",
    "make_folds",
    "inspect_bags",
    "balanced_sampler",
    "collate_bag",
    "DigitsBags",
    "digits_bags",
    "SPLIT_COLUMNS",
]

SPLIT_COLUMNS = ("train", "val", "test")
_LIST_AT_MOST = 10


class MILInputError(DataError):
    """Bad MIL input: a missing file or column, a slide without features, mismatched dimensions..."""


def _some(items: Sequence, limit: int = _LIST_AT_MOST) -> str:
    items = list(items)
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ---------------------------------------------------------------------- labels
@dataclass
class LabelTable:
    """The labels CSV: slide ids in file order, their class indices, and the class names (sorted)."""

    slide_ids: List[str]
    labels: List[int]
    class_names: List[str]

    def as_dict(self) -> Dict[str, int]:
        return dict(zip(self.slide_ids, self.labels))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _sort_class_names(names) -> List[str]:
    """Sorted numerically when every name is an integer ("0", "1", "10"), else as strings."""
    names = sorted(set(names))
    try:
        return sorted(names, key=lambda s: (int(s), s))
    except ValueError:
        return names


def read_labels(path: str, class_names: Optional[Sequence[str]] = None, merge_spellings: bool = False) -> LabelTable:
    """Read a CSV with `slide_id` and `label` columns (other columns ignored).

    Labels are mapped to 0..C-1 in sorted order (numeric order when all labels are integers), unless
    `class_names` is given (e.g. from a checkpoint): then labels must be among them.
    A slide listed twice with different labels is an error; identical repeats are merged. Labels that
    differ only in letter case or spaces ("Positive" / "positive") are an error naming both spellings, or with
    `merge_spellings` one class under the spelling most slides use (said on stderr).
    """
    if not os.path.isfile(path):
        raise MILInputError(f"--labels: no such file: {path}")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        for need in ("slide_id", "label"):
            if need not in fields:
                raise MILInputError(f"--labels {path}: needs a '{need}' column; found columns {fields}")
        rows = []
        for row in reader:
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            if not row.get("slide_id"):
                continue
            rows.append((row["slide_id"], row.get("label", "")))
    if not rows:
        raise MILInputError(f"--labels {path}: no slides listed")
    unlabeled = [s for s, lab in rows if lab == ""]
    if unlabeled:
        raise MILInputError(f"--labels {path}: {len(unlabeled)} slide(s) without a label: {_some(unlabeled)}")
    groups = same_spelling_groups(lab for _, lab in rows)
    if groups and not merge_spellings:
        counts = {lab: sum(1 for _, x in rows if x == lab) for g in groups for lab in g}
        shown = "; ".join(" and ".join(f"{lab!r} ({counts[lab]} slide{'s' if counts[lab] != 1 else ''})" for lab in g)
                          for g in groups[:5])
        raise MILInputError(f"--labels {path}: labels that differ only in letter case or spaces: {shown}; fix the "
                            "CSV, or set merge_label_spellings=true to count each group as one class")
    if groups:
        rename = {}
        for g in groups:
            keep = max(g, key=lambda lab: (sum(1 for _, x in rows if x == lab), [-ord(c) for c in lab]))
            rename.update({lab: keep for lab in g if lab != keep})
            print(f"note: --labels {path}: merged the labels {', '.join(repr(x) for x in g if x != keep)} into "
                  f"{keep!r}", file=sys.stderr, flush=True)
        rows = [(s, rename.get(lab, lab)) for s, lab in rows]
    seen: Dict[str, str] = {}
    order: List[str] = []
    conflicts = []
    for slide, lab in rows:
        if slide in seen:
            if seen[slide] != lab:
                conflicts.append(f"{slide} ({seen[slide]!r} vs {lab!r})")
            continue
        seen[slide] = lab
        order.append(slide)
    if conflicts:
        raise MILInputError(f"--labels {path}: slide(s) listed with different labels: {_some(conflicts)}")
    if class_names is None:
        class_names = _sort_class_names(seen.values())
    else:
        class_names = [str(c) for c in class_names]
        unknown = sorted(set(seen.values()) - set(class_names))
        if unknown:
            raise MILInputError(
                f"--labels {path}: label(s) {unknown} are not among the model's classes {class_names}"
            )
    index = {name: i for i, name in enumerate(class_names)}
    return LabelTable(order, [index[seen[s]] for s in order], list(class_names))


# ---------------------------------------------------------------------- splits
def read_split_file(path: str) -> Dict[str, List[str]]:
    """`splits_k.csv` -> {"train": [...], "val": [...], "test": [...]}; blank cells are skipped.

    Extra columns (CLAM writes an unnamed index column) are ignored; a missing column is an error.
    """
    if not os.path.isfile(path):
        raise MILInputError(f"no such split file: {path}")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        fields = [(f or "").strip() for f in (reader.fieldnames or [])]
        missing = [c for c in SPLIT_COLUMNS if c not in fields]
        if missing:
            raise MILInputError(f"split file {path}: missing column(s) {missing}; found {fields}")
        out: Dict[str, List[str]] = {c: [] for c in SPLIT_COLUMNS}
        for row in reader:
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items() if k is not None}
            for c in SPLIT_COLUMNS:
                if row.get(c):
                    out[c].append(row[c])
    for c in SPLIT_COLUMNS:  # keep the first occurrence of repeats
        out[c] = list(dict.fromkeys(out[c]))
    return out


def find_split_files(directory: str) -> Dict[int, str]:
    """{k: path} for every `splits_<k>.csv` in `directory` (not CLAM's `_bool` / `_descriptor` files)."""
    if not os.path.isdir(directory):
        raise MILInputError(f"--splits: no such directory: {directory}")
    found = {}
    for name in os.listdir(directory):
        m = re.fullmatch(r"splits_(\d+)\.csv", name)
        if m:
            found[int(m.group(1))] = os.path.join(directory, name)
    if not found:
        raise MILInputError(f"--splits {directory}: no splits_<k>.csv files there")
    return dict(sorted(found.items()))


def make_folds(slide_ids: Sequence[str], labels: Sequence[int], k: int, seed: int = 0) -> List[Dict[str, List[str]]]:
    """Stratified k-fold splits: fold i tests on part i, validates on part i+1 (mod k), trains on the rest.

    Every class is dealt round-robin over the k parts after a seeded shuffle, so parts differ in size by
    at most one slide per class.
    """
    if not isinstance(k, int) or k < 3:
        raise MILInputError(f"--folds must be an int >= 3 (test, val and train parts), got {k!r}")
    if len(slide_ids) < k:
        raise MILInputError(f"--folds {k}: needs at least {k} slides, got {len(slide_ids)}")
    rng = np.random.default_rng(seed)
    parts: List[List[str]] = [[] for _ in range(k)]
    offset = 0
    for cls in sorted(set(labels)):
        members = [s for s, y in zip(slide_ids, labels) if y == cls]
        rng.shuffle(members)
        for j, s in enumerate(members):
            parts[(offset + j) % k].append(s)
        offset += len(members)  # start the next class where this one stopped: balanced part sizes
    folds = []
    for i in range(k):
        test, val = parts[i], parts[(i + 1) % k]
        train = [s for j in range(k) if j not in (i, (i + 1) % k) for s in parts[j]]
        folds.append({"train": sorted(train), "val": sorted(val), "test": sorted(test)})
    return folds


# ---------------------------------------------------------------------- features on disk
class FeatureStore:
    """Where each slide's features live: `root/pt_files/<id>.pt`, `root/h5_files/<id>.h5`, or files in root.

    Args:
        root: the feature directory.
        prefer: "pt" or "h5" when a slide has both (default "pt", as CLAM trains from pt_files).
    """

    def __init__(self, root: str, prefer: str = "pt"):
        if not os.path.isdir(root):
            raise MILInputError(f"--features: no such directory: {root}")
        if prefer not in ("pt", "h5"):
            raise ValueError(f"prefer must be 'pt' or 'h5', got {prefer!r}")
        self.root = root
        self.prefer = prefer
        self._files: Dict[str, Dict[str, str]] = {}
        folders = [(os.path.join(root, "pt_files"), ".pt"), (os.path.join(root, "h5_files"), ".h5"), (root, ".pt"),
                   (root, ".h5")]
        for folder, ext in folders:
            if not os.path.isdir(folder):
                continue
            for name in os.listdir(folder):
                if name.endswith(ext) and not name.startswith("."):
                    self._files.setdefault(name[: -len(ext)], {}).setdefault(ext[1:], os.path.join(folder, name))
        if not self._files:
            trident = _trident_feature_dirs(root)
            if len(trident) > 1:
                raise MILInputError(f"--features {root}: several TRIDENT feature folders; give one of "
                                    f"{_some(trident)}")
            if trident:  # TRIDENT: <job>/<mag>x_<size>px_<overlap>px_overlap/features_<encoder>/<slide>.h5
                self.root = trident[0]
                for folder, ext in ((os.path.join(trident[0], "pt_files"), ".pt"), (trident[0], ".h5")):
                    if os.path.isdir(folder):
                        for name in os.listdir(folder):
                            if name.endswith(ext) and not name.startswith("."):
                                self._files.setdefault(name[: -len(ext)], {}).setdefault(
                                    ext[1:], os.path.join(folder, name))
        if not self._files:
            raise MILInputError(
                f"--features {root}: no feature files found (expected pt_files/<slide_id>.pt or "
                "h5_files/<slide_id>.h5, or TRIDENT's features_<encoder>/<slide_id>.h5)"
            )

    def __contains__(self, slide_id: str) -> bool:
        return slide_id in self._files

    def slide_ids(self) -> List[str]:
        return sorted(self._files)

    def missing(self, slide_ids: Sequence[str]) -> List[str]:
        return [s for s in slide_ids if s not in self._files]

    def unreadable(self, slide_ids: Sequence[str]) -> Dict[str, str]:
        """{slide: why} for the slides among `slide_ids` whose feature file cannot be read (missing ones aside)."""
        out = {}
        for s in slide_ids:
            if s in self._files:
                try:
                    self.shape(s)
                except MILInputError as exc:
                    out[s] = str(exc)
        return out

    def path(self, slide_id: str) -> Tuple[str, str]:
        """(format, path) of the slide's feature file."""
        entry = self._files.get(slide_id)
        if entry is None:
            raise MILInputError(f"slide {slide_id!r} has no feature file under {self.root}")
        fmt = self.prefer if self.prefer in entry else next(iter(entry))
        return fmt, entry[fmt]

    @staticmethod
    def _load_pt(path: str) -> torch.Tensor:
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise MILInputError(f"cannot read feature file {path}: {type(exc).__name__}: {exc}") from exc
        if isinstance(obj, Mapping):
            obj = obj.get("features", obj.get("feats"))
        if not isinstance(obj, torch.Tensor):
            raise MILInputError(f"feature file {path}: expected a tensor (n_patches, feat_dim), "
                                f"got {type(obj).__name__}")
        return obj

    def shape(self, slide_id: str) -> Tuple[int, ...]:
        """The feature array's shape, read without loading the features."""
        fmt, path = self.path(slide_id)
        if fmt == "pt":
            return tuple(self._load_pt(path).shape)
        import h5py

        try:
            with h5py.File(path, "r") as f:
                if "features" not in f:
                    raise MILInputError(f"feature file {path}: no 'features' dataset (found {sorted(f.keys())})")
                return tuple(f["features"].shape)
        except OSError as exc:
            raise MILInputError(f"cannot read feature file {path}: {exc}") from exc

    def load(self, slide_id: str, indices: Optional[np.ndarray] = None) -> torch.Tensor:
        """Features (n, feat_dim) as float32; `indices` (sorted, unique) selects rows."""
        fmt, path = self.path(slide_id)
        if fmt == "pt":
            feats = self._load_pt(path)
            if indices is not None:
                feats = feats[torch.as_tensor(indices, dtype=torch.long)]
            feats = feats.to(torch.float32).clone()
        else:
            import h5py

            with h5py.File(path, "r") as f:
                if "features" not in f:
                    raise MILInputError(f"feature file {path}: no 'features' dataset (found {sorted(f.keys())})")
                ds = f["features"]
                if indices is None:
                    arr = ds[()]
                elif len(indices) * 4 > ds.shape[0]:  # a big share: one contiguous read is faster
                    arr = ds[()][indices]
                else:
                    arr = ds[np.asarray(indices, dtype=np.int64)]
            feats = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if feats.dim() != 2:
            raise MILInputError(f"feature file {path}: expected (n_patches, feat_dim), got shape {tuple(feats.shape)}")
        return feats

    def coords(self, slide_id: str) -> Optional[torch.Tensor]:
        """The h5 file's `coords` (n, 2), or None (pt files carry none)."""
        self.path(slide_id)  # raises for an unknown slide
        h5 = self._files[slide_id].get("h5")
        if h5 is None:
            return None
        import h5py

        with h5py.File(h5, "r") as f:
            return torch.from_numpy(np.asarray(f["coords"][()])) if "coords" in f else None


def _trident_feature_dirs(root: str) -> List[str]:
    """The `features_<encoder>` folders holding .h5 files in `root` or one level down (TRIDENT's job folder)."""
    found = []
    for parent in [root] + sorted(os.path.join(root, d) for d in os.listdir(root)):
        if not os.path.isdir(parent):
            continue
        for name in sorted(os.listdir(parent)):
            path = os.path.join(parent, name)
            if name.startswith("features_") and os.path.isdir(path):
                if any(f.endswith(".h5") for f in os.listdir(path)):
                    found.append(path)
    return found


def inspect_bags(store: FeatureStore, slide_ids: Sequence[str],
                 expected_dim: Optional[int] = None) -> Dict[str, Tuple[int, int]]:
    """{slide: (n_instances, feat_dim)}; raises MILInputError on empty bags, bad shapes, mixed dimensions
    or (with `expected_dim`) a dimension that does not fit the model."""
    shapes = {s: store.shape(s) for s in slide_ids}
    bad = [f"{s} {shape}" for s, shape in shapes.items() if len(shape) != 2]
    if bad:
        raise MILInputError(f"feature arrays must be 2-d (n_patches, feat_dim); got {_some(bad)}")
    empty = [s for s, shape in shapes.items() if shape[0] == 0]
    if empty:
        raise MILInputError(f"{len(empty)} empty bag(s) (0 patches): {_some(empty)}")
    by_dim: Dict[int, List[str]] = {}
    for s, shape in shapes.items():
        by_dim.setdefault(int(shape[1]), []).append(s)
    if len(by_dim) > 1:
        detail = "; ".join(f"{d}-d: {len(v)} slide(s), e.g. {_some(v, 3)}" for d, v in sorted(by_dim.items()))
        raise MILInputError(f"feature dimension differs between bags ({detail})")
    if expected_dim is not None and by_dim and next(iter(by_dim)) != expected_dim:
        d = next(iter(by_dim))
        raise MILInputError(f"the model expects {expected_dim}-d instance features, the bags have {d}-d features")
    return {s: (int(shape[0]), int(shape[1])) for s, shape in shapes.items()}


# ---------------------------------------------------------------------- the data set
class MILBagDataset(Dataset):
    """Bags of one split: item i is (features (n, feat_dim) float32, label (int64 scalar), slide_id).

    Args:
        store: where the features are.  slide_ids, labels: the bags and their class indices.
        max_instances: if set, a bag with more instances is randomly sub-sampled to this many (kept in
            their original order, which a sequence model sees); use for training only.
        expected_dim: the feature dimension every bag must have (checked when a bag is read).
        shapes: {slide: (n, feat_dim)} from `inspect_bags`, to skip re-reading shapes when sub-sampling.
    """

    def __init__(
        self,
        store: FeatureStore,
        slide_ids: Sequence[str],
        labels: Sequence[int],
        max_instances: Optional[int] = None,
        expected_dim: Optional[int] = None,
        shapes: Optional[Mapping[str, Tuple[int, int]]] = None,
    ):
        if len(slide_ids) != len(labels):
            raise ValueError("slide_ids and labels must have the same length")
        if max_instances is not None and max_instances < 1:
            raise MILInputError(f"--max-instances must be a positive int, got {max_instances}")
        self.store = store
        self.slide_ids = list(slide_ids)
        self.labels = [int(y) for y in labels]
        self.max_instances = max_instances
        self.expected_dim = expected_dim
        self.shapes = dict(shapes or {})

    def __len__(self) -> int:
        return len(self.slide_ids)

    def __getitem__(self, i: int):
        slide = self.slide_ids[i]
        indices = None
        if self.max_instances is not None:
            n = self.shapes[slide][0] if slide in self.shapes else self.store.shape(slide)[0]
            if n > self.max_instances:
                pick = torch.randperm(n)[: self.max_instances]
                indices = np.sort(pick.numpy())
        feats = self.store.load(slide, indices)
        if feats.shape[0] == 0:
            raise MILInputError(f"slide {slide!r}: empty bag (0 patches)")
        if self.expected_dim is not None and feats.shape[1] != self.expected_dim:
            raise MILInputError(
                f"slide {slide!r}: {feats.shape[1]}-d features, the model expects {self.expected_dim}-d"
            )
        bad = int((~torch.isfinite(feats)).sum())
        if bad:  # checked here, where the bag is read, so that a NaN loss never has to be explained
            raise MILInputError(f"slide {slide!r}: its features hold {bad} NaN / infinite value(s) "
                                f"({self.store.path(slide)[1]}); fix the file or leave the slide out")
        return feats, torch.tensor(self.labels[i], dtype=torch.long), slide


def collate_bag(batch):
    """DataLoader collate for batch_size=1: the single (features, label, slide_id) item unchanged."""
    if len(batch) != 1:
        raise ValueError("MIL bags are loaded one at a time (batch_size=1)")
    return batch[0]


def balanced_sampler(labels: Sequence[int], generator: Optional[torch.Generator] = None) -> WeightedRandomSampler:
    """Class-balanced sampling with replacement: each bag weighted by 1 / (its class's count)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    weights = 1.0 / counts[labels]
    return WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(labels), replacement=True,
                                 generator=generator)


# ---------------------------------------------------------------------- the digits-bags data set
@dataclass
class DigitsBags:
    """A MIL data set made from scikit-learn's digits: bags, their labels, and k-fold splits."""

    features: Dict[str, np.ndarray]  # slide id -> (n_instances, 64) float32
    labels: Dict[str, str]  # slide id -> "positive" | "negative"
    splits: List[Dict[str, List[str]]]  # fold k -> {"train", "val", "test"} slide ids


def digits_bags(
    folds: int = 5,
    bags_per_fold: int = 80,
    min_instances: int = 8,
    max_instances: int = 32,
    target: int = 9,
    positive_fraction: float = 0.5,
    seed: int = 0,
) -> DigitsBags:
    """A MIL data set from scikit-learn's bundled 8x8 digits (the same for the same arguments).

    A bag holds 8 to 32 digit images (instance features: the 64 pixel values, standardised per pixel); it
    is positive iff it holds at least one `target` digit (9). The digit images are divided into `folds`
    disjoint pools and the bags of part k are drawn from pool k only; split k tests on part k, validates
    on part k+1 and trains on the rest, so no image is shared across train / val / test.
    """
    from sklearn.datasets import load_digits

    if not isinstance(folds, int) or folds < 3:
        raise MILInputError(f"folds must be an int >= 3 (test, val and train parts), got {folds!r}")
    digits = load_digits()
    pixels = digits.data / 16.0
    # per-pixel standardisation (label-free statistics of all 1797 images; +0.1 keeps rare pixels bounded)
    data = ((pixels - pixels.mean(0)) / (pixels.std(0) + 0.1)).astype(np.float32)
    target_arr = digits.target
    rng = np.random.default_rng(seed)
    pools = np.array_split(rng.permutation(len(data)), folds)
    features: Dict[str, np.ndarray] = {}
    labels: Dict[str, str] = {}
    parts: List[List[str]] = [[] for _ in range(folds)]
    for k, pool in enumerate(pools):
        pos_pool = pool[target_arr[pool] == target]
        neg_pool = pool[target_arr[pool] != target]
        for b in range(bags_per_fold):
            n = int(rng.integers(min_instances, max_instances + 1))
            positive = rng.random() < positive_fraction
            idx = rng.choice(neg_pool, size=n, replace=True)
            if positive:
                n_pos = int(rng.integers(1, max(2, n // 4) + 1))  # 1 to a quarter of the bag
                where = rng.choice(n, size=n_pos, replace=False)
                idx[where] = rng.choice(pos_pool, size=n_pos, replace=True)
            slide = f"digits_f{k}_b{b:03d}"
            features[slide] = data[idx]
            labels[slide] = "positive" if positive else "negative"
            parts[k].append(slide)
    splits = [{"train": [s for j in range(folds) if j not in (k, (k + 1) % folds) for s in parts[j]],
               "val": parts[(k + 1) % folds], "test": parts[k]} for k in range(folds)]
    return DigitsBags(features, labels, splits)
