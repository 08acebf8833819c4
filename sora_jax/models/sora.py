"""The Sora model: visual tower + audio branch + fusion head, built from a config."""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sora_jax.config import check, one_of
from sora_jax.inputs import InputSpec
from sora_jax.models.audio import AudioEncoder
from sora_jax.models.fusion import FusionHead
from sora_jax.models.visual import VisualTower

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def unit(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / |x| along the last axis, and 0 (with a finite gradient) where x is 0. A clip
    without a sense has an all-zero embedding there: the gradient of `jnp.linalg.norm` at 0
    is 0/0, and a NaN gradient passes any `jnp.where` mask applied afterwards."""
    squared = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared, eps * eps))


class ContrastiveHeads(nn.Module):
    """Projection heads and the learned temperature of audio-visual contrastive learning:
    each sense's embedding -> an MLP -> a unit vector in a space where a clip's picture
    and its sound should meet (SimCLR / CLIP style: the loss acts on the projection, the
    embedding below it is what transfers)."""

    dim: int = 128
    temperature: float = 0.07  # initial; learned
    min_temperature: float = 0.01  # clamp: a collapsing temperature blows up the logits
    dtype: jnp.dtype = jnp.float32

    @staticmethod
    def check_config(p: ml_collections.ConfigDict, key: str) -> None:
        """ConfigError naming the key of a setting (config.model.projection) that cannot
        work."""
        check(p.dim >= 1, f"{key}.dim", "must be >= 1")
        check(
            0 < p.min_temperature <= p.temperature <= 1,
            key,
            f"need 0 < min_temperature ({p.min_temperature}) <= temperature ({p.temperature}) <= 1",
        )

    @nn.compact
    def __call__(self, video: jax.Array, audio: jax.Array) -> tuple[jax.Array, ...]:
        # video, audio: [B, E] -> unit vectors [B, dim] each, and the logit scale []
        def project(x, name):
            x = nn.relu(nn.Dense(x.shape[-1], dtype=self.dtype, name=f"{name}_hidden")(x))
            x = nn.Dense(self.dim, dtype=self.dtype, name=f"{name}_out")(x).astype(jnp.float32)
            return unit(x)

        log_scale = self.param(
            "log_inverse_temperature", nn.initializers.constant(-math.log(self.temperature)), ()
        )
        log_scale = jnp.clip(log_scale, 0.0, -math.log(self.min_temperature))
        return project(video, "video"), project(audio, "audio"), jnp.exp(log_scale)


class SoraModel(nn.Module):
    """Raw clips -> {"embedding": [B, E], "logits": [B, C]}; with `modality_embeddings`
    also each sense alone, from the same pass of the towers: "video_embedding",
    "audio_embedding" [B, E] and "video_logits", "audio_logits" [B, C] (the fusion head
    with the other sense absent: what the model gives a clip whose other sense is
    missing) and, in a model with contrastive heads, the projections ("video_projection",
    "audio_projection") and "logit_scale".

    Inputs: a dict, so exported signatures are self-describing; names, shapes, dtypes
    and meanings are defined once, in `sora_jax.inputs` (frames may also be float in
    [0, 255], audio float in [-1, 1]).

    `heads`: the objectives' own heads (sora_jax/objectives), name -> a module called with
    the towers' features {"visual": (pooled [B, Dv], sequence [B, T, Dv], mask [B, T]),
    "audio": (pooled, sequence [B, F, Da], mask [B, F])}, and "shifted_audio" likewise
    when the inputs hold another soundtrack for the same pictures ("shifted_audio",
    "shifted_audio_len"); each returns outputs merged into the model's. Their parameters
    are the part named after the objective.
    """

    visual: VisualTower
    audio: AudioEncoder
    fusion: FusionHead
    modality_dropout: float = 0.0  # chance, in training, of hiding one of two present modalities
    contrastive: ContrastiveHeads | None = None
    heads: dict[str, nn.Module] | None = None

    @nn.compact
    def __call__(
        self,
        inputs: dict[str, jax.Array],
        *,
        train: bool = False,
        modality_embeddings: bool = False,
    ) -> dict[str, jax.Array]:
        has_video, has_audio = inputs["has_video"], inputs["has_audio"]
        frame_mask = inputs["frame_mask"] & has_video[:, None]
        v, v_seq = self.visual(inputs["frames"], frame_mask)
        a, a_seq, a_mask = self.audio(inputs["audio"], inputs["audio_len"], train=train)
        a_mask = a_mask & has_audio[:, None]
        visual, audio = (v, v_seq, frame_mask), (a, a_seq, a_mask)
        # Modality dropout hides a sense from the fusion only: every head masks an absent
        # sense, so its (computed) features never reach the embedding.
        fuse_video, fuse_audio = has_video, has_audio
        if train and self.modality_dropout > 0:
            k_drop, k_which = jax.random.split(self.make_rng("dropout"))
            both = has_video & has_audio
            drop = both & (jax.random.uniform(k_drop, has_video.shape) < self.modality_dropout)
            drop_video = jax.random.bernoulli(k_which, 0.5, has_video.shape)
            fuse_video = has_video & ~(drop & drop_video)
            fuse_audio = has_audio & ~(drop & ~drop_video)
        embedding, logits = self.fusion(visual, audio, fuse_video, fuse_audio)
        out = {"embedding": embedding.astype(jnp.float32), "logits": logits.astype(jnp.float32)}
        if modality_embeddings:
            absent = jnp.zeros_like(has_video)
            video_alone, video_logits = self.fusion(visual, audio, has_video, absent)
            audio_alone, audio_logits = self.fusion(visual, audio, absent, has_audio)
            out["video_embedding"] = video_alone.astype(jnp.float32)
            out["audio_embedding"] = audio_alone.astype(jnp.float32)
            out["video_logits"] = video_logits.astype(jnp.float32)
            out["audio_logits"] = audio_logits.astype(jnp.float32)
            if self.contrastive is not None:
                v_proj, a_proj, scale = self.contrastive(video_alone, audio_alone)
                out |= {"video_projection": v_proj, "audio_projection": a_proj}
                out["logit_scale"] = scale
        if self.heads:
            features = {"visual": visual, "audio": audio}
            if "shifted_audio" in inputs:  # the same audio branch, another soundtrack
                s, s_seq, s_mask = self.audio(
                    inputs["shifted_audio"], inputs["shifted_audio_len"], train=train
                )
                features["shifted_audio"] = (s, s_seq, s_mask & has_audio[:, None])
            for head in self.heads.values():
                out |= head(features)
        return out


# The parameter tree's parts, by what they do; `init_from` loads and `optimizer.freeze`
# freezes parts by these names. An objective's head is a part named after the objective.
PARTS = ("visual", "audio", "fusion", "head", "projection")
_HEADS = "heads_"  # flax's prefix for the modules of SoraModel.heads


def param_part(path: tuple[str, ...]) -> str:
    """The part a parameter belongs to, from its path in the tree (("fusion", "embed",
    "kernel") -> "fusion"; ("fusion", "classifier", "bias") -> "head"; ("heads_av_sync",
    ...) -> "av_sync")."""
    if path[0].startswith(_HEADS):
        return path[0].removeprefix(_HEADS)
    if path[0] == "fusion":
        return "head" if path[1] == "classifier" else "fusion"
    if path[0] == "contrastive":
        return "projection"
    return path[0]


def check_config(model_config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError, naming the key, for model settings this model cannot build: the
    model's own keys here, each part's in its own module (visual.py, audio.py, fusion.py),
    and any key no part has."""
    m = model_config
    one_of(m.dtype, "model.dtype", DTYPES)
    check(m.num_classes >= 2, "model.num_classes", f"{m.num_classes} < 2")
    check(m.embed_dim >= 1, "model.embed_dim", "must be >= 1")
    check(0.0 <= m.modality_dropout < 1.0, "model.modality_dropout", "must be in [0, 1)")
    for module, key in SECTIONS.items():
        _settings(module, m[key], f"model.{key}")  # every key a setting of the module
        module.check_config(m[key], f"model.{key}")


# Each part and its config section: the section's keys are the module's fields, by name.
SECTIONS = {
    VisualTower: "visual",
    AudioEncoder: "audio",
    FusionHead: "fusion",
    ContrastiveHeads: "projection",
}


def _settings(module: type[nn.Module], section: ml_collections.ConfigDict, key: str) -> dict:
    """The section as `module`'s keyword arguments (lists as tuples); ConfigError for a key
    that is no field of it (a typo would otherwise be ignored)."""
    fields = {f.name for f in dataclasses.fields(module)} - {"parent", "name"}
    unknown = sorted(set(section) - fields)
    check(not unknown, key, f"{unknown} are not settings of {module.__name__}")
    return {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in section.items()}


def build_model(
    model_config: ml_collections.ConfigDict,
    contrastive: bool = False,
    heads: dict[str, nn.Module] | None = None,
) -> SoraModel:
    """The model a config describes (configs/base.py documents every key), each part built
    from its own section; with `contrastive`, with the projection heads of contrastive
    pretraining; with `heads`, the objectives' own. (objectives.build_model(config)
    chooses both from the run's objectives.)"""
    m = model_config
    dtype = DTYPES[m.dtype]
    part = lambda module, **shared: module(
        **_settings(module, m[SECTIONS[module]], f"model.{SECTIONS[module]}"), **shared, dtype=dtype
    )
    return SoraModel(
        visual=part(VisualTower),
        audio=part(AudioEncoder),
        fusion=part(FusionHead, embed_dim=m.embed_dim, num_classes=m.num_classes),
        modality_dropout=m.modality_dropout,
        contrastive=part(ContrastiveHeads) if contrastive else None,
        heads=heads or None,
    )


def dummy_inputs(spec: InputSpec, batch: int = 1) -> dict[str, jax.Array]:
    """Inputs of the right shapes and dtypes, for `init`."""
    return jax.tree.map(jnp.asarray, spec.zeros(batch))
