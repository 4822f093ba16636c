"""The config keys every training run has, written once: precision, device and threads, the seed, the run folder
(output, overwrite, resume, allow_config_change), progress and the log, the stop of one invocation, and the test
hooks of the loop. Each task's table takes them with `run_keys(...)`."""

from __future__ import annotations

from typing import Dict, Optional

from .config import Key
from .device import AMP_MODES, threads_key
from .records import LOGS

__all__ = ["run_keys"]


#: `changes` of the `amp` key of the commands that only run the model (eval, predict): no GradScaler there
INFERENCE_AMP = {"help": "mixed precision of the forward pass: bf16 or fp16 (unset: fp32)"}


def run_keys(folder: str, seed: str, unit: Optional[str] = "epoch", distributed: bool = True,
             resume: str = "continue the run in this folder (or its last.pth) with its own config") -> Dict[str, Key]:
    """The run keys of a task whose default folder is runs/<time>-`folder`, whose `seed` decides what the help
    says, counted in `unit` ("epoch" / "iter"; None: no stop_after key), run under torchrun when
    `distributed`."""
    under_torchrun = " (under torchrun: LOCAL_RANK's GPU)" if distributed else ""
    keys = {
        "amp": Key(None, "mixed precision: null (fp32) | bf16 | fp16 (fp16 uses a GradScaler)", kind="str",
                   choices=AMP_MODES, flag=True),
        "device": Key("auto", f"auto | cpu | cuda | cuda:N{under_torchrun}", flag=True, effect="none"),
        "threads": threads_key(),
        "seed": Key(0, seed, flag=True),
        "output": Key(None, f"the run folder (null: runs/<time>-{folder}); a folder holding a run is refused unless "
                      "overwrite", kind="str", flag=True, effect="none", aliases=("--out",)),
        "overwrite": Key(False, "move a run already in `output` aside (to <output>.old-<time>) and start anew",
                         flag=True, effect="once"),
        "resume": Key(None, resume, kind="str", flag=True, effect="once"),
        "allow_config_change": Key(False, "resume although result-changing keys differ (the model must match)",
                                   effect="once"),
        "progress": Key(True, "show progress bars" + (" (rank 0)" if distributed else ""), flag=True, effect="none"),
        "log": Key("csv", "also keep the figures as metrics.csv (csv) or TensorBoard events in <run>/tensorboard "
                   "(tensorboard; pip install tensorboard); null: metrics.jsonl only", nullable=True, choices=LOGS,
                   flag=True, effect="none"),
    }
    if unit is not None:
        name = "epochs" if unit == "epoch" else "iterations"
        keys[f"stop_after_{unit}s"] = Key(None, f"stop after this many {name} of this invocation (for tests and job "
                                          "limits)", kind="int", positive=True, flag=True, effect="once")
        keys["debug_nan_iter"] = Key(None, "test hook: make the loss NaN at this (0-based) optimizer update",
                                     kind="int", hidden=True)
        keys["debug_dump_rank_state"] = Key(False, "test hook: every rank saves its parameters to "
                                            "<output>/rank<r>_params.pth", hidden=True, effect="once")
    return keys
