"""Compile a run's train and eval steps for any devices, attached or not, and read what the
compiler says about them: memory per device, FLOPs and bytes per step, collectives and
custom calls. The steps are the ones `sora-train` runs (setup.build, step.make_*_step), on
abstract inputs: nothing is allocated, so a 256-chip program is checked on a laptop.
"""

import dataclasses
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import ml_collections
import numpy as np

from sora_jax.aot import collectives, mosaic, traffic
from sora_jax.train import setup
from sora_jax.train.fit import GiB, StepReport, compile_step
from sora_jax.train.step import abstract_batch, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class RunReport:
    batch_size: int  # global
    devices: int
    params_bytes: int  # per device, as sharded over the mesh
    opt_state_bytes: int  # optimizer moments, the EMA copy of the parameters, counters
    batch_bytes: int
    train: StepReport
    eval: StepReport
    train_traffic: dict[str, dict[str, int]]  # traffic.bytes_by_part of the train step
    train_cycles: dict[str, int]  # traffic.cycles_by_part: XLA:TPU's estimate, by part
    collective_bytes: dict[str, int]  # collectives.sent_bytes: what one chip sends a step
    remat: bool  # model.visual.remat: the train step's FLOPs include the tower's recompute

    @property
    def hbm_bytes(self) -> int:
        """The train step's HBM traffic per device and step, at least (aot/traffic.py)."""
        return sum(sum(p.values()) for p in self.train_traffic.values())


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded abstract arrays (its largest shard)."""
    return sum(
        int(np.prod(x.sharding.shard_shape(x.shape), dtype=np.int64)) * x.dtype.itemsize
        for x in jax.tree.leaves(tree)
    )


@dataclasses.dataclass(frozen=True)
class AbstractRun:
    """What sora-train would build on `devices`, without allocating it: the steps and their
    abstract inputs (ShapeDtypeStructs with the run's shardings)."""

    built: setup.Setup  # mesh, model, optimizer, abstract state and its shardings
    train_step: Callable
    train_batch: dict  # config.batch_size clips
    eval_step: Callable
    eval_batch: dict  # data.eval_batch_size clips x views

    def shard_bytes(self) -> dict[str, int]:
        """Per device: parameters; optimizer moments, the EMA copy, counters; the batch."""
        state = self.built.abstract_state
        return {
            "params_bytes": shard_bytes(state.params),
            "opt_state_bytes": shard_bytes((state.opt_state, state.ema_params, state.step)),
            "batch_bytes": shard_bytes(self.train_batch),
        }


def abstract_run(config: ml_collections.ConfigDict, devices: Sequence[jax.Device]) -> AbstractRun:
    run = setup.build(config, devices)  # ConfigError for a config that cannot run there
    d = config.data
    views = d.eval_temporal_views * d.eval_spatial_views
    return AbstractRun(
        built=run,
        train_step=make_train_step(run.model, run.tx, config, run.mesh, run.state_sharding),
        train_batch=abstract_batch(config, run.inputs, config.batch_size, run.batch_sharding),
        eval_step=make_eval_step(run.model, config, run.mesh),
        eval_batch=abstract_batch(
            config, run.inputs, d.eval_batch_size, run.batch_sharding, views=views
        ),
    )


def compile_run(
    config: ml_collections.ConfigDict,
    devices: Sequence[jax.Device],
    dump_hlo: str | None = None,
) -> RunReport:
    """The train step at config.batch_size and the eval step at data.eval_batch_size x
    views, compiled for `devices` exactly as sora-train would build them; the train step's
    HLO text is written to `dump_hlo` if given."""
    run = abstract_run(config, devices)
    state = run.built.abstract_state
    compiled, train = compile_step(run.train_step, state, run.train_batch)
    hlo = compiled.as_text()
    if dump_hlo:
        pathlib.Path(dump_hlo).write_text(hlo)
    launched = list(traffic.launches(hlo))  # read once, summed two ways
    if devices[0].platform == "tpu":  # the Pallas kernels' cycles, which XLA leaves out
        launched = mosaic.with_pallas_cycles(launched, devices[0].device_kind)
    _, evaluation = compile_step(run.eval_step, state.params, run.eval_batch)
    return RunReport(
        batch_size=config.batch_size,
        devices=len(devices),
        **run.shard_bytes(),
        train=train,
        eval=evaluation,
        train_traffic=traffic.bytes_by_part(launched),
        train_cycles=traffic.cycles_by_part(launched),
        collective_bytes=collectives.sent_bytes(launched, len(devices)),
        remat=bool(config.model.visual.remat),
    )


def fits(report: RunReport, device_memory_bytes: int) -> bool:
    return max(report.train.total_bytes, report.eval.total_bytes) <= device_memory_bytes


def largest_fitting_batch(
    config: ml_collections.ConfigDict,
    devices: Sequence[jax.Device],
    device_memory_bytes: int,
    first: RunReport,
    max_compiles: int = 8,
    max_seconds: float | None = None,
    progress: Callable[[str], None] = lambda line: None,
) -> dict:
    """The largest global batch whose train step fits, found by compiling it at other
    batch sizes (multiples of the devices x accum_steps): {"batch_size", "exact",
    "compiles"}, exact False when max_compiles or max_seconds ran out first (that batch
    fits; a larger one might). A production step takes minutes to compile, so the search
    guesses each next batch from the bytes of the ones compiled (search_largest), and says
    each compile's outcome to `progress` as it ends."""
    unit = len(devices) * config.accum_steps
    started, compiles = time.monotonic(), 0

    def train_bytes(units: int) -> int:
        nonlocal compiles
        trial = config.copy_and_resolve_references()
        trial.batch_size = units * unit
        run = abstract_run(trial, devices)
        _, report = compile_step(run.train_step, run.built.abstract_state, run.train_batch)
        compiles += 1
        fits = "fits" if report.total_bytes <= device_memory_bytes else "does not fit"
        progress(
            f"batch search: compile {compiles} of at most {max_compiles}: batch "
            f"{trial.batch_size} needs {report.total_bytes / GiB:.2f} GiB per device ({fits}), "
            f"{time.monotonic() - started:.0f} s so far"
        )
        return report.total_bytes

    deadline = None if max_seconds is None else started + max_seconds
    found = search_largest(
        train_bytes,
        config.batch_size // unit,
        first.train.total_bytes,
        device_memory_bytes,
        max_compiles,
        deadline,
    )
    return {"batch_size": found.largest * unit, "exact": found.exact, "compiles": found.trials}


class Search(NamedTuple):
    largest: int  # the largest n known to fit; 0 when none is
    exact: bool  # n + 1 is known not to fit (or n = 0 and 1 does not)
    trials: int  # calls of bytes_at


def search_largest(
    bytes_at: Callable[[int], int],
    start: int,
    start_bytes: int,
    limit: int,
    max_trials: int,
    deadline: float | None = None,  # time.monotonic(): no trial starts after it
) -> Search:
    """The largest n >= 1 with bytes_at(n) <= limit, for bytes_at growing with n, known at
    `start`. Each trial is a compile, so it is spent where the answer likely is: a step's
    memory is close to affine in its batch, and the next n is where the line through the
    last two trials crosses the limit (a secant step), kept strictly inside what is known
    (above every n that fits, below every n that does not; at most 64x beyond). An affine
    curve takes three trials (the first doubles or halves `start`; then n, then n + 1);
    a plateau, where the line is flat, halves the bracket instead."""
    known = {start: start_bytes}
    tried = [start]

    def crossing(a: int, b: int) -> int | None:
        slope = (known[b] - known[a]) / (b - a)
        return a + int((limit - known[a]) // slope) if slope > 0 else None

    while True:
        good = max((n for n, b in known.items() if b <= limit), default=0)
        bad = min((n for n, b in known.items() if b > limit), default=None)
        trials = len(tried) - 1
        if bad is not None and bad - good <= 1:
            return Search(good, True, trials)
        if trials == max_trials or (deadline is not None and time.monotonic() >= deadline):
            return Search(good, False, trials)
        guess = crossing(*sorted(tried[-2:])) if trials else None
        if bad is None:  # all fit so far
            n = 2 * good if guess is None else min(max(guess, good + 1), 64 * good)
        elif good == 0:  # none fits so far
            n = bad // 2 if guess is None else min(max(guess, bad // 64, 1), bad - 1)
        else:
            n = (good + bad) // 2 if guess is None else min(max(guess, good + 1), bad - 1)
        known[n] = bytes_at(n)
        tried.append(n)
