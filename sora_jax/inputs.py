"""The model's inputs, defined once: names, shapes, dtypes and meanings.

Data sampling produces them, the model consumes them, the steps, the export, the model
card, the benchmarks and the tests all build theirs from `InputSpec`, so they cannot
drift apart. A leaf module (NumPy only): anything may import it.
"""

import dataclasses

import ml_collections
import numpy as np

from sora_jax import config as config_lib

# name -> meaning; the order is the order of the exported signature's documentation.
MEANINGS = {
    "frames": "RGB pixels 0-255 of T frames, centre-cropped and resized to the crop size",
    "frame_mask": "False for frames padded past the end of a video shorter than the window",
    "audio": "16 kHz mono waveform of the frames' time span (zeros past audio_len)",
    "audio_len": "valid samples of `audio` (0 for a clip without audio)",
    "has_video": "False to predict from audio alone",
    "has_audio": "False to predict from video alone (a clip without a sound track)",
}
MODEL_INPUTS = tuple(MEANINGS)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The per-clip sizes a config implies."""

    num_frames: int  # T
    crop_size: int  # S
    audio_samples: int  # A, at config.SAMPLE_RATE (16 kHz)

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> "InputSpec":
        d = config.data
        return cls(d.num_frames, d.crop_size, config_lib.audio_samples(config))

    def shapes(
        self, batch: int | object, audio_dtype: np.dtype = np.int16
    ) -> dict[str, tuple[tuple, np.dtype]]:
        """name -> (shape, dtype) for a batch; `batch` may be a symbolic dimension."""
        T, S, A = self.num_frames, self.crop_size, self.audio_samples
        return {
            "frames": ((batch, T, S, S, 3), np.dtype(np.uint8)),
            "frame_mask": ((batch, T), np.dtype(bool)),
            "audio": ((batch, A), np.dtype(audio_dtype)),  # int16, or float in [-1, 1]
            "audio_len": ((batch,), np.dtype(np.int32)),
            "has_video": ((batch,), np.dtype(bool)),
            "has_audio": ((batch,), np.dtype(bool)),
        }

    def zeros(self, batch: int) -> dict[str, np.ndarray]:
        """Inputs of the right shapes and dtypes (every frame and sample marked present),
        for initialising a model."""
        out = {k: np.zeros(shape, dtype) for k, (shape, dtype) in self.shapes(batch).items()}
        out["frame_mask"][:] = True
        out["audio_len"][:] = self.audio_samples
        out["has_video"][:] = True
        out["has_audio"][:] = True
        return out

    def random(self, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Random pixels and samples with every frame and sample present: benchmark and
        test inputs."""
        out = self.zeros(batch)
        out["frames"] = rng.integers(0, 256, out["frames"].shape, np.uint8)
        out["audio"] = rng.integers(-9000, 9000, out["audio"].shape, np.int16)
        return out


def label_shape(config: ml_collections.ConfigDict, batch: int) -> tuple[tuple, np.dtype]:
    """The training label: a class index [B] int32, or multi-hot [B, C] float32."""
    if config.model.multi_label:
        return (batch, config.model.num_classes), np.dtype(np.float32)
    return (batch,), np.dtype(np.int32)
