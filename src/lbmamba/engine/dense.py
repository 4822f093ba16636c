"""What segmentation and detection share: the dense-task template on the training loop (counted in
iterations, as mmsegmentation / mmdetection count), the generated-data folder, the model a checkpoint
rebuilds, and the inputs of `predict`.

A dense task subclasses `DenseTask` and gives its model, its data sets, its losses and its evaluation;
`DenseTask.train` does the rest the same way for both (the run's data, init weights, the batch plan, the
optimizer preset, the iteration schedule, the loop, the final JSON).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from ..data import ADE20K_CLASSES, ADE20K_PALETTE, DataError
from ..models.checkpoint import CheckpointMismatchError
from .config import ConfigTable, Key
from .device import grad_scaler
from .distributed import DistInfo, barrier
from .errors import UserError
from .loaders import (
    ShardSampler,
    bad_sample_limit,
    batch_plan,
    check_bad_samples,
    iteration_loader,
    loader_workers,
    too_many_bad_samples,
)
from .loop import Plan, Task, already_finished, check_resumable, fit, run_files, start_record
from .optim import create_optimizer, param_groups, preset_for
from .rng import seed_everything, seed_worker
from .runs import LAST, Run, checkpoint_task, load_training_checkpoint, note, require_task
from .schedule import IterationSchedule

__all__ = ["DenseTask", "ALLOW_CLASS_MISMATCH", "RANDOM_WEIGHTS",
            "generated_data_root", "config_from_checkpoint", "input_images", "IMAGE_SUFFIXES",
           "class_palette", "eval_loader", "load_dense_weights"]

_TASKS = {"seg": "segmentation", "det": "detection"}
_WHOLE_TASK = {"segmentor": "segmentation", "detector": "detection"}
#: eval / predict: go on when the class names differ from the checkpoint's (the checkpoint's are used)
ALLOW_CLASS_MISMATCH = Key(False, "go on when the data's / given class names differ from the checkpoint's (the "
                           "checkpoint's count and order are used)", flag=True)
#: predict: an untrained model when no checkpoint is given (a dry run of the command)
RANDOM_WEIGHTS = Key(False, "predict with an untrained model (random weights) when no checkpoint is given", flag=True)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def generated_data_root(cfg: Mapping[str, Any], run_dir: Optional[str], generated: str, folder: str,
                        write: Callable[[str], Any], hint: str) -> str:
    """The data folder: a user folder, or the generated set `generated` written once (into the run folder when
    there is one, else `folder` in the temporary directory). `hint` says what a user folder holds."""
    data = cfg.get("data")
    if data is None:
        raise UserError(f"no data given (set --data DIR, {hint}, or --data {generated})")
    if str(data) == generated:
        root = os.path.join(run_dir, "data") if run_dir else os.path.join(tempfile.gettempdir(), folder)
        return str(write(root))
    root = os.path.abspath(os.path.expanduser(str(data)))
    if not os.path.isdir(root):
        raise DataError(f"data folder not found: {root}")
    return root


def eval_loader(dataset: Dataset, cfg: Mapping[str, Any], dist: DistInfo, batch_size: int, collate: Callable,
                in_process: bool) -> DataLoader:
    """An evaluation loader: each rank its share (`ShardSampler`), in order."""
    return DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), dist.rank, dist.world_size),
                      num_workers=loader_workers(cfg, dist, in_process=in_process), collate_fn=collate,
                      worker_init_fn=seed_worker, pin_memory=dist.device.type == "cuda")


def load_dense_weights(model: nn.Module, source, name: str, load: Callable, whole_kind: str, heads: str,
                       command: str, whole_only: bool) -> None:
    """One of our dense checkpoints into `model` (`whole_only`: eval / predict refuse a classification
    checkpoint, naming `heads` it lacks), or classification weights into its backbone, said in one line."""
    if not whole_only and isinstance(source, (str, os.PathLike)):  # init_checkpoint: a MIL or other dense
        path = os.fspath(source)                                      # task's checkpoint named as such
        source = load_training_checkpoint(path)
        if checkpoint_task(source) not in (None, "classification", _WHOLE_TASK.get(whole_kind)):
            require_task(source, path, "classification", command + " --init-checkpoint", init_flag=False)
    try:
        report = load(model, source)
    except CheckpointMismatchError as exc:
        raise UserError(f"{name}: {exc}") from exc
    if whole_only and report.kind != whole_kind:
        raise UserError(f"{name} holds no {heads}: a classification checkpoint starts a {whole_kind} with "
                        f"`{command} --init-checkpoint`")
    if not whole_only:
        note(f"init_checkpoint: {report.summary()}")


class DenseTask(Task):
    """The template of `seg train` and `det train`. A subclass sets `command` ("seg train"), `task_name` (its
    optimizer presets, see `optim.preset_for`), `generated` (the name of its generated data set), `what` (the
    unreadable samples' name in messages), `score_name` (the row key whose best picks best.pth, e.g. "mIoU"),
    `curves` / `shown` (the record), `collate`, and gives `find_data`, `datasets` (which sets
    `self.class_names`), `build_model`, `load_init`, `describe`, `make_val_loader`, `losses` and `evaluate`."""

    unit = "iter"
    command = ""
    task_name = ""
    generated = ""
    what = "images"
    score_name = ""
    curves: Sequence = ()
    shown: Sequence[str] = ()
    collate: Optional[Callable] = None

    def __init__(self, run: Run, found: Mapping[str, Any]):
        super().__init__(run)
        self.found = found

    # ------------------------------------------------------------------ what a dense task gives
    def find_data(self, run_dir: Optional[str]) -> Dict[str, Any]:
        """The run's data ({"root", ...}); with a run folder, generated data is written there."""
        raise NotImplementedError

    def build_model(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    def datasets(self, data: Mapping[str, Any]) -> Tuple[Dataset, Dataset]:
        """(training set, validation set); may fill in cfg["num_classes"] and self.class_names."""
        raise NotImplementedError

    def load_init(self, model: nn.Module, path: str) -> None:
        raise NotImplementedError

    def prepare_model(self, model: nn.Module) -> nn.Module:
        """The model before it moves to the device (segmentation converts to SyncBatchNorm there)."""
        return model

    def check_batch(self, batch: int) -> None:
        """Refuse a batch the model cannot train on."""

    def describe(self, data: Mapping[str, Any]) -> str:
        """What the run trains, for its title and first line."""
        raise NotImplementedError

    def make_val_loader(self, dataset: Dataset) -> DataLoader:
        raise NotImplementedError

    def result_extra(self) -> Dict[str, Any]:
        return {}

    def checkpoint_extra(self) -> Dict[str, Any]:
        return {"num_classes": self.cfg["num_classes"], "class_names": list(self.class_names)}

    @property
    def in_process(self) -> bool:
        """Generated data (small PNGs) is read in this process."""
        return str(self.cfg.get("data")) == self.generated

    # ------------------------------------------------------------------ the run
    def run_data(self) -> Dict[str, Any]:
        """The data the prepare step found, or the generated set written into the run folder (once, rank 0)."""
        if self.found.get("root"):
            return dict(self.found)
        if self.dist.is_main:
            self.find_data(self.run.dir)
        barrier(self.dist)
        return self.find_data(self.run.dir)

    def train(self) -> Optional[Dict[str, Any]]:
        run, cfg, dist = self.run, self.cfg, self.dist
        device = dist.device
        wall_start = time.perf_counter()
        check_resumable(run.checkpoint, run.path(LAST))
        data = self.run_data()
        self.train_ds, self.val_ds = self.datasets(data)
        saved = already_finished(run, self.command, "iter")
        if saved is not None:
            return saved if dist.is_main else None

        num_classes = cfg["num_classes"]
        seed_everything(cfg["seed"])  # identical initial weights on every rank
        model = self.build_model(num_classes)
        if cfg.get("init_checkpoint") and run.checkpoint is None:
            self.load_init(model, cfg["init_checkpoint"])
        model = self.prepare_model(model).to(device)
        params = sum(p.numel() for p in model.parameters())
        accum, global_batch, lr = batch_plan(cfg, dist.world_size)
        batch = cfg["batch_size"]
        self.check_batch(batch)
        if len(self.train_ds) // dist.world_size < batch:
            raise UserError(f"the training set ({len(self.train_ds)} images, {len(self.train_ds) // dist.world_size} "
                            f"per process) is smaller than one batch ({batch}); lower batch_size")
        preset = preset_for(self.task_name, cfg)
        optimizer = create_optimizer(preset, param_groups(model, preset, cfg["weight_decay"],
                                                          layer_decay=cfg.get("layer_decay")), lr, cfg)
        plan = Plan(model, optimizer, IterationSchedule(optimizer, cfg, lr), grad_scaler(device, cfg["amp"]),
                    accum=accum)
        resume, run.checkpoint = run.checkpoint, None  # the loop loads it; let go of it after
        start = int((resume or {}).get("iter") or 0)
        title = f"{self.describe(data)} on {os.path.basename(data['root'])}"
        record = start_record(self, run, resume, self.curves, title, self.shown)
        self.val_loader = self.make_val_loader(self.val_ds)
        self.loader = iteration_loader(self.train_ds, cfg, dist, start, accum, self.collate, self.in_process)
        if dist.is_main:
            note(f"lbmamba {self.command}: {self.describe(data)} ({params / 1e6:.2f} M params, {num_classes} classes) "
                 f"on {data['root']}: {len(self.train_ds)} train / {len(self.val_ds)} val images; {dist.world_size} "
                 f"process(es) on {device.type}; global batch {global_batch}, lr {lr:.3g}; "
                 + (f"resuming at iteration {start + 1} in {run.dir}" if start else f"output {run.dir}"))
        end = fit(self, plan, record, resume)
        if not dist.is_main:
            return None
        result: Dict[str, Any] = {
            **end.scores,
            f"best_val_{self.score_name}": round(end.best_score, 6),
            "best_iter": end.best_at,
            "iters": end.count,
            "train_loss": round(end.train_loss, 6) if end.train_loss is not None else None,
            "model": cfg["model"], **self.result_extra(), "params": params, "num_classes": num_classes,
            "global_batch_size": global_batch,
            "data": str(cfg["data"]),
            "world_size": dist.world_size,
            "bad_images": end.bad,
            "wall_s": round(time.perf_counter() - wall_start, 2),
            **run_files(run, self, record),
        }
        if end.stopped_early:
            result["stopped_early"] = True
        else:
            record.finish(result)
        return result

    # ------------------------------------------------------------------ what the loop asks
    def train_batches(self, epoch: int, update: int):
        return self.loader

    def bad_limit(self, drawn: int) -> float:
        return bad_sample_limit(self.cfg, drawn)

    def too_many_bad(self, bad: int, drawn: int, where: str) -> Exception:
        return too_many_bad_samples(bad, drawn, self.cfg, self.what, where, so_far=True)

    def check_val_bad(self, bad: int, total: int, where: str) -> None:
        check_bad_samples(bad, total, self.cfg, self.what, where)


# ----------------------------------------------------------------------------------------------- eval / predict
def config_from_checkpoint(table: ConfigTable, config_path: Optional[str], overrides: Optional[Mapping[str, Any]],
                           keys: Sequence[str], generated: str):
    """(config, checkpoint dict or None) for `eval` / `predict`: the table's defaults <- the `keys` one of our
    checkpoints recorded <- the config file and overrides. A run on the generated set (`data` == `generated`)
    reads its own copy beside its checkpoint."""
    given = table.given(config_path, overrides)
    path = given.get("checkpoint")
    ckpt = load_training_checkpoint(os.fspath(path)) if path else None
    if ckpt is not None:  # the wrong kind of checkpoint named as such, before its config is read as this task's
        require_task(ckpt, os.fspath(path), _TASKS[table.command.split()[0]], table.command)
    saved = ckpt.get("config") if isinstance(ckpt, dict) and isinstance(ckpt.get("config"), Mapping) else {}
    from_ckpt = {k: saved[k] for k in keys if k in saved and k in table.keys}
    if saved.get("data") == generated and "data" in from_ckpt:
        from_ckpt["data"] = os.path.join(saved.get("output") or os.path.dirname(os.path.abspath(path)), "data")
        if not os.path.isdir(from_ckpt["data"]):
            from_ckpt["data"] = generated
    cfg = table.apply(table.defaults(), from_ckpt, source=f"checkpoint {path}")
    return table.validate(table.apply(cfg, given)), ckpt


def input_images(inputs: Optional[str]) -> List[Path]:
    """`predict`'s inputs: one image, or the images of a folder (sorted)."""
    if not inputs:
        raise UserError("no inputs given (set --inputs IMAGE or --inputs FOLDER)")
    path = Path(os.path.expanduser(inputs))
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"inputs not found: {path}")
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    return images


def class_palette(names: Sequence[str]) -> np.ndarray:
    """(classes, 3) uint8 colours: ADE20K's own for its classes, else ADE20K's palette in turn, with
    reproducible random colours beyond its 150."""
    colours = np.asarray(ADE20K_PALETTE, dtype=np.uint8)
    if len(names) > len(colours):
        extra = np.random.default_rng(0).integers(0, 256, size=(len(names) - len(colours), 3), dtype=np.uint8)
        colours = np.concatenate([colours, extra])
    if tuple(names) != tuple(ADE20K_CLASSES) and names and names[0] == "background":
        colours = np.concatenate([np.zeros((1, 3), np.uint8), colours])  # background stays black
    return colours[: len(names)]


def _names(names: Sequence[str], at_most: int = 12) -> str:
    shown = ", ".join(str(n) for n in list(names)[:at_most])
    return f"[{shown}{', ...' if len(names) > at_most else ''}]"


def model_for(cfg: Dict[str, Any], ckpt: Optional[Mapping[str, Any]], names: Optional[Sequence[str]],
              device: torch.device, build: Callable[[int], nn.Module], load: Callable[[nn.Module], None],
              background: bool, what: str) -> Tuple[nn.Module, List[str]]:
    """The model of `cfg` (`build(num_classes)`) with the checkpoint's weights (`load(model)`), and its class
    names: the config's, the checkpoint's, `names`, or numbers (`background`: a background class comes first
    and is not counted)."""
    extra = 1 if background else 0
    if ckpt is None and not cfg.get("random_weights"):
        command = f"lbmamba {'det' if background else 'seg'} train"
        raise UserError(f"no checkpoint given: set --checkpoint (the best.pth of a `{command}` run); "
                        + ("--random-weights runs an untrained model" if "random_weights" in cfg else
                           "an untrained model gives no scores worth reading"))
    saved = list((ckpt or {}).get("class_names") or [])
    for given, where in ((cfg.get("class_names"), "class_names"), (names, "the data")):
        if saved and given and list(given) != saved and not cfg.get("allow_class_mismatch"):
            raise UserError(f"the class names of {where} differ from the checkpoint's: {_names(given)} "
                            f"({len(given)}) against {_names(saved)} ({len(saved)}); evaluate on data of the "
                            "checkpoint's classes, or set --allow-class-mismatch to go on with the checkpoint's")
    names = list(cfg.get("class_names") or saved or names or [])
    num_classes = cfg.get("num_classes") or (ckpt or {}).get("num_classes") or max(len(names) - extra, 0)
    if not num_classes:
        raise UserError("the number of classes is unknown: set num_classes (or class_names)")
    if names and len(names) != num_classes + extra:
        raise UserError(f"{len(names)} class names{' (background first)' if background else ''} for a model with "
                        f"{num_classes} classes")
    model = build(int(num_classes))
    if ckpt is not None:
        load(model)
    else:
        note(f"no checkpoint given: the {what} has random weights")
    numbers = [str(i) for i in range(extra, int(num_classes) + extra)]
    return model.to(device).eval(), names or (["background"] if background else []) + numbers
