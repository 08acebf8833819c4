"""Timelines over long files and live streams: sora-predict --timeline / --stream, run as
a user runs them, on real encoded files joined from clips of known classes."""

import json
import os
import pathlib
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from sora_jax.media.predictor import Predictor
from sora_jax.media.timeline import read_ahead
from tests.media import write_sequence

ROOT = pathlib.Path(__file__).resolve().parents[1]
PREDICT = str(pathlib.Path(sys.executable).parent / "sora-predict")


def _run(args: list[str], stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([PREDICT, *args], cwd=ROOT, input=stdin, capture_output=True, check=False)


def _lines(stdout: bytes) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in stdout.decode().splitlines()]
    return [r for r in rows if "scores" in r], [r for r in rows if "summary" in r]


def _check_follows(windows: list[dict], truth: list[tuple[str, float, float]], width: float):
    """Every window farther than a window's width from a boundary has the segment's class
    on top; the windows cover the file from its start to its end."""
    boundaries = [end for _, _, end in truth[:-1]]
    checked = 0
    for w in windows:
        centre = (w["start_s"] + w["end_s"]) / 2
        if any(abs(centre - b) < width for b in boundaries):
            continue
        name = next(n for n, start, end in truth if start <= centre < end)
        assert max(w["scores"], key=w["scores"].get) == name, (w, name)
        checked += 1
    assert checked >= len(windows) // 2, (checked, len(windows))
    assert windows[0]["start_s"] == 0 and windows[-1]["end_s"] == pytest.approx(truth[-1][2])


# Not in CI (`long`): the sight-or-sound clips encode to other pixels from run to run
# (x264 with a sound track muxed in; data_prep/synthetic.write_video), so the model these
# quality thresholds judge differs per run, and this failed in 2 of 5 runs on 2026-12-02.
# make test-slow and make test-all still run it; making the clips deterministic is the fix.
@pytest.mark.slow
@pytest.mark.long
def test_the_timeline_follows_the_segments_of_a_long_file(sight_or_sound, tmp_path):
    export, _ = sight_or_sound
    width = Predictor(export).window_seconds()
    with_sound = write_sequence(tmp_path / "day.mkv", ["red", "low", "blue", "high"], 4.0, 7)
    silent = write_sequence(tmp_path / "quiet.mp4", ["red", "blue", "red"], 4.0, 8, audio=False)
    plot = tmp_path / "timeline.png"
    args = ["--export", str(export), "--timeline", str(tmp_path / "day.mkv")]
    done = _run([*args, str(tmp_path / "quiet.mp4"), "--plot", str(plot)])
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    windows, summaries = _lines(done.stdout)
    by_file = {p: [w for w in windows if w["path"].endswith(p)] for p in ("day.mkv", "quiet.mp4")}
    _check_follows(by_file["day.mkv"], with_sound, width)
    _check_follows(by_file["quiet.mp4"], silent, width)
    assert all(w["has_audio"] and w["has_video"] for w in by_file["day.mkv"])
    assert not any(w["has_audio"] for w in by_file["quiet.mp4"])
    # Half a window apart by default.
    starts = [w["start_s"] for w in by_file["day.mkv"]]
    assert np.diff(starts)[:-1] == pytest.approx(width * 3 / 7)  # 3 of a 7-frame window
    for summary, truth in zip(summaries, (with_sound, silent), strict=True):
        segments = summary["summary"]["segments"]
        assert [s["class"] for s in segments] == [name for name, _, _ in truth]
        for s, (_, start, end) in zip(segments, truth, strict=True):
            assert abs(s["start_s"] - start) < width and abs(s["end_s"] - end) < width
        timing = summary["summary"]["timing"]
        assert timing["real_time_factor"] > 1 and timing["latency_ms"]["p99"] > 0
    for name in ("day", "quiet"):  # one figure per file
        assert (tmp_path / f"timeline-{name}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_a_window_is_the_evaluation_view_that_starts_at_its_frame(sight_or_sound):
    """A timeline scores exactly what sora-predict and sora-eval score: its first and last
    windows of a clip are the clip's two evaluation views, to the pixel and sample."""
    export, raw = sight_or_sound
    predictor = Predictor(export)
    clip = raw / "test" / "high" / "high_000.mp4"
    views, _ = predictor.inputs(clip)
    windows = list(predictor.timeline(clip, with_inputs=True))[:-1]
    for view, window in ((0, windows[0]), (1, windows[-1])):
        for key, value in window["inputs"].items():
            np.testing.assert_array_equal(value, views[key][view], err_msg=key)
    assert windows[-1]["end_s"] == 2.0 and len(windows) == 4  # 16 frames: 0, 3, 6, 9


def _trickle(data: bytes, write, seconds: float, close) -> None:
    """Writes `data` in 40 pieces over `seconds`, as a live source would."""
    pieces = np.array_split(np.frombuffer(data, np.uint8), 40)
    for piece in pieces:
        write(piece.tobytes())
        time.sleep(seconds / len(pieces))
    close()


@pytest.mark.slow
def test_a_live_stream_gives_the_files_windows_as_they_arrive(sight_or_sound, tmp_path):
    export, _ = sight_or_sound
    path = tmp_path / "live.mkv"  # Matroska: streamable, as `ffmpeg -f matroska -` writes
    write_sequence(path, ["blue", "high", "red"], 3.0, 9)
    data = path.read_bytes()
    whole = _run(["--export", str(export), "--timeline", str(path)])
    expected, _ = _lines(whole.stdout)

    # Standard input, fed over ~4 s: the first windows come out before the input ends.
    process = subprocess.Popen(
        [PREDICT, "--export", str(export), "--stream", "-"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=(tmp_path / "stderr").open("wb"),
    )
    first_line = process.stdout.readline  # blocks until the model is loaded
    feeder = threading.Thread(
        target=_trickle, args=(data, process.stdin.write, 4.0, process.stdin.close)
    )
    time.sleep(0.1)
    feeder.start()
    line = first_line()
    seen_while_feeding = feeder.is_alive()
    feeder.join()
    rest = process.stdout.read()
    assert process.wait(timeout=120) == 0, (tmp_path / "stderr").read_text()[-2000:]
    streamed, summary = _lines(line + rest)
    assert seen_while_feeding, "no window came out before the stream ended"

    # A file still being written, followed until it stops growing.
    growing = tmp_path / "growing.mkv"
    out = growing.open("wb")
    feeder = threading.Thread(target=_trickle, args=(data, out.write, 2.0, out.close))
    out.write(b"")
    feeder.start()
    followed = _run(["--export", str(export), "--stream", str(growing), "--idle-seconds", "1.5"])
    feeder.join()
    assert followed.returncode == 0, followed.stderr.decode()[-2000:]
    grown, _ = _lines(followed.stdout)

    for got in (streamed, grown):
        assert [(w["start_s"], w["end_s"]) for w in got] == [
            (w["start_s"], w["end_s"]) for w in expected
        ]
        for a, b in zip(got, expected, strict=True):
            assert a["scores"] == pytest.approx(b["scores"], abs=1e-5)
    assert [s["class"] for s in summary[0]["summary"]["segments"]] == ["blue", "high", "red"]
    assert "warning" not in summary[0]["summary"]  # every byte of it was media

    # The same stream followed by garbage: its windows, and a summary saying where the
    # media ended (it was once consumed to the end without a word).
    garbage = np.random.default_rng(0).integers(0, 256, 200_000, np.uint8).tobytes()
    spoiled = _run(["--export", str(export), "--stream", "-"], stdin=data + garbage)
    assert spoiled.returncode == 0, spoiled.stderr.decode()[-2000:]
    windows, summary = _lines(spoiled.stdout)
    assert len(windows) == len(expected)
    warning = summary[0]["summary"]["warning"]
    end = int(warning.split("after byte ")[1].split()[0])
    assert len(data) - 64 * 1024 < end <= len(data) and "held no media" in warning


# Run in a fresh process: how far a timeline (or, for the control, a whole-file prediction)
# over one file raises the peak resident memory. Loading jax and the model peaks higher
# than either (~1.4 GiB here), so the peak is reset (Linux: /proc/self/clear_refs) once
# the model is loaded and compiled on a short clip; the answer is the peak (VmHWM) then,
# less the memory in use at the reset (which differs by ~100 MiB between a process that
# compiled and one that loaded the compilation cache).
# MALLOC_ARENA_MAX=1: glibc otherwise gives threads arenas of their own, and which threads
# touch which arena varies from run to run (+-10 MiB of noise here; +-3 MiB with one).
PEAK_OF = """
import pathlib, sys
from sora_jax.media.predictor import Predictor
from sora_jax.media.timeline import read_ahead

export, warm_up, path, mode = sys.argv[1:]
predictor = Predictor(export)
list(predictor.timeline(warm_up)), predictor.predict(warm_up)
def status(key):
    lines = pathlib.Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in lines if line.startswith(key))

pathlib.Path("/proc/self/clear_refs").write_text("5")
before = status("VmRSS")
if mode == "timeline":
    assert "summary" in list(predictor.timeline(path))[-1]
else:
    assert "scores" in predictor.predict(path)
print(status("VmHWM") - before)
"""


@pytest.mark.slow
def test_a_timeline_holds_a_few_windows_however_long_the_file(sight_or_sound, tmp_path):
    """Peak memory over a 1-minute and a 6-minute file: flat for the timeline (+5 to +10
    MiB at either length, run to run: how far the decoding thread has read ahead, and the
    allocator). The control, a prediction without --timeline, decodes the whole file first
    and grows with the frames and sound it holds (+7 and +60 MiB): the measure can tell."""
    export, raw = sight_or_sound
    warm_up = raw / "test" / "red" / "red_000.mp4"
    names = ["red", "low", "blue", "high"]
    peak = {}
    for minutes in (1, 6):
        path = tmp_path / f"{minutes}.mkv"
        write_sequence(path, names * (minutes * 3), 5.0, minutes)
        for mode in ("timeline", "whole"):
            args = [str(export), str(warm_up), str(path), mode]
            done = subprocess.run(
                [sys.executable, "-c", PEAK_OF, *args],
                cwd=ROOT,
                env=os.environ | {"MALLOC_ARENA_MAX": "1"},
                capture_output=True,
                check=True,
            )
            peak[mode, minutes] = int(done.stdout.split()[-1]) / 1024  # KiB -> MiB
    assert peak["whole", 6] - peak["whole", 1] > 30, peak  # the control: holding the file shows
    assert abs(peak["timeline", 6] - peak["timeline", 1]) < 10, peak


@pytest.mark.slow
def test_unreadable_inputs_are_reported_and_the_rest_go_on(sight_or_sound, tmp_path):
    export, raw = sight_or_sound
    broken = tmp_path / "broken.mkv"
    broken.write_bytes(b"\x1a\x45\xdf\xa3 not a video" * 50)
    playlist = tmp_path / "list.m3u8"
    playlist.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2,\nfile:/etc/passwd\n")
    clip = raw / "test" / "red" / "red_000.mp4"
    done = _run(["--export", str(export), "--timeline", str(broken), str(clip)])
    assert done.returncode == 3
    rows = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert rows[0]["path"] == str(broken) and "error" in rows[0]
    assert any("summary" in r for r in rows)
    # A stream has the restrictions a file has: a playlist is not followed.
    for source in (broken, playlist):
        streamed = _run(["--export", str(export), "--stream", "-"], stdin=source.read_bytes())
        assert streamed.returncode == 3
        (row,) = [json.loads(line) for line in streamed.stdout.decode().splitlines()]
        assert row["path"] == "-" and "not" in row["error"], row


def test_reading_ahead_hands_over_errors_and_stops_when_the_reader_does():
    produced = []

    def events(fail_at: int | None):
        for i in range(1000):
            if i == fail_at:
                raise ValueError(f"broken at {i}")
            produced.append(i)
            yield i

    # The events before the error arrive, then the error itself (an assert inside
    # pytest.raises would never run: list() raises first).
    received = []
    with pytest.raises(ValueError, match="broken at 5"):
        for event in read_ahead(events(5), size=2):
            received.append(event)
    assert received == [0, 1, 2, 3, 4]
    produced.clear()
    reader = read_ahead(events(None), size=4)
    assert [next(reader) for _ in range(3)] == [0, 1, 2]
    reader.close()  # the producer stops: it had run at most the buffer's size ahead
    assert len(produced) <= 3 + 4 + 1, produced
    assert list(read_ahead(iter(range(50)), size=3)) == list(range(50))


@pytest.mark.slow
def test_time_the_caller_spends_between_windows_is_not_counted_as_decoding(
    sight_or_sound, tmp_path
):
    """sora-predict --explain explains windows between them: that time once showed as
    decoding (decode 35.7 s, real-time factor 0.15, against 0.31 s and 15.6x without)."""
    export, _ = sight_or_sound
    path = tmp_path / "a.mkv"
    write_sequence(path, ["red", "low"], 3.0, 3)
    began, windows, timing = time.perf_counter(), 0, None
    for row in Predictor(export).timeline(path):
        if "summary" in row:
            timing = row["summary"]["timing"]
        else:
            windows += 1
            time.sleep(0.2)  # the caller's work on this window
    wall = time.perf_counter() - began
    assert timing["caller_s"] >= 0.2 * windows
    assert timing["seconds"] <= wall - 0.2 * windows + 0.01
    assert timing["decode_s"] < 0.2 * windows / 2


def test_a_stream_that_is_a_folder_is_refused_in_one_line(tmp_path):
    done = _run(["--export", str(tmp_path), "--stream", str(tmp_path)])
    assert done.returncode == 2
    assert f"--stream {tmp_path}: no such file".encode() in done.stderr
    assert b"Traceback" not in done.stderr
