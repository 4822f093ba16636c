"""Data sets this package generates and writes once: the digit scenes for segmentation and detection.

A set is written into a temporary folder beside its root and moved into place whole, with its settings in
a marker file written last. So a complete set made with the same settings is reused, an interrupted write
leaves no partial set, and processes writing the same set at once agree (the last to finish finds the
first one's set in place and keeps it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Tuple

import numpy as np

from .images import DataError

__all__ = ["digit_pools", "existing_set", "write_set"]


def digit_pools(seed: int) -> Tuple[np.random.Generator, Dict[str, Tuple[np.ndarray, np.ndarray]]]:
    """A set's generator and its splits of scikit-learn's 8x8 digits: {"train": (images, labels), "val":
    ...} from disjoint 80 / 20 parts, images float32 0..16. The generator has drawn the split; the scenes
    draw from it next."""
    from sklearn.datasets import load_digits

    data = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(data.target))
    cut = int(0.8 * len(order))
    pools = {split: (data.images[part].astype(np.float32), data.target[part])
             for split, part in (("train", order[:cut]), ("val", order[cut:]))}
    return rng, pools


def existing_set(root: Path, settings: Dict[str, object], marker: str, what: str) -> bool:
    """True when `root` holds a complete `what` made with `settings`; DataError when it holds anything else."""
    path = root / marker
    if path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"unreadable {what} marker {path}: {exc}") from exc
        if found == settings:
            return True
        differing = sorted(k for k in settings if found.get(k) != settings[k])
        raise DataError(f"{root} holds {what} made with other settings ({', '.join(differing)}); remove it or "
                        "write it to another folder")
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(f"{root} exists but holds no complete {what} (no {marker}); remove it or write the set "
                        "to another folder")
    return False


def write_set(root, settings: Dict[str, object], marker: str, what: str, fill: Callable[[Path], None]) -> Path:
    """`root` holding the set `fill(folder)` writes, made once (see the module's docstring); returns it."""
    root = Path(root)
    if existing_set(root, settings, marker, what):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", suffix=".tmp", dir=root.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's folder is private; the set is ordinary data
    try:
        fill(tmp)
        (tmp / marker).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
        try:
            if root.is_dir():
                root.rmdir()  # an empty folder (checked above) is replaced
            os.rename(tmp, root)
        except OSError:
            if not existing_set(root, settings, marker, what):  # another process finished first: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
