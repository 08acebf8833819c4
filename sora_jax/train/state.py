"""Train state and optimizer: everything a step changes, as one pytree."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sora_jax.inputs import InputSpec
from sora_jax.models import SoraModel, dummy_inputs


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any
    ema_params: Any  # params' exponential moving average, or None
    # -1 until a loss or gradient goes NaN/inf; then that step and what it was (1 loss,
    # 2 gradient norm). Checked every log interval, so no per-step host sync is needed.
    nonfinite_step: jax.Array
    nonfinite_what: jax.Array


NONFINITE_NAMES = {1: "loss", 2: "gradient norm"}


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    o = config.optimizer
    if o.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, o.learning_rate, o.warmup_steps, max(config.total_steps, o.warmup_steps + 1)
        )
    if o.warmup_steps:
        return optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps)
    return optax.constant_schedule(o.learning_rate)


def _decay_mask(params):
    """Weight decay on matrices and conv kernels only: not biases, norms or tokens."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    o = config.optimizer
    schedule = learning_rate_schedule(config)
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    if o.name == "adamw":
        parts.append(optax.adamw(schedule, weight_decay=o.weight_decay, mask=_decay_mask))
    else:
        if o.weight_decay:
            parts.append(optax.add_decayed_weights(o.weight_decay, mask=_decay_mask))
        parts.append(optax.sgd(schedule, momentum=o.momentum, nesterov=True))
    return optax.chain(*parts)


def init_state(
    model: SoraModel,
    tx: optax.GradientTransformation,
    spec: InputSpec,
    config: ml_collections.ConfigDict,
    rng: jax.Array,
) -> TrainState:
    """Fresh parameters and optimizer state (jit this with out_shardings to init sharded)."""
    params = model.init({"params": rng, "dropout": rng}, dummy_inputs(spec))["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=params if config.optimizer.ema_decay > 0 else None,
        nonfinite_step=jnp.full((), -1, jnp.int32),
        nonfinite_what=jnp.zeros((), jnp.int32),
    )
