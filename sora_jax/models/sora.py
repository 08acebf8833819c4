"""The Sora model: visual tower + audio branch + fusion head, built from a config."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sora_jax.models.audio import AudioEncoder
from sora_jax.models.fusion import FusionHead
from sora_jax.models.visual import VisualTower

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class SoraModel(nn.Module):
    """Raw clips -> {"embedding": [B, E], "logits": [B, C]}.

    Inputs (a dict, so exported signatures are self-describing):
      frames      [B, T, H, W, 3] uint8 (or float in [0, 255])
      frame_mask  [B, T] bool, False for frames padded past a short video's end
      audio       [B, S] int16 (or float in [-1, 1]) at 16 kHz
      audio_len   [B] int32, valid samples of `audio`
      has_video   [B] bool
      has_audio   [B] bool
    """

    visual: VisualTower
    audio: AudioEncoder
    fusion: FusionHead
    modality_dropout: float = 0.0  # chance, in training, of hiding one of two present modalities

    @nn.compact
    def __call__(
        self, inputs: dict[str, jax.Array], *, train: bool = False
    ) -> dict[str, jax.Array]:
        has_video, has_audio = inputs["has_video"], inputs["has_audio"]
        if train and self.modality_dropout > 0:
            k_drop, k_which = jax.random.split(self.make_rng("dropout"))
            both = has_video & has_audio
            drop = both & (jax.random.uniform(k_drop, has_video.shape) < self.modality_dropout)
            drop_video = jax.random.bernoulli(k_which, 0.5, has_video.shape)
            has_video = has_video & ~(drop & drop_video)
            has_audio = has_audio & ~(drop & ~drop_video)
        frame_mask = inputs["frame_mask"] & has_video[:, None]
        v, v_seq = self.visual(inputs["frames"], frame_mask)
        a, a_seq, a_mask = self.audio(inputs["audio"], inputs["audio_len"], train=train)
        a_mask = a_mask & has_audio[:, None]
        embedding, logits = self.fusion(
            (v, v_seq, frame_mask), (a, a_seq, a_mask), has_video, has_audio
        )
        return {"embedding": embedding.astype(jnp.float32), "logits": logits.astype(jnp.float32)}


def build_model(model_config: ml_collections.ConfigDict) -> SoraModel:
    """The model a config describes (see configs/demo.py for every key)."""
    m = model_config
    dtype = DTYPES[m.dtype]
    vis, aud, fus = m.visual, m.audio, m.fusion
    return SoraModel(
        visual=VisualTower(
            widths=tuple(vis.widths),
            blocks=tuple(vis.blocks),
            strides=tuple(vis.strides),
            norm=vis.norm,
            residual=vis.residual,
            temporal_pool=vis.temporal_pool,
            remat=vis.remat,
            dtype=dtype,
            conv_backend=vis.get("conv_backend", "auto"),  # configs saved before the key
        ),
        audio=AudioEncoder(
            hidden=aud.hidden,
            cell=aud.cell,
            layers=aud.layers,
            bidirectional=aud.bidirectional,
            num_mel_bins=aud.num_mel_bins,
            spec_augment=tuple(aud.spec_augment),
            unroll=aud.get("unroll", 1),  # absent from configs saved before the key
            lstm_backend=aud.get("lstm_backend", "auto"),  # likewise
            dtype=dtype,
        ),
        fusion=FusionHead(
            kind=fus.kind,
            dim=fus.dim,
            heads=fus.heads,
            embed_dim=m.embed_dim,
            num_classes=m.num_classes,
            dtype=dtype,
        ),
        modality_dropout=m.modality_dropout,
    )


def dummy_inputs(batch: int, frames: int, size: int, audio_samples: int) -> dict[str, Any]:
    """Zero inputs of the right shapes and dtypes, for `init` and for export specs."""
    return {
        "frames": jnp.zeros((batch, frames, size, size, 3), jnp.uint8),
        "frame_mask": jnp.ones((batch, frames), bool),
        "audio": jnp.zeros((batch, audio_samples), jnp.int16),
        "audio_len": jnp.full((batch,), audio_samples, jnp.int32),
        "has_video": jnp.ones((batch,), bool),
        "has_audio": jnp.ones((batch,), bool),
    }
