"""The Sora model: visual tower + audio branch + fusion head, built from a config."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sora_jax.config import check, one_of
from sora_jax.inputs import InputSpec
from sora_jax.kernels import onednn
from sora_jax.models.audio import CELLS, AudioEncoder
from sora_jax.models.fusion import FUSIONS, FusionHead
from sora_jax.models.visual import NORMS, TEMPORAL_POOLS, VisualTower

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class SoraModel(nn.Module):
    """Raw clips -> {"embedding": [B, E], "logits": [B, C]}.

    Inputs: a dict, so exported signatures are self-describing; names, shapes, dtypes
    and meanings are defined once, in `sora_jax.inputs` (frames may also be float in
    [0, 255], audio float in [-1, 1]).
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


def check_config(model_config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError, naming the key, for model settings this model cannot build."""
    m, v, a, f = model_config, model_config.visual, model_config.audio, model_config.fusion
    one_of(m.dtype, "model.dtype", DTYPES)
    check(m.num_classes >= 2, "model.num_classes", f"{m.num_classes} < 2")
    check(m.embed_dim >= 1, "model.embed_dim", "must be >= 1")
    check(0.0 <= m.modality_dropout < 1.0, "model.modality_dropout", "must be in [0, 1)")
    one_of(v.norm, "model.visual.norm", NORMS)
    one_of(v.temporal_pool, "model.visual.temporal_pool", TEMPORAL_POOLS)
    check(
        len(v.widths) == len(v.blocks) == len(v.strides) >= 1,
        "model.visual",
        f"widths {tuple(v.widths)}, blocks {tuple(v.blocks)} and strides "
        f"{tuple(v.strides)} must have one entry per stage",
    )
    check(
        all(x > 0 for x in (*v.widths, *v.blocks, *v.strides)),
        "model.visual",
        "widths, blocks and strides must be positive",
    )
    one_of(a.cell, "model.audio.cell", CELLS)
    check(a.hidden >= 1, "model.audio.hidden", "must be >= 1")
    check(a.layers >= 1, "model.audio.layers", "must be >= 1")
    check(a.num_mel_bins >= 1, "model.audio.num_mel_bins", "must be >= 1")
    check(a.unroll >= 1, "model.audio.unroll", "must be >= 1")
    check(
        len(a.spec_augment) == 4 and all(x >= 0 for x in a.spec_augment),
        "model.audio.spec_augment",
        "(time masks, max width, mel masks, max width), each >= 0",
    )
    one_of(f.kind, "model.fusion.kind", FUSIONS)
    check(f.dim >= 1 and f.heads >= 1, "model.fusion", "dim and heads must be >= 1")
    if f.kind == "attention":
        check(
            f.dim % f.heads == 0,
            "model.fusion.heads",
            f"fusion.dim {f.dim} is not divisible by {f.heads} heads",
        )
    for key, backend in (
        ("model.visual.conv_backend", v.conv_backend),
        ("model.audio.lstm_backend", a.lstm_backend),
    ):
        one_of(backend, key, onednn.BACKENDS)
        if backend == "onednn":
            why_not = onednn.unavailable_reason()
            if why_not is None and key == "model.visual.conv_backend":
                why_not = onednn.conv_unverified_reason()
            check(why_not is None, key, f"'onednn' cannot run: {why_not}")


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
            conv_backend=vis.conv_backend,
        ),
        audio=AudioEncoder(
            hidden=aud.hidden,
            cell=aud.cell,
            layers=aud.layers,
            bidirectional=aud.bidirectional,
            num_mel_bins=aud.num_mel_bins,
            spec_augment=tuple(aud.spec_augment),
            unroll=aud.unroll,
            lstm_backend=aud.lstm_backend,
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


def dummy_inputs(spec: InputSpec, batch: int = 1) -> dict[str, jax.Array]:
    """Inputs of the right shapes and dtypes, for `init`."""
    return jax.tree.map(jnp.asarray, spec.zeros(batch))
