"""Fusion heads: join the visual and audio features into one clip representation.

Every head receives `has_video` / `has_audio` ([B] bool). A missing modality is masked
out (or replaced by a learned "missing" token), never fed as zeros pretending to be data,
so one set of parameters serves audio-only, video-only and audio-visual inputs.
"""

import flax.linen as nn
import jax.numpy as jnp

from sora_jax.config import check, one_of

FUSIONS = ("concat", "mean", "gated", "attention")


def _masked_mean(features, present):  # features: [B, K, D], present: [B, K] bool
    # `where`, not a multiply by 0: an absent modality's features never reach the sum.
    total = jnp.sum(jnp.where(present[..., None], features, 0), axis=1)
    count = jnp.sum(present, axis=1, keepdims=True).astype(features.dtype)
    return total / jnp.maximum(count, 1.0)


class CrossModalAttention(nn.Module):
    """Each modality's sequence attends to the other's; the result is added back
    residually only where the other modality is present."""

    dim: int
    heads: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, query_seq, query_mask, key_seq, key_mask, key_present):
        # query_seq: [B, Tq, D], key_seq: [B, Tk, D], masks: [B, T], key_present: [B]
        attention_mask = query_mask[:, None, :, None] & key_mask[:, None, None, :]
        attended = nn.MultiHeadDotProductAttention(
            num_heads=self.heads, qkv_features=self.dim, dtype=self.dtype, name="attention"
        )(query_seq, key_seq, mask=attention_mask)
        attended = jnp.where(key_present[:, None, None], attended, 0)
        return nn.LayerNorm(dtype=self.dtype, name="norm")(query_seq + attended)


class FusionHead(nn.Module):
    """(visual, audio) -> embedding [B, E] and class logits [B, C]."""

    kind: str = "concat"
    dim: int = 256  # common width of both modalities for mean / gated / attention
    heads: int = 4
    embed_dim: int = 512
    num_classes: int = 10
    dtype: jnp.dtype = jnp.float32

    @staticmethod
    def check_config(f, key: str) -> None:
        """ConfigError naming the key of a setting (config.model.fusion) that cannot work."""
        one_of(f.kind, f"{key}.kind", FUSIONS)
        check(f.dim >= 1 and f.heads >= 1, key, "dim and heads must be >= 1")
        if f.kind == "attention":
            check(
                f.dim % f.heads == 0,
                f"{key}.heads",
                f"fusion.dim {f.dim} is not divisible by {f.heads} heads",
            )

    @nn.compact
    def __call__(self, visual, audio, has_video, has_audio):
        # visual / audio: (pooled [B, D*], seq [B, T*, D*], mask [B, T*])
        (v, v_seq, v_mask), (a, a_seq, a_mask) = visual, audio
        present = jnp.stack([has_video, has_audio], axis=1)  # [B, 2]
        if self.kind == "concat":
            missing_v = self.param("missing_video", nn.initializers.normal(0.02), (v.shape[-1],))
            missing_a = self.param("missing_audio", nn.initializers.normal(0.02), (a.shape[-1],))
            v = jnp.where(has_video[:, None], v, missing_v.astype(v.dtype))
            a = jnp.where(has_audio[:, None], a, missing_a.astype(a.dtype))
            fused = jnp.concatenate([v, a], axis=-1)
        elif self.kind in ("mean", "gated"):
            both = jnp.stack(
                [
                    nn.Dense(self.dim, dtype=self.dtype, name="video_proj")(v),
                    nn.Dense(self.dim, dtype=self.dtype, name="audio_proj")(a),
                ],
                axis=1,
            )  # [B, 2, dim]
            if self.kind == "mean":
                fused = _masked_mean(both, present)
            else:
                logits = nn.Dense(1, dtype=self.dtype, name="fusion_gate")(both)[..., 0]  # [B, 2]
                logits = jnp.where(present, logits.astype(jnp.float32), -1e9)
                gates = jnp.where(present, nn.softmax(logits, axis=-1), 0).astype(both.dtype)
                self.sow("intermediates", "fusion_gates", gates.astype(jnp.float32))  # [B, 2]
                fused = jnp.sum(jnp.where(present[..., None], gates[..., None] * both, 0), axis=1)
        elif self.kind == "attention":
            v_seq = nn.Dense(self.dim, dtype=self.dtype, name="video_proj")(v_seq)
            a_seq = nn.Dense(self.dim, dtype=self.dtype, name="audio_proj")(a_seq)
            attend = lambda name: CrossModalAttention(self.dim, self.heads, self.dtype, name=name)
            v_ctx = attend("video_from_audio")(v_seq, v_mask, a_seq, a_mask, has_audio)
            a_ctx = attend("audio_from_video")(a_seq, a_mask, v_seq, v_mask, has_video)
            pool = lambda seq, mask: _masked_mean(seq, mask)
            fused = _masked_mean(jnp.stack([pool(v_ctx, v_mask), pool(a_ctx, a_mask)], 1), present)
        else:
            raise ValueError(f"unknown fusion {self.kind!r}; choose from {FUSIONS}")
        embedding = nn.relu(nn.Dense(self.embed_dim, dtype=self.dtype, name="embed")(fused))
        logits = nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(embedding)
        return embedding, logits
