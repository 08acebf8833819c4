"""Contrastive pretraining through the trainer, its measures (retrieval, kNN), and the
road to a downstream task: init_from a work dir, a step dir or an export, frozen parts,
shape mismatches, sora-embed. Small runs on the shared demo data (labelled, so kNN
applies; pretraining never reads the labels)."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import linear_probe, pretrain_av
from sora_jax import objectives
from sora_jax.config import ConfigError
from sora_jax.export import embed as embed_lib
from sora_jax.export import export as export_lib
from sora_jax.objectives import contrastive
from sora_jax.train import trainer, transfer
from sora_jax.train.representation import retrieval_report
from sora_jax.train.state import param_roles
from tests.conftest import ONE_DEVICE, built_once

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pretrain_config(demo_data):
    config = pretrain_av.get_config("runlocal")
    config.data.update(dir=demo_data[0], name=demo_data[1], fps=8.0)
    config.model.num_classes = 7  # any: a contrastive run never reads the labels
    config.eval.knn_k = 3
    return config


@pytest.fixture(scope="module")
def pretrained(demo_data, tmp_path_factory) -> pathlib.Path:
    """A pretraining run's work dir (12 steps, no labels read)."""
    config = _pretrain_config(demo_data)
    # Its exports are read here on the CPU only (every platform and the SavedModel:
    # test_export.py).
    config.export.update(platforms=("cpu",), saved_model=False)
    # And evaluators (tests/test_evaluators.py): a linear probe on the labels it never
    # trained on, and retrieval and kNN as evaluators beside the built-in measures.
    config.evals = {
        "probe": {"type": "linear_probe", "split": "test"},
        "retrieval_again": {"type": "retrieval", "split": "test"},
        "knn_again": {"type": "knn", "split": "test", "k": 3},
    }
    build = lambda d: trainer.train(config, d, ONE_DEVICE)
    return built_once(tmp_path_factory, "pretrained", build)


def _probe_config(demo_data, init_from=""):
    config = linear_probe.get_config("runlocal")
    config.data.update(dir=demo_data[0], name=demo_data[1], fps=8.0)
    config.model.num_classes = 4
    config.init_from = str(init_from)
    return config


def test_contrastive_loss_pairs_each_clip_with_its_own_sound_and_masks_the_rest():
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    video = unit(rng.normal(size=(6, 4))).astype(np.float32)
    audio = unit(video + 0.3 * rng.normal(size=(6, 4))).astype(np.float32)
    scale = np.float32(5.0)

    def reference(v, a):  # symmetric InfoNCE written out
        logits = scale * v @ a.T
        log_p = lambda x: x - np.log(np.exp(x).sum(1, keepdims=True))
        return (-np.mean(np.diag(log_p(logits))) - np.mean(np.diag(log_p(logits.T)))) / 2

    all_valid = np.ones(6, bool)
    loss, _ = contrastive.contrastive_loss(video, audio, all_valid, scale)
    np.testing.assert_allclose(loss, reference(video, audio), rtol=1e-5)
    # A clip missing a sense is neither a positive nor a negative: the loss is that of
    # the other clips alone, whatever its (meaningless) vectors hold.
    valid = all_valid.copy()
    valid[2] = False
    garbage = video.copy()
    garbage[2] = audio[0]  # would be a strong negative for clip 0 if it counted
    loss, _ = contrastive.contrastive_loss(garbage, audio, valid, scale)
    np.testing.assert_allclose(loss, reference(video[valid], audio[valid]), rtol=1e-5)
    # Swapping the sounds of two clips makes their pairs wrong: the loss goes up.
    swapped = audio[[1, 0, 2, 3, 4, 5]]
    assert contrastive.contrastive_loss(video, swapped, all_valid, scale)[0] > loss


@pytest.mark.slow
def test_the_loss_of_2_processes_x_2_devices_equals_1_process_x_4(tmp_path):
    def run(processes: int, devices: int) -> list[dict]:
        done = subprocess.run(
            [
                sys.executable,
                "launch/local.py",
                "--processes",
                str(processes),
                "--devices-per-process",
                str(devices),
                "--",
                sys.executable,
                "tests/contrastive_probe.py",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        lines = [x.split("PROBE ", 1)[1] for x in done.stdout.splitlines() if "PROBE " in x]
        return [json.loads(x) for x in lines]

    (one,) = run(1, 4)
    two = run(2, 2)
    assert one["devices"] == 4 and [r["processes"] for r in two] == [2, 2]
    assert {r["devices"] for r in two} == {4}
    for r in two:  # every process holds the same global loss
        np.testing.assert_allclose(r["loss"], one["loss"], rtol=1e-6)
        assert r["match"] == one["match"]
    assert one["loss"] > 0


def test_pretraining_reports_retrieval_and_knn_and_sora_eval_prints_them(demo_data, pretrained):
    result = json.loads((pretrained / "eval_test.json").read_text())
    r = result["retrieval"]
    assert r["num_examples"] + r["left_out"] == 20  # every held-out clip, once
    for key in ("v2a_r1", "v2a_r5", "v2a_r10", "a2v_r1", "a2v_r5", "a2v_r10"):
        assert 0 <= r[key] <= 1, key
    assert r["v2a_r1"] <= r["v2a_r5"] <= r["v2a_r10"]
    assert result["knn"]["bank_size"] == 48 and result["knn"]["num_examples"] == 20
    assert "top1" not in result  # no classifier was trained: no classification scores
    rows = [json.loads(x) for x in (pretrained / "metrics.jsonl").read_text().splitlines()]
    metrics = [row for row in rows if "loss" in row]  # the steps' rows, not the evaluators'
    assert {"contrastive_loss", "match_accuracy", "temperature"} <= set(metrics[-1])
    assert "accuracy" not in metrics[-1]
    done = subprocess.run(
        [pathlib.Path(sys.executable).parent / "sora-eval", "--workdir", str(pretrained)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["retrieval"] == r and last["knn"]["top1"] == result["knn"]["top1"]


def _params(workdir):
    source, _ = transfer.load_source(workdir)
    return source


def test_a_linear_probe_from_an_export_freezes_the_encoder_and_trains_only_a_new_head(
    demo_data, pretrained, tmp_path, caplog
):
    # An export holds the parameters of the step it was made from.
    export_lib.export(pretrained, tmp_path / "export")
    from_export, _ = transfer.load_source(tmp_path / "export")
    from_step, origin = transfer.load_source(pretrained / "checkpoints" / "12")
    assert origin.startswith("step 12 of")
    for part in ("visual", "audio", "fusion"):
        jax.tree.map(np.testing.assert_array_equal, from_export[part], from_step[part])
    config = _probe_config(demo_data, tmp_path / "export")
    config.init_parts = ("visual", "audio", "fusion", "head")  # the source's head: 7 classes
    with caplog.at_level("INFO", logger="sora_jax"):
        trainer.train(config, tmp_path / "probe", ONE_DEVICE)
    # A head for another number of classes (the probe's 4) starts anew, and says so.
    assert "the classifier differs in shape" in caplog.text and "initialised anew" in caplog.text
    after = _params(tmp_path / "probe")
    for part in ("visual", "audio"):
        jax.tree.map(np.testing.assert_array_equal, from_export[part], after[part])
    jax.tree.map(
        np.testing.assert_array_equal,
        {k: v for k, v in from_export["fusion"].items() if k != "classifier"},
        {k: v for k, v in after["fusion"].items() if k != "classifier"},
    )
    assert "contrastive" not in after  # the projection heads stay behind
    # ... while the head (for 4 classes, the source's for 7) goes on learning.
    earlier = _params(tmp_path / "probe" / "checkpoints" / "8")
    changed = after["fusion"]["classifier"]["kernel"] - earlier["fusion"]["classifier"]["kernel"]
    assert after["fusion"]["classifier"]["kernel"].shape == (16, 4)
    assert np.abs(changed).max() > 0
    # No optimizer state is kept for the frozen parts: Adam's moments cover the head only.
    from sora_jax.train import setup

    run = setup.build(config)
    roles = param_roles(run.abstract_state.params, config)
    head = sum(
        x.size
        for x, role in zip(
            jax.tree.leaves(run.abstract_state.params), jax.tree.leaves(roles), strict=True
        )
        if role == "trained"
    )
    opt_floats = sum(x.size for x in jax.tree.leaves(run.abstract_state.opt_state) if x.ndim)
    assert opt_floats == 2 * head  # mu and nu of the classifier, nothing else


def test_init_from_fails_before_compiling_naming_the_parameter_and_both_shapes(
    demo_data, pretrained, tmp_path, caplog
):
    caplog.set_level("INFO", logger="sora_jax")
    config = _probe_config(demo_data, pretrained)
    config.model.embed_dim = 24
    shapes = r"fusion/embed/bias has shape \(16,\) in step 12 of .* but \(24,\) in"
    with pytest.raises(ConfigError, match=shapes):
        trainer.train(config, tmp_path / "probe", ONE_DEVICE)
    assert not (tmp_path / "probe" / "config.json").exists()
    config = _probe_config(demo_data, tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config\.init_from: .*nowhere does not exist"):
        trainer.train(config, tmp_path / "probe2", ONE_DEVICE)
    config = _probe_config(demo_data, pretrained)
    config.init_parts = ("visual", "projection")  # a probe has no projection heads
    with pytest.raises(ConfigError, match=r"config\.init_parts: 'projection': only runs"):
        trainer.train(config, tmp_path / "probe3", ONE_DEVICE)
    assert "compiled" not in caplog.text, caplog.text  # each fails before compiling


def test_sora_embed_writes_one_npz_of_a_split_or_of_files(demo_data, pretrained, tmp_path):
    out = tmp_path / "test.npz"
    assert embed_lib.main(["--workdir", str(pretrained), "--split", "test", "--out", str(out)]) == 0
    z = np.load(out)
    assert z["embedding"].shape == (20, 16) and z["embedding"].dtype == np.float32
    assert z["video_embedding"].shape == z["audio_embedding"].shape == (20, 16)
    assert len(set(z["id"])) == 20 and set(z["label"]) <= {0, 1, 2, 3}
    assert list(z["class_names"]) == sorted(z["class_names"]) and len(z["class_names"]) == 4
    assert all(z["label_name"][i] == z["class_names"][z["label"][i]] for i in range(20))
    # Never over a file it did not write, unless asked.
    assert embed_lib.main(["--workdir", str(pretrained), "--split", "test", "--out", str(out)]) == 2
    # Raw files through an export: ids are absolute paths, so equal names never collide.
    export_lib.export(pretrained, tmp_path / "export")
    raw = pathlib.Path(demo_data[0]).parent / "raw" / "test"
    files = sorted(raw.rglob("*.mp4"))[:3]
    broken = tmp_path / "a" / files[0].name
    broken.parent.mkdir()
    broken.write_bytes(b"not a video")
    args = ["--export", str(tmp_path / "export"), *map(str, files), str(broken)]
    assert embed_lib.main([*args, "--out", str(tmp_path / "files.npz")]) == 3
    z = np.load(tmp_path / "files.npz")
    assert list(z["id"]) == [str(f.absolute()) for f in files] and set(z["label"]) == {-1}
    # The split's embedding of a clip is the file's embedding of the same clip.
    split = np.load(out)
    row = [i for i, p in enumerate(split["path"]) if p.endswith(files[0].name)]
    np.testing.assert_allclose(z["embedding"][0], split["embedding"][row[0]], atol=1e-4)


def _retrieval_from(npz: pathlib.Path) -> dict:
    z = np.load(npz)
    both = z["has_video"] & z["has_audio"]
    return retrieval_report(z["video_projection"], z["audio_projection"], both)


def _numbers(report: dict) -> dict:
    return {k: v for k, v in report.items() if not isinstance(v, str)}


def test_the_aligned_space_is_exported_and_retrieval_from_it_is_sora_evals(
    demo_data, pretrained, tmp_path
):
    """The projections are the product of pretraining: sora-embed and the export give them,
    and retrieval computed from either is sora-eval's, on the same clips. (The raw
    embeddings gave chance: they are not the space the senses were aligned in.)"""
    evaluated = json.loads((pretrained / "eval_test.json").read_text())["retrieval"]
    split = tmp_path / "split.npz"
    assert (
        embed_lib.main(["--workdir", str(pretrained), "--split", "test", "--out", str(split)]) == 0
    )
    assert _numbers(_retrieval_from(split)) == pytest.approx(_numbers(evaluated), abs=1e-9)

    export_lib.export(pretrained, tmp_path / "export")
    card = json.loads((tmp_path / "export" / "model_card.json").read_text())
    assert card["kind"] == "embedding" and card["class_names"] == []
    assert "logits" not in card["outputs"]  # an untrained classifier is not exported
    assert {"video_projection", "audio_projection"} <= set(card["outputs"])
    assert card["objective"] == {"contrastive": 1.0}
    markdown = (tmp_path / "export" / "model_card.md").read_text()
    assert "Pretrained without labels (contrastive): the classifier is untrained" in markdown
    assert "probe" in markdown  # the run's evaluators' measures, on the card too
    exported = tmp_path / "exported.npz"
    args = ["--export", str(tmp_path / "export"), "--split", "test", "--out", str(exported)]
    assert embed_lib.main(args) == 0
    assert _numbers(_retrieval_from(exported)) == pytest.approx(_numbers(evaluated), abs=1e-9)

    # Files in, embeddings out (never a crash over classes it does not have); a file with
    # no sound has no sound's embedding, not a vector that looks like data.
    from sora_jax.media.predictor import Predictor
    from tests.media import write_clip

    silent = write_clip(tmp_path / "silent.mp4", seconds=2.0, audio=False)
    predictor = Predictor(tmp_path / "export")
    result = predictor.predict(silent)
    assert "scores" not in result and result["has_audio"] is False
    assert result["embeddings"]["audio_embedding"] is None
    assert result["embeddings"]["audio_projection"] is None
    assert (
        len(result["embeddings"]["video_projection"])
        == card["outputs"]["video_projection"]["shape"][1]
    )
    files = tmp_path / "files.npz"
    args = ["--export", str(tmp_path / "export"), str(silent), "--out", str(files)]
    assert embed_lib.main(args) == 0
    z = np.load(files)
    assert not z["has_audio"][0] and np.isnan(z["audio_embedding"][0]).all()
    assert np.isfinite(z["video_embedding"][0]).all()
    with pytest.raises(ValueError, match="embedding model"):
        predictor.explain_file(silent)


def test_finetuning_trains_the_pretrained_parts_at_a_tenth_of_the_rate(
    demo_data, pretrained, tmp_path
):
    from configs import finetune

    config = finetune.get_config("runlocal")
    config.data.update(dir=demo_data[0], name=demo_data[1], fps=8.0)
    config.model.num_classes = 4
    config.init_from = str(pretrained)
    config.optimizer.update(schedule="constant", warmup_steps=0, grad_clip=0.0)
    config.total_steps = 1
    trainer.train(config, tmp_path / "finetune", ONE_DEVICE)
    before, after = _params(pretrained), _params(tmp_path / "finetune")
    # One Adam step moves every parameter by about its learning rate (the update is
    # ~sign(gradient)): 1e-3 for the new head, 1e-4 for the pretrained tower.
    lr = config.optimizer.learning_rate
    moved = lambda a, b: np.median(np.abs(a - b))
    visual = moved(
        after["visual"]["stage0_block0"]["conv_b"]["kernel"],
        before["visual"]["stage0_block0"]["conv_b"]["kernel"],
    )
    assert 0.05 * lr < visual < 0.2 * lr, visual
    roles = param_roles(after, config)
    assert roles["visual"]["stage0_block0"]["conv_b"]["kernel"] == "pretrained"
    assert roles["fusion"]["classifier"]["kernel"] == "trained"


def test_two_windows_of_a_clip_are_positives_for_each_other(demo_data):
    from sora_jax.data import pipeline

    config = _pretrain_config(demo_data)
    config.data.train_views = 2
    batch = next(iter(pipeline.train_dataset(config, 8)))
    assert batch["frames"].shape[:2] == (8, 2) and batch["label"].shape == (8,)
    # Two random windows and crops of each clip: not the same pixels.
    assert all(not np.array_equal(f[0], f[1]) for f in batch["frames"])
    # The loss is the mean over the four pairings of windows (picture i, sound j).
    rng = np.random.default_rng(1)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    v, a = unit(rng.normal(size=(8, 2, 4))), unit(rng.normal(size=(8, 2, 4)))
    flat = lambda x: x.reshape(16, 4)
    out = {"video_projection": flat(v), "audio_projection": flat(a), "logit_scale": 5.0}
    present = np.ones(16, bool)
    got, metrics = objectives.total(
        out, {"has_video": present, "has_audio": present}, config, views=2
    )
    valid = np.ones(8, bool)
    want = np.mean(
        [
            contrastive.contrastive_loss(v[:, i], a[:, j], valid, 5.0)[0]
            for i in (0, 1)
            for j in (0, 1)
        ]
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert metrics["pairs"] == 8  # clips, not windows


@pytest.mark.slow
def test_two_window_pretraining_trains_through_the_trainer(demo_data, tmp_path):
    config = _pretrain_config(demo_data)
    config.data.train_views = 2
    config.total_steps = 4
    trainer.train(config, tmp_path / "two_views", ONE_DEVICE)
    rows = [
        json.loads(x) for x in (tmp_path / "two_views" / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(rows) == 4 and all(np.isfinite(r["contrastive_loss"]) for r in rows)


def test_supervised_and_contrastive_losses_combine_as_a_weighted_sum(demo_data):
    config = _pretrain_config(demo_data)
    config.objectives.supervised.weight, config.objectives.contrastive.weight = 1.0, 0.5
    rng = np.random.default_rng(2)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
    out = {
        "logits": rng.normal(size=(6, 7)).astype(np.float32),
        "video_projection": unit(rng.normal(size=(6, 4))),
        "audio_projection": unit(rng.normal(size=(6, 4))),
        "logit_scale": np.float32(5.0),
    }
    present = np.ones(6, bool)
    batch = {"label": rng.integers(0, 7, 6), "has_video": present, "has_audio": present}
    loss, metrics = objectives.total(out, batch, config)

    # Each part computed here, independently: cross-entropy and symmetric InfoNCE by hand.
    def log_softmax(x):
        shifted = x - x.max(1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(1, keepdims=True))

    supervised = -np.mean(log_softmax(out["logits"])[np.arange(6), batch["label"]])
    logits = 5.0 * out["video_projection"] @ out["audio_projection"].T
    contrastive = (
        -(np.mean(np.diag(log_softmax(logits))) + np.mean(np.diag(log_softmax(logits.T)))) / 2
    )
    np.testing.assert_allclose(metrics["supervised_loss"], supervised, rtol=1e-5)
    np.testing.assert_allclose(metrics["contrastive_loss"], contrastive, rtol=1e-5)
    np.testing.assert_allclose(loss, supervised + 0.5 * contrastive, rtol=1e-5)
    assert {"accuracy", "match_accuracy", "temperature"} <= set(metrics)


def test_one_run_learns_from_a_labelled_and_an_unlabeled_dataset_mixed(demo_data, tmp_path):
    """As pretraining teams do: the contrastive loss on every clip, the supervised loss on
    the labelled ones (data.mixture), evaluated on the labelled set."""
    from data_prep import builder, layouts
    from data_prep.worker import PrepSettings

    raw = pathlib.Path(demo_data[0]).parent / "raw"
    unlabeled = layouts.discover(raw / "train", "unlabeled", seed=0, test_fraction=0.2)
    builder.prepare(unlabeled, tmp_path / "data", "web", PrepSettings(fps=8.0, short_side=40))
    config = _pretrain_config(demo_data)
    config.objectives.supervised.weight, config.model.num_classes = 1.0, 4
    config.data.mixture = (
        {"dir": demo_data[0], "name": demo_data[1], "weight": 1.0},
        {"dir": str(tmp_path / "data"), "name": "web", "weight": 1.0},
    )
    config.total_steps, config.log_every = 4, 1
    result = trainer.train(config, tmp_path / "run", ONE_DEVICE)
    assert "top1" in result and "retrieval" in result
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    for row in rows:
        assert np.isfinite([row["supervised_loss"], row["contrastive_loss"]]).all()


def test_recall_at_k_is_given_only_below_the_clip_count_and_few_clips_are_flagged():
    rng = np.random.default_rng(0)
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
    video, audio = unit(rng.normal(size=(11, 8))), unit(rng.normal(size=(11, 8)))
    report = retrieval_report(video, audio, np.ones(11, bool))
    assert "v2a_r10" in report and "v2a_r5" in report  # 10 < 11
    report = retrieval_report(video[:10], audio[:10], np.ones(10, bool))
    assert "v2a_r10" not in report and "a2v_r10" not in report  # always 1 with 10 clips
    assert "10 clips" in report["warning"]
    # Planted pairs: each picture's own sound is its nearest, so recall@1 is 1.
    report = retrieval_report(video, video, np.ones(11, bool))
    assert report["v2a_r1"] == report["a2v_r1"] == 1.0


def test_a_source_with_conv_biases_this_model_lacks_is_named_not_dropped():
    # Runs of the production configs from before 2026-12-03 have a bias on the convs their
    # norms follow; the configs now have none, and would load the rest and drop those.
    kernel, bias = (
        ("visual", "stage0_block0", "conv_a", "kernel"),
        ("visual", "stage0_block0", "conv_a", "bias"),
    )
    norm = ("visual", "stage0_block0", "norm_a", "GroupNorm_0", "bias")
    without = {kernel: (3, 3, 3, 8), norm: (8,)}
    with_bias = {**without, bias: (8,)}
    as_source = lambda shapes: {path: np.zeros(shape) for path, shape in shapes.items()}
    with pytest.raises(ConfigError, match=r"stage0_block0/conv_a/bias.*conv_bias_before_norm=True"):
        transfer._plan(without, as_source(with_bias), ("visual",), "old-run")
    with pytest.raises(
        ConfigError, match=r"conv_a/bias is not in new-run.*conv_bias_before_norm=False"
    ):
        transfer._plan(with_bias, as_source(without), ("visual",), "new-run")
    # The same model on both sides loads every parameter; a part not loaded is not looked at.
    assert sorted(transfer._plan(with_bias, as_source(with_bias), ("visual",), "run")[0]) == sorted(
        with_bias
    )
    audio = ("audio", "input_proj_0_fwd", "kernel")
    extra_audio = ("audio", "input_proj_0_fwd", "bias")
    source = as_source({**with_bias, audio: (4, 8), extra_audio: (8,)})
    assert len(transfer._plan({**with_bias, audio: (4, 8)}, source, ("visual",), "run")[0]) == 3
