"""`lbmamba mil train | eval | extract` from the command line: flags named as the config keys, --config / --set,
the old flag spellings, one JSON line, one-line errors."""

import json
import os

import pytest

from lbmamba.cli import main

pytestmark = pytest.mark.usefixtures("one_thread", "restore_globals")


def _cli(argv, capsys):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_eval_and_clean_errors(tiny_bags, capsys):
    (tiny_bags / "mil.yaml").write_text("model: lb\nembed_dim: 8\nepochs: 2\n")
    code, out, err = _cli(["mil", "train", "--config", tiny_bags / "mil.yaml", "--features", tiny_bags / "feats",
                           "--labels", tiny_bags / "labels.csv", "--folds", "4", "--fold-indices", "1",
                           "--layers", "1", "--set", "stop_epoch=0", "--out", tiny_bags / "cli", "--no-progress",
                           "--device", "cpu"], capsys)
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["command"] == "mil train" and summary["model"] == "lb" and summary["folds"] == 1
    assert os.path.isfile(tiny_bags / "cli" / "splits" / "splits_1.csv")
    import yaml

    saved = yaml.safe_load((tiny_bags / "cli" / "config.yaml").read_text())
    assert (saved["depth"], saved["embed_dim"], saved["epochs"], saved["stop_epoch"]) == (1, 8, 2, 0)
    code, out, err = _cli(["mil", "eval", "--checkpoint", tiny_bags / "cli" / "fold_1.pt", "--features",
                           tiny_bags / "feats", "--labels", tiny_bags / "labels.csv", "--splits",
                           tiny_bags / "cli" / "splits", "--fold", "1", "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["command"] == "mil eval" and res["n"] == 2 and res["split"] == "test"
    code, out, err = _cli(["mil", "train", "--features", tiny_bags / "nowhere", "--labels", tiny_bags / "labels.csv",
                           "--no-progress"], capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip() == f"lbmamba mil train: error: --features: no such directory: {tiny_bags / 'nowhere'}"
    code, out, err = _cli(["mil", "train", "--dropout", "-0.5"], capsys)
    assert code == 1 and "'drop_rate' must be >= 0" in err
    code, out, err = _cli(["mil", "train", "--set", "epoch=3"], capsys)
    assert code == 1 and "unknown config key 'epoch'" in err and "epochs" in err
