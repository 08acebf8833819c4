"""Evaluation's scores per sense: each counts only the clips that have that sense.
(The whole Evaluator runs in test_train.py, test_multi_label.py and test_pretrain.py.)"""

import numpy as np

from sora_jax.train import evaluate, metrics

CLASSES = ("a", "b", "c")


def test_each_sense_alone_is_scored_on_the_clips_that_have_it():
    labels = np.array([0, 1, 2, 0])
    right = np.eye(3)[labels]  # [N, C] scores that pick each clip's label
    wrong = np.eye(3)[(labels + 1) % 3]
    has_audio = np.array([True, True, False, False])
    outputs = {
        "full": right,
        # The last two clips have no sound track: their audio-only scores mean nothing.
        "audio_only": np.where(has_audio[:, None], right, wrong),
        "video_only": right,
        "has_audio": has_audio,
        "has_video": np.ones(4, bool),
    }
    reports = metrics.classification_by_mode(outputs, labels, CLASSES, multi_label=False)
    assert reports["audio_only"]["top1"] == 1.0 and reports["audio_only"]["num_examples"] == 2
    assert reports["full"]["num_examples"] == reports["video_only"]["num_examples"] == 4
    assert reports["full"]["top1"] == reports["video_only"]["top1"] == 1.0

    outputs["has_audio"] = np.zeros(4, bool)  # a split without any sound
    reports = metrics.classification_by_mode(outputs, labels, CLASSES, multi_label=False)
    assert reports["audio_only"] == {"num_examples": 0}
    result = dict(reports["full"]) | {k: reports[k] for k in ("audio_only", "video_only")}
    assert "audio-only n/a" in evaluate.headline(result)
