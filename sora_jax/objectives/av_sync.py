"""Audio-visual synchronisation (the AVTS / "Look, Listen and Learn" family): a clip's
picture must tell its own soundtrack from the same soundtrack shifted in time.

The contrastive objective pairs a picture with a sound by what they are about; it pools
each sense over time first, so it cannot see *when* anything happens, and a soundtrack
shifted by a second scores as well as the true one. This objective compares the two
senses moment by moment: a small head projects each frame's visual features and the sound
of the same moment (the audio branch's outputs pooled onto the frame times) to unit
vectors, and a picture's score with a soundtrack is the mean over its frames of their dot
products. Its InfoNCE has two kinds of negatives for each picture: every other clip's
sound in the global batch, and, the hard one, its own soundtrack rolled in time by at least
`min_offset_s` (circularly, within the clip's own samples).

Settings (config.objectives.av_sync):
  weight        its term in the loss (0: off); combinable with contrastive by weight
  min_offset_s  the smallest shift of a hard negative, in seconds; the audio window must
                be at least twice as long
  dim           width of the per-moment projections
  temperature   of the InfoNCE logits

What lip-sync and tampering checks build on. The `av_sync` evaluator
(sora_jax/evaluators/av_sync.py) measures it on held-out clips.
"""

from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax import config as config_lib
from sora_jax.models.sora import unit
from sora_jax.objectives.base import Objective
from sora_jax.objectives.contrastive import MASKED, constrain, nce_from_logits
from sora_jax.train.sharding import BATCH_AXES


def shift_audio(
    audio: jax.Array,  # [B, A] waveform
    audio_len: jax.Array,  # [B] valid samples
    offset: jax.Array,  # [B] samples to roll by
) -> jax.Array:
    """Each clip's own samples rolled by `offset` (circularly within its audio_len: what
    is heard at t is heard at t - offset); padding stays padding."""
    positions = jnp.arange(audio.shape[1])[None, :]  # [1, A]
    length = jnp.maximum(audio_len, 1)[:, None]
    source = jnp.where(positions < length, (positions + offset[:, None]) % length, positions)
    return jnp.take_along_axis(audio, source, axis=1)


def offsets(
    fraction: jax.Array, audio_len: jax.Array, low: float, high: float
) -> tuple[jax.Array, jax.Array]:
    """(offset [B] in samples, at `fraction` [B] in [0, 1) of the way from `low` to `high`
    seconds, and at most the clip's length less `low`, so that the roll is never within
    `low` of no shift; usable [B]: the clip is long enough, 2 x low, for such a shift)."""
    low_n = int(low * config_lib.SAMPLE_RATE)
    high_n = jnp.minimum(int(high * config_lib.SAMPLE_RATE), audio_len - low_n)
    usable = high_n >= low_n
    offset = low_n + (fraction * jnp.maximum(high_n - low_n, 0)).astype(jnp.int32)
    return jnp.where(usable, offset, 0), usable


def _onto_frames(seq: jax.Array, mask: jax.Array, frames: int) -> tuple[jax.Array, jax.Array]:
    """Audio steps [B, F, D] (mask [B, F]) averaged onto `frames` equal spans of the same
    window: [B, T, D], and [B, T] whether a span heard anything."""
    steps = seq.shape[1]
    span = (np.arange(steps) * frames) // steps  # the frame each audio step falls in
    onto = jnp.asarray(span[None, :] == np.arange(frames)[:, None], seq.dtype)  # [T, F]
    weights = onto[None] * mask[:, None, :].astype(seq.dtype)  # [B, T, F]
    count = jnp.sum(weights, axis=-1)
    pooled = jnp.einsum("btf,bfd->btd", weights, seq) / jnp.maximum(count, 1)[..., None]
    return pooled, count > 0


class SyncHead(nn.Module):
    """Per-moment projections: "sync_video" [B, T, dim] from each frame's features,
    "sync_audio" (and "sync_shifted_audio") [B, T, dim] from the sound of the same span;
    unit vectors, zero where a frame or its span's sound is missing."""

    dim: int = 64
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, features: dict) -> dict[str, jax.Array]:
        _, v_seq, v_mask = features["visual"]  # [B, T, Dv], [B, T]
        frames = v_seq.shape[1]

        dense = lambda name: nn.Dense(self.dim, dtype=self.dtype, name=name)
        video_hidden, video_out = dense("video_hidden"), dense("video_out")
        audio_in, audio_hidden, audio_out = (
            dense("audio_in"),
            dense("audio_hidden"),
            dense("audio_out"),
        )
        video = unit(video_out(nn.relu(video_hidden(v_seq))).astype(jnp.float32))
        out = {"sync_video": jnp.where(v_mask[..., None], video, 0.0)}
        for key in ("audio", "shifted_audio"):  # one projection for both soundtracks
            if key in features:
                _, a_seq, a_mask = features[key]
                pooled, heard = _onto_frames(audio_in(a_seq), a_mask, frames)
                audio = unit(audio_out(nn.relu(audio_hidden(pooled))).astype(jnp.float32))
                out[f"sync_{key}"] = jnp.where(heard[..., None], audio, 0.0)
        return out


def sync_scores(video: jax.Array, audio: jax.Array, frame_mask: jax.Array) -> jax.Array:
    """[B, B]: picture i's score with soundtrack j, the mean over i's frames of the
    per-moment dot products. video, audio: [B, T, dim]; frame_mask [B, T]."""
    frames = jnp.maximum(jnp.sum(frame_mask, axis=1), 1).astype(jnp.float32)
    return jnp.einsum("itd,jtd->ij", video, audio) / frames[:, None]


def own_sync_scores(video: jax.Array, audio: jax.Array, frame_mask: jax.Array) -> jax.Array:
    """[B]: each picture's score with the soundtrack in the same row."""
    frames = jnp.maximum(jnp.sum(frame_mask, axis=1), 1).astype(jnp.float32)
    return jnp.einsum("itd,itd->i", video, audio) / frames


class AVSync(Objective):
    name = "av_sync"
    needs = frozenset()
    in_batch_negatives = True
    defaults: ClassVar[dict] = {"min_offset_s": 0.5, "dim": 64, "temperature": 0.1}

    def check(self, settings, config):
        key = f"objectives.{self.name}"
        config_lib.check(settings.min_offset_s > 0, f"{key}.min_offset_s", "must be > 0")
        config_lib.check(settings.dim >= 1, f"{key}.dim", "must be >= 1")
        config_lib.check(0 < settings.temperature <= 1, f"{key}.temperature", "not in (0, 1]")
        window = config_lib.audio_samples(config) / config_lib.SAMPLE_RATE
        config_lib.check(
            window >= 2 * settings.min_offset_s,
            f"{key}.min_offset_s",
            f"a shift of {settings.min_offset_s} s needs an audio window of at least "
            f"{2 * settings.min_offset_s} s; this run's is {window:.2f} s (data.num_frames x "
            "data.frame_stride / data.fps, or data.audio_samples)",
        )

    def head(self, settings, config):
        return SyncHead(dim=settings.dim, dtype=jnp.dtype(config.model.dtype))

    def model_inputs(self, inputs, settings, config, rng):
        window = config_lib.audio_samples(config) / config_lib.SAMPLE_RATE
        fraction = jax.random.uniform(rng, inputs["audio_len"].shape)
        offset, usable = offsets(fraction, inputs["audio_len"], settings.min_offset_s, window)
        shifted = shift_audio(inputs["audio"], inputs["audio_len"], offset)
        return {
            "shifted_audio": shifted,  # what the model's audio branch also encodes
            "shifted_audio_len": inputs["audio_len"],
            "shift_usable": usable,  # [B] the clip's sound is long enough to be shifted
        }

    def loss(self, out, batch, settings, config, mesh, views):
        video, audio, shifted = out["sync_video"], out["sync_audio"], out["sync_shifted_audio"]
        frame_mask = batch["frame_mask"] & batch["has_video"][:, None]
        valid = batch["has_video"] & batch["has_audio"]
        rows = columns = None
        if mesh is not None:
            rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(BATCH_AXES, None))
            columns = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        scale = 1.0 / settings.temperature
        audio = constrain(audio, columns)
        logits = constrain(scale * sync_scores(video, audio, frame_mask), rows)  # [B, B]
        usable = batch["shift_usable"]
        own_shifted = scale * own_sync_scores(video, shifted, frame_mask)  # [B]
        hard = jnp.where(usable, own_shifted, MASKED)
        loss, top1 = nce_from_logits(logits, valid, extra=hard)
        own = jnp.diagonal(logits)
        beats_shift = jnp.where(valid & usable, own > own_shifted, False)
        return loss, {
            "sync_loss": loss,
            "sync_top1": top1,  # own soundtrack first among the batch's and its shifted one
            "sync_accuracy": jnp.sum(beats_shift) / jnp.maximum(jnp.sum(valid & usable), 1),
        }


OBJECTIVE = AVSync()
