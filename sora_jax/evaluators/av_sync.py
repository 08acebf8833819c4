"""av_sync: does the model tell a clip's true soundtrack from the same soundtrack shifted
in time? On each held-out window the picture is scored with its own sound and with that
sound rolled by `min_offset_s` to `max_offset_s` seconds (a fixed offset per window, so
runs compare on the same task); accuracy is the fraction of windows whose true sound
scores higher. Chance is 0.5.

The score is the model's own notion of "this sound belongs to this picture": the av_sync
objective's per-moment score where the run trained that head, else the cosine of the
contrastive projections (which pool over time, so they should stand near chance).

Settings: min_offset_s (0.5), max_offset_s (2.0).
"""

import functools
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax import config as config_lib
from sora_jax.evaluators.base import SliceableEvaluator, flatten_views
from sora_jax.inputs import MODEL_INPUTS
from sora_jax.objectives.av_sync import offsets, own_sync_scores, shift_audio

_GOLDEN = 0.6180339887  # spreads the fixed per-window offsets evenly over the range


def fixed_offsets(audio_len: jax.Array, low: float, high: float) -> tuple[jax.Array, jax.Array]:
    """objectives.av_sync.offsets with a fixed fraction per row, the same at every
    evaluation."""
    fractions = jnp.mod((jnp.arange(audio_len.shape[0]) + 1) * _GOLDEN, 1.0)
    return offsets(fractions, audio_len, low, high)


class AVSyncEvaluator(SliceableEvaluator):
    type = "av_sync"
    defaults: ClassVar[dict] = {"min_offset_s": 0.5, "max_offset_s": 2.0}

    @classmethod
    def check(cls, key, settings, config):
        low, high = settings.min_offset_s, settings.max_offset_s
        from sora_jax import objectives

        config_lib.check(
            0 < low <= high, key, f"need 0 < min_offset_s {low} <= max_offset_s {high}"
        )

        config_lib.check(
            "projections" in objectives.needs(config) or "av_sync" in objectives.chosen(config),
            key,
            "scores a sound against a picture: the run needs the contrastive or the av_sync "
            "objective",
        )
        window = config_lib.audio_samples(config) / config_lib.SAMPLE_RATE
        config_lib.check(
            window >= 2 * low,
            f"{key}.min_offset_s",
            f"a shift of {low} s needs an audio window of {2 * low} s; this run's is "
            f"{window:.2f} s",
        )

    def __init__(self, name, settings, context):
        super().__init__(name, settings, context)
        self._reader = context.reader(settings.split)
        low, high = settings.min_offset_s, settings.max_offset_s
        self._step = context.jit(functools.partial(self._scores, context.apply, low, high))

    @staticmethod
    def _scores(apply, low, high, params, batch):
        rows, B, V = flatten_views({k: batch[k] for k in MODEL_INPUTS})
        offset, usable = fixed_offsets(rows["audio_len"], low, high)
        shifted = shift_audio(rows["audio"], rows["audio_len"], offset)
        variables = {"params": params}
        extra = {"shifted_audio": shifted, "shifted_audio_len": rows["audio_len"]}
        out = apply(variables, rows | extra, modality_embeddings=True)
        if "sync_video" in out:  # the av_sync objective's head
            frame_mask = rows["frame_mask"] & rows["has_video"][:, None]
            own = own_sync_scores(out["sync_video"], out["sync_audio"], frame_mask)
            other = own_sync_scores(out["sync_video"], out["sync_shifted_audio"], frame_mask)
        else:  # the contrastive projections: the same pictures with the shifted sound
            moved = apply(variables, rows | {"audio": shifted}, modality_embeddings=True)
            own = jnp.sum(out["video_projection"] * out["audio_projection"], axis=-1)
            other = jnp.sum(moved["video_projection"] * moved["audio_projection"], axis=-1)
        counted = usable & rows["has_video"] & rows["has_audio"]  # [B * V]
        per_clip = lambda x: x.reshape(B, V)
        hits = jnp.sum(per_clip(counted & (own > other)), axis=1)
        windows = jnp.sum(per_clip(counted), axis=1)
        margin = jnp.sum(per_clip(jnp.where(counted, own - other, 0.0)), axis=1)
        return {"hits": hits, "windows": windows, "margin": margin}

    headline = "accuracy"

    def outputs(self, params):
        return self._reader.run(self._step, params)[0]

    def summarize(self, outputs, keep):
        hits, windows, margin = (outputs[k][keep] for k in ("hits", "windows", "margin"))
        if not windows.sum():
            return {"num_windows": 0, "num_clips": 0}
        return {
            "accuracy": float(hits.sum() / windows.sum()),
            "margin": float(margin.sum() / windows.sum()),  # mean true minus shifted score
            "num_windows": int(windows.sum()),
            "num_clips": int(np.sum(windows > 0)),
        }

    def close(self):
        self._reader.close()


EVALUATOR = AVSyncEvaluator
