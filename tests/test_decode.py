"""Decoding real files of many containers, codecs, rates, sizes and channel layouts."""

import os
import shutil

import numpy as np
import pytest
from PIL import Image

from sora_jax.media.decode import DecodeError, decode_video, stored_example
from sora_jax.media.sampling import ClipSpec, eval_views, train_clip
from tests.media import dominant_hz, write_audio_only, write_clip

FORMATS = [
    ("mp4", "libx264", "aac"),
    ("mkv", "libx264", "libopus"),
    ("webm", "libvpx-vp9", "libopus"),
    ("mkv", "libx264", "libmp3lame"),
    ("mkv", "mpeg4", "pcm_s16le"),
    # Video only: PyAV's AVI muxer shifts video timestamps when audio is interleaved.
    ("avi", "mpeg4", None),
]


@pytest.mark.parametrize("ext,video_codec,audio_codec", FORMATS)
def test_containers_and_codecs_decode_to_the_same_clip(tmp_path, ext, video_codec, audio_codec):
    rate = 48_000 if "opus" in (audio_codec or "") else 44_100
    path = write_clip(
        tmp_path / f"clip.{ext}",
        seconds=2.0,
        fps=10,
        hz=440,
        rate=rate,
        video_codec=video_codec,
        audio_codec=audio_codec or "aac",
        audio=audio_codec is not None,
    )
    clip = decode_video(path, fps=5.0, short_side=24)
    assert clip.frames.shape == (10, 24, 32, 3)  # 2 s at 5 fps; 48x64 -> short side 24
    assert clip.frames.dtype == np.uint8 and clip.audio.dtype == np.int16
    assert clip.has_audio == (audio_codec is not None)
    if audio_codec:
        assert abs(len(clip.audio) - 32_000) < 2_500  # 2 s at 16 kHz, give or take padding
        assert abs(dominant_hz(clip.audio[4000:28000]) - 440) < 5
    # Resampling 10 -> 5 fps keeps every other frame: frame i's brightness is 10 + 11 * 2i.
    means = clip.frames.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(means, 10 + 22 * np.arange(10), atol=6)


def test_variable_frame_rate_is_resampled_by_timestamps(tmp_path):
    times = np.array([0.0, 0.1, 0.15, 0.5, 0.55, 0.6, 1.2, 1.9])  # irregular, 2 s long
    path = write_clip(tmp_path / "vfr.mp4", seconds=2.0, fps=10, frame_times=times, audio=False)
    clip = decode_video(path, fps=10.0, short_side=0)
    shown = clip.frames.mean(axis=(1, 2, 3))
    # At t = k / 10 the picture is the latest frame whose time <= t.
    expected_index = [
        np.searchsorted(times, k / 10 + 1e-9, side="right") - 1 for k in range(len(shown))
    ]
    np.testing.assert_allclose(shown, 10 + 11 * np.asarray(expected_index), atol=6)
    assert 19 <= len(shown) <= 21


@pytest.mark.parametrize("channels,rate", [(2, 44_100), (6, 48_000), (1, 8_000)])
def test_any_channel_layout_and_rate_becomes_16khz_mono(tmp_path, channels, rate):
    path = write_clip(
        tmp_path / "audio.mkv",
        seconds=1.0,
        hz=1000,
        rate=rate,
        channels=channels,
        audio_codec="aac" if rate != 8_000 else "pcm_s16le",
    )
    clip = decode_video(path, fps=4.0, short_side=16)
    assert abs(len(clip.audio) - 16_000) < 1_500
    assert abs(dominant_hz(clip.audio[2000:14000]) - 1000) < 5


def test_portrait_video_keeps_its_orientation(tmp_path):
    path = write_clip(tmp_path / "portrait.mp4", seconds=1.0, size=(64, 36), audio=False)
    clip = decode_video(path, fps=4.0, short_side=18)
    assert clip.frames.shape[1:] == (32, 18, 3)
    assert not clip.has_audio and clip.audio.size == 0


@pytest.mark.parametrize("degrees,corner", [(90, (1, 0)), (-90, (0, 1)), (180, (1, 1))])
def test_display_rotation_is_applied_as_a_player_shows_it(tmp_path, degrees, corner):
    """A 64x32 landscape picture, red in its top-left quadrant, stored with a display
    rotation: decoded upright, with the red quadrant where the rotation takes it."""
    from data_prep.synthetic import write_video

    frames = np.zeros((4, 32, 64, 3), np.uint8)
    frames[:, :16, :32] = (255, 0, 0)
    path = tmp_path / f"rotated_{degrees}.mp4"
    write_video(path, frames, 4.0, display_rotation=degrees)
    clip = decode_video(path, fps=4.0, short_side=0)
    height, width = (64, 32) if degrees % 180 else (32, 64)
    assert clip.frames.shape == (4, height, width, 3)
    red = clip.frames[0, ..., 0] > 128
    row, col = (height // 2) * corner[0], (width // 2) * corner[1]
    assert red[row : row + height // 2, col : col + width // 2].mean() > 0.95
    assert red.mean() == pytest.approx(0.25, abs=0.02)


def test_bad_inputs_raise_decode_errors_with_reasons(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    picture = tmp_path / "picture.jpg"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(picture)
    reasons = {}
    for path in (empty, garbage, picture):
        with pytest.raises(DecodeError) as e:
            decode_video(path, fps=4.0, short_side=16)
        reasons[path.name] = str(e.value)
    assert reasons["empty.mp4"] == "empty file"
    assert "not a readable media file" in reasons["garbage.mp4"]
    assert "still picture" in reasons["picture.jpg"]
    # A sound without a picture is a clip too: the model hears it, and never sees blanks.
    sound = decode_video(write_audio_only(tmp_path / "audio_only.m4a"), fps=4.0, short_side=16)
    assert not sound.has_video and sound.frames.shape[0] == 0
    assert sound.has_audio and abs(sound.audio.size - 16_000) < 2_000  # one second
    spec = ClipSpec(
        num_frames=3, frame_stride=2, crop_size=8, fps=4.0, audio_samples=4000, num_classes=2
    )
    views = eval_views(stored_example(sound), spec, temporal_views=2, spatial_views=3)
    assert views["frames"].shape == (6, 3, 8, 8, 3) and not views["frame_mask"].any()
    assert not views["has_video"].any() and views["has_audio"].all()
    assert (views["audio_len"] == 4000).all()
    clip = train_clip(stored_example(sound), spec, np.random.default_rng(0), 0.5, True)
    assert clip["frames"].shape == (3, 8, 8, 3) and clip["has_video"] == np.False_


def test_only_the_local_file_itself_is_read(tmp_path):
    """A downloaded dataset's file must not make FFmpeg read anything else: a playlist or a
    concat list naming another file (here a real clip, which FFmpeg would decode and store
    as this one), a URL, a FIFO (reading it would hang), a device, a dangling link."""
    (tmp_path / "elsewhere").mkdir()
    elsewhere = write_clip(tmp_path / "elsewhere" / "private.mp4", seconds=2.0)
    playlist = tmp_path / "clip.m3u8"
    playlist.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{elsewhere}\n")
    disguised = tmp_path / "clip.mp4"  # the same playlist, named as a video
    shutil.copy(playlist, disguised)
    concat = tmp_path / "list.mkv"
    concat.write_text("ffconcat version 1.0\nfile 'elsewhere/private.mp4'\n")
    fifo = tmp_path / "fifo.mp4"
    os.mkfifo(fifo)
    dangling = tmp_path / "dangling.mp4"
    dangling.symlink_to(tmp_path / "deleted.mp4")
    reasons = {}
    for path in (
        playlist,
        disguised,
        concat,
        fifo,
        dangling,
        "/dev/zero",
        "http://127.0.0.1:9/a.mp4",
    ):
        with pytest.raises(DecodeError) as e:
            decode_video(path, fps=4.0, short_side=16)
        reasons[os.path.basename(path)] = str(e.value)
    assert "not a plain media file" in reasons["clip.m3u8"]
    assert "not a readable media file" in reasons["clip.mp4"]
    assert "not a plain media file" in reasons["list.mkv"]
    assert reasons["fifo.mp4"] == "not a regular file (a FIFO)"
    assert reasons["dangling.mp4"] == "a dangling link"
    assert reasons["zero"] == "not a regular file (a device, socket or folder)"
    assert reasons["a.mp4"] == "file not found"
    # A plain file whose name reads like an FFmpeg protocol is still just that file.
    odd = shutil.copy(elsewhere, tmp_path / "concat:a.mp4|b.mp4")
    assert decode_video(odd, fps=4.0, short_side=16).frames.shape[0] == 8


def test_a_jump_in_the_timestamps_is_closed_up_not_filled(tmp_path):
    """A 1.4 KB file whose third frame is stamped an hour later once decoded into an hour
    of copies of one frame (5 GB for a day at full size): memory must not grow with what a
    file only claims."""
    from data_prep.synthetic import write_video
    from tests.media import gradient_frames

    path = tmp_path / "gap.mkv"
    times = np.array([0.0, 0.1, 3600.0, 3600.1])
    write_video(path, gradient_frames(4, 48, 64), 10.0, None, frame_times=times)
    assert path.stat().st_size < 4096
    video = decode_video(path, 8.0, 0)
    assert len(video.frames) <= 4  # not 28,800
    assert video.notes == ("a 3599.9 s gap in the timestamps at 0.1 s closed up",)
    assert video.truncated() is None  # the claimed hour was the gap, not a cut-off file
    # A pause shorter than the limit is held, as a variable-rate recording means it.
    write_video(path, gradient_frames(3, 48, 64), 10.0, None, frame_times=np.array([0.0, 0.1, 5.0]))
    assert len(decode_video(path, 8.0, 0).frames) == 41


def test_a_long_input_is_cut_to_max_seconds_and_says_so(tmp_path):
    path = write_clip(tmp_path / "long.mp4", seconds=5.0)
    video = decode_video(path, 8.0, 0, max_seconds=2.0)
    assert len(video.frames) == 16 and video.notes == ("cut to its first 2 s of 5 s",)


@pytest.mark.parametrize("channels", [32, 64])
def test_sound_of_many_channels_is_averaged_to_mono(tmp_path, channels):
    """Ambisonics or a microphone array: FFmpeg's resampler refuses such layouts, and the
    file was once skipped as "corrupt or truncated: Invalid argument", picture and all."""
    import av

    from tests.media import gradient_frames, tone

    path = tmp_path / "array.mkv"
    layout = f"{channels} channels"
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=10)
        video.height, video.width, video.pix_fmt = 48, 64, "yuv420p"
        audio = out.add_stream("pcm_s16le", rate=16_000, layout=layout)
        wave = (tone(1.0, 440.0, 16_000)[0] * 32767).astype(np.int16)
        packed = np.repeat(wave[:, None], channels, axis=1).reshape(1, -1)  # s16: interleaved
        frame = av.AudioFrame.from_ndarray(packed, format="s16", layout=layout)
        frame.sample_rate = 16_000
        for packet in [*audio.encode(frame), *audio.encode(None)]:
            out.mux(packet)
        for image in gradient_frames(10, 48, 64):
            out.mux(video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(video.encode(None))
    decoded = decode_video(path, 8.0, 0)
    assert decoded.has_audio and decoded.has_video
    assert abs(dominant_hz(decoded.audio) - 440) < 10
    assert 0.4 * 32767 * 0.9 < np.abs(decoded.audio).max() < 0.4 * 32767 * 1.1  # tone()'s 0.4
