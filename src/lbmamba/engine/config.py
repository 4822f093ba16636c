"""Run configs: built-in defaults (the digits run) <- a YAML file <- `key=value` overrides.

A config is a flat dict (only `model_kwargs` nests). YAML files may start from another file with
`base: other.yaml` (a path relative to the including file). Values given as strings on the command line
are parsed as YAML (`lr=5e-4`, `model_kwargs.depth=4`, `amp=null`, `aa="rand-m9-mstd0.5-inc1"`) and then
coerced to the type of the default (`epochs=10.0` -> 10). Unknown keys are refused with a suggestion.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import re
from typing import Any, Dict, Iterable, Mapping, Optional

import yaml

from .errors import UserError

__all__ = [
    "DEFAULTS",
    "KEY_HELP",
    "FINGERPRINT_KEYS",
    "MODEL_KEYS",
    "load_config",
    "apply_overrides",
    "parse_override",
    "config_fingerprint",
    "yaml_load",
    "describe_keys",
]

# (default, help). The defaults are the shipped run: a small LBVim on scikit-learn's 8x8 digits.
_SPEC: Dict[str, tuple] = {
    # model
    "model": ("lbvim_tiny_patch16_224", "timm model name (lbvim_*, vim_*, uvim_* or any timm model)"),
    "model_kwargs": ({"embed_dim": 64, "depth": 4, "patch_size": 8}, "extra constructor arguments (embed_dim, depth, patch_size, ...)"),
    "img_size": (32, "input resolution (null: the model's default)"),
    "in_chans": (None, "image channels (null: 1 for digits, 3 for image folders)"),
    "num_classes": (None, "classes (null: from the data)"),
    "drop_path": (0.0, "stochastic depth rate"),
    "init_checkpoint": (None, "start from these weights (e.g. a reference {'model': state_dict} file)"),
    "grad_checkpointing": (False, "recompute activations in backward (model.set_grad_checkpointing)"),
    # data
    "data": ("digits", "'digits' (scikit-learn, bundled) or an ImageFolder root with train/ and val/"),
    "train_split": ("train", "sub-folder of `data` with the training images"),
    "val_split": ("val", "sub-folder of `data` with the validation images"),
    "val_fraction": (0.2, "digits: stratified validation fraction (fixed split, seed 0)"),
    "digits_shift": (2, "digits: random translation in pixels (training only)"),
    "workers": (None, "data-loading worker processes per rank (null: 0 for digits, else min(8, cores / local processes))"),
    "max_bad_fraction": (0.01, "fail when more than this fraction of the images drawn are unreadable"),
    # batch and optimisation
    "batch_size": (64, "images per process per step (micro-batch)"),
    "global_batch_size": (None, "if set: grad_accum = global_batch_size / (batch_size x world size)"),
    "grad_accum": (1, "micro-batches per optimizer step (ignored when global_batch_size is set)"),
    "epochs": (15, "training epochs"),
    "opt": ("adamw", "timm optimizer name (create_optimizer_v2)"),
    "opt_eps": (1e-8, "optimizer epsilon"),
    "momentum": (0.9, "momentum for opt=sgd / momentum / lamb ... (AdamW ignores it)"),
    "weight_decay": (0.05, "weight decay (not on biases, norms, pos_embed, A_log, D)"),
    "lr": (2e-3, "peak learning rate; null: base_lr x global batch / lr_base_size"),
    "base_lr": (1e-3, "learning rate per lr_base_size images of global batch (used when lr is null)"),
    "lr_base_size": (512, "the batch size base_lr refers to"),
    "sched": ("cosine", "timm scheduler name (create_scheduler_v2)"),
    "sched_on_updates": (True, "step the schedule every optimizer update (else once per epoch)"),
    "warmup_epochs": (2, "linear warm-up epochs"),
    "warmup_lr": (1e-6, "learning rate at the start of the warm-up"),
    "min_lr": (1e-5, "final learning rate of the cosine"),
    "clip_grad": (None, "clip gradients at this value (null: off)"),
    "clip_mode": ("norm", "norm | value | agc"),
    # regularisation and augmentation
    "smoothing": (0.1, "label smoothing"),
    "mixup": (0.0, "mixup alpha (0: off)"),
    "cutmix": (0.0, "cutmix alpha (0: off)"),
    "mixup_prob": (1.0, "probability of applying mixup or cutmix to a batch"),
    "mixup_switch_prob": (0.5, "probability of cutmix instead of mixup when both are on"),
    "mixup_mode": ("batch", "batch | pair | elem"),
    "aa": (None, "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 (ImageFolder data)"),
    "color_jitter": (0.0, "colour jitter strength (ImageFolder data)"),
    "reprob": (0.0, "random erasing probability (ImageFolder data)"),
    "remode": ("pixel", "random erasing mode"),
    "recount": (1, "random erasing count"),
    "repeated_aug": (False, "repeated augmentation (timm RepeatAugSampler)"),
    "num_repeats": (3, "repeats per image with repeated_aug"),
    "train_interpolation": ("bicubic", "resize interpolation for training (random, bilinear, bicubic)"),
    "interpolation": ("bicubic", "resize interpolation for evaluation"),
    "crop_pct": (0.875, "evaluation centre-crop fraction"),
    "model_ema": (False, "keep an EMA of the weights (timm ModelEmaV3)"),
    "model_ema_decay": (0.99996, "EMA decay per optimizer update"),
    # run
    "amp": (None, "mixed precision: null (fp32) | bf16 | fp16 (fp16 uses a GradScaler)"),
    "device": ("auto", "auto | cpu | cuda | cuda:N (under torchrun: LOCAL_RANK's GPU)"),
    "seed": (0, "base seed (data order and augmentation depend on seed + epoch + rank)"),
    "output": (None, "output directory (null: runs/<time>-<model>; on resume: the checkpoint's directory)"),
    "resume": (None, "checkpoint to resume (restores weights, optimizer, schedule, EMA, scaler, epoch, RNG)"),
    "eval_every": (1, "validate every N epochs (and always after the last)"),
    "progress": (True, "show a tqdm progress bar (rank 0)"),
    "threads": (1, "CPU threads per process for torch and the numba scan kernels (the small default model runs "
                   "fastest on one); null: torch's default, under torchrun cores / local processes"),
    "allow_config_change": (False, "resume although training hyper-parameters differ (the model must match)"),
    "stop_after_epochs": (None, "stop after this many epochs of this invocation (for tests and job limits)"),
    # test hooks (not for normal use)
    "debug_nan_step": (None, "test hook: make the loss NaN at this (0-based) global step"),
    "debug_dump_rank_state": (False, "test hook: every rank saves its weights to <output>/rank<r>_state.pth"),
}

DEFAULTS: Dict[str, Any] = {k: copy.deepcopy(v[0]) for k, v in _SPEC.items()}
KEY_HELP: Dict[str, str] = {k: v[1] for k, v in _SPEC.items()}

# keys that define the network: resuming with different values is always an error
MODEL_KEYS = ("model", "model_kwargs", "img_size", "in_chans", "num_classes")
# keys whose change alters the training trajectory (refused on resume unless allow_config_change)
FINGERPRINT_KEYS = MODEL_KEYS + (
    "drop_path", "batch_size", "global_batch_size", "grad_accum", "epochs", "opt", "opt_eps",
    "weight_decay", "lr", "base_lr", "lr_base_size", "sched", "sched_on_updates", "warmup_epochs",
    "warmup_lr", "min_lr", "clip_grad", "smoothing", "mixup", "cutmix", "aa", "color_jitter", "reprob",
    "repeated_aug", "model_ema", "model_ema_decay", "amp", "seed",
)
_NULLABLE_INT = {"workers", "in_chans", "img_size", "num_classes", "global_batch_size", "stop_after_epochs", "threads", "debug_nan_step"}
_NULLABLE_FLOAT = {"lr", "clip_grad"}
_NULLABLE_STR = {"aa", "amp", "output", "resume", "init_checkpoint", "data", "model"}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-3` as a float (YAML 1.1 needs a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


def _suggest(key: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(choices), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _coerce(key: str, value: Any) -> Any:
    default = DEFAULTS[key]
    if key in _NULLABLE_INT:
        if value is None:
            return None
        if _is_number(value) and int(value) == value:
            return int(value)
        raise UserError(f"config key {key!r} expects an integer or null, got {value!r}")
    if key in _NULLABLE_FLOAT:
        if value is None:
            return None
        if _is_number(value):
            return float(value)
        raise UserError(f"config key {key!r} expects a number or null, got {value!r}")
    if key in _NULLABLE_STR:
        if value is None:
            return None
        if isinstance(value, str) or _is_number(value):
            return str(value)
        raise UserError(f"config key {key!r} expects a string or null, got {value!r}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise UserError(f"config key {key!r} expects true or false, got {value!r}")
    if isinstance(default, int):
        if _is_number(value) and int(value) == value:
            return int(value)
        raise UserError(f"config key {key!r} expects an integer, got {value!r}")
    if isinstance(default, float):
        if _is_number(value):
            return float(value)
        raise UserError(f"config key {key!r} expects a number, got {value!r}")
    if isinstance(default, str):
        if isinstance(value, str) or _is_number(value):
            return str(value)
        raise UserError(f"config key {key!r} expects a string, got {value!r}")
    if isinstance(default, dict):
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise UserError(f"config key {key!r} expects a mapping, got {value!r}")
        return dict(value)
    return value


def apply_overrides(cfg: Dict[str, Any], overrides: Mapping[str, Any], source: str = "override") -> Dict[str, Any]:
    """Return `cfg` updated with `overrides` (dotted keys `model_kwargs.depth` set one nested entry)."""
    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        top, _, sub = key.partition(".")
        if top not in DEFAULTS:
            raise UserError(f"unknown config key {top!r} in {source}{_suggest(top, DEFAULTS)}")
        if sub:
            if top != "model_kwargs":
                raise UserError(f"config key {top!r} has no sub-keys (only model_kwargs.<name> nests), got {key!r}")
            cfg[top] = dict(cfg.get(top) or {})
            if value is None:
                cfg[top].pop(sub, None)
            else:
                cfg[top][sub] = value
        else:
            cfg[top] = _coerce(top, value)
    return cfg


def parse_override(text: str) -> tuple:
    """'key=value' -> (key, YAML-parsed value)."""
    if "=" not in text:
        raise UserError(f"--set expects key=value, got {text!r}")
    key, _, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not key:
        raise UserError(f"--set expects key=value, got {text!r}")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UserError(f"--set {key}: cannot parse {raw!r} as a YAML value ({exc.__class__.__name__})") from exc
    return key, value


def _read_yaml(path: str, seen: tuple = ()) -> Dict[str, Any]:
    path = os.path.abspath(path)
    if path in seen:
        raise UserError(f"config {path} includes itself through 'base:'")
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as handle:
            data = yaml_load(handle.read()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml(os.path.join(os.path.dirname(path), base), seen + (path,))
    merged.update(data)
    return merged


def load_config(path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """DEFAULTS <- YAML file at `path` <- `overrides` (dotted keys allowed); validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        cfg = apply_overrides(cfg, _read_yaml(path), source=f"config file {path}")
    if overrides:
        cfg = apply_overrides(cfg, overrides, source="the command line")
    _validate(cfg)
    return cfg


def _validate(cfg: Dict[str, Any]) -> None:
    def positive(key, allow_none=False):
        value = cfg[key]
        if value is None and allow_none:
            return
        if value is None or value <= 0:
            raise UserError(f"config key {key!r} must be > 0, got {value!r}")

    for key in ("batch_size", "epochs", "grad_accum", "eval_every", "lr_base_size", "num_repeats"):
        positive(key)
    for key in ("global_batch_size", "lr", "img_size", "in_chans", "num_classes", "stop_after_epochs", "clip_grad", "threads"):
        positive(key, allow_none=True)
    if cfg["amp"] not in (None, "bf16", "fp16"):
        raise UserError(f"config key 'amp' must be null, bf16 or fp16, got {cfg['amp']!r}")
    if not 0.0 <= cfg["max_bad_fraction"] <= 1.0:
        raise UserError(f"config key 'max_bad_fraction' must be in [0, 1], got {cfg['max_bad_fraction']!r}")
    if not 0.0 < cfg["val_fraction"] < 1.0:
        raise UserError(f"config key 'val_fraction' must be in (0, 1), got {cfg['val_fraction']!r}")
    if cfg["clip_mode"] not in ("norm", "value", "agc"):
        raise UserError(f"config key 'clip_mode' must be norm, value or agc, got {cfg['clip_mode']!r}")
    if cfg["workers"] is not None and cfg["workers"] < 0:
        raise UserError(f"config key 'workers' must be >= 0, got {cfg['workers']}")


def config_fingerprint(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """The model-defining and trajectory-defining part of a config (stored in checkpoints)."""
    return {k: copy.deepcopy(cfg.get(k)) for k in FINGERPRINT_KEYS}


def describe_keys() -> str:
    """One line per config key: name, default, help (for --help)."""
    lines = []
    for key, (default, text) in _SPEC.items():
        if key.startswith("debug_"):
            continue
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        lines.append(f"  {key} = {shown}\n      {text}")
    return "\n".join(lines)
