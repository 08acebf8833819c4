"""Train state and optimizer: everything a step changes, as one pytree."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from sora_jax.inputs import InputSpec
from sora_jax.models import SoraModel, dummy_inputs, param_part


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


def param_roles(params: Any, config: ml_collections.ConfigDict) -> Any:
    """Per parameter: "frozen" (a part in optimizer.freeze: never updated), "pretrained"
    (loaded by init_from, trained at pretrained_lr_scale x the learning rate) or
    "trained"."""
    o = config.optimizer
    scaled = set(config.init_parts) if config.init_from and o.pretrained_lr_scale != 1 else set()

    def role(path, _):
        part = param_part(tuple(k.key for k in path))
        return "frozen" if part in o.freeze else "pretrained" if part in scaled else "trained"

    return jax.tree_util.tree_map_with_path(role, params)


def _update_rule(config: ml_collections.ConfigDict, lr_scale: float):
    o = config.optimizer
    schedule = learning_rate_schedule(config)
    if lr_scale != 1:
        schedule = lambda step, base=schedule: lr_scale * base(step)
    if o.name == "adamw":
        return optax.adamw(schedule, weight_decay=o.weight_decay, mask=_decay_mask)
    parts = []
    if o.weight_decay:
        parts.append(optax.add_decayed_weights(o.weight_decay, mask=_decay_mask))
    parts.append(optax.sgd(schedule, momentum=o.momentum, nesterov=True))
    return optax.chain(*parts)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Gradient clipping, then AdamW or SGD. With frozen parts or a learning rate of its
    own for pretrained parts, an optax.multi_transform over the parameters' roles: a
    frozen part gets zero updates and keeps no optimizer state at all."""
    o = config.optimizer
    parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
    if o.freeze or (config.init_from and o.pretrained_lr_scale != 1):
        rules = {
            "trained": _update_rule(config, 1.0),
            "pretrained": _update_rule(config, o.pretrained_lr_scale),
            "frozen": optax.set_to_zero(),
        }
        parts.append(optax.multi_transform(rules, lambda p: param_roles(p, config)))
    else:
        parts.append(_update_rule(config, 1.0))
    return optax.chain(*parts)


def stop_frozen_gradients(params: Any, config: ml_collections.ConfigDict) -> Any:
    """Frozen parts behind `stop_gradient`: their gradients are zeros (so they count in
    no gradient norm), and no backward pass through them is traced at all, where zeroing
    their gradients afterwards left XLA to prune it (8% of a linear probe's step here,
    97 -> 89 ms for configs/linear_probe.py:small)."""
    if not config.optimizer.freeze:
        return params
    roles = param_roles(params, config)
    stop = lambda p, role: jax.lax.stop_gradient(p) if role == "frozen" else p
    return jax.tree.map(stop, params, roles)


def init_state(
    model: SoraModel,
    tx: optax.GradientTransformation,
    spec: InputSpec,
    config: ml_collections.ConfigDict,
    rng: jax.Array,
) -> TrainState:
    """Fresh parameters and optimizer state (jit this with out_shardings to init sharded)."""
    params = model.init(
        {"params": rng, "dropout": rng},
        dummy_inputs(spec),
        modality_embeddings=model.contrastive is not None,  # creates the projection heads
    )["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=params if config.optimizer.ema_decay > 0 else None,
        nonfinite_step=jnp.full((), -1, jnp.int32),
        nonfinite_what=jnp.zeros((), jnp.int32),
    )
