"""Writing real encoded videos with PyAV: the built-in demo dataset, and test fixtures."""

import colorsys
import csv
import fractions
import pathlib
from collections.abc import Callable

import av
import numpy as np


def write_video(
    path: str | pathlib.Path,
    frames: np.ndarray,  # [N, H, W, 3] uint8
    fps: float,
    audio: np.ndarray | None = None,  # [S] or [C, S] float in [-1, 1]
    sample_rate: int = 44_100,
    video_codec: str = "libx264",
    audio_codec: str = "aac",
    audio_layout: str | None = None,
    frame_times: np.ndarray | None = None,  # seconds; irregular times make a VFR video
    display_rotation: int = 0,  # counterclockwise degrees, as a phone's portrait video
    bit_rate: int | None = None,  # video bits per second (None: the encoder's default)
) -> None:
    """Encode frames (and audio) into `path`; the container follows the file extension."""
    path = pathlib.Path(path)
    with av.open(str(path), "w") as out:
        rate = fractions.Fraction(fps).limit_denominator(1001)
        v = out.add_stream(video_codec, rate=rate)
        v.height, v.width = frames.shape[1:3]
        v.pix_fmt = "yuv420p"
        if bit_rate:
            v.bit_rate = bit_rate
        if display_rotation:
            v.set_display_rotation(display_rotation)
        if frame_times is not None:
            v.codec_context.time_base = fractions.Fraction(1, 1000)
        if audio is not None:
            audio = np.atleast_2d(audio).astype(np.float32)
            layout = audio_layout or {1: "mono", 2: "stereo", 6: "5.1"}[audio.shape[0]]
            a = out.add_stream(audio_codec, rate=sample_rate, layout=layout)
        chunk = 1024  # audio samples per frame
        next_sample = 0

        def mux_audio_until(seconds: float) -> None:  # time order: streamable, as players need
            nonlocal next_sample
            while audio is not None and next_sample < min(seconds * sample_rate, audio.shape[1]):
                piece = np.ascontiguousarray(audio[:, next_sample : next_sample + chunk])
                frame = av.AudioFrame.from_ndarray(piece, format="fltp", layout=layout)
                frame.sample_rate = sample_rate
                frame.pts = next_sample
                frame.time_base = fractions.Fraction(1, sample_rate)
                out.mux(a.encode(frame))
                next_sample += chunk

        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            if frame_times is not None:
                frame.pts = round(frame_times[i] * 1000)
                frame.time_base = fractions.Fraction(1, 1000)
            else:  # explicit timestamps: some encoders (mpeg4 in AVI) otherwise skip one
                frame.pts, frame.time_base = i, 1 / rate
            mux_audio_until(float(frame.pts * frame.time_base))
            out.mux(v.encode(frame))
        out.mux(v.encode(None))
        if audio is not None:
            mux_audio_until(float("inf"))
            out.mux(a.encode(None))


# The demo's four classes need both senses: what is seen (a red or a blue object) and what
# is heard (a low or a high tone). A video-only model can tell two of them apart, not
# four, so it stays near 50%; so does an audio-only model; a fused one can reach 100%.
DEMO_SIGHTS = ("red", "blue")
DEMO_SOUNDS = ("low", "high")
DEMO_CLASSES = tuple(f"{s}_{h}" for s in DEMO_SIGHTS for h in DEMO_SOUNDS)
_COLORS = {"red": (220, 40, 40), "blue": (40, 70, 220)}
_PITCH_HZ = {"low": (220.0, 330.0), "high": (1400.0, 2000.0)}


# Pixels inside each shape, from their distances to its centre (dy, dx) and its size r.
_SHAPE_MASKS = {
    "disc": lambda dy, dx, r: dy**2 + dx**2 <= r**2,
    "square": lambda dy, dx, r: np.maximum(dy, dx) <= r * 0.8,
    "ring": lambda dy, dx, r: np.abs(np.sqrt(dy**2 + dx**2) - r * 0.8) <= r * 0.25,
    "hbar": lambda dy, dx, r: (dy <= r / 3) & (dx <= r),
    "vbar": lambda dy, dx, r: (dx <= r / 3) & (dy <= r),
}


def _animate(
    rng: np.random.Generator,
    n: int,
    size: int,
    background: int,
    radius: int,
    xy: np.ndarray,
    velocity: np.ndarray,
    color: np.ndarray,
    shape: str,
) -> np.ndarray:
    """[n, size, size, 3] uint8: a `shape` of `color` moving at `velocity` (clamped to the
    frame) over a noisy grey background."""
    frames = np.empty((n, size, size, 3), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        image = np.clip(background + rng.normal(0, 12, (size, size, 3)), 0, 255)
        xy = np.clip(xy + velocity, radius, size - radius)
        image[_SHAPE_MASKS[shape](np.abs(yy - xy[1]), np.abs(xx - xy[0]), radius)] = color
        frames[i] = image.astype(np.uint8)
    return frames


def demo_clip(
    rng: np.random.Generator,
    sight: str,
    sound: str,
    fps: float = 8.0,
    seconds: float = 2.0,
    size: int = 48,
    sample_rate: int = 22_050,
) -> tuple[np.ndarray, np.ndarray]:
    """One demo clip: an object moving over a noisy background, and a tone in noise."""
    n = round(fps * seconds)
    background = rng.integers(60, 190)
    radius = rng.integers(size // 8, size // 4)
    xy = rng.uniform(radius, size - radius, 2)
    velocity = rng.uniform(-2.5, 2.5, 2)
    color = np.array(_COLORS[sight]) + rng.integers(-25, 26, 3)
    frames = _animate(rng, n, size, background, radius, xy, velocity, color, "disc")
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    pitch = rng.uniform(*_PITCH_HZ[sound])
    tone = np.sin(2 * np.pi * pitch * t + rng.uniform(0, 2 * np.pi))
    audio = rng.uniform(0.2, 0.5) * tone + rng.normal(0, 0.05, t.shape)
    return frames, np.clip(audio, -1, 1).astype(np.float32)


def write_demo_timeline(
    path: str | pathlib.Path, seconds: float = 4.0, repeats: int = 2, seed: int = 0
) -> list[tuple[str, float, float]]:
    """One long file of demo clips, each class for `seconds`, the classes in turn
    `repeats` times: what sora-predict --timeline should follow. Returns (class, start_s,
    end_s) per segment."""
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed + 1000)
    names = list(DEMO_CLASSES) * repeats
    clips = [demo_clip(rng, *name.split("_"), seconds=seconds) for name in names]
    frames = np.concatenate([f for f, _ in clips])
    write_video(path, frames, 8.0, np.concatenate([a for _, a in clips]), 22_050)
    return [(name, i * seconds, (i + 1) * seconds) for i, name in enumerate(names)]


def write_split_tree(
    out_dir: pathlib.Path,
    classes: tuple[str, ...],
    clip_fn: Callable[[np.random.Generator, str], tuple[np.ndarray, np.ndarray]],
    train_per_class: int,
    test_per_class: int,
    seed: int,
) -> pathlib.Path:
    """OUT/<split>/<class>/<class>_<n>.mp4 from `clip_fn(rng, class)`: the layout of every
    built-in set (and the tests' own), in one order, so a seed gives the same files."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for name in classes:
            folder = out_dir / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                frames, audio = clip_fn(rng, name)
                write_video(folder / f"{name}_{i:03d}.mp4", frames, 8.0, audio, 22_050)
    return out_dir


def make_demo_dataset(
    out_dir: str | pathlib.Path, train_per_class: int = 48, test_per_class: int = 16, seed: int = 0
) -> pathlib.Path:
    """Write OUT/<split>/<class>/<n>.mp4 (h264 + aac); returns OUT."""
    return write_split_tree(
        pathlib.Path(out_dir),
        DEMO_CLASSES,
        lambda rng, name: demo_clip(rng, *name.split("_")),
        train_per_class,
        test_per_class,
        seed,
    )


# The small-set demo: like a user's first labelled dataset (ten classes, a few hundred
# clips), each class has a look of its own and a sound of its own, so either sense alone
# can tell the classes apart, but neither by one simple cue: a look is a shape (five) in a
# colour family (two), a sound a pitch band (five) in a timbre (pure or buzzing).
SMALL_SET_CLASSES = tuple(f"class_{k}" for k in range(10))
_HUES = (0.0, 0.55)  # warm, cool


def small_set_clip(
    rng: np.random.Generator,
    k: int,
    fps: float = 8.0,
    seconds: float = 2.0,
    size: int = 128,
    sample_rate: int = 22_050,
    paired: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """One clip of class `k` (0-9): its shape in its colour family moving over noise; its
    pitch band in its timbre. Sight and sound pair the factors differently.

    `paired`: within the class, the clip's picture and sound also vary together, as a
    real object's do: one draw sets both the hue within the colour family and the pitch
    within the band, another both the object's size and the sound's loudness. So a
    clip's own sound can be told from its classmates' (what retrieval measures)."""
    n = round(fps * seconds)
    shape, hue = tuple(_SHAPE_MASKS)[k % 5], _HUES[k // 5]
    band, buzzing = (3 * k) % 5, k % 2 == 1
    if paired:
        tint, bigness = rng.uniform(-1, 1), rng.uniform(0, 1)
    hue_shift = 0.08 * tint if paired else rng.uniform(-0.08, 0.08)
    color = colorsys.hsv_to_rgb((hue + hue_shift) % 1.0, rng.uniform(0.5, 0.9), rng.uniform(0.6, 1))
    background = rng.integers(60, 190)
    if paired:
        radius = round(size / 8 + bigness * (size / 5 - size / 8))
    else:
        radius = rng.integers(size // 8, size // 5)
    xy = rng.uniform(radius, size - radius, 2)
    velocity = rng.uniform(-0.05, 0.05, 2) * size
    color = 255 * np.array(color)
    frames = _animate(rng, n, size, background, radius, xy, velocity, color, shape)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    detune = 1 + 0.12 * tint if paired else rng.uniform(0.95, 1.05)
    pitch = 250.0 * 2 ** (0.8 * band) * detune  # 250 Hz .. 2.4 kHz
    phase = 2 * np.pi * pitch * t + rng.uniform(0, 2 * np.pi)
    tone = np.sign(np.sin(phase)) * 0.5 if buzzing else np.sin(phase)  # odd harmonics
    loudness = 0.1 + 0.5 * bigness if paired else rng.uniform(0.2, 0.5)
    audio = loudness * tone + rng.normal(0, 0.05, t.shape)
    return frames, np.clip(audio, -1, 1).astype(np.float32)


def make_small_set(
    out_dir: str | pathlib.Path,
    train_per_class: int = 24,
    test_per_class: int = 8,
    seed: int = 0,
    paired: bool = False,
) -> pathlib.Path:
    """Write the ten-class small set as OUT/<split>/<class>/<n>.mp4; returns OUT.
    `paired`: picture and sound also vary together within each class (small_set_clip)."""
    return write_split_tree(
        pathlib.Path(out_dir),
        SMALL_SET_CLASSES,
        lambda rng, name: small_set_clip(rng, SMALL_SET_CLASSES.index(name), paired=paired),
        train_per_class,
        test_per_class,
        seed,
    )


def make_paired_set(
    out_dir: str | pathlib.Path, train_per_class: int = 24, test_per_class: int = 8, seed: int = 0
) -> pathlib.Path:
    """The small set with picture and sound varying together within each class: a corpus
    to pretrain on without its labels, then probe with them."""
    return make_small_set(out_dir, train_per_class, test_per_class, seed, paired=True)


# The timing set: where only *when* things happen pairs a picture with its sound. Every
# clip is the same grey scene with a few flashes at random moments, and a click at each
# flash; the classes do not differ. A picture's own soundtrack shifted by half a second
# has the same clicks at the wrong moments: only a model that compares the senses moment
# by moment (objectives/av_sync.py) can tell the two apart.
TIMING_CLASSES = ("flashes",)


def timing_clip(
    rng: np.random.Generator,
    fps: float = 8.0,
    seconds: float = 4.0,
    size: int = 64,
    sample_rate: int = 22_050,
    events: int = 5,
    min_gap_s: float = 0.5,
) -> tuple[np.ndarray, np.ndarray]:
    """Flashes of two frames with a 40 ms click at the start of each, at `events` random
    moments at least `min_gap_s` apart."""
    n = round(fps * seconds)
    while True:  # moments at least min_gap_s apart
        moments = np.sort(rng.uniform(0, seconds - 2 / fps, events))
        if np.all(np.diff(moments) >= min_gap_s):
            break
    frames = np.full((n, size, size, 3), 90, np.uint8)
    frames += rng.integers(0, 12, frames.shape, dtype=np.uint8)  # a little sensor noise
    audio = 0.01 * rng.standard_normal(round(seconds * sample_rate))
    click = round(0.04 * sample_rate)
    for t in moments:
        first = int(t * fps)
        frames[first : first + 2, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 235
        start = round(first / fps * sample_rate)
        decay = np.exp(-np.arange(click) / (0.01 * sample_rate))
        audio[start : start + click] += 0.6 * decay * rng.standard_normal(click)
    return frames, np.clip(audio, -1, 1).astype(np.float32)


def make_timing_set(
    out_dir: str | pathlib.Path, train_per_class: int = 160, test_per_class: int = 40, seed: int = 0
) -> pathlib.Path:
    """Write the timing set as OUT/<split>/flashes/<n>.mp4; returns OUT."""
    return write_split_tree(
        pathlib.Path(out_dir),
        TIMING_CLASSES,
        lambda rng, _: timing_clip(rng),
        train_per_class,
        test_per_class,
        seed,
    )


def remux(source: str | pathlib.Path, target: str | pathlib.Path) -> None:
    """Copy `source`'s streams into another container (the extension of `target`) without
    decoding them: the same pictures and sound, other bytes (a re-upload's first form)."""
    with av.open(str(source)) as src, av.open(str(target), "w") as out:
        streams = {s.index: out.add_stream_from_template(s) for s in src.streams}
        for packet in src.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                out.mux(packet)


# The faulty set: the paired set's clips, and in its train split the faults web video
# brings to a pretraining corpus, planted where a test can count them (clips.csv says
# which clip has which, in its `fault` and `original` columns; sora-curate never reads them):
#   swapped    two clips trade soundtracks: each picture's sound is another's (dubbing,
#              music laid over a video). The two differ in shape and in pitch band, each
#              sense's main cue: another kind of scene's sound, not a classmate's or a near
#              class's (class k and k + 5 share both, differing only in hue and timbre).
#              `original` names the clip whose sound it got.
#   duplicate  a clip again, re-encoded smaller and at a lower bitrate, some also trimmed
#              or only re-muxed into another container (a re-upload)
#   silent     a silent soundtrack, or none at all
#   frozen     the first frame held for the whole clip (a still with sound)
#   black      a black picture
# The test split stays clean: the held-out clips every run is measured on.
FAULTS = ("swapped", "duplicate", "silent", "frozen", "black")
# What each sora-curate flag should find of them: a frozen picture is both static and
# blank (its frames repeat), a black one too (black frames do not move).
FLAG_FINDS = {
    "silent": {"silent"},
    "static": {"frozen", "black"},
    "blank": {"frozen", "black"},
    "duplicate": {"duplicate"},
    "av_mismatch": {"swapped"},
}
FAULT_SHARES = {"swapped": 0.2, "duplicate": 0.12, "silent": 0.08, "frozen": 0.06, "black": 0.04}


def _resized(frames: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(f).resize((size, size))) for f in frames])


def _kind(name: str) -> int:
    """The shape and the pitch band of a small-set class (class_k: shape k % 5, band
    3k % 5): two classes of one kind differ only in hue family and timbre."""
    return SMALL_SET_CLASSES.index(name) % 5


def make_faulty_set(
    out_dir: str | pathlib.Path,
    train_per_class: int = 24,
    test_per_class: int = 8,
    seed: int = 0,
    shares: dict[str, float] | None = None,
) -> pathlib.Path:
    """Write the faulty set as OUT/<split>/<class>/<file> and OUT/clips.csv (columns path,
    label, split, fault, original); returns the CSV, the source to prepare. `shares`: the
    fraction of train clips given each fault (FAULT_SHARES), duplicates added on top."""
    out = pathlib.Path(out_dir)
    shares = FAULT_SHARES if shares is None else shares
    rng = np.random.default_rng(seed)
    classes = SMALL_SET_CLASSES
    rows: list[tuple[str, str, str, str, str]] = []  # path, label, split, fault, original

    def write(key: str, frames, audio, **kwargs) -> str:
        (out / key).parent.mkdir(parents=True, exist_ok=True)
        write_video(out / key, frames, 8.0, audio, 22_050, **kwargs)
        return key

    for split, count in (("test", test_per_class), ("train", train_per_class)):
        clips = [
            (name, f"{split}/{name}/{name}_{i:03d}.mp4", *small_set_clip(rng, k, paired=True))
            for k, name in enumerate(classes)
            for i in range(count)
        ]
        if split == "test":
            rows += [(key, name, split, "clean", "") for name, key, f, a in clips]
            for _, key, frames, audio in clips:
                write(key, frames, audio)
            continue
        order = rng.permutation(len(clips))
        planned, start = {}, 0
        for fault in ("swapped", "silent", "frozen", "black"):
            n = round(shares.get(fault, 0.0) * len(clips))
            n += fault == "swapped" and n % 2  # swapped in pairs
            planned |= {int(i): fault for i in order[start : start + n]}
            start += n
        swapped = [i for i in order if planned.get(int(i)) == "swapped"]
        partner = {}
        while swapped:  # pair clips of other kinds of scene; one left without is clean
            a = int(swapped.pop())
            b = next((int(j) for j in swapped if _kind(clips[j][0]) != _kind(clips[a][0])), None)
            if b is None:
                planned.pop(a)
                continue
            swapped.remove(b)
            partner[a], partner[b] = b, a
        for i, (name, key, frames, audio) in enumerate(clips):
            fault = planned.get(i, "clean")
            if fault == "swapped":
                audio = clips[partner[i]][3]
            elif fault == "silent":
                audio = np.zeros_like(audio) if i % 2 else None  # silence, or no sound at all
            elif fault == "frozen":
                frames = np.repeat(frames[:1], len(frames), axis=0)
            elif fault == "black":
                frames = np.zeros_like(frames)
            original = clips[partner[i]][1] if fault == "swapped" else ""
            rows.append((write(key, frames, audio), name, split, fault, original))
        # Duplicates of clean clips: another size and bitrate, a third also trimmed, a
        # third only re-muxed into Matroska.
        clean = [i for i in order if int(i) not in planned]
        for n, i in enumerate(clean[: round(shares.get("duplicate", 0.0) * len(clips))]):
            name, key, frames, audio = clips[i]
            copy = key.replace(".mp4", "_copy.mkv")
            if n % 3 == 2:
                remux(out / key, out / copy)
            else:
                skip = 3 if n % 3 == 1 else 0  # frames trimmed off the start (3/8 s)
                size = int(rng.choice([64, 96, 112]))
                trimmed_audio = audio[round(skip / 8.0 * 22_050) :]
                write(copy, _resized(frames[skip:], size), trimmed_audio, bit_rate=150_000)
            rows.append((copy, name, split, "duplicate", key))
    with (out / "clips.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "label", "split", "fault", "original"))
        writer.writerows(sorted(rows))
    return out / "clips.csv"
