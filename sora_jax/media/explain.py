"""Why the model decided: modality attribution and occlusion saliency for one view.

Saliency is measured by occlusion (Zeiler & Fergus, 2014): hide one region of the input,
score again, and credit the region with how much the top class's log-probability fell.
It needs nothing but the exported function (no gradients: the artifact takes uint8
pixels, and a downstream team's copy has no training code), it measures what the model
does with the region rather than a local slope that saturates in a confident model, and
the same procedure serves pixels and sound:
- frames: a square of the frame's mean colour slid over each sampled frame;
- sound: a band of mel frequencies removed from a stretch of time (the waveform filtered
  in that band, cross-faded in), drawn over the window's log-mel spectrogram.
Modality attribution is the top class's score with both senses, with the video alone
and with the audio alone: the model's own way of scoring a clip missing a sense.

NumPy only, plus a `call(inputs) -> logits` the caller supplies.
"""

from collections.abc import Callable

import numpy as np

from .decode import SAMPLE_RATE

Scorer = Callable[[dict[str, np.ndarray]], np.ndarray]  # batched inputs -> log-probs [B, C]


def _batched(score: Scorer, variants: dict[str, np.ndarray], batch: int) -> np.ndarray:
    """Scores of many variants [N, ...] of one window, `batch` at a time (the last batch
    padded to the same size, so the artifact compiles once): [N, C]."""
    n = len(next(iter(variants.values())))
    out = []
    for start in range(0, n, batch):
        chunk = {k: v[start : start + batch] for k, v in variants.items()}
        short = batch - len(next(iter(chunk.values())))
        if short:
            chunk = {k: np.concatenate([v, v[-1:].repeat(short, 0)]) for k, v in chunk.items()}
        out.append(np.asarray(score(chunk))[: batch - short])
    return np.concatenate(out)


def _repeat(window: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: np.repeat(np.asarray(v)[None], n, axis=0) for k, v in window.items()}


def mel_scale(hz: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(hz) / 700.0)


def mel_hz(mel: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10 ** (np.asarray(mel) / 2595.0) - 1.0)


def log_mel(wave: np.ndarray, bins: int = 64) -> np.ndarray:
    """[F, bins] log-mel energies of 16 kHz `wave` (25 ms windows every 10 ms), for
    drawing: the model computes its own features inside the artifact."""
    size, hop = 400, 160
    x = np.asarray(wave, np.float32) / 32768.0
    x = np.pad(x, (0, max(0, size - len(x))))
    count = 1 + (len(x) - size) // hop
    frames = np.stack([x[i * hop : i * hop + size] for i in range(count)]) * np.hanning(size)
    power = np.abs(np.fft.rfft(frames, 512)) ** 2  # [F, 257]
    hz = np.fft.rfftfreq(512, 1 / SAMPLE_RATE)
    edges = mel_hz(np.linspace(0, mel_scale(SAMPLE_RATE / 2), bins + 2))
    filters = np.zeros((bins, len(hz)), np.float32)
    for b in range(bins):
        lo, mid, hi = edges[b], edges[b + 1], edges[b + 2]
        filters[b] = np.clip(np.minimum((hz - lo) / (mid - lo), (hi - hz) / (hi - mid)), 0, None)
    return np.log(power @ filters.T + 1e-6)


def frame_saliency(
    score: Scorer, window: dict[str, np.ndarray], top: int, grid: int = 16, batch: int = 32
) -> np.ndarray:
    """[T, S, S] >= 0: for each sampled frame, how much hiding each region (a square of
    two cells of an S / grid grid, slid a cell at a time, in the frame's mean colour)
    lowered the top class's log-probability; each pixel gets the mean over the squares
    covering it."""
    frames = np.asarray(window["frames"])  # [T, S, S, 3]
    t, s = frames.shape[:2]
    cell = max(1, s // grid)
    corners = range(0, max(s - 2 * cell, 0) + 1, cell)
    boxes = [(i, y, x) for i in range(t) for y in corners for x in corners]
    variants = _repeat(window, len(boxes))
    for k, (i, y, x) in enumerate(boxes):
        mean = frames[i].reshape(-1, 3).mean(0).round().astype(np.uint8)
        variants["frames"][k, i, y : y + 2 * cell, x : x + 2 * cell] = mean
    base = float(_batched(score, _repeat(window, 1), batch)[0, top])
    drops = np.maximum(base - _batched(score, variants, batch)[:, top], 0)
    total, covered = np.zeros((t, s, s)), np.zeros((t, s, s))
    for drop, (i, y, x) in zip(drops, boxes, strict=True):
        total[i, y : y + 2 * cell, x : x + 2 * cell] += drop
        covered[i, y : y + 2 * cell, x : x + 2 * cell] += 1
    return total / np.maximum(covered, 1)


def audio_saliency(
    score: Scorer,
    window: dict[str, np.ndarray],
    top: int,
    bands: int = 8,
    stretches: int = 8,
    mel_bins: int = 64,
    batch: int = 32,
) -> np.ndarray:
    """[F, mel_bins] >= 0 over the window's log-mel frames: how much removing each band
    of mel frequencies (`bands` equal on the mel scale) from each stretch of time
    (`stretches` equal) lowered the top class's log-probability."""
    wave = np.asarray(window["audio"]).astype(np.float32)  # [A]
    length = int(window["audio_len"])
    spectrum = np.fft.rfft(wave)
    hz = np.fft.rfftfreq(len(wave), 1 / SAMPLE_RATE)
    edges = mel_hz(np.linspace(0, mel_scale(SAMPLE_RATE / 2), bands + 1))
    edges[-1] += 1.0  # the top band includes Nyquist
    cuts = np.linspace(0, max(length, 1), stretches + 1).round().astype(int)
    fade = min(32, max(1, (cuts[1] - cuts[0]) // 4))  # cross-fades of 2 ms: no clicks
    variants = _repeat(window, bands * stretches)
    for b in range(bands):
        without = np.fft.irfft(
            np.where((hz >= edges[b]) & (hz < edges[b + 1]), 0, spectrum), len(wave)
        )
        for j in range(stretches):
            mask = np.zeros(len(wave))
            mask[cuts[j] : cuts[j + 1]] = 1.0
            mask = np.convolve(mask, np.ones(fade) / fade, mode="same")
            mixed = wave * (1 - mask) + without * mask
            variants["audio"][b * stretches + j] = np.clip(mixed, -32768, 32767).round()
    base = float(_batched(score, _repeat(window, 1), batch)[0, top])
    drops = np.maximum(base - _batched(score, variants, batch)[:, top], 0).reshape(bands, stretches)
    # Onto the spectrogram's grid: mel bin m lies in band m * bands // mel_bins.
    spectrogram_frames = log_mel(wave, mel_bins).shape[0]
    frame_stretch = np.minimum(
        np.searchsorted(cuts, np.arange(spectrogram_frames) * 160 + 200, side="right") - 1,
        stretches - 1,
    )
    band_of_bin = np.arange(mel_bins) * bands // mel_bins
    return drops[band_of_bin][:, frame_stretch].T  # [F, mel_bins]


def explain_window(
    score: Scorer,
    window: dict[str, np.ndarray],
    class_names: list[str],
    grid: int = 16,
    batch: int = 32,
) -> dict:
    """A window's explanation: {"attribution", "frames", "frame_saliency", "log_mel",
    "audio_saliency"} (a map of zeros for a sense the window lacks)."""
    has_video, has_audio = bool(window["has_video"]), bool(window["has_audio"])
    senses = _repeat(window, 3)
    senses["has_audio"][1] = False  # video only
    senses["has_video"][2] = False  # audio only
    log_probs = _batched(score, senses, batch)  # [3, C]
    top = int(np.argmax(log_probs[0]))
    both, video_only, audio_only = np.exp(log_probs[:, top])
    attribution = {
        "class": class_names[top],
        "both": float(both),
        "video_only": float(video_only) if has_video else None,
        "audio_only": float(audio_only) if has_audio else None,
        # What each sense adds: how far the score falls when that sense is taken away.
        "video_drop": float(both - audio_only) if has_video and has_audio else None,
        "audio_drop": float(both - video_only) if has_video and has_audio else None,
    }
    frames = np.asarray(window["frames"])
    t, s = frames.shape[:2]
    spectrogram = log_mel(np.asarray(window["audio"]))
    return {
        "attribution": attribution,
        "frames": frames,
        "frame_saliency": (
            frame_saliency(score, window, top, grid, batch) if has_video else np.zeros((t, s, s))
        ),
        "log_mel": spectrogram,
        "audio_saliency": (
            audio_saliency(score, window, top, batch=batch)
            if has_audio
            else np.zeros_like(spectrogram)
        ),
    }
