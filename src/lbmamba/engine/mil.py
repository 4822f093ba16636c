"""Whole-slide image classification: k-fold MIL training, checkpoint evaluation, patch-feature extraction.

    from lbmamba.engine.mil import MILTrainConfig, train_mil, evaluate_mil_checkpoint, extract_features
    summary = train_mil(MILTrainConfig(model="lb"))     # no data given: the digits-bags data set

Training follows MambaMIL: one bag per step, AdamW, cross-entropy, early stopping on the validation
loss (patience, not before `min_epochs`); the best epoch's weights are written atomically to
`out/fold_<k>.pt` and scored on the fold's test split. Metrics: ROC AUC (binary: of the positive
class's probability; multi-class: one-vs-rest macro), macro F1 and accuracy, per fold and as
mean ± std (population std, ddof=0) over folds, in `out/summary.csv` and the returned dict.

Bad input raises `lbmamba.engine.UserError` (a `MILUserError`, also a ValueError).
"""

from __future__ import annotations

import csv
import functools
import math
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..data.mil import (
    FeatureStore,
    MILBagDataset,
    MILInputError,
    balanced_sampler,
    collate_bag,
    find_split_files,
    inspect_bags,
    make_digits_bags,
    make_folds,
    read_labels,
    read_split_file,
    write_split_file,
)
from ..models.mil import MODEL_NAMES, create_mil_model
from .checkpointing import atomic_save
from .errors import TrainingDivergedError, UserError

__all__ = [
    "MILUserError",
    "MILTrainConfig",
    "DIGITS_PRESET",
    "train_mil",
    "train_fold",
    "evaluate_bags",
    "evaluate_mil_checkpoint",
    "load_mil_checkpoint",
    "extract_features",
    "build_encoder",
    "roc_auc",
    "macro_f1",
    "accuracy",
    "classification_metrics",
]

CHECKPOINT_FORMAT = "lbmamba-mil"


class MILUserError(UserError, ValueError):
    """Bad MIL input (the command line prints it as one line)."""


def _user_errors(fn):
    """Re-raise the data layer's MILInputError as a UserError."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MILInputError as exc:
            raise MILUserError(str(exc)) from exc

    return wrapper


# ---------------------------------------------------------------------- metrics
def _binary_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of `score` for y in {0, 1} (Mann-Whitney U with mid-ranks for ties); nan if one class."""
    y = np.asarray(y).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(score.size, dtype=np.float64)
    # mid-ranks of tied groups (1-based)
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [score.size]])
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc(y_true: Sequence[int], probs: np.ndarray) -> float:
    """Binary (probs (n, 2) or (n,)): AUC of the positive class; multi-class: one-vs-rest macro AUC over
    the classes present in y_true (sklearn's `roc_auc_score(multi_class="ovr", average="macro")` when
    every class is present). nan when it is undefined (a single class in y_true)."""
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        return _binary_auc(y == 1, p)
    if p.shape[1] == 2:
        return _binary_auc(y == 1, p[:, 1])
    aucs = [_binary_auc(y == c, p[:, c]) for c in range(p.shape[1]) if 0 < (y == c).sum() < y.size]
    return float(np.mean(aucs)) if aucs else float("nan")


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Macro F1 over the labels in y_true ∪ y_pred (sklearn's `f1_score(average="macro")`; 0 for a
    label with no true and no predicted positives is never needed, such labels are not in the union)."""
    y = np.asarray(y_true, dtype=np.int64)
    q = np.asarray(y_pred, dtype=np.int64)
    if y.size == 0:
        return float("nan")
    scores = []
    for c in np.union1d(y, q):
        tp = np.sum((q == c) & (y == c))
        fp = np.sum((q == c) & (y != c))
        fn = np.sum((q != c) & (y == c))
        denom = 2 * tp + fp + fn
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    y = np.asarray(y_true)
    return float(np.mean(y == np.asarray(y_pred))) if y.size else float("nan")


def classification_metrics(y_true: Sequence[int], probs: np.ndarray) -> Dict[str, float]:
    """{"auc", "f1", "acc"} from labels and class probabilities (n, C); prediction = argmax."""
    probs = np.asarray(probs, dtype=np.float64)
    pred = probs.argmax(axis=1)
    return {"auc": roc_auc(y_true, probs), "f1": macro_f1(y_true, pred), "acc": accuracy(y_true, pred)}


# ---------------------------------------------------------------------- configuration
@dataclass
class MILTrainConfig:
    """Everything `train_mil` needs. With features/labels None: the digits-bags data set (DIGITS_PRESET
    fills the fields left at None)."""

    features: Optional[str] = None
    labels: Optional[str] = None
    splits: Optional[str] = None  # a folder of splits_<k>.csv; else `folds` stratified folds
    folds: Optional[int] = None  # default 5 (generated), or all the split files
    fold_indices: Optional[List[int]] = None  # run only these folds
    seed: int = 0
    model: str = "lb"
    depth: Optional[int] = None
    embed_dim: Optional[int] = None
    d_state: int = 16
    rate: int = 10
    window: Any = "auto"
    drop_rate: Optional[float] = None
    lr: Optional[float] = None
    weight_decay: float = 1e-5
    epochs: Optional[int] = None
    patience: Optional[int] = None
    min_epochs: Optional[int] = None
    max_instances: Optional[int] = None
    balanced: bool = False
    skip_missing: bool = False
    prefer: str = "pt"
    out: Optional[str] = None
    device: str = "auto"
    num_workers: int = 0
    threads: Optional[int] = None
    progress: bool = True
    grad_checkpointing: bool = False


#: the paper / MambaMIL recipe (used for real data where the user gave nothing)
PAPER_DEFAULTS = dict(depth=2, embed_dim=512, drop_rate=0.25, lr=2e-4, epochs=200, patience=20, min_epochs=50)
#: the shipped digits-bags run: a narrower model and a short schedule (5 folds in a few CPU minutes)
DIGITS_PRESET = dict(depth=2, embed_dim=64, drop_rate=0.25, lr=5e-4, epochs=12, patience=4, min_epochs=6)


def _resolve(cfg: MILTrainConfig, preset: Dict[str, Any]) -> MILTrainConfig:
    values = asdict(cfg)
    for key, value in preset.items():
        if values.get(key) is None:
            values[key] = value
    return MILTrainConfig(**values)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise MILUserError(f"--device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MILUserError(f"--device {name}: CUDA is not available on this machine")
    return device


def _finite(x: float) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_bags(
    model: nn.Module, dataset: Dataset, device: torch.device, progress: bool = False, desc: str = "eval", num_workers: int = 0
) -> Dict[str, Any]:
    """Mean cross-entropy, AUC, macro F1, accuracy over a data set of bags (+ labels, probs, slide ids)."""
    model.eval()
    loader = DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate_bag, num_workers=num_workers)
    losses, probs, labels, slides = [], [], [], []
    for feats, label, slide in tqdm(loader, desc=desc, leave=False, disable=not progress, file=sys.stderr):
        logits = model(feats.to(device, non_blocking=True))
        target = label.view(1).to(device)
        losses.append(float(F.cross_entropy(logits.float(), target)))
        probs.append(torch.softmax(logits.float(), dim=-1)[0].cpu().numpy())
        labels.append(int(label))
        slides.append(slide)
    if not labels:
        return {"loss": float("nan"), "auc": float("nan"), "f1": float("nan"), "acc": float("nan"), "n": 0,
                "labels": [], "probs": np.zeros((0, 0)), "slide_ids": []}
    probs_arr = np.stack(probs)
    out = {"loss": float(np.mean(losses)), **classification_metrics(labels, probs_arr), "n": len(labels)}
    out.update(labels=labels, probs=probs_arr, slide_ids=slides)
    return out


# ---------------------------------------------------------------------- checkpoints
def _save_checkpoint(path: str, model: nn.Module, class_names: List[str], **extra) -> None:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_save({"format": CHECKPOINT_FORMAT, "version": 1, "model": state, "config": model.config,
                 "class_names": list(class_names), **extra}, path)


def load_mil_checkpoint(path: str, device: Any = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """(model in eval mode, checkpoint dict without the weights) from a `mil train` checkpoint."""
    if not os.path.isfile(path):
        raise MILUserError(f"--checkpoint: no such file: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MILUserError(f"--checkpoint {path}: cannot be read safely ({type(exc).__name__}: {exc})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "config" not in ckpt:
        raise MILUserError(f"--checkpoint {path}: not a `lbmamba mil train` checkpoint (no MIL model config inside)")
    config = dict(ckpt["config"])
    try:
        model = create_mil_model(**config)
        model.load_state_dict(ckpt["model"])
    except (ValueError, TypeError, RuntimeError) as exc:
        raise MILUserError(f"--checkpoint {path}: the stored model does not rebuild: {exc}") from exc
    meta = {k: v for k, v in ckpt.items() if k != "model"}
    return model.to(device).eval(), meta


# ---------------------------------------------------------------------- training
def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if name in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=lr)


def train_fold(
    fold: int,
    model_config: Dict[str, Any],
    class_names: List[str],
    train_ds: MILBagDataset,
    val_ds: MILBagDataset,
    test_ds: MILBagDataset,
    cfg: MILTrainConfig,
    checkpoint_path: str,
    device: torch.device,
) -> Dict[str, Any]:
    """Train one fold with early stopping on the validation loss; score the best epoch on the test split."""
    torch.manual_seed(cfg.seed * 1000 + fold)
    model = create_mil_model(**model_config).to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = _optimizer(model, cfg.lr, cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + fold)
    sampler = balanced_sampler(train_ds.labels, generator=gen) if cfg.balanced else None
    loader = DataLoader(
        train_ds, batch_size=1, shuffle=sampler is None, sampler=sampler, generator=gen if sampler is None else None,
        collate_fn=collate_bag, num_workers=cfg.num_workers,
    )
    best_loss, best_epoch, bad_epochs, epochs_run = float("inf"), -1, 0, 0
    history = []
    epochs = tqdm(range(cfg.epochs), desc=f"fold {fold}", disable=not cfg.progress, file=sys.stderr)
    for epoch in epochs:
        model.train()
        total, count = 0.0, 0
        for feats, label, slide in tqdm(loader, desc="train", leave=False, disable=not cfg.progress, file=sys.stderr):
            logits = model(feats.to(device, non_blocking=True))
            loss = F.cross_entropy(logits.float(), label.view(1).to(device))
            if not torch.isfinite(loss):
                raise TrainingDivergedError(
                    f"fold {fold}, epoch {epoch}: the loss became {float(loss)} on slide {slide!r}; try a lower --lr"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            count += 1
        epochs_run = epoch + 1
        train_loss = total / max(count, 1)
        if len(val_ds):
            val = evaluate_bags(model, val_ds, device, progress=cfg.progress, desc="val", num_workers=cfg.num_workers)
            monitor = val["loss"]
        else:  # no validation split: keep the last epoch
            val, monitor = {"loss": float("nan"), "auc": float("nan")}, -float(epoch)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "val_auc": val["auc"]})
        if monitor < best_loss:
            best_loss, best_epoch, bad_epochs = monitor, epoch, 0
            _save_checkpoint(checkpoint_path, model, class_names, fold=fold, epoch=epoch,
                             val_loss=float(val["loss"]), seed=cfg.seed)
        else:
            bad_epochs += 1
        epochs.set_postfix(train_loss=f"{train_loss:.3f}", val_loss=f"{val['loss']:.3f}", val_auc=f"{val['auc']:.3f}")
        if len(val_ds) and epochs_run >= cfg.min_epochs and bad_epochs >= cfg.patience:
            break
    epochs.close()
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["model"])
    test = evaluate_bags(model, test_ds, device, progress=cfg.progress, desc="test", num_workers=cfg.num_workers)
    val_best = history[best_epoch]["val_loss"] if best_epoch >= 0 else float("nan")
    return {
        "fold": fold, "test_auc": test["auc"], "test_f1": test["f1"], "test_acc": test["acc"], "test_loss": test["loss"],
        "val_loss": val_best, "best_epoch": best_epoch, "epochs_run": epochs_run,
        "n_train": len(train_ds), "n_val": len(val_ds), "n_test": len(test_ds), "checkpoint": checkpoint_path,
        "history": history,
    }


def _default_out(model: str) -> str:
    return os.path.join("runs", "mil", f"{model}-{time.strftime('%Y%m%d-%H%M%S')}")


def _write_summary(path: str, rows: List[Dict[str, Any]], stats: Dict[str, Dict[str, float]]) -> None:
    cols = ["fold", "test_auc", "test_f1", "test_acc", "test_loss", "val_loss", "best_epoch", "epochs_run",
            "n_train", "n_val", "n_test"]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(cols)
        for r in rows:
            writer.writerow([r[c] if not isinstance(r[c], float) else f"{r[c]:.6f}" for c in cols])
        for name in ("mean", "std"):
            writer.writerow([name] + [f"{stats[c][name]:.6f}" if c in stats else "" for c in cols[1:]])
        writer.writerow(["mean±std"] + [f"{stats[c]['mean']:.4f}±{stats[c]['std']:.4f}" if c in stats else "" for c in cols[1:]])
    os.replace(tmp, path)


def _resolve_splits(cfg: MILTrainConfig, table, out_dir: str) -> Dict[int, Dict[str, List[str]]]:
    if cfg.splits:
        files = find_split_files(cfg.splits)
        splits = {k: read_split_file(p) for k, p in files.items()}
        if cfg.folds is not None and cfg.folds < len(splits):
            splits = dict(list(splits.items())[: cfg.folds])
    else:
        generated = make_folds(table.slide_ids, table.labels, int(cfg.folds or 5), cfg.seed)
        splits = dict(enumerate(generated))
        for k, split in splits.items():
            write_split_file(os.path.join(out_dir, "splits", f"splits_{k}.csv"), split)
    if cfg.fold_indices:
        unknown = sorted(set(cfg.fold_indices) - set(splits))
        if unknown:
            raise MILUserError(f"--fold-indices {unknown}: no such fold (have {sorted(splits)})")
        splits = {k: splits[k] for k in cfg.fold_indices}
    return splits


@_user_errors
def train_mil(cfg: Optional[MILTrainConfig] = None) -> Dict[str, Any]:
    """k-fold training and testing; returns the summary dict (also written as out/summary.csv)."""
    cfg = cfg or MILTrainConfig()
    start = time.time()
    if cfg.model not in MODEL_NAMES:
        raise MILUserError(f"--model must be one of {', '.join(MODEL_NAMES)}; got {cfg.model!r}")
    if (cfg.features is None) != (cfg.labels is None):
        raise MILUserError("--features and --labels go together (give both, or neither for the digits-bags demo)")
    dataset_name = "digits-bags"
    tmp_root = None
    if cfg.features is None:
        if cfg.splits is not None:
            raise MILUserError("--splits needs --features and --labels")
        cfg = _resolve(cfg, DIGITS_PRESET)
        tmp_root = tempfile.TemporaryDirectory(prefix="lbmamba-digits-bags-")
        if cfg.folds is not None and cfg.folds < 3:
            raise MILUserError(f"--folds must be an int >= 3 (test, val and train parts), got {cfg.folds}")
        paths = make_digits_bags(tmp_root.name, folds=int(cfg.folds or 5), seed=cfg.seed)
        cfg.features, cfg.labels, cfg.splits = paths["features"], paths["labels"], paths["splits"]
    else:
        dataset_name = os.path.abspath(cfg.features)
        cfg = _resolve(cfg, PAPER_DEFAULTS)
    threads = torch.get_num_threads()
    try:
        return _train_mil(cfg, dataset_name, start)
    finally:
        torch.set_num_threads(threads)
        if tmp_root is not None:
            tmp_root.cleanup()


def _train_mil(cfg: MILTrainConfig, dataset_name: str, start: float) -> Dict[str, Any]:
    for name in ("epochs", "patience", "depth", "embed_dim"):
        if int(getattr(cfg, name)) < (1 if name in ("epochs", "patience", "embed_dim") else 0):
            raise MILUserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise MILUserError(f"--lr must be positive, got {cfg.lr}")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = _device(cfg.device)
    out_dir = cfg.out or _default_out(cfg.model)
    os.makedirs(out_dir, exist_ok=True)

    store = FeatureStore(cfg.features, prefer=cfg.prefer)
    table = read_labels(cfg.labels)
    missing = store.missing(table.slide_ids)
    if missing and not cfg.skip_missing:
        raise MILUserError(
            f"{len(missing)} slide(s) in {cfg.labels} have no feature file under {cfg.features}: "
            f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''} (pass --skip-missing to leave them out)"
        )
    if missing:
        warnings.warn(f"--skip-missing: leaving out {len(missing)} slide(s) without a feature file")
    missing_set = set(missing)
    kept = [(s, y) for s, y in zip(table.slide_ids, table.labels) if s not in missing_set]
    table.slide_ids, table.labels = [s for s, _ in kept], [y for _, y in kept]
    if not table.slide_ids:
        raise MILUserError("no slide has both a label and a feature file")
    label_of = table.as_dict()
    if len(table.class_names) < 2:
        raise MILUserError(f"--labels {cfg.labels}: needs at least two classes, found only {table.class_names}")

    splits = _resolve_splits(cfg, table, out_dir)
    # every slide a split names must be labelled; slides skipped for missing features drop out
    for k, split in splits.items():
        listed = [s for c in ("train", "val", "test") for s in split[c]]
        unlabeled = [s for s in listed if s not in label_of and s not in missing_set]
        if unlabeled:
            raise MILUserError(
                f"fold {k}: {len(unlabeled)} slide(s) in the split file are not in {cfg.labels}: {', '.join(unlabeled[:20])}"
            )
        for c in ("train", "val", "test"):
            split[c] = [s for s in split[c] if s in label_of]
    used = sorted({s for split in splits.values() for c in ("train", "val", "test") for s in split[c]})
    shapes = inspect_bags(store, used)
    in_dim = next(iter(shapes.values()))[1]

    model_config = dict(
        model=cfg.model, in_dim=in_dim, num_classes=len(table.class_names), depth=int(cfg.depth),
        embed_dim=int(cfg.embed_dim), drop_rate=float(cfg.drop_rate), d_state=int(cfg.d_state),
        rate=int(cfg.rate), window=cfg.window,
    )
    try:
        create_mil_model(**model_config)
    except (ValueError, TypeError) as exc:
        raise MILUserError(f"invalid model options: {exc}") from exc

    rows = []
    for k, split in splits.items():
        for c in ("train", "test"):
            if not split[c]:
                raise MILUserError(f"fold {k}: the {c} split is empty")
        train_classes = sorted({label_of[s] for s in split["train"]})
        if len(train_classes) < 2:
            only = table.class_names[train_classes[0]]
            raise MILUserError(
                f"fold {k}: the training split has only one class ({only!r}, {len(split['train'])} slides); "
                f"each training split needs at least two classes"
            )
        if not split["val"]:
            warnings.warn(f"fold {k}: empty val split: no early stopping, the last epoch is kept")

        def ds(c, max_inst=None):
            return MILBagDataset(store, split[c], [label_of[s] for s in split[c]], max_instances=max_inst,
                                 expected_dim=in_dim, shapes=shapes)

        rows.append(train_fold(k, model_config, table.class_names, ds("train", cfg.max_instances), ds("val"), ds("test"),
                               cfg, os.path.join(out_dir, f"fold_{k}.pt"), device))

    stats = {}
    for c in ("test_auc", "test_f1", "test_acc", "test_loss", "val_loss"):
        vals = np.array([r[c] for r in rows], dtype=np.float64)
        good = vals[np.isfinite(vals)]
        stats[c] = {"mean": float(good.mean()) if good.size else float("nan"),
                    "std": float(good.std()) if good.size else float("nan")}
    summary_csv = os.path.join(out_dir, "summary.csv")
    _write_summary(summary_csv, rows, stats)
    return {
        "command": "mil train",
        "dataset": dataset_name,
        "model": cfg.model,
        "classes": table.class_names,
        "folds": len(rows),
        "auc_mean": _finite(stats["test_auc"]["mean"]), "auc_std": _finite(stats["test_auc"]["std"]),
        "f1_mean": _finite(stats["test_f1"]["mean"]), "f1_std": _finite(stats["test_f1"]["std"]),
        "acc_mean": _finite(stats["test_acc"]["mean"]), "acc_std": _finite(stats["test_acc"]["std"]),
        "per_fold": [
            {"fold": r["fold"], "auc": _finite(r["test_auc"]), "f1": _finite(r["test_f1"]), "acc": _finite(r["test_acc"]),
             "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"]}
            for r in rows
        ],
        "skipped_missing": len(missing),
        "out_dir": os.path.abspath(out_dir),
        "summary_csv": os.path.abspath(summary_csv),
        "device": str(device),
        "wall_s": round(time.time() - start, 1),
    }


# ---------------------------------------------------------------------- evaluation of a checkpoint
@_user_errors
def evaluate_mil_checkpoint(
    checkpoint: str,
    features: str,
    labels: str,
    splits: Optional[str] = None,
    fold: Optional[int] = None,
    split: str = "test",
    skip_missing: bool = False,
    prefer: str = "pt",
    device: str = "auto",
    progress: bool = True,
    num_workers: int = 0,
) -> Dict[str, Any]:
    """Score a `mil train` checkpoint on one split of one fold (or, without --splits, on every labelled slide)."""
    dev = _device(device)
    model, meta = load_mil_checkpoint(checkpoint, dev)
    table = read_labels(labels, class_names=meta.get("class_names"))
    label_of = table.as_dict()
    if splits is not None:
        files = find_split_files(splits)
        if fold is None:
            if len(files) != 1:
                raise MILUserError(f"--fold is needed: {splits} holds folds {sorted(files)}")
            fold = next(iter(files))
        if fold not in files:
            raise MILUserError(f"--fold {fold}: no splits_{fold}.csv in {splits} (have {sorted(files)})")
        if split not in ("train", "val", "test"):
            raise MILUserError(f"--split must be train, val or test; got {split!r}")
        slide_ids = read_split_file(files[fold])[split]
        unlabeled = [s for s in slide_ids if s not in label_of]
        if unlabeled:
            raise MILUserError(f"{len(unlabeled)} slide(s) of the {split} split are not in {labels}: {', '.join(unlabeled[:20])}")
    else:
        slide_ids = list(table.slide_ids)
    store = FeatureStore(features, prefer=prefer)
    missing = store.missing(slide_ids)
    if missing and not skip_missing:
        raise MILUserError(
            f"{len(missing)} slide(s) have no feature file under {features}: {', '.join(missing[:20])}"
            f"{' ...' if len(missing) > 20 else ''} (pass --skip-missing to leave them out)"
        )
    missing_set = set(missing)
    slide_ids = [s for s in slide_ids if s not in missing_set]
    if not slide_ids:
        raise MILUserError(f"the {split} split has no slides to score")
    inspect_bags(store, slide_ids, expected_dim=model.in_dim)
    ds = MILBagDataset(store, slide_ids, [label_of[s] for s in slide_ids], expected_dim=model.in_dim)
    res = evaluate_bags(model, ds, dev, progress=progress, desc=f"{split}", num_workers=num_workers)
    return {
        "command": "mil eval", "checkpoint": os.path.abspath(checkpoint), "model": meta["config"].get("model"),
        "fold": fold, "split": split if splits is not None else "all", "n": res["n"],
        "auc": _finite(res["auc"]), "f1": _finite(res["f1"]), "acc": _finite(res["acc"]), "loss": _finite(res["loss"]),
        "skipped_missing": len(missing),
    }


# ---------------------------------------------------------------------- patch-feature extraction
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
DEFAULT_ENCODER = "resnet50_trunc"


class _TakeLast(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x)[-1]


def build_encoder(name: str = DEFAULT_ENCODER, checkpoint: Optional[str] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """(encoder mapping (B, 3, H, W) -> (B, feat_dim), info) with no weights downloaded.

    "resnet50_trunc": timm's ResNet-50 up to stage 3 (layer3, 1024 channels) + global average pooling,
    CLAM's encoder. Any other name: that timm model with its classifier removed (num_classes=0, pooled
    features). `checkpoint` (.pth / .pt / .safetensors, a state dict or {'model': ...}) is loaded into it;
    the classifier's and (for the truncated ResNet) stage 4's weights are ignored. Without a checkpoint
    the weights are random and the info says so.
    """
    import timm

    from ..models.checkpoint import unwrap_state_dict

    try:
        if name == DEFAULT_ENCODER:
            base = timm.create_model("resnet50", pretrained=False, features_only=True, out_indices=(3,))
            encoder = nn.Sequential(_TakeLast(base), nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
            target = base
            cfg = timm.models.get_pretrained_cfg("resnet50")
        else:
            base = timm.create_model(name, pretrained=False, num_classes=0)
            encoder = target = base
            cfg = getattr(base, "pretrained_cfg", None)
    except RuntimeError as exc:  # timm: "Unknown model (...)"
        raise MILUserError(f"--encoder {name!r}: {exc}") from exc
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg or {})
    info = {"encoder": name, "random_weights": checkpoint is None, "mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
            "std": tuple(cfg.get("std", (0.229, 0.224, 0.225)))}
    if checkpoint is not None:
        if not os.path.isfile(checkpoint):
            raise MILUserError(f"--encoder-checkpoint: no such file: {checkpoint}")
        try:
            if checkpoint.endswith(".safetensors"):
                from safetensors.torch import load_file

                raw = load_file(checkpoint)
            else:
                raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
            state = unwrap_state_dict(raw)
        except Exception as exc:
            raise MILUserError(f"--encoder-checkpoint {checkpoint}: cannot be read ({type(exc).__name__}: {exc})") from exc
        own = target.state_dict()
        usable = {k: v for k, v in state.items() if k in own}
        missing = [k for k in own if k not in usable and not k.endswith("num_batches_tracked")]
        bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in usable.items() if v.shape != own[k].shape]
        if missing or bad:
            raise MILUserError(
                f"--encoder-checkpoint {checkpoint} does not fit --encoder {name}: "
                + (f"{len(missing)} missing key(s) e.g. {missing[:5]}" if missing else "")
                + ("; " if missing and bad else "")
                + (f"mis-shaped: {bad[:5]}" if bad else "")
            )
        target.load_state_dict(usable, strict=False)
        info["ignored_keys"] = len(state) - len(usable)
    with torch.no_grad():
        info["feat_dim"] = int(encoder.eval()(torch.zeros(1, 3, 64, 64)).shape[-1])
    return encoder.eval(), info


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _parse_xy(stem: str) -> Optional[Tuple[int, int]]:
    m = re.search(r"(\d+)[_\-,](\d+)$", stem)
    return (int(m.group(1)), int(m.group(2))) if m else None


class _PatchImages(Dataset):
    def __init__(self, paths: List[str], size: Optional[int], mean, std):
        self.paths, self.size = paths, size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as im:
                im = im.convert("RGB")
                if self.size:
                    im = im.resize((self.size, self.size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.float32) / 255.0
        except OSError as exc:
            raise MILInputError(f"cannot read patch image {self.paths[i]}: {exc}") from exc
        x = torch.from_numpy(arr).permute(2, 0, 1)
        return (x - self.mean) / self.std


def _collate_images(batch):
    shapes = {tuple(x.shape) for x in batch}
    if len(shapes) > 1:
        raise MILInputError(f"patch images of different sizes in one slide {sorted(shapes)}; pass --resize N")
    return torch.stack(batch)


def _atomic_h5(path: str, features: np.ndarray, coords: np.ndarray, attrs: Dict[str, Any]) -> None:
    import h5py

    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("features", data=features)
            f.create_dataset("coords", data=coords)
            for k, v in attrs.items():
                f.attrs[k] = v
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@_user_errors
def extract_features(
    patches: str,
    out: str,
    encoder: str = DEFAULT_ENCODER,
    encoder_checkpoint: Optional[str] = None,
    batch_size: int = 64,
    resize: Optional[int] = None,
    num_workers: int = 0,
    device: str = "auto",
    overwrite: bool = False,
    also_pt: bool = False,
    progress: bool = True,
) -> Dict[str, Any]:
    """Folders of patch images (one folder per slide) -> `out/h5_files/<slide>.h5` (CLAM layout).

    Coordinates come from file names ending in `<x>_<y>` (e.g. `1024_2048.png`, ordered row by row);
    when a slide's names do not all carry them, files keep their natural name order and `coords` is
    (running index, 0). Slides already extracted are skipped unless `overwrite`.
    """
    start = time.time()
    if not os.path.isdir(patches):
        raise MILUserError(f"--patches: no such directory: {patches}")
    if batch_size < 1:
        raise MILUserError(f"--batch-size must be positive, got {batch_size}")
    slides = sorted((d for d in os.listdir(patches) if os.path.isdir(os.path.join(patches, d)) and not d.startswith(".")),
                    key=_natural_key)
    if not slides:
        raise MILUserError(f"--patches {patches}: no slide folders inside (expected one folder of patch images per slide)")
    dev = _device(device)
    net, info = build_encoder(encoder, encoder_checkpoint)
    if info["random_weights"]:
        warnings.warn(
            f"mil extract: encoder {encoder!r} has RANDOM weights (no pretrained weights are downloaded); the features "
            "are not meaningful for real slides. Pass --encoder-checkpoint FILE with trained weights.",
            UserWarning,
        )
    net = net.to(dev)
    h5_dir = os.path.join(out, "h5_files")
    os.makedirs(h5_dir, exist_ok=True)
    if also_pt:
        os.makedirs(os.path.join(out, "pt_files"), exist_ok=True)
    written, skipped, empty, n_patches = [], [], [], 0
    for slide in tqdm(slides, desc="slides", disable=not progress, file=sys.stderr):
        h5_path = os.path.join(h5_dir, slide + ".h5")
        if os.path.exists(h5_path) and not overwrite:
            skipped.append(slide)
            continue
        folder = os.path.join(patches, slide)
        names = [n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
        if not names:
            empty.append(slide)
            continue
        xy = [_parse_xy(os.path.splitext(n)[0]) for n in names]
        if all(p is not None for p in xy):
            order = sorted(range(len(names)), key=lambda i: (xy[i][1], xy[i][0], names[i]))
            coords = np.array([xy[i] for i in order], dtype=np.int32)
            coords_source = "filename"
        else:
            order = sorted(range(len(names)), key=lambda i: _natural_key(names[i]))
            coords = np.stack([np.arange(len(names)), np.zeros(len(names))], axis=1).astype(np.int32)
            coords_source = "index"
        paths = [os.path.join(folder, names[i]) for i in order]
        loader = DataLoader(_PatchImages(paths, resize, info["mean"], info["std"]), batch_size=batch_size,
                            num_workers=num_workers, collate_fn=_collate_images)
        feats = []
        with torch.inference_mode():
            for x in tqdm(loader, desc=slide, leave=False, disable=not progress, file=sys.stderr):
                feats.append(net(x.to(dev)).float().cpu())
        features = torch.cat(feats).numpy().astype(np.float32)
        attrs = {"encoder": encoder, "feat_dim": features.shape[1], "coords_source": coords_source,
                 "random_weights": bool(info["random_weights"])}
        _atomic_h5(h5_path, features, coords, attrs)
        if also_pt:
            atomic_save(torch.from_numpy(features), os.path.join(out, "pt_files", slide + ".pt"))
        written.append(slide)
        n_patches += len(paths)
    if empty:
        warnings.warn(f"mil extract: {len(empty)} slide folder(s) hold no images and were skipped: {', '.join(empty[:10])}")
    return {
        "command": "mil extract", "out": os.path.abspath(out), "encoder": encoder, "feat_dim": info["feat_dim"],
        "random_weights": info["random_weights"], "slides_written": len(written), "slides_skipped_existing": len(skipped),
        "slides_empty": len(empty), "patches": n_patches, "device": str(dev), "wall_s": round(time.time() - start, 1),
    }
