"""The evaluators of config.evals: the linear probe's closed-form fit against answers worked
out on planted embeddings, and in a pretraining run against a probe fitted here on
sora-embed's embeddings of the same clips."""

import json

import numpy as np
import pytest

from sora_jax.config import ConfigError
from sora_jax.data import pipeline
from sora_jax.evaluators.linear_probe import fit_ridge, probe_top1
from sora_jax.export import embed as embed_lib
from tests.test_tensorboard import _scalars
from tests.test_transfer import _pretrain_config, pretrained  # noqa: F401 (a fixture)


def _clusters(labels: np.ndarray, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.eye(8)[labels] + noise * rng.normal(size=(len(labels), 8))


def test_the_ridge_probe_separates_planted_classes_and_not_shuffled_ones():
    labels = np.repeat(np.arange(4), 30)
    train, test = _clusters(labels, 0.2, 0), _clusters(labels, 0.2, 1)
    weights = fit_ridge(train, labels, 4, l2=1e-3)
    assert weights.shape == (9, 4)  # 8 features and a bias
    assert probe_top1(weights, test, labels) == 1.0
    # Labels shuffled against the embeddings: what the probe learns does not transfer.
    shuffled = np.random.default_rng(2).permutation(labels)
    assert probe_top1(fit_ridge(train, shuffled, 4, 1e-3), test, labels) < 0.45
    # Constant embeddings: every clip gets one class, right for a quarter.
    constant = np.ones((120, 8))
    assert probe_top1(fit_ridge(constant, labels, 4, 1e-3), constant, labels) == 0.25


def test_the_ridge_probe_by_hand_on_one_feature():
    # One feature, x = +1 for class 1 and -1 for class 0, no noise: class 1's target
    # (+1 for it, -1 for the other) is x itself, so w = (1, 0) up to the ridge's shrinkage
    # and the bias row is 0 by symmetry; class 0's is -x.
    x = np.array([[1.0], [1.0], [-1.0], [-1.0]])
    labels = np.array([1, 1, 0, 0])
    weights = fit_ridge(x, labels, 2, l2=1e-6)
    np.testing.assert_allclose(weights, [[-1.0, 1.0], [0.0, 0.0]], atol=1e-5)


def test_a_pretraining_run_probes_its_frozen_embeddings_as_it_trains(pretrained, tmp_path):  # noqa: F811
    result = json.loads((pretrained / "eval_test.json").read_text())
    probe = result["evals"]["probe"]
    assert probe["num_train"] == 48 and probe["num_examples"] == 20  # demo_small's splits
    assert 0.0 <= probe["top1"] <= 1.0 and probe["majority_top1"] == pytest.approx(0.25)
    assert "eval/probe/top1" in _scalars(pretrained / "tensorboard")
    # The same probe, fitted here on sora-embed's embeddings of both splits (another
    # path through the data and the model), scores the same, within one clip.
    embedded = {}
    for split in ("train", "test"):
        out = tmp_path / f"{split}.npz"
        assert (
            embed_lib.main(["--workdir", str(pretrained), "--split", split, "--out", str(out)]) == 0
        )
        z = np.load(out)
        x = z["embedding"] / np.linalg.norm(z["embedding"], axis=1, keepdims=True)
        embedded[split] = (x, z["label"])
    weights = fit_ridge(*embedded["train"], 4, 1e-3)
    assert abs(probe_top1(weights, *embedded["test"]) - probe["top1"]) <= 1 / 20 + 1e-9


def test_retrieval_and_knn_as_evaluators_equal_the_built_in_measures(pretrained):  # noqa: F811
    """The same measures by another path: the evaluators' own steps and readers against the
    built-in eval step (train/step.py make_eval_step) on the same split and parameters."""
    result = json.loads((pretrained / "eval_test.json").read_text())
    again = result["evals"]["retrieval_again"]
    for key, value in result["retrieval"].items():
        if key != "warning":
            assert again[key] == pytest.approx(value), key
    knn = result["evals"]["knn_again"]
    for key in ("top1", "video_top1", "audio_top1", "k", "num_examples"):
        assert knn[key] == pytest.approx(result["knn"][key]), key
    assert knn["bank_size"] == 48  # the train split: knn_bank_size is larger


def test_probe_mistakes_fail_before_compiling_and_name_the_key(demo_data):
    config = _pretrain_config(demo_data)
    config.evals = {"probe": {"type": "linear_probe", "dataset": "nosuch"}}
    with pytest.raises(ConfigError, match=r"config\.evals\.probe\.dataset: no prepared dataset"):
        pipeline.check_dataset(config)
    config.evals = {"probe": {"type": "linear_probe", "train_split": "validation"}}
    with pytest.raises(ConfigError, match=r"config\.evals\.probe: no split 'validation'"):
        pipeline.check_dataset(config)
