"""Supervised: cross-entropy of the class scores against the labels (softmax for one label
per clip, sigmoid for multi-hot labels), over the clips that have a label (an unlabeled
dataset mixed in by data.mixture gives -1)."""

import jax
import jax.numpy as jnp
import optax

from sora_jax.objectives.base import Objective


def labelled(labels: jax.Array, multi_label: bool) -> jax.Array:
    """[B] bool: the clip has a label."""
    return (labels[:, 0] if multi_label else labels) >= 0


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def classification_loss(logits: jax.Array, labels: jax.Array, multi_label: bool) -> jax.Array:
    """Mean softmax cross-entropy (integer labels) or sigmoid BCE (multi-hot labels) over
    the labelled clips of the batch."""
    mask = labelled(labels, multi_label)
    if multi_label:
        per_clip = optax.sigmoid_binary_cross_entropy(logits, jnp.maximum(labels, 0)).sum(-1)
    else:
        per_clip = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
    return masked_mean(per_clip, mask)


class Supervised(Objective):
    name = "supervised"
    uses_labels = True

    def loss(self, out, batch, settings, config, mesh, views):
        logits, labels, multi = out["logits"], batch["label"], config.model.multi_label
        mask = labelled(labels, multi)
        if multi:
            correct = masked_mean(jnp.mean((logits > 0) == (labels > 0.5), axis=-1), mask)
        else:
            correct = masked_mean(jnp.argmax(logits, -1) == labels, mask)
        loss = classification_loss(logits, labels, multi)
        return loss, {"supervised_loss": loss, "accuracy": correct}


OBJECTIVE = Supervised()
