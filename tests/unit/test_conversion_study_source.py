"""studies/conversion_study.py refuses a dense source run left by an earlier version of its config, naming what
changed and both ways out, instead of silently converting a different model."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "studies"))
from conversion_study import stale_source  # noqa: E402

from moedit.config import load_config, save_yaml  # noqa: E402

CONFIG = "configs/dense_video_quickstart.yaml"


def write_run(run: Path, overrides: list[str]) -> None:
    run.mkdir(parents=True)
    save_yaml(load_config(ROOT / CONFIG, [f"train.out_dir={run}", *overrides]), run / "config.yaml")


def test_no_run_and_a_run_of_the_same_config_are_fine(tmp_path):
    assert stale_source(tmp_path / "absent", CONFIG) is None
    write_run(tmp_path / "dense", [])
    assert stale_source(tmp_path / "dense", CONFIG) is None


@pytest.mark.parametrize("override, key", [("model.image_size=64", "model.image_size"),
                                           ("train.lr=0.002", "train.lr")])
def test_a_run_of_an_older_config_is_named_with_the_fix(tmp_path, override, key):
    extra = ["data.image_size=64"] if key == "model.image_size" else []
    write_run(tmp_path / "dense", [override, *extra])
    problem = stale_source(tmp_path / "dense", CONFIG)
    assert problem is not None and key in problem
    assert "mv " in problem and "--dense" in problem
