"""Audio-visual contrastive: symmetric InfoNCE between a clip's picture and its own sound,
every other clip of the global batch a negative (configs/pretrain_av.py).

The loss is written for a global batch sharded over the mesh: the similarity matrix keeps
the batch's rows where they are and sees every clip of the global batch as a column, and
the sharding annotations, not a hand-written all-gather, tell XLA to bring the columns
together. So a batch split over 2 processes x 2 devices gives the loss of 1 process x 4
devices (tests/test_transfer.py).
"""

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sora_jax.objectives.base import Objective
from sora_jax.train.sharding import BATCH_AXES

MASKED = -1e9  # logit of a column that is no clip's sound (or picture)


def constrain(x, sharding):
    return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def info_nce(queries, keys, valid, scale, rows=None, columns=None, extra=None):
    """Mean over valid rows of -log p(row i's own key | its query), the other valid clips
    of the batch the alternatives, and (if given) `extra` [B] logits of one more
    alternative per row, a hard negative. queries, keys: [B, D] unit vectors; valid: [B].
    Returns (loss, fraction of valid rows whose own key scores highest)."""
    keys = constrain(keys, columns)  # every clip of the global batch, on every device
    logits = constrain(scale * queries @ keys.T, rows)  # [B, B], rows stay sharded
    return nce_from_logits(logits, valid, extra)


def nce_from_logits(logits, valid, extra=None):
    """info_nce from its logits [B, B] (row i's own key in column i)."""
    logits = jnp.where(valid[None, :], logits, MASKED)
    if extra is not None:
        logits = jnp.concatenate([logits, extra[:, None]], axis=1)  # [B, B + 1]
    log_p = jax.nn.log_softmax(logits, axis=-1)
    own = jnp.diagonal(log_p[:, : log_p.shape[0]])  # [B]
    count = jnp.maximum(jnp.sum(valid), 1)
    loss = -jnp.sum(jnp.where(valid, own, 0.0)) / count
    hit = jnp.argmax(logits, axis=-1) == jnp.arange(logits.shape[0])
    return loss, jnp.sum(valid & hit) / count


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
    v2a, v2a_hit = info_nce(video, audio, valid, scale, rows, columns)
    a2v, a2v_hit = info_nce(audio, video, valid, scale, rows, columns)
    return (v2a + a2v) / 2, (v2a_hit + a2v_hit) / 2


def by_clip(x: jax.Array, views: int) -> jax.Array:
    """[B * V, ...] -> [B, V, ...]: a clip's windows side by side."""
    return x.reshape(-1, views, *x.shape[1:])


class Contrastive(Objective):
    """With `views` windows of each clip (data.train_views), every window's picture has its
    own window's sound and the other windows' sounds of the same clip as positives: the
    loss is the mean over the V x V pairings of windows."""

    name = "contrastive"
    needs = frozenset({"modality_embeddings", "projections"})
    in_batch_negatives = True

    def loss(self, out, batch, settings, config, mesh, views):
        valid = by_clip(batch["has_video"] & batch["has_audio"], views).all(axis=1)  # [B]
        video = by_clip(out["video_projection"], views)
        audio = by_clip(out["audio_projection"], views)
        pairs = [
            contrastive_loss(video[:, i], audio[:, j], valid, out["logit_scale"], mesh)
            for i in range(views)
            for j in range(views)
        ]
        loss = sum(loss for loss, _ in pairs) / len(pairs)
        return loss, {
            "contrastive_loss": loss,
            "match_accuracy": sum(hit for _, hit in pairs) / len(pairs),  # in-batch top-1
            "temperature": 1.0 / out["logit_scale"],
            "pairs": jnp.sum(valid).astype(jnp.float32),  # clips with both senses
        }


OBJECTIVE = Contrastive()
