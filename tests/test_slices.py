"""Per-slice metrics: sora-prep keeps a CSV's other columns per clip, and the `slices`
evaluator reports another evaluator's measures per value, checked against the built-in
evaluation's per-class accuracy (another path through the model and the data) on slices
that are unions of classes; small slices are marked, and the model card gets the table."""

import csv
import json

import pytest

from configs import demo
from data_prep import builder, layouts
from data_prep.synthetic import DEMO_CLASSES, make_demo_dataset
from data_prep.worker import PrepSettings
from sora_jax.config import ConfigError
from sora_jax.data import pipeline
from sora_jax.export import export as export_lib
from sora_jax.train import trainer
from tests.conftest import ONE_DEVICE, built_once

TEST_PER_CLASS = 4
FIRST = DEMO_CLASSES[:2]  # group "first"; the others "second"


@pytest.fixture(scope="module")
def sliced_data(tmp_path_factory):
    """The demo clips listed in a CSV with two more columns: `group` (by class) and
    `device` ("phone", but "tablet" for two test clips)."""

    def build(root):
        raw = make_demo_dataset(root / "raw", train_per_class=6, test_per_class=TEST_PER_CLASS)
        rows, tablets = [], 0
        for path in sorted(raw.rglob("*.mp4")):
            split, label = path.parent.parent.name, path.parent.name
            device = "phone"
            if split == "test" and tablets < 2:
                device, tablets = "tablet", tablets + 1
            group = "first" if label in FIRST else "second"
            rows.append([path.relative_to(raw), label, split, group, device])
        with (raw / "clips.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["path", "label", "split", "group", "device"], *rows])
        entries = layouts.discover(raw / "clips.csv", "csv")
        builder.prepare(entries, root / "data", "sliced", PrepSettings(fps=8.0, short_side=40))

    return built_once(tmp_path_factory, "sliced", build) / "data"


def _config(data_dir):
    c = demo.get_config("runlocal")
    c.data.update(dir=str(data_dir), name="sliced")
    c.evals = {
        "cls": {"type": "classification", "split": "test"},
        "by_group": {"type": "slices", "of": "cls", "column": "group", "min_clips": 2},
        "by_device": {"type": "slices", "of": "cls", "column": "device", "min_clips": 5},
    }
    c.export.update(platforms=("cpu",), saved_model=False)
    return c


def test_prep_keeps_a_csvs_other_columns_per_clip(sliced_data):
    summary = pipeline.dataset_summary(str(sliced_data), "sliced")
    assert summary.metadata_columns == ("device", "group")
    clips = pipeline.clip_metadata(str(sliced_data), "sliced", "test")
    assert len(clips) == 4 * TEST_PER_CLASS
    assert sorted(c["device"] for c in clips).count("tablet") == 2
    assert {c["group"] for c in clips} == {"first", "second"}


def test_slices_match_the_built_in_per_class_accuracy_and_go_on_the_model_card(
    sliced_data, tmp_path
):
    workdir = tmp_path / "run"
    result = trainer.train(_config(sliced_data), workdir, ONE_DEVICE)
    per_class = result["per_class_accuracy"]  # the built-in evaluation's, on the same split
    by_group = result["evals"]["by_group"]
    assert by_group["overall"]["top1"] == pytest.approx(result["top1"])
    for group, classes in (("first", FIRST), ("second", DEMO_CLASSES[2:])):
        expected = sum(per_class[c] for c in classes) / len(classes)  # equal class sizes
        assert by_group["slices"][group]["top1"] == pytest.approx(expected)
        assert by_group["slices"][group]["num_clips"] == 2 * TEST_PER_CLASS
    worst = min(("first", "second"), key=lambda g: by_group["slices"][g]["top1"])
    assert by_group["worst"]["slice"] == worst
    assert by_group["gap"] == pytest.approx(result["top1"] - by_group["slices"][worst]["top1"])
    # Two clips are too few to trust (min_clips 5): reported, marked, never the worst.
    by_device = result["evals"]["by_device"]
    assert by_device["slices"]["tablet"]["num_clips"] == 2
    assert by_device["slices"]["tablet"]["too_small"] and by_device["num_trusted"] == 1
    assert by_device["worst"]["slice"] == "phone"
    # metrics.jsonl and the model card carry them.
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["by_group/slices/first/top1"] == by_group["slices"]["first"]["top1"]
    export_lib.export(workdir, tmp_path / "export")
    card = (tmp_path / "export" / "model_card.md").read_text()
    assert "### by_group: by group" in card and "| tablet |" in card and "too few clips" in card


def test_a_column_the_data_does_not_keep_is_named_before_compiling(sliced_data):
    c = _config(sliced_data)
    c.evals.by_group.column = "gruop"
    with pytest.raises(ConfigError, match=r"evals\.by_group\.column: dataset sliced keeps no"):
        pipeline.check_dataset(c)
    c = _config(sliced_data)
    c.evals.by_group.of = "nosuch"
    from sora_jax.train import setup

    with pytest.raises(ConfigError, match=r"evals\.by_group\.of: 'nosuch' is not another"):
        setup.check_config(c)
