"""`lbmamba <command>` / `python -m lbmamba <command>`: argument parsing only.

Every command is an engine function over a config table (`lbmamba.engine.config`): its flags are the
table's keys (`--batch-size` sets `batch_size`), `--config FILE` reads a YAML file and `--set KEY=VALUE`
sets any key. The command prints the dict the function returns as ONE JSON line (the last line on
stdout) and exits 0. Bad input (`lbmamba.engine.UserError`) prints `lbmamba <command>: error: <message>`
on stderr, without a traceback, and exits 1. Under torchrun only rank 0 prints the JSON line.
"""

from __future__ import annotations

import argparse
import difflib
import json
import signal
import sys
import textwrap
import threading
from typing import Any, Callable, Dict, Optional, Sequence

from . import __version__
from .engine import (
    BENCH,
    DET_EVAL,
    DET_PREDICT,
    DET_TRAIN,
    EVAL,
    EXPORT,
    EXTRACT,
    HEATMAP,
    MIL_EVAL,
    MIL_TRAIN,
    PATCH,
    PREDICT,
    SEG_EVAL,
    SEG_PREDICT,
    SEG_TRAIN,
    TRAIN,
    ConfigTable,
    UserError,
    bench,
    evaluate,
    evaluate_det,
    evaluate_mil,
    evaluate_seg,
    export_model,
    extract_features,
    heatmap,
    patch_slides,
    predict,
    predict_det,
    predict_seg,
    train,
    train_det,
    train_mil,
    train_seg,
)
from .engine.config import parse_override
from .engine.files import jsonable

__all__ = ["main", "build_parser"]

_DEST = "key:"  # argparse destinations of config keys (no clash with config / set / func)
_CONFIG_HELP = """\
config: the command's defaults <- --config FILE <- --set KEY=VALUE <- the flags (each flag sets the key of
its name). --set values are YAML: --set lr=5e-4 --set model_kwargs.depth=6 --set amp=null.
The last stdout line is a JSON object with the final figures.

config keys (default, meaning):
"""


def _para(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), width=100)


def _add_command(sub, name: str, table: ConfigTable, func: Callable, help_text: str, description: str,
                 example: str = "") -> argparse.ArgumentParser:
    """A sub-command whose flags are `table`'s flag keys, plus --config and --set."""
    epilog = (f"example: {example}\n\n" if example else "") + _CONFIG_HELP + table.describe()
    p = sub.add_parser(name, help=help_text, description=_para(description), epilog=epilog,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML config (see configs/)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="set one config key (repeatable; the value is YAML)")
    for key_name, key in table.keys.items():
        if not key.flag:
            continue
        dest = _DEST + key_name
        if key.kind == "bool":
            kwargs: Dict[str, Any] = dict(action="store_const", const=not key.default)
        else:
            kwargs = dict(metavar=key_name.upper())
        p.add_argument(table.flag(key_name), dest=dest, help=table.flag_help(key_name), **kwargs)
        for alias in key.aliases:
            p.add_argument(alias, dest=dest, help=argparse.SUPPRESS, **kwargs)
    p.set_defaults(func=func, table=table, command_parser=p)
    return p


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    """--set entries, then the flags given (a flag wins over --set of the same key)."""
    table: ConfigTable = args.table
    out: Dict[str, Any] = dict(parse_override(text) for text in args.set)
    for dest, value in vars(args).items():
        if dest.startswith(_DEST) and value is not None:
            name = dest[len(_DEST):]
            out[name] = value if isinstance(value, bool) else table.parse_text(name, value)
    return out


def _add_group(sub, name: str, help_text: str, description: str):
    """A command group (`lbmamba NAME SUBCOMMAND`) that prints its help when called alone; its subparsers."""
    group = sub.add_parser(name, help=help_text, description=description)
    group.set_defaults(func=None, group=group)
    return group.add_subparsers(dest=f"{name}_command", metavar="SUBCOMMAND")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lbmamba",
        description="LBMamba (locally bi-directional Mamba): train, evaluate and benchmark LBVim / Vim models, "
                    "semantic segmentation and object detection with them, and whole-slide image classification with "
                    "LB-MambaMIL.",
        epilog="Run `lbmamba train` with no arguments to train a small LBVim on scikit-learn's digits (CPU, minutes).",
    )
    parser.add_argument("--version", action="version", version=f"lbmamba {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_command(
        sub, "train", TRAIN, train,
        "train an image classifier (default: a small LBVim on the bundled digits, CPU)",
        "Train an image classifier. With no arguments: a 4-layer LBVim on scikit-learn's 8x8 digits (upsampled to "
        "32x32) on the CPU in a few minutes. With --config configs/classification/lbvim_tiny.yaml "
        "--data /path/to/imagenet: the paper's ImageNet recipe; multi-GPU / multi-node with "
        "`torchrun --nproc_per_node 8 -m lbmamba train ...`. "
        "The run folder gets config.yaml, last.pth / best.pth (atomically, every epoch), metrics.jsonl, curves.png "
        "and summary.json; --resume FOLDER continues a run with its own config.",
        "lbmamba train --config configs/classification/lbvim_tiny.yaml --data /data/imagenet",
    )
    _add_command(
        sub, "eval", EVAL, evaluate,
        "evaluate a checkpoint: top-1, top-5, loss, images/s",
        "Evaluate a checkpoint on a validation set. Accepts our last.pth / best.pth (the model, its arguments and the "
        "data default to what the checkpoint recorded) and the reference code bases' {'model': state_dict} files "
        "(give --model). --data is an ImageFolder root (its val/ is used) or a folder of class folders, or 'digits'.",
        "lbmamba eval --model lbvim_tiny_patch16_224 --checkpoint lbvim_tiny.pth --data /data/imagenet",
    )
    _add_command(
        sub, "bench", BENCH, bench,
        "throughput and peak memory (the paper's protocol)",
        "Inference throughput (random input, fp32, no_grad, warm-up, synchronised timing; batch 128 and 100 passes on "
        "a GPU, batch 8 and 10 passes on the CPU by default), training throughput and peak memory for each model. "
        "Prints a table, writes bench.json and bench.png (throughput against parameters, or against accuracy with "
        "--results).",
        "lbmamba bench --models lbvim_tiny_patch16_224,vim_tiny_patch16_224 --results acc.json",
    )
    _add_command(
        sub, "export", EXPORT, export_model,
        "write a model.onnx that plain onnxruntime runs (checked against PyTorch)",
        "Export a classifier or segmentor checkpoint (or a timm model name with --checkpoint WEIGHTS) to ONNX: "
        "standard ops only (the scan as a short blocked graph), a dynamic batch axis, the image size fixed by "
        "--img-size, and the preprocessing (mean, std, size, class names) in the file's metadata. The file is run in "
        "onnxruntime on random batches and compared with PyTorch; above --tolerance nothing is written. "
        "--quantize dynamic writes int8 MatMul weights. See docs/deploy.md.",
        "lbmamba export --checkpoint runs/digits/best.pth --output model.onnx",
    )
    _add_command(
        sub, "predict", PREDICT, predict,
        "classify images: top-k classes and scores (PyTorch or onnxruntime)",
        "Classify an image or a folder of images with a classifier checkpoint (--engine torch) or an exported "
        "model.onnx (--engine onnxruntime) and write the top-k classes and softmax scores to a CSV file.",
        "lbmamba predict --checkpoint model.onnx --inputs photos/ --top-k 3",
    )
    mil_sub = _add_group(
        sub, "mil", "whole-slide image classification from patch features (LB-MambaMIL, MambaMIL, ABMIL)",
        "Multiple-instance learning on whole-slide images in the CLAM layout: `patch` slides (tissue and a patch "
        "grid), `extract` patch features, `train` k-fold, `eval` a checkpoint, `heatmap` its attention.",
    )
    _add_command(
        mil_sub, "train", MIL_TRAIN, train_mil,
        "k-fold training + testing (no data: the digits-bags demo, CPU, minutes)",
        "Train a MIL model per fold (Adam with L2 weight decay by default, --opt adamw for AdamW; one bag per step, "
        " early stopping on the validation loss), keep the best "
        "epoch (<run>/fold_<k>.pt), score it on the fold's test split, and write <run>/summary.csv with AUC, macro F1 "
        "and accuracy per fold and mean ± std. Without --features / --labels: a digits-bags data set (scikit-learn's "
        "8x8 digits; a bag is positive iff it holds a 9) written into the run folder. --resume FOLDER continues at "
        "the fold and epoch where a run stopped.",
        "lbmamba mil train --features FEATS/ --labels slides.csv --splits SPLITS/ --model lb",
    )
    _add_command(
        mil_sub, "eval", MIL_EVAL, evaluate_mil,
        "score a `mil train` checkpoint on one split",
        "Rebuild the model stored in a `mil train` fold checkpoint and report AUC, macro F1, accuracy and loss on a "
        "split of a fold (without --splits: on every slide of the labels CSV).",
        "lbmamba mil eval --checkpoint RUN/fold_0.pt --features FEATS/ --labels slides.csv --splits SPLITS/ --fold 0",
    )
    _add_command(
        mil_sub, "extract", EXTRACT, extract_features,
        "slides + coordinates (or patch-image folders) -> CLAM h5 feature files",
        "Encode patches with a timm encoder and write <output>/h5_files/<slide>.h5 (features, coords). With --slides "
        "and --coords (`mil patch`, CLAM or TRIDENT coordinate files) patches are read straight from the slides; "
        "with --patches, from one folder of images per slide (coordinates from file names like 1024_2048.png, else a "
        "running index). Under torchrun the slides are shared out among the processes; a rerun skips finished "
        "slides. No weights are downloaded: without --encoder-checkpoint the encoder has random weights (a warning "
        "says so).",
        "lbmamba mil extract --slides SLIDES/ --coords PATCHES/ --output FEATS/ --encoder-checkpoint resnet50.pth",
    )
    _add_command(
        mil_sub, "patch", PATCH, patch_slides,
        "whole-slide images -> tissue masks and CLAM coordinate files (patches/<slide>.h5)",
        "Find the tissue of every slide (CLAM's recipe: saturation, median blur, Otsu, closing, area filters) and "
        "cut a grid of --patch-size patches at --magnification (default 256 px at 20x); write "
        "<output>/patches/<slide>.h5 (coords at level 0, patch_level, patch_size) and previews/<slide>.png. "
        "--workers N patches N slides at once; a rerun skips finished slides; --skip-bad skips slides that cannot "
        "be patched.",
        "lbmamba mil patch --slides SLIDES/ --output PATCHES/ --workers 4",
    )
    _add_command(
        mil_sub, "heatmap", HEATMAP, heatmap,
        "attention heatmaps of a `mil train` checkpoint over the slides, and their top patches",
        "Run a fold checkpoint on each slide's features and draw its attention-pooling weights over the slide "
        "thumbnail as a colour map (<output>/<slide>_heatmap.png, with the predicted class and score); save the "
        "--top-k patches as images (<output>/<slide>_top/) and everything in heatmaps.json.",
        "lbmamba mil heatmap --checkpoint RUN/fold_0.pt --slides SLIDES/ --features FEATS/ --output HEATMAPS/",
    )
    seg_sub = _add_group(
        sub, "seg", "semantic segmentation: UperNet on an LBVim / Vim backbone (ADE20K, your own masks)",
        "Semantic segmentation with an LBVim / Vim / uVim backbone and UperNet heads: `train` (iterations, "
        "exact resume), `eval` (mIoU, mAcc, aAcc, per-class IoU), `predict` (colour masks and overlays).",
    )
    _add_command(
        seg_sub, "train", SEG_TRAIN, train_seg,
        "train a segmentor (no data: generated digit scenes, CPU, minutes)",
        "Train a segmentor: backbone (LBVim / Vim / uVim or a timm model) + UPerHead + auxiliary FCNHead, AdamW, "
        "warm-up and poly decay over iterations. Without --data: digit scenes (scikit-learn's digits pasted on "
        "textured canvases, written into <run>/data) on the CPU in minutes. With --config configs/seg/lbvim_tiny.yaml "
        "--data /data/ade/ADEChallengeData2016: the paper's ADE20K recipe; multi-GPU with `torchrun --nproc_per_node 8 "
        "-m lbmamba seg train ...`. The run folder gets config.yaml, last.pth / best.pth (atomically), metrics.jsonl, "
        "curves.png and summary.json; --resume FOLDER continues a run exactly where it stopped.",
        "lbmamba seg train --config configs/seg/lbvim_tiny.yaml --data /data/ade/ADEChallengeData2016",
    )
    _add_command(
        seg_sub, "eval", SEG_EVAL, evaluate_seg,
        "score a segmentor: mIoU, mAcc, aAcc and per-class IoU",
        "Score a checkpoint on a split (default: the validation split) with mmsegmentation's IoU metric over the "
        "whole data set. Accepts our last.pth / best.pth (the model and the data default to what the run used) and "
        "segmentor state dicts with mmsegmentation's names (give the model keys). --eval-mode slide, --eval-flip and "
        "--eval-scales set the test-time augmentation.",
        "lbmamba seg eval --checkpoint runs/seg/best.pth --data /data/ade/ADEChallengeData2016 --eval-mode slide",
    )
    _add_command(
        seg_sub, "predict", SEG_PREDICT, predict_seg,
        "segment images: colour masks, label maps and overlays as PNG",
        "Segment an image or a folder of images with a checkpoint and write <output>/<stem>_mask.png (class colours), "
        "<stem>_labels.png (class indices) and <stem>_overlay.png.",
        "lbmamba seg predict --checkpoint runs/seg/best.pth --inputs photos/ --output masks/",
    )
    det_sub = _add_group(
        sub, "det", "object detection and instance segmentation: Cascade Mask R-CNN on an LBVim / Vim backbone (COCO)",
        "Object detection and instance segmentation with an LBVim / Vim / uVim backbone, ViTDet's simple "
        "feature pyramid and Cascade Mask R-CNN or Mask R-CNN: `train` (iterations, exact resume), `eval` "
        "(COCO box and mask AP), `predict` (boxes, labels and masks drawn into PNGs).",
    )
    _add_command(
        det_sub, "train", DET_TRAIN, train_det,
        "train a detector (no data: generated digit scenes, CPU, minutes)",
        "Train a detector: backbone + simple feature pyramid + RPN + cascade box and mask heads, AdamW, linear "
        "warm-up and step decay over iterations, large-scale jitter. Without --data: digit scenes with COCO-format "
        "boxes and polygon masks (written into <run>/data) on the CPU in minutes. With --config "
        "configs/det/lbvim_tiny.yaml --data /data/coco: the paper's COCO recipe; multi-GPU with `torchrun "
        "--nproc_per_node 8 -m lbmamba det train ...`. The run folder gets config.yaml, last.pth / best.pth "
        "(atomically), metrics.jsonl, curves.png and summary.json; --resume FOLDER continues a run exactly where it "
        "stopped.",
        "lbmamba det train --config configs/det/lbvim_tiny.yaml --data /data/coco",
    )
    _add_command(
        det_sub, "eval", DET_EVAL, evaluate_det,
        "score a detector: COCO box and mask AP",
        "Score a checkpoint with pycocotools' COCOeval (AP, AP50, AP75, APs, APm, APl for boxes and masks) on the "
        "run's validation set, or on --images / --annotations. --results-json also writes the detections.",
        "lbmamba det eval --checkpoint runs/det/best.pth --data /data/coco",
    )
    _add_command(
        det_sub, "predict", DET_PREDICT, predict_det,
        "detect objects in images: boxes, labels and masks drawn into PNGs",
        "Run a checkpoint on an image or a folder of images and write <output>/<stem>_detections.png (masks, boxes, "
        "'class score' labels) and <output>/detections.json.",
        "lbmamba det predict --checkpoint runs/det/best.pth --inputs photos/ --output detections/",
    )
    return parser


def _unknown_flags(parser: argparse.ArgumentParser, extras: Sequence[str]) -> None:
    """Exit (status 2) with `parser`'s usage (the sub-command's own) and, for each unknown flag, the closest
    one it has: "unrecognized arguments: --itters 5 (did you mean --iters?)"."""
    known = [s for action in parser._actions for s in action.option_strings if s.startswith("--")]
    hints = []
    for extra in extras:
        if extra.startswith("-"):
            flag = extra.split("=", 1)[0]
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            if close:
                hints.append(f"did you mean {close[0]}?" if sum(e.startswith("-") for e in extras) == 1 else
                             f"{flag}: did you mean {close[0]}?")
    parser.error(f"unrecognized arguments: {' '.join(extras)}" + (f" ({'; '.join(hints)})" if hints else ""))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `lbmamba` and `python -m lbmamba`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:  # said by the sub-command's parser (its usage), with the closest flag
        _unknown_flags(getattr(args, "command_parser", None) or getattr(args, "group", None) or parser, extras)
    if not getattr(args, "func", None):  # `lbmamba` alone, or a task without its sub-command
        getattr(args, "group", parser).print_help()
        return 2
    command = args.table.command
    signals = []

    def terminated(signum, frame):  # what job schedulers send: stop like Ctrl-C (checkpoints stay whole)
        signals.append(signum)
        raise KeyboardInterrupt

    in_main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, terminated) if in_main_thread else None
    try:
        result = args.func(_overrides(args), args.config)
    except UserError as exc:
        print(f"lbmamba {command}: error: {' '.join(str(exc).split()) or type(exc).__name__}", file=sys.stderr,
              flush=True)
        return 1
    except OSError as exc:  # a file system's refusal the command did not turn into a UserError: still one line
        where = f" {exc.filename}" if exc.filename else ""
        print(f"lbmamba {command}: error: cannot write or read{where}: {exc.strerror or exc}", file=sys.stderr,
              flush=True)
        return 1
    except KeyboardInterrupt as exc:
        detail = f"; {exc}" if str(exc) else ""
        print(f"lbmamba {command}: {'terminated' if signals else 'interrupted'}{detail}", file=sys.stderr, flush=True)
        return 128 + (signals[0] if signals else signal.SIGINT)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if result is not None:
        sys.stdout.flush()
        print(json.dumps(jsonable(result)), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
