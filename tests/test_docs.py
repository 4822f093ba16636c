"""The user documentation against the code: every model name it mentions exists."""

import re
from pathlib import Path

import pytest
import timm

import lbmamba  # noqa: F401  (registers the models)

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a model name of ours; one followed by a file extension (lbvim_tiny.yaml) names a file, one after "--" a flag,
# one after "--shapes " a benchmark shape (lbvim_t_layer)
NAME = re.compile(r"(?<!-)(?<!--shapes )\b((?:lb|u)?vim_\w+|mambamil_\w+|abmil\w*)\b(?!\.(?:yaml|pth|safetensors))")


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_every_model_name_in_the_docs_creates(doc):
    names = set(NAME.findall(doc.read_text()))
    unknown = sorted(n for n in names if not timm.is_model(n))
    assert not unknown, f"{doc.name} names models that do not exist: {unknown}"
    if doc.name in ("README.md", "models.md"):
        assert "lbvim_tiny_patch16_224" in names


def test_the_worked_task_example_trains_validates_and_resumes(tmp_path, restore_globals):
    """docs/architecture.md's "adding a task" example, run as written."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    code = re.search(r"### Adding a task.*?```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "architecture.md", "exec"), namespace)
    regress = namespace["regress"]
    whole = regress({"output": str(tmp_path / "whole"), "progress": False, "device": "cpu"})
    assert whole["val_loss"] < 1.0 and (tmp_path / "whole" / "best.pth").is_file()
    part = regress({"output": str(tmp_path / "part"), "progress": False, "device": "cpu", "stop_after_epochs": 2})
    assert part["val_loss"] > whole["val_loss"]
    resumed = regress({"resume": str(tmp_path / "part"), "progress": False})
    assert resumed["val_loss"] == whole["val_loss"]  # exact resume: the same run as one that never stopped
