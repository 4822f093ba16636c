"""Whole-slide image classification: k-fold MIL training (`train_mil`) and checkpoint scoring (`evaluate_mil`).

    from lbmamba.engine.mil import train_mil
    summary = train_mil({"model": "lb"})     # no data given: the digits-bags demo

Training follows MambaMIL: one bag per step, Adam with L2 weight decay, cross-entropy, early stopping on
the validation loss as CLAM's EarlyStopping (stop once `patience` epochs passed without improvement and
the 0-based epoch is past `stop_epoch`); the best epoch's weights are written atomically to
`<run>/fold_<k>.pt` and scored on the fold's test split. Metrics: ROC AUC (binary: of the positive
class's probability; multi-class: one-vs-rest macro), macro F1 and accuracy, per fold and as mean ± std
(ddof=1, as pandas) over folds, in `<run>/summary.csv`, `<run>/summary.json` and the returned dict.

A run lives in its folder like every training run (see `lbmamba.engine.runs`): `config.yaml`,
`last.pth` after every epoch (the fold, the epoch, the weights, optimizer, early-stopping state, RNG and
the finished folds' results), `metrics.jsonl` / `curves.png` with one line per fold, and `summary.csv`
rewritten as each fold finishes. `resume=<run folder>` continues at the fold and epoch where it stopped
and ends with the results of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..data.mil import (
    SPLIT_COLUMNS,
    FeatureStore,
    LabelTable,
    MILBagDataset,
    balanced_sampler,
    collate_bag,
    digits_bags,
    find_split_files,
    inspect_bags,
    make_folds,
    read_labels,
    read_split_file,
)
from ..models.mil import MIL_INITS, MODEL_NAMES, create_mil_model
from .config import ConfigTable, Key
from .device import autocast, grad_scaler
from .distributed import DistInfo, session
from .errors import UserError, user_errors
from .files import atomic_save, jsonable, write_csv, write_h5
from .loop import FORMAT, Plan, Task, check_resumable, fit
from .metrics import classification_metrics, mean_std
from .optim import create_optimizer, param_groups, preset_for
from .records import RunRecord, progress
from .rng import derive_seed, seed_everything, seed_worker
from .run_keys import INFERENCE_AMP, run_keys
from .runs import LAST, Run, load_training_checkpoint, note, open_run, require_task
from .schedule import Schedule

__all__ = ["MIL_TRAIN", "MIL_EVAL", "PAPER_PRESET", "DIGITS_PRESET", "train_mil", "evaluate_mil", "evaluate_bags",
           "should_stop", "FoldTask",
           "load_mil_checkpoint", "write_digits_bags", "write_split_file"]

#: the fold checkpoints of lbmamba before the one run format (`mil eval` still reads them)
_OLD_CHECKPOINT_FORMAT = "lbmamba-mil"
DIGITS = "digits-bags"

#: the paper's / MambaMIL's recipe: what real data gets for the keys left at null
PAPER_PRESET = dict(folds=10, depth=2, embed_dim=512, drop_rate=0.0, lr=2e-4, epochs=200, patience=20, stop_epoch=50)
#: the shipped digits-bags demo: a narrower model and a short schedule (5 folds in a few CPU minutes)
DIGITS_PRESET = dict(folds=5, depth=2, embed_dim=64, drop_rate=0.25, lr=5e-4, epochs=12, patience=4, stop_epoch=4)
_PRESET = "null: the paper's recipe ({paper}; digits-bags demo: {demo})"


def _preset_key(name: str, help_text: str, kind: str, **kwargs) -> Key:
    text = f"{help_text} ({_PRESET.format(paper=PAPER_PRESET[name], demo=DIGITS_PRESET[name])})"
    zero_allowed = name in ("depth", "drop_rate", "stop_epoch")
    return Key(None, text, kind=kind, positive=not zero_allowed, low=0 if zero_allowed else None, flag=True, **kwargs)


MIL_TRAIN = ConfigTable("mil train", {
    # data
    "features": Key(None, "CLAM feature folder (pt_files/<slide>.pt and/or h5_files/<slide>.h5); null: the digits-bags "
                          "demo (a bag is positive iff it holds a 9), generated into the run folder", kind="str",
                    flag=True),
    "labels": Key(None, "CSV with slide_id,label columns (string labels map to sorted classes)", kind="str", flag=True),
    "splits": Key(None, "folder of splits_<k>.csv (train,val,test columns); null: generated stratified folds",
                  kind="str", flag=True),
    "folds": _preset_key("folds", "generated stratified folds (fold k tests on part k, validates on part k+1: "
                                  "10 folds are 80/10/10), or with splits: use the first K split files", "int"),
    "fold_indices": Key(None, "run only these folds, e.g. 0,3", kind="int_list", flag=True),
    "max_instances": Key(None, "randomly sub-sample training bags larger than N instances (kept in order)",
                         kind="int", positive=True, flag=True),
    "balanced": Key(False, "class-balanced sampling of training bags (with replacement)", flag=True),
    "merge_label_spellings": Key(False, "count labels that differ only in letter case or spaces (\"Positive\" / "
                                 "\"positive\") as one class instead of refusing them", flag=True),
    "skip_missing": Key(False, "leave out (and count) labelled slides without a readable feature file instead of "
                               "stopping", flag=True),
    "prefer": Key("pt", "which file to read when a slide has both", choices=("pt", "h5"), flag=True),
    # model
    "model": Key("lb", "MambaMIL mixer (lb: one LB scan; lb-srmamba: LB scans in SRMamba) or the ABMIL baseline",
                 choices=MODEL_NAMES, flag=True, effect="model"),
    "depth": _preset_key("depth", "mixer layers", "int", aliases=("--layers",), effect="model"),
    "embed_dim": _preset_key("embed_dim", "width after the input projection", "int", effect="model"),
    "d_state": Key(16, "SSM state size", positive=True, flag=True, effect="model"),
    "rate": Key(5, "SRMamba re-ordering stride", positive=True, flag=True, effect="model"),
    "init": Key("mambamil", "mambamil: xavier-normal weights and zero biases for every Linear layer, the mixers' "
                            "included (MambaMIL's); mamba: the mixers keep Mamba's own initialisation",
                choices=MIL_INITS, flag=True, effect="model"),
    "window": Key("auto", "LB window: a positive int or auto (4 / 8 / 16 by length)", kind="window", flag=True,
                  effect="model"),
    "drop_rate": _preset_key("drop_rate", "dropout after the input projection", "float", aliases=("--dropout",),
                             effect="model"),
    "grad_checkpointing": Key(False, "recompute mixer layers in the backward (huge bags)", flag=True, effect="none"),
    "scan_chunk": Key(None, "run the mixer layers over a bag in chunks of N instances, the scan state carried (same "
                            "result, less memory for bags of 100,000+; lb / mamba mixers); null: whole bags",
                      kind="int", positive=True, flag=True, effect="none"),
    # optimisation
    "opt": Key("adam", "adam: Adam with L2 weight decay on every parameter (MambaMIL's); adamw: decoupled decay, "
                       "none on biases, norms, A_log and D", choices=("adam", "adamw"), flag=True),
    "lr": _preset_key("lr", "learning rate", "float"),
    "weight_decay": Key(1e-5, "weight decay", low=0, flag=True),
    "epochs": _preset_key("epochs", "maximum epochs per fold", "int"),
    "patience": _preset_key("patience", "early-stopping patience on the validation loss", "int"),
    "stop_epoch": _preset_key("stop_epoch", "early stopping may stop a fold only after the 0-based epoch "
                                            "stop_epoch: at least stop_epoch + 2 epochs run", "int"),
    # run
    "workers": Key(0, "data-loading worker processes", low=0, flag=True, effect="none"),
    **run_keys("mil-<model>", "seed of the generated folds, initialisation and shuffling", unit=None,
               distributed=False, resume="continue the run in this folder at the fold and epoch where it stopped"),
})

MIL_EVAL = ConfigTable("mil eval", {
    "checkpoint": Key(None, "<run>/fold_<k>.pt of `lbmamba mil train`", kind="str", flag=True),
    "features": Key(None, "CLAM feature folder", kind="str", flag=True),
    "labels": MIL_TRAIN.keys["labels"],
    "splits": Key(None, "folder of splits_<k>.csv (null: score every labelled slide)", kind="str", flag=True),
    "fold": Key(None, "which splits_<K>.csv", kind="int", low=0, flag=True),
    "split": Key("test", "which split of the fold", choices=SPLIT_COLUMNS, flag=True),
    "skip_missing": MIL_TRAIN.keys["skip_missing"],
    "prefer": MIL_TRAIN.keys["prefer"],
    "amp": dataclasses.replace(MIL_TRAIN.keys["amp"], **INFERENCE_AMP),
    "device": MIL_TRAIN.keys["device"],
    "workers": MIL_TRAIN.keys["workers"],
    "threads": MIL_TRAIN.keys["threads"],
    "progress": MIL_TRAIN.keys["progress"],
    "scan_chunk": MIL_TRAIN.keys["scan_chunk"],
})

_CURVES = [("loss", "loss", [("train_loss", "train"), ("val_loss", "validation")]),
           ("validation AUC", "AUC", [("val_auc", "validation")])]
_SHOWN = ("fold", "epoch", "train_loss", "val_loss", "val_auc", "epoch_seconds")
_SUMMARY_COLUMNS = ["fold", "test_auc", "test_f1", "test_acc", "test_loss", "val_loss", "best_epoch", "epochs_run",
                    "n_train", "n_val", "n_test"]


# ---------------------------------------------------------------------- data on disk
def write_split_file(path: str, split: Mapping[str, List[str]]) -> None:
    """A CLAM-style split file: an index column, then train,val,test of different lengths (blank cells)."""
    columns = [list(split.get(c, [])) for c in SPLIT_COLUMNS]
    n = max((len(c) for c in columns), default=0)
    write_csv(path, [["", *SPLIT_COLUMNS]] + [[i, *[c[i] if i < len(c) else "" for c in columns]] for i in range(n)])


def write_digits_bags(root: str, folds: int = 5, seed: int = 0) -> Dict[str, str]:
    """The digits-bags data set (`lbmamba.data.mil.digits_bags`) written in the CLAM layout under `root`:
    `h5_files/*.h5`, `labels.csv`, `splits/splits_<k>.csv`. Returns {"features", "labels", "splits"}."""
    bags = digits_bags(folds=folds, seed=seed)
    for slide, feats in bags.features.items():
        coords = np.stack([np.arange(len(feats)) * 8, np.zeros(len(feats))], axis=1).astype(np.int32)
        write_h5(os.path.join(root, "h5_files", slide + ".h5"), {"features": feats, "coords": coords})
    labels_csv = os.path.join(root, "labels.csv")
    write_csv(labels_csv, [["case_id", "slide_id", "label"]] + [[s, s, y] for s, y in bags.labels.items()])
    splits_dir = os.path.join(root, "splits")
    for k, split in enumerate(bags.splits):
        write_split_file(os.path.join(splits_dir, f"splits_{k}.csv"), split)
    return {"features": root, "labels": labels_csv, "splits": splits_dir}


class _Bags:
    """A run's data: the feature store, the labels, the folds' splits and the bags' shapes."""

    def __init__(self, store: FeatureStore, table: LabelTable, splits: Dict[int, Dict[str, List[str]]],
                 shapes: Dict[str, Tuple[int, int]], missing: List[str], unreadable: List[str]):
        self.store, self.table, self.splits, self.shapes = store, table, splits, shapes
        self.missing, self.unreadable = missing, unreadable
        self.label_of = table.as_dict()
        self.in_dim = next(iter(shapes.values()))[1]

    def dataset(self, slide_ids: List[str], max_instances: Optional[int] = None) -> MILBagDataset:
        return MILBagDataset(self.store, slide_ids, [self.label_of[s] for s in slide_ids], max_instances=max_instances,
                             expected_dim=self.in_dim, shapes=self.shapes)


def _read_splits(cfg: Mapping[str, Any], table: LabelTable) -> Dict[int, Dict[str, List[str]]]:
    """The folds: the split files, or (none given) stratified folds."""
    if cfg["splits"]:
        files = find_split_files(cfg["splits"])
        splits = {k: read_split_file(p) for k, p in files.items()}
        if cfg["folds"] is not None and cfg["folds"] < len(splits):
            splits = dict(list(splits.items())[: cfg["folds"]])
    else:
        splits = dict(enumerate(make_folds(table.slide_ids, table.labels, int(cfg["folds"]), cfg["seed"])))
    if cfg["fold_indices"]:
        unknown = sorted(set(cfg["fold_indices"]) - set(splits))
        if unknown:
            raise UserError(f"fold_indices {unknown}: no such fold (have {sorted(splits)})")
        splits = {k: splits[k] for k in cfg["fold_indices"]}
    return splits


def _load_bags(cfg: Mapping[str, Any]) -> _Bags:
    """Read and check everything a run needs before it trains: labels, feature files, splits, shapes."""
    store = FeatureStore(cfg["features"], prefer=cfg["prefer"])
    table = read_labels(cfg["labels"], merge_spellings=bool(cfg.get("merge_label_spellings")))
    missing = store.missing(table.slide_ids)
    if missing and not cfg["skip_missing"]:
        raise UserError(
            f"{len(missing)} slide(s) in {cfg['labels']} have no feature file under {cfg['features']}: "
            f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''} (set skip_missing to leave them out)"
        )
    unreadable = store.unreadable(table.slide_ids) if cfg["skip_missing"] else {}
    if missing or unreadable:
        warnings.warn(f"skip_missing: leaving out {len(missing)} slide(s) without a feature file and "
                      f"{len(unreadable)} whose file cannot be read{': ' if unreadable else ''}"
                      f"{'; '.join(list(unreadable.values())[:3])}", stacklevel=2)
    missing_set = set(missing) | set(unreadable)
    kept = [(s, y) for s, y in zip(table.slide_ids, table.labels) if s not in missing_set]
    table.slide_ids, table.labels = [s for s, _ in kept], [y for _, y in kept]
    if not table.slide_ids:
        raise UserError("no slide has both a label and a feature file")
    if len(table.class_names) < 2:
        raise UserError(f"labels {cfg['labels']}: needs at least two classes, found only {table.class_names}")
    label_of = table.as_dict()
    splits = _read_splits(cfg, table)
    for k, split in splits.items():  # every slide a split names must be labelled; those skipped drop out
        listed = [s for c in SPLIT_COLUMNS for s in split[c]]
        unlabeled = [s for s in listed if s not in label_of and s not in missing_set]
        if unlabeled:
            raise UserError(
                f"fold {k}: {len(unlabeled)} slide(s) in the split file are not in {cfg['labels']}: "
                f"{', '.join(unlabeled[:20])}"
            )
        for c in SPLIT_COLUMNS:
            split[c] = [s for s in split[c] if s in label_of]
        for c in ("train", "test"):
            if not split[c]:
                raise UserError(f"fold {k}: the {c} split is empty")
        train_classes = sorted({label_of[s] for s in split["train"]})
        if len(train_classes) < 2:
            raise UserError(
                f"fold {k}: the training split has only one class ({table.class_names[train_classes[0]]!r}, "
                f"{len(split['train'])} slides); each training split needs at least two classes"
            )
    used = sorted({s for split in splits.values() for c in SPLIT_COLUMNS for s in split[c]})
    return _Bags(store, table, splits, inspect_bags(store, used), missing, sorted(unreadable))


# ---------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_bags(model: nn.Module, dataset: Dataset, device: torch.device, show_progress: bool = False,
                  desc: str = "eval", num_workers: int = 0, amp: Optional[str] = None) -> Dict[str, Any]:
    """Mean cross-entropy, AUC, macro F1, accuracy over a data set of bags (+ labels, probs, slide ids)."""
    model.eval()
    loader = DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate_bag, num_workers=num_workers)
    losses, probs, labels, slides = [], [], [], []
    for feats, label, slide in progress(loader, desc=desc, enabled=show_progress):
        with autocast(device, amp):
            logits = model(feats.to(device, non_blocking=True)).float()
        losses.append(float(F.cross_entropy(logits, label.view(1).to(device))))
        probs.append(torch.softmax(logits, dim=-1)[0].cpu().numpy())
        labels.append(int(label))
        slides.append(slide)
    probs_arr = np.stack(probs) if probs else np.zeros((0, 0))
    return {"loss": float(np.mean(losses)) if losses else float("nan"), **classification_metrics(labels, probs_arr),
            "n": len(labels), "labels": labels, "probs": probs_arr, "slide_ids": slides}


def load_mil_checkpoint(path: str, device: Any = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """A `mil train` fold checkpoint (`fold_<k>.pt`, of the one run format or of lbmamba before it) as its
    model in eval mode and the rest: {"config": the model's constructor arguments, "class_names", "fold", ...}."""
    ckpt = load_training_checkpoint(path)
    require_task(ckpt, path, "mil", "mil eval")
    if ckpt.get("format") == FORMAT and "model_config" in ckpt:
        meta = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer", "rng", "config", "model_config")}
        meta["config"] = ckpt["model_config"]
    elif ckpt.get("format") == _OLD_CHECKPOINT_FORMAT and "config" in ckpt:
        meta = {k: v for k, v in ckpt.items() if k != "model"}
    else:
        raise UserError(f"checkpoint {path}: not a `lbmamba mil train` fold checkpoint (no MIL model config inside)")
    try:
        model = create_mil_model(**meta["config"])
        model.load_state_dict(ckpt["model"])
    except (ValueError, TypeError, RuntimeError) as exc:
        raise UserError(f"checkpoint {path}: the stored model does not rebuild: {exc}") from exc
    return model.to(device).eval(), meta


# ---------------------------------------------------------------------- training
def _resolve_preset(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Check what can be checked without the data; fill the keys left at null from the preset."""
    if (cfg["features"] is None) != (cfg["labels"] is None):
        raise UserError("features and labels go together (give both, or neither for the digits-bags demo)")
    if cfg["features"] is None and cfg["splits"] is not None:
        raise UserError("splits needs features and labels")
    if cfg["features"] is None and cfg["folds"] is not None and cfg["folds"] < 3:
        raise UserError(f"folds must be an int >= 3 (test, val and train parts), got {cfg['folds']}")
    for key, value in (DIGITS_PRESET if cfg["features"] is None else PAPER_PRESET).items():
        if cfg[key] is None:
            cfg[key] = value
    return cfg


def _model_config(cfg: Mapping[str, Any], in_dim: int, num_classes: int) -> Dict[str, Any]:
    """The MIL model's constructor arguments; UserError when the model options do not build a model."""
    config = dict(model=cfg["model"], in_dim=in_dim, num_classes=num_classes, depth=cfg["depth"],
                  embed_dim=cfg["embed_dim"], drop_rate=cfg["drop_rate"], d_state=cfg["d_state"], rate=cfg["rate"],
                  window=cfg["window"], init=cfg["init"])
    try:
        with torch.device("meta"):
            create_mil_model(**config)
    except (ValueError, TypeError) as exc:
        raise UserError(f"invalid model options: {exc}") from exc
    return config


@user_errors()
def train_mil(overrides: Optional[Mapping[str, Any]] = None, config_path: Optional[str] = None) -> Dict[str, Any]:
    """k-fold training and testing as the `MIL_TRAIN` table says; returns the summary (also written to
    <run>/summary.csv and <run>/summary.json)."""
    checked: Dict[str, _Bags] = {}

    def prepare(cfg: Dict[str, Any]) -> Dict[str, Any]:
        """Everything that can be checked is checked before the run folder exists."""
        cfg = _resolve_preset(cfg)
        _model_config(cfg, in_dim=8, num_classes=2)
        if cfg["features"] is not None:
            checked["bags"] = _load_bags(cfg)
        return cfg

    start = time.time()
    with open_run(MIL_TRAIN, overrides, config_path, lambda cfg: f"mil-{cfg['model']}", prepare,
                  distributed=False) as run:
        return _train_mil(run, start, checked.get("bags"))


def _run_data(run: Run, bags: Optional[_Bags]) -> Tuple[_Bags, str]:
    """The run's bags (the digits-bags demo is written into the run folder once; generated folds are
    written to <run>/splits) and the data set's name."""
    cfg = run.cfg
    if cfg["features"] is None:
        root = run.path("data")
        if not os.path.isdir(root):
            write_digits_bags(root, folds=int(cfg["folds"]), seed=cfg["seed"])
        demo = dict(cfg, features=root, labels=os.path.join(root, "labels.csv"), splits=os.path.join(root, "splits"),
                    folds=None)
        return _load_bags(demo), DIGITS
    bags = bags or _load_bags(cfg)
    if cfg["splits"] is None and not os.path.isdir(run.path("splits")):
        for k, split in bags.splits.items():
            write_split_file(run.path(os.path.join("splits", f"splits_{k}.csv")), split)
    return bags, os.path.abspath(cfg["features"])


def _train_mil(run: Run, start: float, bags: Optional[_Bags]) -> Dict[str, Any]:
    """The fold driver: each fold not finished yet is a run of the training loop; after each, its row joins
    summary.csv and last.pth."""
    cfg = run.cfg
    check_resumable(run.checkpoint, run.path(LAST))
    bags, dataset_name = _run_data(run, bags)
    model_config = _model_config(cfg, bags.in_dim, len(bags.table.class_names))
    state = run.checkpoint or {}
    rows: List[Dict[str, Any]] = list(state.get("finished", []))
    done = {r["fold"] for r in rows}
    saved = run.saved_summary()
    if done >= set(bags.splits) and saved is not None:  # else: write the summary the run did not get to write
        note(f"lbmamba mil train: the run in {run.dir} already finished ({len(done)} folds); nothing to do")
        return saved
    at_fold, at_epoch = state.get("fold"), int(state.get("epoch") or 0)
    record = RunRecord(run.dir, _CURVES, f"MIL {cfg['model']} on {os.path.basename(dataset_name)}", group="fold",
                       shown=_SHOWN, log=cfg["log"],
                       keep=(lambda r: r["fold"] in done or (r["fold"] == at_fold and r["epoch"] <= at_epoch))
                       if run.resumed else None)
    for k, split in bags.splits.items():
        if k in done:
            continue
        resume = state if state.get("fold") == k and "model" in state else None
        rows.append(FoldTask(run, k, split, bags, model_config, rows).train(record, resume))
        _write_summary_csv(run.path("summary.csv"), rows)
        atomic_save({"format": FORMAT, "task": "mil", "config": jsonable(cfg), "finished": jsonable(rows)},
                    run.path(LAST))
    result = _summary(cfg, rows, bags, dataset_name, run, start)
    record.finish(result)
    return result


def _summary(cfg, rows, bags: _Bags, dataset_name: str, run: Run, start: float) -> Dict[str, Any]:
    stats = {c: mean_std(r[c] for r in rows) for c in ("test_auc", "test_f1", "test_acc")}
    result: Dict[str, Any] = {"command": "mil train", "dataset": dataset_name, "model": cfg["model"],
                              "classes": bags.table.class_names, "folds": len(rows)}
    for name, column in (("auc", "test_auc"), ("f1", "test_f1"), ("acc", "test_acc")):
        result[f"{name}_mean"], result[f"{name}_std"] = stats[column]["mean"], stats[column]["std"]
    result.update(
        per_fold=[{"fold": r["fold"], "auc": r["test_auc"], "f1": r["test_f1"], "acc": r["test_acc"],
                   "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"]} for r in rows],
        skipped_missing=len(bags.missing), skipped_unreadable=len(bags.unreadable),
        output=run.dir, summary_csv=run.path("summary.csv"),
        device=str(run.dist.device), wall_s=round(time.time() - start, 1),
    )
    return jsonable(result)


def _write_summary_csv(path: str, rows: List[Dict[str, Any]]) -> None:
    """One row per finished fold, then mean, std and mean±std over them."""
    stats = {c: mean_std(r[c] for r in rows) for c in _SUMMARY_COLUMNS[1:6]}
    out: List[List[Any]] = [_SUMMARY_COLUMNS]
    out += [[f"{r[c]:.6f}" if isinstance(r[c], float) else r[c] for c in _SUMMARY_COLUMNS] for r in rows]
    for name in ("mean", "std"):
        out.append([name] + [f"{stats[c][name]:.6f}" if c in stats else "" for c in _SUMMARY_COLUMNS[1:]])
    out.append(["mean±std"] + [f"{stats[c]['mean']:.4f}±{stats[c]['std']:.4f}" if c in stats else ""
                               for c in _SUMMARY_COLUMNS[1:]])
    write_csv(path, out)


class FoldTask(Task):
    """One fold as MambaMIL trains it: one bag per step, cross-entropy, the config's optimizer preset (Adam with
    L2 by default), a constant lr, validation loss every epoch with CLAM's early stopping, the best epoch kept
    as `fold_<k>.pt` and scored on the fold's test split."""

    task_name = "mil"

    unit = "epoch"
    samples = "bags"
    worst_score = -math.inf  # the score is minus the validation loss

    def __init__(self, run: Run, fold: int, split: Dict[str, List[str]], bags: _Bags, model_config: Dict[str, Any],
                 finished: List[Dict[str, Any]]):
        super().__init__(run)
        self.fold, self.bags, self.model_config, self.finished = fold, bags, model_config, finished
        self.label = f"fold {fold}, "
        if not split["val"]:
            warnings.warn(f"fold {fold}: empty val split: no early stopping, the last epoch is kept", stacklevel=3)
        self.train_ds = bags.dataset(split["train"], run.cfg["max_instances"])
        self.val_ds, self.test_ds = bags.dataset(split["val"]), bags.dataset(split["test"])

    @property
    def best_path(self) -> str:
        return self.run.path(f"fold_{self.fold}.pt")

    def train(self, record: RunRecord, resume: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        """Train the fold (from `resume`, a last.pth that stopped in it) and return its row of results."""
        cfg, device = self.cfg, self.dist.device
        seed_everything(cfg["seed"], self.fold)
        model = create_mil_model(**self.model_config).to(device)
        if cfg["grad_checkpointing"]:
            model.set_grad_checkpointing(True)
        _set_scan_chunk(model, cfg["scan_chunk"])
        preset = preset_for("mil", cfg)
        optimizer = create_optimizer(preset, param_groups(model, preset, cfg["weight_decay"]), cfg["lr"], cfg)
        self.generator = torch.Generator()
        sampler = balanced_sampler(self.train_ds.labels, generator=self.generator) if cfg["balanced"] else None
        self.loader = DataLoader(self.train_ds, batch_size=1, shuffle=sampler is None, sampler=sampler,
                                 generator=self.generator if sampler is None else None, collate_fn=collate_bag,
                                 num_workers=cfg["workers"], worker_init_fn=seed_worker)
        plan = Plan(model, optimizer, Schedule(), grad_scaler(device, cfg["amp"]),
                    updates_per_epoch=len(self.loader))
        end = fit(self, plan, record, resume)
        model.load_state_dict(load_training_checkpoint(self.best_path)["model"])
        test = evaluate_bags(model, self.test_ds, device, cfg["progress"], "test", cfg["workers"], cfg["amp"])
        return {"fold": self.fold, "test_auc": test["auc"], "test_f1": test["f1"], "test_acc": test["acc"],
                "test_loss": test["loss"], "val_loss": -end.best_score if len(self.val_ds) else float("nan"),
                "best_epoch": end.best_at, "epochs_run": end.count, "n_train": len(self.train_ds),
                "n_val": len(self.val_ds), "n_test": len(self.test_ds), "checkpoint": self.best_path}

    # ------------------------------------------------------------------ what the loop asks
    def train_batches(self, epoch: int, update: int):
        seed_everything(self.cfg["seed"], self.fold, epoch + 1)
        self.generator.manual_seed(derive_seed(self.cfg["seed"], self.fold, epoch, 1))
        return ((feats, label, slide, 0) for feats, label, slide in self.loader)

    def losses(self, model: nn.Module, feats: torch.Tensor, label: torch.Tensor, slide) -> Dict[str, torch.Tensor]:
        # a bag's features were checked when it was read: a non-finite loss means the training diverged
        return {"loss": F.cross_entropy(model(feats).float(), label.view(1))}

    def evaluate(self, model: nn.Module, count: int) -> Tuple[Dict[str, Any], float]:
        if not len(self.val_ds):  # no validation split: the last epoch is the best
            return {"val_loss": float("nan"), "val_auc": float("nan")}, float(count)
        cfg = self.cfg
        val = evaluate_bags(model, self.val_ds, self.dist.device, cfg["progress"], "val", cfg["workers"], cfg["amp"])
        return {"val_loss": val["loss"], "val_auc": val["auc"]}, -val["loss"]

    def stop_early(self, epochs_done: int, evals_since_best: int) -> bool:
        cfg = self.cfg
        return bool(len(self.val_ds)) and should_stop(epochs_done, evals_since_best, cfg["patience"], cfg["stop_epoch"])

    def checkpoint_extra(self) -> Dict[str, Any]:
        return {"fold": self.fold, "finished": jsonable(self.finished), "model_config": jsonable(self.model_config),
                "class_names": list(self.bags.table.class_names), "seed": self.cfg["seed"]}

    def row_extra(self) -> Dict[str, Any]:
        return {"fold": self.fold}


def should_stop(epochs_done: int, bad_epochs: int, patience: int, stop_epoch: int) -> bool:
    """CLAM's / MambaMIL's early stopping after an epoch: `patience` epochs without a lower validation loss (a
    tie counts as none), and the epoch just done (0-based: epochs_done - 1) past `stop_epoch`."""
    return bad_epochs >= patience and epochs_done - 1 > stop_epoch


# ---------------------------------------------------------------------- scoring a checkpoint
@user_errors()
def evaluate_mil(overrides: Optional[Mapping[str, Any]] = None, config_path: Optional[str] = None) -> Dict[str, Any]:
    """Score a `mil train` fold checkpoint on one split of one fold (without splits: on every labelled slide)."""
    cfg = MIL_EVAL.load(config_path, overrides)
    for key in ("checkpoint", "features", "labels"):
        if not cfg[key]:
            raise UserError(f"mil eval needs --{key}")
    with session(cfg["device"], cfg["threads"], MIL_EVAL.command, distributed=False) as dist:
        return _evaluate_mil(cfg, dist)


def _set_scan_chunk(model: nn.Module, chunk: Optional[int]) -> None:
    try:
        model.set_scan_chunk(chunk)
    except ValueError as exc:
        raise UserError(f"scan_chunk: {exc}") from exc


def _evaluate_mil(cfg: Mapping[str, Any], dist: DistInfo) -> Dict[str, Any]:
    model, meta = load_mil_checkpoint(cfg["checkpoint"], dist.device)
    _set_scan_chunk(model, cfg["scan_chunk"])
    table = read_labels(cfg["labels"], class_names=meta.get("class_names"))
    label_of = table.as_dict()
    fold, split = cfg["fold"], cfg["split"]
    if cfg["splits"] is not None:
        files = find_split_files(cfg["splits"])
        if fold is None:
            if len(files) != 1:
                raise UserError(f"fold is needed: {cfg['splits']} holds folds {sorted(files)}")
            fold = next(iter(files))
        if fold not in files:
            raise UserError(f"fold {fold}: no splits_{fold}.csv in {cfg['splits']} (have {sorted(files)})")
        slide_ids = read_split_file(files[fold])[split]
        unlabeled = [s for s in slide_ids if s not in label_of]
        if unlabeled:
            raise UserError(f"{len(unlabeled)} slide(s) of the {split} split are not in {cfg['labels']}: "
                            f"{', '.join(unlabeled[:20])}")
    else:
        slide_ids = list(table.slide_ids)
    store = FeatureStore(cfg["features"], prefer=cfg["prefer"])
    missing = store.missing(slide_ids)
    if missing and not cfg["skip_missing"]:
        raise UserError(
            f"{len(missing)} slide(s) have no feature file under {cfg['features']}: {', '.join(missing[:20])}"
            f"{' ...' if len(missing) > 20 else ''} (set skip_missing to leave them out)"
        )
    slide_ids = [s for s in slide_ids if s not in set(missing)]
    if not slide_ids:
        raise UserError(f"the {split} split has no slides to score")
    inspect_bags(store, slide_ids, expected_dim=model.in_dim)
    ds = MILBagDataset(store, slide_ids, [label_of[s] for s in slide_ids], expected_dim=model.in_dim)
    res = evaluate_bags(model, ds, dist.device, cfg["progress"], split, cfg["workers"], cfg["amp"])
    return jsonable({
        "command": "mil eval", "checkpoint": os.path.abspath(cfg["checkpoint"]), "model": meta["config"].get("model"),
        "fold": fold, "split": split if cfg["splits"] is not None else "all", "n": res["n"],
        "auc": res["auc"], "f1": res["f1"], "acc": res["acc"], "loss": res["loss"], "skipped_missing": len(missing),
    })
