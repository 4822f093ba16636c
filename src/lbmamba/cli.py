"""`lbmamba <command>` / `python -m lbmamba <command>`: argument parsing only.

Every command parses its arguments, calls one engine function (`args.func(args)`), prints the dict it
returns as ONE JSON line (the last line on stdout) and exits 0. Bad input (`lbmamba.engine.UserError`,
`lbmamba.data.DataError`, a checkpoint that does not fit) prints `lbmamba <command>: error: <message>`
on stderr, without a traceback, and exits 1. Under torchrun only rank 0 prints the JSON line.

Other command groups plug in through `register(subparsers)`: `lbmamba.cli_mil` adds `lbmamba mil ...`;
its sub-commands set `func=` defaults returning a JSON-able dict (or None when they print themselves).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import sys
import textwrap
from typing import Any, Dict, Optional, Sequence

__all__ = ["main", "build_parser"]

_CONFIG_HELP = """\
config: built-in defaults (the digits run) <- --config FILE <- --set KEY=VALUE <- the explicit flags.
  --set values are YAML: --set lr=5e-4 --set model_kwargs.depth=6 --set aa=rand-m9-mstd0.5-inc1 --set amp=null
  configs/ holds the paper's ImageNet recipes (lbvim_tiny.yaml, ..., vim_small.yaml) and digits.yaml.

The last stdout line is a JSON object with the final figures.

config keys (default, meaning):
"""


def _overrides(args: argparse.Namespace, flag_keys: Dict[str, str]) -> Dict[str, Any]:
    from .engine import parse_override

    out: Dict[str, Any] = {}
    for text in getattr(args, "set", None) or []:
        key, value = parse_override(text)
        out[key] = value
    for attr, key in flag_keys.items():
        value = getattr(args, attr, None)
        if value is not None:
            out[key] = value
    return out


_TRAIN_FLAGS = {
    "model": "model", "data": "data", "epochs": "epochs", "batch_size": "batch_size",
    "global_batch_size": "global_batch_size", "lr": "lr", "output": "output", "resume": "resume", "amp": "amp",
    "workers": "workers", "device": "device", "seed": "seed", "max_bad_fraction": "max_bad_fraction",
    "grad_accum": "grad_accum", "clip_grad": "clip_grad", "grad_checkpointing": "grad_checkpointing",
    "stop_after_epochs": "stop_after_epochs", "progress": "progress", "init_checkpoint": "init_checkpoint",
    "img_size": "img_size",
}


def _cmd_train(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    from .engine import load_config, train

    cfg = load_config(args.config, _overrides(args, _TRAIN_FLAGS))
    return train(cfg)


_EVAL_FLAGS = {
    "model": "model", "data": "data", "batch_size": "batch_size", "workers": "workers", "device": "device",
    "amp": "amp", "img_size": "img_size", "max_bad_fraction": "max_bad_fraction", "progress": "progress",
    "crop_pct": "crop_pct", "interpolation": "interpolation",
}


def _cmd_eval(args: argparse.Namespace) -> Optional[Dict[str, Any]]:
    from .engine import evaluate

    return evaluate(checkpoint=args.checkpoint, overrides=_overrides(args, _EVAL_FLAGS), config_path=args.config,
                    use_ema=args.ema)


def _cmd_bench(args: argparse.Namespace) -> Dict[str, Any]:
    from .engine import UserError, bench
    from .engine.config import yaml_load

    kwargs = None
    if args.model_kwargs:
        try:
            kwargs = yaml_load(args.model_kwargs)
        except Exception as exc:
            raise UserError(f"--model-kwargs must be a YAML / JSON mapping, got {args.model_kwargs!r}") from exc
        if not isinstance(kwargs, dict):
            raise UserError(f"--model-kwargs must be a YAML / JSON mapping, got {args.model_kwargs!r}")
    return bench(
        models=args.models.split(","), img_size=args.img_size, batch_size=args.batch_size, iters=args.iters,
        warmup=args.warmup, device=args.device, train=not args.no_train, model_kwargs=kwargs,
        num_classes=args.num_classes, in_chans=args.in_chans, output=args.output, results=args.results,
        threads=args.threads,
    )


def _add_common_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config (see configs/)")
    p.add_argument("--set", metavar="KEY=VALUE", action="append", default=[],
                   help="override one config key (repeatable; the value is YAML)")
    p.add_argument("--model", help="timm model name, e.g. lbvim_tiny_patch16_224")
    p.add_argument("--data", metavar="DIR", help="ImageFolder root (train/ and val/ with one folder per class), or 'digits'")
    p.add_argument("--batch-size", type=int, help="images per process per step")
    p.add_argument("--img-size", type=int, help="input resolution")
    p.add_argument("--workers", type=int, help="data-loading worker processes per rank")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision (default fp32)")
    p.add_argument("--max-bad-fraction", type=float,
                   help="fail when more than this fraction of images are unreadable (default 0.01)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")


def _para(text: str) -> str:
    return textwrap.fill(text, width=100)


def _keys_epilog() -> str:
    from .engine.config import describe_keys

    return _CONFIG_HELP + describe_keys()


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="lbmamba",
        description="LBMamba (locally bi-directional Mamba): train, evaluate and benchmark LBVim / Vim models.",
        epilog="Run `lbmamba train` with no arguments to train a small LBVim on scikit-learn's digits (CPU, minutes).",
    )
    parser.add_argument("--version", action="version", version=f"lbmamba {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # ---- train
    p = sub.add_parser(
        "train", help="train an image classifier (default: a small LBVim on the bundled digits, CPU)",
        description=_para("Train an image classifier. With no arguments: a 4-layer LBVim on scikit-learn's 8x8 digits "
                    "(upsampled to 32x32) on the CPU in a few minutes. With --config configs/lbvim_tiny.yaml "
                    "--data /path/to/imagenet: the paper's ImageNet recipe; multi-GPU / multi-node with "
                    "`torchrun --nproc_per_node 8 -m lbmamba train ...`. Writes last.pth / best.pth (atomically, "
                    "every epoch), metrics.jsonl, curves.png, config.yaml and summary.json to the output directory."),
        epilog=_keys_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_common_run_flags(p)
    p.add_argument("--epochs", type=int, help="training epochs")
    p.add_argument("--global-batch-size", type=int, help="batch over all processes (sets grad_accum)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate (default for recipes: 1e-3 x global batch / 512)")
    p.add_argument("--clip-grad", type=float, help="gradient clipping value (norm by default)")
    p.add_argument("--grad-checkpointing", action="store_const", const=True, help="recompute activations in backward")
    p.add_argument("--output", metavar="DIR", help="output directory (default runs/<time>-<model>)")
    p.add_argument("--resume", metavar="CKPT", help="resume from a last.pth / best.pth of the same model and config")
    p.add_argument("--init-checkpoint", metavar="CKPT", help="start from these weights (fine-tuning)")
    p.add_argument("--seed", type=int, help="base seed")
    p.add_argument("--stop-after-epochs", type=int, help="stop after N epochs of this invocation (resume later)")
    p.set_defaults(func=_cmd_train)

    # ---- eval
    p = sub.add_parser(
        "eval", help="evaluate a checkpoint: top-1, top-5, loss, images/s",
        description=_para("Evaluate a checkpoint on a validation set. Accepts our last.pth / best.pth (the model, its "
                    "arguments and the data default to what the checkpoint recorded) and the reference code bases' "
                    "{'model': state_dict} files (give --model). --data is an ImageFolder root (its val/ is used) "
                    "or a folder of class folders, or 'digits'."),
        epilog="example: lbmamba eval --model lbvim_tiny_patch16_224 --checkpoint lbvim_tiny.pth --data /data/imagenet",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", metavar="FILE", help="weights to evaluate (.pth / .safetensors)")
    _add_common_run_flags(p)
    p.add_argument("--crop-pct", type=float, help="centre-crop fraction (default 0.875)")
    p.add_argument("--interpolation", help="resize interpolation (default bicubic)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of one of our checkpoints")
    p.set_defaults(func=_cmd_eval)

    # ---- bench
    p = sub.add_parser(
        "bench", help="throughput and peak memory (the paper's protocol)",
        description=_para("Inference throughput (random input, fp32, no_grad, warm-up, synchronised timing; batch 128 "
                    "and 100 passes on a GPU, batch 8 and 10 passes on the CPU by default), training throughput "
                    "and peak memory for each model. Prints a table, writes bench.json and bench.png (throughput "
                    "against parameters, or against accuracy with --results)."),
        epilog="example: lbmamba bench --models lbvim_tiny_patch16_224,vim_tiny_patch16_224 --results acc.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", required=True, help="comma-separated timm model names")
    p.add_argument("--img-size", type=int, default=224, help="input resolution (default 224)")
    p.add_argument("--batch-size", type=int, help="batch (default 128 on GPU, 8 on CPU)")
    p.add_argument("--iters", type=int, help="timed passes (default 100 on GPU, 10 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed warm-up passes (default 10 on GPU, 2 on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-train", action="store_true", help="skip the training-throughput measurement")
    p.add_argument("--model-kwargs", metavar="YAML", help="extra constructor arguments for every model, e.g. '{depth: 12}'")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier outputs (default 1000)")
    p.add_argument("--in-chans", type=int, default=3, help="input channels (default 3)")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--output", metavar="DIR", help="where bench.json / bench.png go (default runs/bench-<time>)")
    p.add_argument("--results", metavar="FILE",
                   help="accuracies (JSON {model: top1}, list of {model, top1}, or CSV model,top1): plot against accuracy")
    p.set_defaults(func=_cmd_bench)

    _register_plugins(sub)
    return parser


#: modules that add command groups: each defines register(subparsers)
PLUGINS = ["lbmamba.cli_mil"]


def _register_plugins(sub) -> None:
    """`lbmamba mil ...` from lbmamba.cli_mil, when that module exists."""
    for module_name in PLUGINS:
        try:
            found = importlib.util.find_spec(module_name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            continue
        try:
            module = importlib.import_module(module_name)
            module.register(sub)
        except Exception as exc:  # a broken plug-in must not take the other commands down
            command = module_name.rsplit(".", 1)[-1].replace("cli_", "")
            message = f"{module_name} failed to load: {type(exc).__name__}: {exc}"
            p = sub.add_parser(command, help=f"(unavailable: {message})")

            def _broken(args, message=message):
                from .engine import UserError

                raise UserError(message)

            p.set_defaults(func=_broken)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _user_error_types():
    from .data import DataError
    from .engine import UserError

    types = [UserError, DataError]
    try:
        from .models.checkpoint import CheckpointMismatchError

        types.append(CheckpointMismatchError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `lbmamba` and `python -m lbmamba`; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        # `lbmamba` alone, or a command group (e.g. `lbmamba mil`) without its sub-command
        if args.command:
            try:
                parser.parse_args([a for a in argv if a not in ("-h", "--help")] + ["--help"])
            except SystemExit:
                pass
            return 2
        parser.print_help()
        return 2
    command = " ".join(a for a in argv[:2] if not a.startswith("-")) or args.command
    try:
        result = args.func(args)
    except _user_error_types() as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"lbmamba {command}: error: {message}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"lbmamba {command}: interrupted", file=sys.stderr, flush=True)
        return 130
    if result is not None:
        sys.stdout.flush()
        print(json.dumps(_json_safe(result)), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
