"""GPU runs checked without a GPU: the train and eval steps lowered for CUDA.

XLA compiles for a GPU only with one attached, so for GPUs this stops one stage short of
the TPU path: `jax.jit(step).trace(...).lower(lowering_platforms=("cuda",))` gives the
StableHLO that JAX would hand to XLA:GPU, with the run's shardings, traced for a GPU
(`platform.targeting("gpu")`: XLA's convolutions and the LSTM's scan, none of the CPU's
kernels or gradient rewrites). The mesh is built from stand-in CPU devices, one per GPU.

What lowering checks: the steps trace and lower for CUDA with their shardings; the custom
calls they make (none of this project's CPU kernels); per-device bytes of parameters,
optimizer state and batch (from their shardings, exact). What only XLA:GPU's compile
would tell, and this does not: temporaries, whether the run fits, FLOPs, collectives.
"""

import dataclasses
import re

import jax
import ml_collections

from sora_jax.aot.analysis import abstract_run
from sora_jax.kernels import platform

# `stablehlo.custom_call @Target(...)`; sharding annotations are custom calls too.
_CUSTOM_CALL = re.compile(r"stablehlo\.custom_call @([\w.$-]+)")
SHARDING_MARKERS = {"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"}
NOT_CHECKED = (
    "temporaries, fits, FLOPs and collectives: XLA compiles for a GPU only with one "
    "attached; run sora-train on one GPU host (it compiles and checks the fit first)"
)


@dataclasses.dataclass(frozen=True)
class LoweredRun:
    batch_size: int  # global
    devices: int
    params_bytes: int  # per device, as sharded over the mesh
    opt_state_bytes: int
    batch_bytes: int
    custom_calls: list[str]  # of both steps, sharding markers left out
    stablehlo_bytes: int  # the train step's module, as text


def custom_calls(stablehlo: str) -> set[str]:
    """The custom-call targets of a lowered program's text, but its sharding annotations."""
    return set(_CUSTOM_CALL.findall(stablehlo)) - SHARDING_MARKERS


# The platform a model traces for (kernels/platform.py) when lowered for each of these.
TRACED_AS = {"cuda": "gpu", "cpu": "cpu"}


def lower_run(
    config: ml_collections.ConfigDict, devices: list[jax.Device], target: str = "cuda"
) -> LoweredRun:
    """The train step at config.batch_size and the eval step at data.eval_batch_size x
    views, as sora-train builds them on len(devices) devices of `target`, lowered for it
    (cuda; or cpu, to compare on the same stand-in devices)."""
    run = abstract_run(config, devices)
    state = run.built.abstract_state
    with platform.targeting(TRACED_AS[target]):  # the steps trace when lowered
        train = run.train_step.trace(state, run.train_batch).lower(lowering_platforms=(target,))
        evaluation = run.eval_step.trace(state.params, run.eval_batch).lower(
            lowering_platforms=(target,)
        )
    train_text = train.as_text()  # printing a large module takes a while: once
    return LoweredRun(
        batch_size=config.batch_size,
        devices=len(devices),
        **run.shard_bytes(),
        custom_calls=sorted(custom_calls(train_text) | custom_calls(evaluation.as_text())),
        stablehlo_bytes=len(train_text),
    )
