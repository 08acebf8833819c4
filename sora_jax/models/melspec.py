"""Log-mel front end in JAX, so training, evaluation and exported models share one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.kernels import platform

SAMPLE_RATE = 16_000
WINDOW = 400  # 25 ms at 16 kHz
HOP = 160  # 10 ms at 16 kHz
FFT_SIZE = 512
# The 400-sample window spans 2.5 hops. Padding it with zeros to 3 hops lets framing be a
# reshape plus three shifted slices instead of a gather, which XLA lowers to plain copies.
_PADDED_WINDOW = 3 * HOP


def num_frames(num_samples: int) -> int:
    """Number of log-mel frames for `num_samples` of audio (0 if shorter than a window)."""
    return max(0, 1 + (num_samples - WINDOW) // HOP)


def frame_lengths(sample_lengths: jnp.ndarray) -> jnp.ndarray:
    """Valid log-mel frames per clip from valid samples per clip: [B] -> [B]."""
    return jnp.maximum(0, 1 + (sample_lengths - WINDOW) // HOP).astype(jnp.int32)


@functools.cache
def mel_matrix(num_mel_bins: int, lower_hz: float = 125.0, upper_hz: float = 7500.0) -> np.ndarray:
    """HTK-style triangular filters: [FFT_SIZE // 2 + 1, num_mel_bins], float32."""
    hz_to_mel = lambda hz: 1127.0 * np.log1p(np.asarray(hz) / 700.0)
    spectrum_hz = np.linspace(0.0, SAMPLE_RATE / 2, FFT_SIZE // 2 + 1)
    spectrum_mel = hz_to_mel(spectrum_hz)[:, None]
    edges = np.linspace(hz_to_mel(lower_hz), hz_to_mel(upper_hz), num_mel_bins + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    rising = (spectrum_mel - lower) / (center - lower)
    falling = (upper - spectrum_mel) / (upper - center)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0  # the DC bin carries no pitch
    return weights.astype(np.float32)


@functools.cache
def _periodic_hann() -> np.ndarray:
    """The 400-sample periodic Hann window, zero-padded to 3 hops: [480]."""
    window = np.zeros(_PADDED_WINDOW, np.float32)
    window[:WINDOW] = np.hanning(WINDOW + 1)[:-1]
    return window


@functools.cache
def dft_matrix() -> np.ndarray:
    """The windowed real DFT of a padded frame as one matrix: frame [480] @ it [480, 514]
    = (real parts [257], imaginary parts [257]) of rfft(frame * window, n=512)."""
    n = np.arange(_PADDED_WINDOW)[:, None]
    k = np.arange(FFT_SIZE // 2 + 1)[None, :]
    angle = 2.0 * np.pi * n * k / FFT_SIZE
    window = _periodic_hann()[:, None].astype(np.float64)
    return np.concatenate([window * np.cos(angle), -window * np.sin(angle)], 1).astype(np.float32)


def power_spectrum(frames: jnp.ndarray) -> jnp.ndarray:
    """|rfft(frame * window, n=512)|^2 of frames [..., 480] -> [..., 257].

    An FFT, but on TPUs: there the same numbers come from one matmul by dft_matrix(). XLA's
    FFT on a TPU is a chain of transposing kernels: in a small.py train step compiled for
    a v5e, the front end's kernels take 177k of XLA:TPU's estimated cycles with the matmul
    and 304k with the FFT (BENCHMARKS.md section 7). It runs at HIGHEST precision:
    float32, not one bfloat16 pass. GPUs keep the FFT (not measured there)."""
    if platform.target_platform() != "tpu":
        return jnp.abs(jnp.fft.rfft(frames * _periodic_hann(), n=FFT_SIZE)) ** 2
    both = jnp.matmul(frames, dft_matrix(), precision=jax.lax.Precision.HIGHEST)
    real, imaginary = jnp.split(both, 2, axis=-1)
    return real * real + imaginary * imaginary


def waveform_to_float(waveform: jnp.ndarray) -> jnp.ndarray:
    """int16 PCM or float in [-1, 1] -> float32 in [-1, 1]."""
    if jnp.issubdtype(waveform.dtype, jnp.integer):
        return waveform.astype(jnp.float32) / 32768.0
    return waveform.astype(jnp.float32)


def log_mel(waveform: jnp.ndarray, num_mel_bins: int = 64) -> jnp.ndarray:
    """Waveform [B, S] at 16 kHz (int16 or float) -> log-mel [B, F, M] in float32."""
    wave = waveform_to_float(waveform)
    B, S = wave.shape
    F = num_frames(S)
    if F == 0:
        raise ValueError(f"audio of {S} samples is shorter than one {WINDOW}-sample window")
    # Chunks of one hop: frame f covers chunks f, f + 1, f + 2 (the last 80 samples get a
    # zero window weight, so the zero padding below never reaches the result).
    needed = (F + 2) * HOP
    wave = jnp.pad(wave, ((0, 0), (0, max(0, needed - S))))[:, :needed]
    chunks = wave.reshape(B, F + 2, HOP)
    frames = jnp.concatenate([chunks[:, 0:F], chunks[:, 1 : F + 1], chunks[:, 2 : F + 2]], axis=-1)
    spectrum = power_spectrum(frames)  # [B, F, 257]
    mel = spectrum @ mel_matrix(num_mel_bins)  # [B, F, M]
    return jnp.log(mel + 1e-6)
