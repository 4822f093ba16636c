"""`lbmamba mil train | eval | extract`: whole-slide image classification (argument parsing only).

`lbmamba.cli` calls `register(subparsers)`; each sub-command's `func(args)` returns a JSON-able dict that
the CLI prints as the last stdout line. The work is done in `lbmamba.engine.mil`.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict

__all__ = ["register"]

_MODELS = ("lb", "mamba", "bimamba", "srmamba", "lb-srmamba", "abmil")  # = lbmamba.models.mil.MODEL_NAMES


def _window(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'auto', got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def _fold_list(text: str):
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fold numbers like 0,2,3; got {text!r}") from None


def _cmd_train(args: argparse.Namespace) -> Dict[str, Any]:
    from .engine.mil import MILTrainConfig, train_mil

    cfg = MILTrainConfig(
        features=args.features, labels=args.labels, splits=args.splits, folds=args.folds, fold_indices=args.fold_indices,
        seed=args.seed, model=args.model, depth=args.layers, embed_dim=args.embed_dim, d_state=args.d_state,
        rate=args.rate, window=args.window, drop_rate=args.dropout, lr=args.lr, weight_decay=args.weight_decay,
        epochs=args.epochs, patience=args.patience, min_epochs=args.min_epochs, max_instances=args.max_instances,
        balanced=args.balanced, skip_missing=args.skip_missing, prefer=args.prefer, out=args.out, device=args.device,
        num_workers=args.workers, threads=args.threads, progress=not args.no_progress,
        grad_checkpointing=args.grad_checkpointing,
    )
    return train_mil(cfg)


def _cmd_eval(args: argparse.Namespace) -> Dict[str, Any]:
    from .engine.mil import evaluate_mil_checkpoint

    return evaluate_mil_checkpoint(
        args.checkpoint, args.features, args.labels, splits=args.splits, fold=args.fold, split=args.split,
        skip_missing=args.skip_missing, prefer=args.prefer, device=args.device, progress=not args.no_progress,
        num_workers=args.workers,
    )


def _cmd_extract(args: argparse.Namespace) -> Dict[str, Any]:
    from .engine.mil import extract_features

    return extract_features(
        args.patches, args.out, encoder=args.encoder, encoder_checkpoint=args.encoder_checkpoint,
        batch_size=args.batch_size, resize=args.resize, num_workers=args.workers, device=args.device,
        overwrite=args.overwrite, also_pt=args.pt, progress=not args.no_progress,
    )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    p.add_argument("--workers", type=int, default=0, metavar="N", help="DataLoader worker processes (default 0)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def register(subparsers) -> None:
    """Add `mil` with its `train`, `eval` and `extract` sub-commands to `lbmamba`'s sub-parsers."""
    mil = subparsers.add_parser(
        "mil",
        help="whole-slide image classification from patch features (LB-MambaMIL, MambaMIL, ABMIL)",
        description="Multiple-instance learning on whole-slide images in the CLAM layout: "
        "`extract` patch features, `train` k-fold, `eval` a checkpoint.",
    )
    sub = mil.add_subparsers(dest="mil_command", metavar="SUBCOMMAND")

    # ---- train
    p = sub.add_parser(
        "train",
        help="k-fold training + testing (no data arguments: the bundled digits-bags demo, CPU, minutes)",
        description="Train a MIL model per fold (AdamW, one bag per step, early stopping on the validation loss), "
        "keep the best epoch (out/fold_<k>.pt), score it on the fold's test split, and write out/summary.csv "
        "with AUC, macro F1 and accuracy per fold and mean ± std. Without --features/--labels: a digits-bags "
        "data set (scikit-learn's 8x8 digits; a bag is positive iff it holds a 9) in a temporary CLAM-layout folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--features", metavar="DIR", help="CLAM feature folder (pt_files/<slide>.pt and/or h5_files/<slide>.h5)")
    g.add_argument("--labels", metavar="CSV", help="CSV with slide_id,label columns (string labels map to sorted classes)")
    g.add_argument("--splits", metavar="DIR", help="folder of splits_<k>.csv (train,val,test columns); else --folds")
    g.add_argument("--folds", type=int, metavar="K", help="stratified K-fold splits when no --splits (default 5); "
                   "with --splits: use the first K split files")
    g.add_argument("--fold-indices", type=_fold_list, metavar="LIST", help="run only these folds, e.g. 0,3")
    g.add_argument("--seed", type=int, default=0, help="seed of the generated folds, initialisation and shuffling")
    g.add_argument("--max-instances", type=_positive_int, metavar="N",
                   help="randomly sub-sample training bags larger than N instances (kept in order)")
    g.add_argument("--balanced", action="store_true", help="class-balanced sampling of training bags (with replacement)")
    g.add_argument("--skip-missing", action="store_true", help="leave out (and count) labelled slides without a feature file "
                   "instead of stopping with an error")
    g.add_argument("--prefer", choices=("pt", "h5"), default="pt", help="which file to read when a slide has both")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=_MODELS, default="lb",
                   help="MambaMIL mixer (lb: one LB scan; lb-srmamba: LB scans in SRMamba) or the ABMIL baseline")
    g.add_argument("--layers", type=int, metavar="N", help="mixer layers (default 2)")
    g.add_argument("--embed-dim", type=_positive_int, metavar="D", help="width after the input projection "
                   "(default 512; digits demo 64)")
    g.add_argument("--d-state", type=_positive_int, default=16, help="SSM state size")
    g.add_argument("--rate", type=_positive_int, default=10, help="SRMamba re-ordering stride")
    g.add_argument("--window", type=_window, default="auto", help="LB window: a positive int or auto (4/8/16 by length)")
    g.add_argument("--dropout", type=float, metavar="P", help="dropout after the input projection (default 0.25)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute mixer layers in the backward (huge bags)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, help="AdamW learning rate (default 2e-4; digits demo 5e-4)")
    g.add_argument("--weight-decay", type=float, default=1e-5)
    g.add_argument("--epochs", type=_positive_int, help="maximum epochs (default 200; digits demo 12)")
    g.add_argument("--patience", type=_positive_int, help="early-stopping patience on the validation loss (default 20)")
    g.add_argument("--min-epochs", type=int, help="never stop before this many epochs (default 50)")
    g = p.add_argument_group("run")
    g.add_argument("--out", metavar="DIR", help="checkpoints, splits and summary.csv (default runs/mil/<model>-<time>)")
    g.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    _common(g)
    p.set_defaults(func=_cmd_train)

    # ---- eval
    p = sub.add_parser(
        "eval",
        help="score a `mil train` checkpoint on one split",
        description="Rebuild the model stored in a `mil train` checkpoint and report AUC, macro F1, accuracy and "
        "loss on a split of a fold (without --splits: on every slide of the labels CSV).",
    )
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="out/fold_<k>.pt of `mil train`")
    p.add_argument("--features", required=True, metavar="DIR")
    p.add_argument("--labels", required=True, metavar="CSV")
    p.add_argument("--splits", metavar="DIR", help="folder of splits_<k>.csv")
    p.add_argument("--fold", type=int, metavar="K", help="which splits_<K>.csv")
    p.add_argument("--split", choices=("train", "val", "test"), default="test")
    p.add_argument("--skip-missing", action="store_true")
    p.add_argument("--prefer", choices=("pt", "h5"), default="pt")
    _common(p)
    p.set_defaults(func=_cmd_eval)

    # ---- extract
    p = sub.add_parser(
        "extract",
        help="patch images (one folder per slide) -> CLAM h5 feature files",
        description="Encode every patch image with a timm encoder and write out/h5_files/<slide>.h5 (features, coords). "
        "Coordinates come from file names like 1024_2048.png (x_y), else a running index. No weights are "
        "downloaded: without --encoder-checkpoint the encoder has random weights (a warning says so).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--patches", required=True, metavar="DIR", help="one sub-folder of patch images per slide")
    p.add_argument("--out", required=True, metavar="DIR", help="output feature folder (h5_files/ inside)")
    p.add_argument("--encoder", default="resnet50_trunc",
                   help="resnet50_trunc (ResNet-50 to stage 3 + average pooling, 1024-d, as CLAM) or any timm model name")
    p.add_argument("--encoder-checkpoint", metavar="FILE", help="encoder weights (.pth/.pt/.safetensors state dict)")
    p.add_argument("--batch-size", type=_positive_int, default=64)
    p.add_argument("--resize", type=_positive_int, metavar="N", help="resize patches to N x N first")
    p.add_argument("--overwrite", action="store_true", help="re-extract slides whose h5 file exists")
    p.add_argument("--pt", action="store_true", help="also write pt_files/<slide>.pt")
    _common(p)
    p.set_defaults(func=_cmd_extract)
