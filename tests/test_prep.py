"""sora-prep: layouts, bad files and the report, idempotency, and the tfds dataset."""

import collections
import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data_prep import builder, cli, layouts, report
from data_prep.worker import PrepSettings, prepare_entry
from sora_jax.media.decode import decode_video
from tests.media import write_audio_only, write_clip

SETTINGS = PrepSettings(fps=4.0, short_side=16, min_frames=4)


def _tree(root: pathlib.Path, files: dict[str, dict]) -> pathlib.Path:
    for rel, kwargs in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_clip(path, **kwargs)
    return root


def test_bad_files_are_reported_and_never_stop_the_run(tmp_path):
    source = _tree(
        tmp_path / "videos",
        {
            "train/cat/good.mp4": dict(seconds=2.0),
            "train/cat/silent.mp4": dict(seconds=2.0, audio=False),
            "train/dog/short.mp4": dict(seconds=0.5),
            "test/dog/good.webm": dict(
                seconds=2.0, video_codec="libvpx-vp9", audio_codec="libopus", rate=48_000
            ),
            "test/cat/good.mkv": dict(seconds=1.5),
        },
    )
    (source / "train/dog/empty.mp4").write_bytes(b"")
    (source / "train/dog/garbage.avi").write_bytes(os.urandom(4096))
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(source / "train/cat/photo.jpg")
    write_audio_only(source / "train/dog/podcast.m4a")
    whole = (source / "train/cat/good.mp4").read_bytes()
    (source / "train/dog/truncated.mp4").write_bytes(whole[: len(whole) // 3])
    # Inputs that are not plain local files are reported too, never followed or hung on.
    (source / "train/dog/playlist.m3u8").write_text(
        f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{source / 'train/cat/good.mp4'}\n"
    )
    os.mkfifo(source / "train/dog/fifo.mp4")
    (source / "train/cat/dangling.mp4").symlink_to(tmp_path / "deleted.mp4")

    out = tmp_path / "data"
    code = cli.main(
        [
            str(source),
            "--out",
            str(out),
            "--name",
            "pets",
            "--fps",
            "4",
            "--short-side",
            "16",
            "--workers",
            "2",
            "--min-frames",
            "4",
        ]
    )
    assert code == cli.EXIT_SKIPPED
    rows = {
        pathlib.Path(r["path"]).name: r for r in json.loads((out / "pets_report.json").read_text())
    }
    assert len(rows) == 13  # every input is in the report
    skipped = {name: r["reason"] for name, r in rows.items() if r["status"] == "skipped"}
    assert set(skipped) == {
        "empty.mp4",
        "garbage.avi",
        "photo.jpg",
        "truncated.mp4",
        "playlist.m3u8",
        "fifo.mp4",
        "dangling.mp4",
    }
    assert skipped["empty.mp4"] == "empty file"
    assert "not a plain media file" in skipped["playlist.m3u8"]
    assert skipped["fifo.mp4"] == "not a regular file (a FIFO)"
    assert skipped["dangling.mp4"] == "a dangling link"
    assert "still picture" in skipped["photo.jpg"]
    podcast = rows["podcast.m4a"]  # a sound without a picture: kept, marked
    assert podcast["status"] == "ok" and podcast["has_video"] is False and podcast["has_audio"]
    assert podcast["reason"] == "no video stream (kept, has_video=False)"
    assert rows["silent.mp4"]["status"] == "ok" and rows["silent.mp4"]["has_audio"] is False
    assert rows["short.mp4"]["status"] == "ok" and "short" in rows["short.mp4"]["reason"]
    assert rows["good.webm"]["status"] == "ok" and rows["good.webm"]["split"] == "test"
    assert set(rows["good.mp4"]) >= {
        "path",
        "status",
        "reason",
        "label",
        "split",
        "has_audio",
        "has_video",
    }

    train = tfds.data_source("pets", split="train", data_dir=str(out))
    test = tfds.data_source("pets", split="test", data_dir=str(out))
    assert (len(train), len(test)) == (4, 2)
    info = tfds.builder("pets", data_dir=str(out)).info
    assert info.features["label"].names == ["cat", "dog"]
    assert info.metadata["prep"]["fps"] == 4.0
    examples = {e["path"]: e for e in (train[i] for i in range(4))}
    podcast = examples[b"train/dog/podcast.m4a"]
    assert podcast["num_frames"] == 0 and len(podcast["frames"]) == 0 and podcast["has_audio"]
    silent = examples[b"train/cat/silent.mp4"]
    assert not silent["has_audio"] and len(silent["audio"]) == 0
    short = examples[b"train/dog/short.mp4"]
    assert short["num_frames"] == 2 and len(short["frames"]) == 2
    good = examples[b"train/cat/good.mp4"]
    assert good["num_frames"] == 8 and abs(len(good["audio"]) - 32_000) < 2_500


def test_rerunning_is_idempotent_and_a_stopped_rebuild_keeps_the_old_dataset(tmp_path, monkeypatch):
    source = _tree(
        tmp_path / "videos", {f"{c}/{i}.mp4": dict(seconds=1.0) for c in "ab" for i in range(3)}
    )
    out = tmp_path / "data"
    args = [
        str(source),
        "--out",
        str(out),
        "--name",
        "ab",
        "--fps",
        "4",
        "--short-side",
        "16",
        "--workers",
        "0",
    ]
    assert cli.main(args) == 0
    files = sorted((out / "ab").rglob("*"))
    before = {p: p.read_bytes() for p in files if p.is_file()}
    report = (out / "ab_report.json").read_text()
    assert cli.main(args) == 0
    after = {p: p.read_bytes() for p in sorted((out / "ab").rglob("*")) if p.is_file()}
    assert before == after and report == (out / "ab_report.json").read_text()
    # A changed input is noticed and the dataset rebuilt; a rebuild stopped midway (as by a
    # kill) leaves the previous dataset whole and readable.
    write_clip(source / "a" / "new.mp4", seconds=1.0)
    calls = []

    def killed_on_the_third_clip(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return prepare_entry(*args, **kwargs)

    monkeypatch.setattr(builder, "prepare_entry", killed_on_the_third_clip)
    with pytest.raises(KeyboardInterrupt):
        cli.main(args)
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in sorted((out / "ab").rglob("*")) if p.is_file()} == before
    splits = tfds.builder("ab", data_dir=str(out)).info.splits
    assert sum(s.num_examples for s in splits.values()) == 6
    # What killed builds leave (tfds's incomplete.* and a dead process's staging folder)
    # goes with the next build.
    for leftover in (out / "ab" / "incomplete.3fa1c2", out / ".staging.ab.999999999"):
        (leftover / "1.0.0").mkdir(parents=True)
    assert cli.main(args) == 0
    assert len(json.loads((out / "ab_report.json").read_text())) == 7
    splits = tfds.builder("ab", data_dir=str(out)).info.splits
    assert sum(s.num_examples for s in splits.values()) == 7
    assert sorted(p.name for p in out.iterdir()) == [".ab.lock", "ab", "ab_report.json"]
    assert sorted(p.name for p in (out / "ab").iterdir()) == ["1.0.0"]


def test_linked_folders_are_followed_once_and_stray_files_are_reported(tmp_path):
    """A source assembled from links (a class folder kept elsewhere, a link back up the
    tree) and a README at its root: every clip found once, the README reported."""
    source, elsewhere = tmp_path / "source", tmp_path / "elsewhere" / "dogs"
    (source / "cat").mkdir(parents=True)
    elsewhere.mkdir(parents=True)
    for path in (source / "cat" / "1.mp4", elsewhere / "2.mp4"):
        path.write_bytes(b"placeholder")
    (source / "dog").symlink_to(elsewhere, target_is_directory=True)
    (source / "cat" / "loop").symlink_to(source, target_is_directory=True)
    (source / "README.md").write_text("my clips")
    entries = layouts.discover(source, seed=0, test_fraction=0.0)
    assert [(e.key, e.labels, e.skip) for e in entries] == [
        ("README.md", (), "not where the layout has clips (DIR/<class>/<file>)"),
        ("cat/1.mp4", ("cat",), ""),
        ("dog/2.mp4", ("dog",), ""),
    ]
    row, example = prepare_entry(entries[0], SETTINGS)
    assert (row["status"], row["reason"], example) == ("skipped", entries[0].skip, None)


def test_class_folders_split_is_stratified_seeded_and_deterministic(tmp_path):
    sizes = {"x": 20, "y": 20, "rare": 2, "single": 1}
    for c, n in sizes.items():
        (tmp_path / c).mkdir()
        for i in range(n):
            (tmp_path / c / f"{i}.mp4").write_bytes(b"placeholder")
    a = layouts.discover(tmp_path, seed=1)
    b = layouts.discover(tmp_path, seed=1)
    c = layouts.discover(tmp_path, seed=2)
    assert [e.split for e in a] == [e.split for e in b]
    assert [e.split for e in a] != [e.split for e in c]
    # Per class: a fifth of each class in the test split; at least one clip, never all.
    tests = collections.Counter(e.labels[0] for e in a if e.split == "test")
    assert tests == {"x": 4, "y": 4, "rare": 1}
    assert layouts.detect_layout(tmp_path) == "class_folders"
    rows = [{"status": "ok", "label": e.labels[0], "split": e.split, "path": e.key} for e in a]
    assert report.thin_classes(rows) == {"rare": 1, "single": 0}


def test_csv_and_kinetics_layouts(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    write_clip(clips / "a.mp4", seconds=1.0)
    write_clip(clips / "abc123_000010_000020.mp4", seconds=1.0)
    plain = tmp_path / "list.csv"
    with plain.open("w", newline="") as f:
        csv.writer(f).writerows(
            [
                ["path", "label", "split"],
                ["clips/a.mp4", "cat;dog", "train"],
                ["clips/missing.mp4", "dog", "test"],
            ]
        )
    entries = layouts.discover(plain)
    assert layouts.detect_layout(plain) == "csv"
    assert [(e.key, e.labels, e.split) for e in entries] == [
        ("clips/a.mp4", ("cat", "dog"), "train"),
        ("clips/missing.mp4", ("dog",), "test"),
    ]
    kinetics = tmp_path / "kinetics.csv"
    with kinetics.open("w", newline="") as f:
        csv.writer(f).writerows(
            [
                ["youtube_id", "time_start", "time_end", "label", "split"],
                ["abc123", "10", "20", "playing drums", "train"],
            ]
        )
    assert layouts.detect_layout(kinetics) == "kinetics"
    (entry,) = layouts.discover(kinetics, videos_dir=clips)
    assert entry.path == (clips / "abc123_000010_000020.mp4").resolve()
    assert entry.labels == ("playing drums",)
    # A missing file is reported, not silently dropped.
    rows, _ = builder.prepare(entries, tmp_path / "out", "listed", SETTINGS)
    assert [(r["status"], r["reason"]) for r in rows] == [("ok", ""), ("skipped", "file not found")]


def test_sora_prep_command_line_contract(tmp_path):
    source = tmp_path / "raw"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.cli",
            "demo",
            str(source),
            "--train-per-class",
            "2",
            "--test-per-class",
            "1",
            "--timeline",
            str(tmp_path / "not_yet" / "timeline.mkv"),  # its folder is made
        ],
        check=True,
    )
    timeline = decode_video(tmp_path / "not_yet" / "timeline.mkv", fps=8.0, short_side=0)
    assert len(timeline.frames) == 8 * 32 and timeline.has_audio  # 4 classes x 4 s, twice
    (source / "train" / "red_low" / "broken.mp4").write_bytes(b"\x00" * 100)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.cli",
            str(source),
            "--out",
            str(tmp_path / "data"),
            "--name",
            "tiny",
            "--short-side",
            "24",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 3, done.stderr
    assert "12 kept, 1 skipped" in done.stdout and "broken.mp4" in done.stdout
    report = json.loads((tmp_path / "data" / "tiny_report.json").read_text())
    assert len(report) == 13  # 4 classes x (2 train + 1 test) + 1
    # The dataset and its report, nothing else (tfds would leave an empty downloads/).
    held = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert held == [".tiny.lock", "tiny", "tiny_report.json"]  # the lock: one sora-prep at a time
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.cli",
            str(tmp_path / "nowhere"),
            "--out",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr


@pytest.mark.parametrize("name", ["Bad-Name", "1st"])
def test_dataset_names_must_be_snake_case(tmp_path, name):
    with pytest.raises(ValueError, match="snake_case"):
        builder.make_builder(name, str(tmp_path), entries=[], settings=SETTINGS)


def test_beam_direct_runner_builds_the_same_dataset_as_the_local_build(tmp_path):
    source = _tree(
        tmp_path / "videos",
        {
            **{
                f"train/{c}/{i}.mp4": dict(seconds=1.0, hz=300 + 100 * i)
                for c in "ab"
                for i in range(3)
            },
            "test/a/0.mkv": dict(seconds=1.5),
            "test/b/0.mkv": dict(seconds=1.5, audio=False),
        },
    )
    (source / "train" / "a" / "bad.mp4").write_bytes(b"\x00" * 64)
    entries = layouts.discover(source)
    local_rows, _ = builder.prepare(entries, tmp_path / "local", "same", SETTINGS)
    beam_rows, _ = builder.prepare(entries, tmp_path / "beam", "same", SETTINGS, beam_options="")
    assert beam_rows == local_rows
    for split in ("train", "test"):
        local = tfds.data_source("same", split=split, data_dir=str(tmp_path / "local"))
        beam = tfds.data_source("same", split=split, data_dir=str(tmp_path / "beam"))
        assert len(local) == len(beam) > 0
        for i in range(len(local)):
            a, b = local[i], beam[i]
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(
                    np.asarray(a[key], dtype=object), np.asarray(b[key], dtype=object), err_msg=key
                )
    assert not (tmp_path / "beam" / ".beam_report").exists()


def test_unlabeled_layout_reads_any_tree_or_a_path_only_csv_and_stores_no_labels(tmp_path):
    source = _tree(
        tmp_path / "videos",
        {
            "a.mp4": dict(seconds=2.0),
            "trip/day1/b.mp4": dict(seconds=2.0),
            "trip/day2/c.mkv": dict(seconds=2.0, audio=False),
            "trip/d.mp4": dict(seconds=2.0),
        },
    )
    (source / "notes.txt").write_text("not a video")
    entries = layouts.discover(source, "unlabeled", seed=1, test_fraction=0.5)
    assert [e.key for e in entries] == [
        "a.mp4",
        "notes.txt",
        "trip/d.mp4",
        "trip/day1/b.mp4",
        "trip/day2/c.mkv",
    ]
    assert all(e.labels == () for e in entries)
    again = layouts.discover(source, "unlabeled", seed=1, test_fraction=0.5)
    assert [e.split for e in again] == [e.split for e in entries]  # seeded, not random
    assert {e.split for e in entries} == {"train", "test"}
    listing = tmp_path / "clips.csv"
    listing.write_text("path\nvideos/a.mp4\nvideos/trip/d.mp4\n")
    from_csv = layouts.discover(listing, "unlabeled")
    assert [e.path for e in from_csv] == [source / "a.mp4", source / "trip" / "d.mp4"]
    (tmp_path / "bad.csv").write_text("file\nvideos/a.mp4\n")
    with pytest.raises(ValueError, match="needs a `path` column"):
        layouts.discover(tmp_path / "bad.csv", "unlabeled")

    code = cli.main(
        [
            str(source),
            "--out",
            str(tmp_path / "data"),
            "--name",
            "raw_video",
            "--layout",
            "unlabeled",
            "--test-fraction",
            "0.5",
            "--seed",
            "1",
            "--fps",
            "4",
            "--short-side",
            "16",
            "--workers",
            "1",
        ]
    )
    assert code == cli.EXIT_SKIPPED  # notes.txt, reported with its reason
    report = json.loads((tmp_path / "data" / "raw_video_report.json").read_text())
    assert [r["status"] for r in report].count("skipped") == 1
    assert {r["label"] for r in report} == {""}
    builder_ = tfds.builder("raw_video", data_dir=str(tmp_path / "data"))
    assert "label" not in builder_.info.features  # pretraining data: nothing to read
    from sora_jax.data import pipeline

    summary = pipeline.dataset_summary(str(tmp_path / "data"), "raw_video")
    assert summary.class_names == () and sum(summary.splits.values()) == 4
    # A supervised run on it fails before compiling, naming the key to change.
    from configs import demo
    from sora_jax.config import ConfigError

    config = demo.get_config("runlocal")
    config.data.update(dir=str(tmp_path / "data"), name="raw_video", fps=4.0, crop_size=16)
    with pytest.raises(
        ConfigError, match=r"config\.objectives: supervised read labels, but .* has none"
    ):
        pipeline.check_dataset(config)
    # ... and a contrastive one reads its clips, the silent one marked so.
    config.objectives.supervised.weight, config.objectives.contrastive.weight = 0.0, 1.0
    pipeline.check_dataset(config)
    clips = {}
    for split, size in summary.splits.items():
        source_ = pipeline.data_source(config, split)
        clips |= {c["path"].decode(): c for c in (source_[i] for i in range(size))}
    assert sorted(clips) == ["a.mp4", "trip/d.mp4", "trip/day1/b.mp4", "trip/day2/c.mkv"]
    assert all("label" not in c for c in clips.values())
    assert [k for k, c in clips.items() if not c["has_audio"]] == ["trip/day2/c.mkv"]


def test_a_truncated_file_is_skipped_with_a_reason_and_the_client_warns(tmp_path):
    """A download cut off part way: FFmpeg decodes what is there without an error, so
    the decoded length is held against the duration the container claims."""
    whole = write_clip(tmp_path / "whole.mkv", seconds=4.0)
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(whole.read_bytes()[: len(whole.read_bytes()) // 2])
    settings = PrepSettings(fps=8.0, short_side=16)
    entry = lambda path: layouts.Entry(path, path.name, ("a",), "train")
    row, example = prepare_entry(entry(cut), settings)
    assert row["status"] == "skipped" and example is None
    assert row["reason"].startswith("truncated: decoded 2.") and "of the 4.0 s" in row["reason"]
    assert prepare_entry(entry(whole), settings)[0]["status"] == "ok"
    # The threshold is a setting: 0 keeps every file that decodes at all.
    kept, _ = prepare_entry(entry(cut), PrepSettings(fps=8.0, short_side=16, min_complete=0.0))
    assert kept["status"] == "ok"


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--fps", "-3", "--fps -3.0: must be positive"),
        ("--fps", "0", "--fps 0.0: must be positive"),
        ("--short-side", "-5", "--short-side -5: must be >= 0"),
        ("--min-complete", "1.5", "--min-complete 1.5: must be in [0, 1]"),
    ],
)
def test_bad_arguments_fail_before_any_file_is_read(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as e:
        cli.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"), flag, value])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_output_inside_the_source_is_refused(tmp_path, capsys):
    """Run twice, it once read its own output as a class of 0 clips."""
    source = _tree(tmp_path / "videos", {"train/a/0.mp4": dict(seconds=1.0)})
    assert cli.main([str(source), "--out", str(source / "prepared"), "--name", "x"]) == 2
    assert "is inside SOURCE" in capsys.readouterr().err
    assert not (source / "prepared").exists()


def test_one_sora_prep_at_a_time_builds_a_dataset(tmp_path, capsys):
    """Two on one --out/--name with different inputs: the later once silently replaced the
    earlier's dataset."""
    import fcntl

    source = _tree(tmp_path / "videos", {"train/a/0.mp4": dict(seconds=1.0)})
    out = tmp_path / "data"
    out.mkdir()
    with open(out / ".x.lock", "a+") as held:  # as a running sora-prep holds it
        held.write("pid 123 on elsewhere")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert cli.main([str(source), "--out", str(out), "--name", "x"]) == 2
        assert (
            "being prepared by another sora-prep (pid 123 on elsewhere)" in capsys.readouterr().err
        )
    assert cli.main([str(source), "--out", str(out), "--name", "x"]) == 0  # free again
