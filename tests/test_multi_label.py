"""Multi-label end to end: a CSV giving each clip several labels, prepared into
ArrayRecords, trained with sigmoid cross-entropy, scored by mAP, exported and predicted.

The demo's clips relabelled: a red object with a high tone carries both `red` and `high`.
The colour is only visible and the tone only audible, so the fused model can find both
labels while each sense alone finds only its own pair.
"""

import csv
import json
import pathlib

import numpy as np
import pytest

from data_prep import builder, layouts
from data_prep.synthetic import make_demo_dataset
from data_prep.worker import PrepSettings
from sora_jax.export import export as export_lib
from sora_jax.export.predict import Predictor
from sora_jax.train import trainer
from tests.conftest import ONE_DEVICE

pytestmark = pytest.mark.slow  # a training held to a quality


def _multi_label_csv(raw: pathlib.Path) -> pathlib.Path:
    """raw/<split>/<colour>_<tone>/x.mp4 -> list.csv rows: path, "colour;tone", split."""
    rows = [["path", "label", "split"]]
    for video in sorted(raw.glob("*/*/*.mp4")):
        split, folder = video.parts[-3], video.parts[-2]
        rows.append([video.relative_to(raw).as_posix(), folder.replace("_", ";"), split])
    listing = raw / "list.csv"
    with listing.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return listing


def test_multi_label_clips_train_evaluate_export_and_predict(tmp_path):
    from configs import demo

    raw = make_demo_dataset(tmp_path / "raw", train_per_class=24, test_per_class=8, seed=3)
    entries = layouts.discover(_multi_label_csv(raw))
    assert {e.labels for e in entries} == {
        ("red", "high"),
        ("red", "low"),
        ("blue", "high"),
        ("blue", "low"),
    }
    rows, _ = builder.prepare(
        entries, tmp_path / "data", "multi", PrepSettings(fps=8.0, short_side=40), workers=2
    )
    assert all(r["status"] == "ok" for r in rows), rows

    config = demo.get_config()
    config.data.update(dir=str(tmp_path / "data"), name="multi", workers=0)
    config.model.multi_label = True
    config.total_steps = 200
    # The export for the CPU alone: other platforms and the SavedModel: test_export.py.
    config.export.update(platforms=("cpu",), saved_model=False)
    result = trainer.train(config, tmp_path / "run", ONE_DEVICE)

    # Chance mAP with two of four labels per clip is about 0.5; each sense alone can
    # rank its own two labels perfectly and the other two only at chance (~0.75).
    assert result["map"] >= 0.95, result["map"]
    for mode in ("audio_only", "video_only"):
        assert 0.6 <= result[mode]["map"] <= 0.9, (mode, result[mode]["map"])
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert metrics[-1]["loss"] < 0.5 * metrics[0]["loss"], (metrics[0], metrics[-1])

    card = export_lib.export(tmp_path / "run", tmp_path / "export")
    assert card["multi_label"] and card["class_names"] == ["blue", "high", "low", "red"]
    predictor = Predictor(tmp_path / "export")
    for folder in ("red_high", "blue_low"):
        probs, _, has_audio = predictor.scores(raw / "test" / folder / f"{folder}_000.mp4")
        expected = set(folder.split("_"))
        # Independent sigmoids: both true labels high together, the other two low.
        assert has_audio
        assert {card["class_names"][i] for i in np.flatnonzero(probs > 0.5)} == expected, probs
        assert probs.sum() > 1.5, probs
