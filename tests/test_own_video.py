"""Pretraining on your own video, end to end, as a new user runs it: a folder of ordinary
clips, among them the kinds that once crashed or were kept silently (a sound shorter than
the picture, a still image with a voice-over, no sound at all, a truncated file), fewer
training clips than a batch. Prepared unlabeled, pretrained, evaluated, the best
checkpoint exported, and the aligned space read back from the export."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from data_prep.synthetic import make_paired_set, write_video
from sora_jax.train.representation import retrieval_report
from tests.media import gradient_frames, tone, write_clip

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _command(name: str, *args: str) -> list[str]:
    return [os.path.join(os.path.dirname(sys.executable), name), *args]


def _ordinary_clips(root: pathlib.Path) -> pathlib.Path:
    corpus = root / "corpus"
    corpus.mkdir()
    paired = make_paired_set(root / "paired", train_per_class=5, test_per_class=1, seed=1)
    for i, clip in enumerate(sorted(paired.rglob("*.mp4"))):  # a pile of files, no labels
        shutil.copy(clip, corpus / f"clip_{i:03d}.mp4")
    frames = gradient_frames(52, 96, 128)  # 5.2 s at 10 fps
    # The sound ends before the picture (3.3 s of 5.2 s): a trailing black screen.
    write_video(corpus / "short_sound.mp4", frames, 10.0, tone(3.3, 300, 44_100), 44_100)
    # A still image with a voice-over, shorter than the picture (ffmpeg -loop 1 -shortest).
    still = np.repeat(frames[:1], 52, axis=0)
    write_video(corpus / "still_with_voice.mp4", still, 10.0, tone(3.3, 500, 44_100), 44_100)
    write_clip(corpus / "no_sound.mp4", seconds=4.0, audio=False)
    whole = write_clip(root / "whole.mkv", seconds=4.0)
    (corpus / "truncated.mkv").write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    return corpus


def test_pretraining_on_ordinary_clips_runs_to_the_end_and_hands_over_its_space(tmp_path):
    corpus = _ordinary_clips(tmp_path)
    run_in = lambda args: subprocess.run(args, cwd=tmp_path, capture_output=True, text=True)
    data, run, export = tmp_path / "data", tmp_path / "run", tmp_path / "export"

    prep = run_in(
        _command(
            *("sora-prep", str(corpus), "--out", str(data), "--name", "mine"),
            *("--layout", "unlabeled", "--short-side", "64"),
        )
    )
    assert prep.returncode == 3, prep.stderr[-2000:]  # 3: some files were skipped
    rows = {
        pathlib.Path(r["path"]).name: r for r in json.loads((data / "mine_report.json").read_text())
    }
    assert rows["truncated.mkv"]["status"] == "skipped"
    assert rows["truncated.mkv"]["reason"].startswith("truncated: decoded")
    assert all(r["status"] == "ok" for name, r in rows.items() if name != "truncated.mkv")
    train_clips = sum(r["split"] == "train" and r["status"] == "ok" for r in rows.values())
    assert train_clips < 64  # fewer than one batch of pretrain_av.py:small

    # pretrain_av.py:small as it is, but 60 steps (evaluated every 20) to keep the test short.
    trained = run_in(
        _command(
            *("sora-train", "--config", f"{ROOT}/configs/pretrain_av.py:small"),
            *(f"--workdir={run}", f"--config.data.dir={data}", "--config.data.name=mine"),
            *("--config.total_steps=60", "--config.eval_every=20"),
            "--config.checkpoint.every_steps=20",
        )
    )
    assert trained.returncode == 0, trained.stderr[-3000:]  # no NaN, no StopIteration
    losses = [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 60 and np.isfinite(losses).all()

    evaluated = run_in(_command("sora-eval", "--workdir", str(run), "--checkpoint", "best"))
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    brief = json.loads(evaluated.stdout.splitlines()[-1])
    assert brief["step"] in (20, 40, 60)
    exported = run_in(
        _command(
            *("sora-export", "--workdir", str(run), "--output", str(export)),
            *("--checkpoint", "best"),
        )
    )
    assert exported.returncode == 0, exported.stderr[-3000:]
    card = json.loads((export / "model_card.json").read_text())
    assert card["checkpoint_step"] == brief["step"] and card["kind"] == "embedding"

    # The export's aligned space gives sora-eval's retrieval on the same clips.
    embedded = run_in(
        _command("sora-embed", "--export", str(export), "--split", "test", "--out", "e.npz")
    )
    assert embedded.returncode == 0, embedded.stderr[-3000:]
    z = np.load(tmp_path / "e.npz")
    both = z["has_video"] & z["has_audio"]
    got = retrieval_report(z["video_projection"], z["audio_projection"], both)
    for key, value in brief["retrieval"].items():
        assert got[key] == (value if isinstance(value, str) else pytest.approx(value)), key

    # Files in, embeddings out; a file with no sound has none of the sound's.
    predicted = run_in(
        _command("sora-predict", "--export", str(export), str(corpus / "no_sound.mp4"))
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    result = json.loads(predicted.stdout.splitlines()[-1])
    assert result["has_audio"] is False and result["embeddings"]["audio_projection"] is None
    assert all(isinstance(x, float) for x in result["embeddings"]["video_projection"])
    # The truncated file, which sora-prep skipped, is embedded with a warning.
    predicted = run_in(
        _command("sora-predict", "--export", str(export), str(corpus / "truncated.mkv"))
    )
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    assert "truncated: decoded" in json.loads(predicted.stdout.splitlines()[-1])["warning"]
