"""What training minimises: a weighted sum of the supervised loss on the labels and the
audio-visual contrastive loss, with the metrics each part reports.

The contrastive loss is written for a global batch sharded over the mesh: the
similarity matrix keeps the batch's rows where they are and sees every clip of the
global batch as a column, and the sharding annotations, not a hand-written
all-gather, tell XLA to bring the columns together. So a batch split over 2 processes
x 2 devices gives the loss of 1 process x 4 devices (tests/test_transfer.py).
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sora_jax import config as config_lib
from sora_jax.train.sharding import BATCH_AXES

_MASKED = -1e9  # logit of a column that is no clip's sound (or picture)


def labelled(labels: jax.Array, multi_label: bool) -> jax.Array:
    """[B] bool: the clip has a label (an unlabeled dataset's clips, mixed into a run by
    data.mixture, have -1)."""
    return (labels[:, 0] if multi_label else labels) >= 0


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def classification_loss(logits: jax.Array, labels: jax.Array, multi_label: bool) -> jax.Array:
    """Mean softmax cross-entropy (integer labels) or sigmoid BCE (multi-hot labels) over
    the labelled clips of the batch."""
    mask = labelled(labels, multi_label)
    if multi_label:
        per_clip = optax.sigmoid_binary_cross_entropy(logits, jnp.maximum(labels, 0)).sum(-1)
    else:
        per_clip = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    return _masked_mean(per_clip, mask)


def _info_nce(queries, keys, valid, scale, rows, columns):
    """Mean over valid rows of -log p(row i's own key | its query), the other valid clips
    of the batch the alternatives. queries, keys: [B, D] unit vectors; valid: [B]."""
    keys = _constrain(keys, columns)  # every clip of the global batch, on every device
    logits = _constrain(scale * queries @ keys.T, rows)  # [B, B], rows stay sharded
    logits = jnp.where(valid[None, :], logits, _MASKED)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    own = jnp.diagonal(log_p)  # [B]
    count = jnp.maximum(jnp.sum(valid), 1)
    loss = -jnp.sum(jnp.where(valid, own, 0.0)) / count
    hit = jnp.argmax(logits, axis=-1) == jnp.arange(logits.shape[0])
    return loss, jnp.sum(valid & hit) / count


def _constrain(x, sharding):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def contrastive_loss(
    video: jax.Array,  # [B, D] unit vectors, the global batch
    audio: jax.Array,  # [B, D]
    valid: jax.Array,  # [B] bool: the clip has both a picture and a sound
    scale: jax.Array,  # [] inverse temperature
    mesh: Mesh | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Symmetric InfoNCE: (loss, in-batch top-1 of video->audio and audio->video).

    A clip's picture and its own sound are the positive pair; every other clip of the
    global batch is a negative. A clip missing a sense is neither (its row and column
    are masked out), so it is never paired with a sound or picture that is not there.
    """
    rows = columns = None
    if mesh is not None:
        rows, columns = NamedSharding(mesh, P(BATCH_AXES, None)), NamedSharding(mesh, P())
    v2a, v2a_hit = _info_nce(video, audio, valid, scale, rows, columns)
    a2v, a2v_hit = _info_nce(audio, video, valid, scale, rows, columns)
    return (v2a + a2v) / 2, (v2a_hit + a2v_hit) / 2


def wants_modality_embeddings(config: ml_collections.ConfigDict) -> bool:
    return config_lib.trains_alignment(config)


def objective(
    out: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    config: ml_collections.ConfigDict,
    mesh: Mesh | None = None,
    views: int = 1,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of one batch from the model's outputs. With `views` windows of each
    clip (rows [B * V], a clip's side by side), every window's picture has its own
    window's sound and the other windows' sounds of the same clip as positives: the
    contrastive loss is the mean over the V x V pairings of windows."""
    weights = config.loss
    loss = jnp.zeros((), jnp.float32)
    metrics = {}
    if config_lib.trains_classifier(config):
        logits, labels = out["logits"], batch["label"]
        supervised = classification_loss(logits, labels, config.model.multi_label)
        mask = labelled(labels, config.model.multi_label)
        if config.model.multi_label:
            correct = _masked_mean(jnp.mean((logits > 0) == (labels > 0.5), axis=-1), mask)
        else:
            correct = _masked_mean(jnp.argmax(logits, -1) == labels, mask)
        loss += weights.supervised * supervised
        metrics |= {"supervised_loss": supervised, "accuracy": correct}
    if config_lib.trains_alignment(config):
        by_clip = lambda x: x.reshape(-1, views, *x.shape[1:])  # [B * V, ...] -> [B, V, ...]
        valid = by_clip(batch["has_video"] & batch["has_audio"]).all(axis=1)  # [B]
        video, audio = by_clip(out["video_projection"]), by_clip(out["audio_projection"])
        pairs = [
            contrastive_loss(video[:, i], audio[:, j], valid, out["logit_scale"], mesh)
            for i in range(views)
            for j in range(views)
        ]
        contrastive = sum(loss for loss, _ in pairs) / len(pairs)
        matched = sum(hit for _, hit in pairs) / len(pairs)
        loss += weights.contrastive * contrastive
        metrics |= {
            "contrastive_loss": contrastive,
            "match_accuracy": matched,  # in-batch top-1, both directions
            "temperature": 1.0 / out["logit_scale"],
            "pairs": jnp.sum(valid).astype(jnp.float32),  # clips with both senses
        }
    return loss, metrics
