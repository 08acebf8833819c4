"""The train and eval steps: pure functions of (state, batch), jitted once with shardings."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from sora_jax import config as config_lib
from sora_jax import objectives
from sora_jax.inputs import MODEL_INPUTS, InputSpec, label_shape
from sora_jax.models import SoraModel
from sora_jax.models.sora import unit
from sora_jax.train.sharding import BATCH_AXES, gathered
from sora_jax.train.state import TrainState, learning_rate_schedule, stop_frozen_gradients


def abstract_batch(
    config: ml_collections.ConfigDict,
    spec: InputSpec,
    batch_size: int,
    sharding: NamedSharding,
    views: int | None = None,
) -> dict[str, jax.ShapeDtypeStruct]:
    """The shapes, dtypes and sharding of a global batch, as the pipeline delivers it:
    training batches [B, ...] ([B, V, ...] with data.train_views V > 1), evaluation
    batches with `views` per clip [B, V, ...]."""
    if views is None and config.data.train_views > 1:
        views = config.data.train_views
    shapes = spec.shapes(batch_size) | {"label": label_shape(config, batch_size)}
    if views is not None:
        shapes = {
            k: (shape if k == "label" else (shape[0], views, *shape[1:]), dtype)
            for k, (shape, dtype) in shapes.items()
        }
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}


def make_train_step(
    model: SoraModel,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    state_sharding: TrainState,  # a NamedSharding per array of the state
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """train_step(state, batch) -> (state, metrics), compiled once for these shardings."""
    accum = config.accum_steps
    views = config.data.train_views
    flatten_views = lambda x, repeat: (
        jnp.repeat(x, views, axis=0) if repeat else x.reshape(-1, *x.shape[2:])
    )
    modality_embeddings = "modality_embeddings" in objectives.needs(config)
    ema_decay = config.optimizer.ema_decay
    base_rng = jax.random.key(config.seed)
    schedule_fn = learning_rate_schedule(config)
    micro_sharding = NamedSharding(mesh, P(None, BATCH_AXES))

    def loss_fn(params, batch, rng):
        params = gathered(stop_frozen_gradients(params, config), mesh)
        if views > 1:  # [B, V, ...] -> [B * V, ...], a clip's windows side by side
            batch = {k: flatten_views(v, k == "label") for k, v in batch.items()}
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        objective_rng = jax.random.fold_in(rng, 1 << 20)  # not the dropout's stream
        extra = objectives.model_inputs(inputs, config, objective_rng)  # e.g. shifted sound
        out = model.apply(
            {"params": params},
            inputs | extra,
            train=True,
            modality_embeddings=modality_embeddings,
            rngs={"dropout": rng},
        )
        with jax.named_scope("loss"):  # named in profiles and in aot/traffic.py
            return objectives.total(out, batch | extra, config, mesh, views)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    traces = 0

    @functools.partial(
        jax.jit, donate_argnums=(0,), out_shardings=(state_sharding, NamedSharding(mesh, P()))
    )
    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        nonlocal traces
        traces += 1  # Python runs here only while JAX traces: once per compilation
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # see models/conv.py
            return _train_step(state, batch)

    train_step.traces = lambda: traces  # the loop warns if this ever exceeds 1

    def _train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(base_rng, state.step)
        if accum == 1:
            (loss, parts), grads = grad_fn(state.params, batch, rng)
        else:
            # [B, ...] -> [accum, B / accum, ...] keeping each device's rows on that device.
            def split(x):
                x = x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
                return jax.lax.with_sharding_constraint(x, micro_sharding)

            micro = jax.tree.map(split, batch)

            def body(carry, xs):
                i, mb = xs
                value, g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (value, g)), None

            zeros = jax.tree.map(
                jnp.zeros_like,
                (jax.eval_shape(grad_fn, state.params, batch, rng)[0], state.params),
            )
            ((loss, parts), grads), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
            (loss, parts), grads = jax.tree.map(lambda x: x / accum, ((loss, parts), grads))
        with jax.named_scope("optimizer"):  # the update, the EMA and the guard
            grad_norm = optax.global_norm(grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            ema = state.ema_params
            if ema is not None:
                ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
            # A non-finite loss or gradient leaves the state as it was and records the step;
            # the loop stops the run at its next check, before any checkpoint of a bad state.
            loss_ok, grad_ok = jnp.isfinite(loss), jnp.isfinite(grad_norm)
            ok = loss_ok & grad_ok & (state.nonfinite_step < 0)
            keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
            first_bad = (state.nonfinite_step < 0) & ~(loss_ok & grad_ok)
            new_state = TrainState(
                step=state.step + 1,
                params=keep(params, state.params),
                opt_state=keep(opt_state, state.opt_state),
                ema_params=None if ema is None else keep(ema, state.ema_params),
                nonfinite_step=jnp.where(first_bad, state.step, state.nonfinite_step),
                nonfinite_what=jnp.where(first_bad, jnp.where(loss_ok, 2, 1), state.nonfinite_what),
            )
        metrics = parts | {
            "loss": loss,
            "grad_norm": grad_norm,
            "learning_rate": schedule_fn(state.step),
        }
        return new_state, metrics

    return train_step


EMBEDDINGS = ("embedding", "video_embedding", "audio_embedding")
MODE_LOGITS = {"full": "logits", "audio_only": "audio_logits", "video_only": "video_logits"}
PROJECTIONS = ("video_projection", "audio_projection")


def masked_view_mean(x: jax.Array, present: jax.Array) -> jax.Array:
    """x [B, V, D] averaged over the views where `present` [B, V]; over all views where no
    view has it (such a clip is left out by whoever reads it)."""
    weights = jnp.where(present.any(axis=1, keepdims=True), present, True).astype(x.dtype)
    return jnp.sum(x * weights[..., None], axis=1) / jnp.sum(weights, axis=1, keepdims=True)


def clip_scores(embedded: dict, batch: dict, multi_label: bool) -> dict[str, jax.Array]:
    """Class scores per clip [B, C] for full, audio-only and video-only inputs, from the
    model's logits of B clips x V views, averaged over the views."""
    B, V = batch["frames"].shape[:2]
    scores = {}
    for mode, key in MODE_LOGITS.items():
        p = jax.nn.sigmoid(embedded[key]) if multi_label else jax.nn.softmax(embedded[key])
        scores[mode] = p.reshape(B, V, -1).mean(axis=1)
    return scores


def clip_vectors(embedded: dict, batch: dict, keys: tuple[str, ...]) -> dict[str, jax.Array]:
    """Unit vectors per clip [B, D] of the model's outputs `keys` (embeddings,
    projections) for B clips x V views. A sense's own output is averaged over the views
    that have that sense (a window past the end of a clip's sound has none); a clip
    without it in any view is marked by clip_senses."""
    B, V = batch["frames"].shape[:2]
    has = {"video": batch["has_video"], "audio": batch["has_audio"]}  # [B, V] each
    vectors = {}
    for key in keys:
        x = embedded[key].reshape(B, V, -1)
        sense = key.split("_")[0]
        vectors[key] = unit(masked_view_mean(x, has[sense]) if sense in has else x.mean(axis=1))
    return vectors


def clip_senses(batch: dict) -> dict[str, jax.Array]:
    """Which senses each clip has in some view: has_video, has_audio [B] bool."""
    return {k: batch[k].any(axis=1) for k in ("has_video", "has_audio")}


def make_eval_step(
    model: SoraModel, config: ml_collections.ConfigDict, mesh: Mesh
) -> Callable[[dict, dict], dict]:
    """eval_step(params, batch [B, V, ...]) -> per clip, averaged over its V views:
    class scores [B, C] for full, audio-only and video-only inputs (runs with a
    supervised loss); in runs with a contrastive loss, unit-length embeddings [B, E] of
    the fused clip and of each sense alone and the senses' projections [B, P]; and which
    senses the clip has ([B] bool)."""
    multi_label = config.model.multi_label
    classify = config_lib.trains_classifier(config)
    represent = config_lib.trains_alignment(config)

    @functools.partial(jax.jit, out_shardings=NamedSharding(mesh, P()))
    def eval_step(params, batch: dict) -> dict:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # see models/conv.py
            return _eval_step(params, batch)

    def _eval_step(params, batch: dict) -> dict:
        B, V = batch["frames"].shape[:2]
        flat = {k: batch[k].reshape(B * V, *batch[k].shape[2:]) for k in MODEL_INPUTS}
        # One pass of the towers gives the clip fused and each sense alone (the fusion
        # head with the other sense absent, as if it were missing from the input).
        embedded = model.apply({"params": gathered(params, mesh)}, flat, modality_embeddings=True)
        out = clip_senses(batch)
        if classify:
            out |= clip_scores(embedded, batch, multi_label)
        if represent:
            out |= clip_vectors(embedded, batch, EMBEDDINGS + PROJECTIONS)
        return out

    return eval_step
