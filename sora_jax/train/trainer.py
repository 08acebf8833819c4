"""The training loop, top to bottom: config -> mesh -> state -> steps -> checkpoints.

The step itself (step.py) is a pure jitted function; this file does the host-side work:
reading data, logging every `log_every` steps (the only host syncs), checkpointing,
evaluating, and stopping cleanly on SIGTERM or on a non-finite loss.
"""

import hashlib
import json
import logging
import pathlib
import signal
import time
from collections.abc import Sequence
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from sora_jax import config as config_lib
from sora_jax.data import pipeline
from sora_jax.models import SoraModel, build_model
from sora_jax.train import checkpoint, sharding
from sora_jax.train.evaluate import evaluate
from sora_jax.train.state import NONFINITE_NAMES, TrainState, init_state, make_optimizer
from sora_jax.train.step import make_train_step
from sora_jax.train.tensorboard import ScalarWriter

log = logging.getLogger("sora_jax")


class NonFiniteError(RuntimeError):
    """The loss or gradient became NaN/inf; no checkpoint of that state was written."""


def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
    """Join a multi-process run: from the config, or auto-detected (TPU pods, SLURM) with
    distributed.num_processes=-1. A single process with nothing configured does nothing."""
    d = config.distributed
    if jax.distributed.is_initialized() or not (d.coordinator or d.num_processes == -1):
        return
    # Only matters for CPU devices (tests, laptops); accelerators use their own links.
    jax.config.update("jax_cpu_collectives_implementation", d.cpu_collectives)
    kwargs = {"heartbeat_timeout_seconds": d.heartbeat_timeout_s}
    if d.coordinator:
        jax.distributed.initialize(d.coordinator, d.num_processes, d.process_id, **kwargs)
    else:
        jax.distributed.initialize(**kwargs)


def check_processes_agree(
    config: ml_collections.ConfigDict, summary: pipeline.DatasetSummary
) -> None:
    """Fail, naming the process, if processes were started with different configs or see
    different datasets (a stale copy on one host): such runs silently diverge."""
    if jax.process_count() == 1:
        return
    as_dict = config.to_dict()
    as_dict.pop("distributed", None)  # process_id differs by design
    facts = {"config": json.dumps(as_dict, sort_keys=True, default=str), "dataset": repr(summary)}
    digest = lambda text: int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") >> 1
    mine = np.array([digest(v) for v in facts.values()], np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(mine))  # [processes, facts]
    for process, theirs in enumerate(everyone):
        for i, what in enumerate(facts):
            if theirs[i] != everyone[0][i]:
                raise config_lib.ConfigError(
                    f"process {process} has a different {what} from process 0 (this is "
                    f"process {jax.process_index()}): start every process with the same "
                    f"config and the same prepared dataset"
                )


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint and exits. With several
    processes, all must stop at the same step (a checkpoint is collective), so the flag
    is shared at log steps, which are host syncs anyway."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, step: int, at_sync_point: bool) -> bool:
        if jax.process_count() == 1:
            return self.requested
        if not at_sync_point:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.asarray(flags).any())

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _check_finite(state) -> None:
    bad_step = int(jax.device_get(state.nonfinite_step))
    if bad_step >= 0:
        what = NONFINITE_NAMES[int(jax.device_get(state.nonfinite_what))]
        raise NonFiniteError(
            f"the {what} became NaN or inf at step {bad_step + 1}; stopping without saving "
            f"that state (the last checkpoint is from before it). Lower "
            f"config.optimizer.learning_rate or set config.optimizer.grad_clip."
        )


class TrainingSetup(NamedTuple):
    mesh: Mesh
    model: SoraModel
    tx: optax.GradientTransformation
    rng: jax.Array
    abstract_state: TrainState  # shapes, dtypes and shardings; no arrays
    state_sharding: TrainState  # a NamedSharding per array of the state


def setup_training(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> TrainingSetup:
    """Mesh, model, optimizer and the sharded layout of the train state, without
    allocating it: shared by the trainer, evaluation and the benchmarks."""
    mesh = sharding.make_mesh(config.mesh.fsdp, devices)
    config_lib.validate(config, num_devices=mesh.size)
    model = build_model(config.model)
    tx = make_optimizer(config)
    rng = jax.random.key(config.seed)
    abstract = jax.eval_shape(lambda: init_state(model, tx, config, rng))
    state_sharding = sharding.tree_shardings(abstract, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding
    )
    return TrainingSetup(mesh, model, tx, rng, abstract, state_sharding)


def load_for_inference(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    step: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[SoraModel, dict, int, Mesh, pipeline.DatasetSummary]:
    """(model, params, step, mesh, dataset summary) from a work dir's checkpoint."""
    summary = pipeline.check_dataset(config)
    mesh, model, _, _, abstract, _ = setup_training(config, devices)
    manager = checkpoint.make_manager(workdir, config, read_only=True)
    params, step = checkpoint.restore_params(manager, step, abstract)
    return model, params, step, mesh, summary


class _Logger:
    """TensorBoard scalars, metrics.jsonl (every step's loss) and the progress bar."""

    def __init__(self, workdir: pathlib.Path, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.jsonl = workdir / "metrics.jsonl"
        self.throughput = workdir / "throughput.jsonl"  # per log window
        self.writer = None
        self.bar = None
        if enabled:
            self.writer = ScalarWriter(workdir / "tensorboard")
            self.bar = tqdm.tqdm(
                total=total, initial=start, desc="train", unit="step", dynamic_ncols=True
            )

    def steps(self, first_step: int, per_step: list[dict], extra: dict) -> None:
        if not self.enabled:
            return
        with self.jsonl.open("a") as f:
            for i, m in enumerate(per_step):
                f.write(
                    json.dumps({"step": first_step + i, **{k: float(v) for k, v in m.items()}})
                    + "\n"
                )
        last = first_step + len(per_step) - 1
        with self.throughput.open("a") as f:
            f.write(json.dumps({"step": last, "steps": len(per_step), **extra}) + "\n")
        mean = {k: float(np.mean([m[k] for m in per_step])) for k in per_step[0]}
        for k, v in (mean | extra).items():
            self.writer.scalar(f"train/{k}", v, last)
        self.writer.flush()
        self.bar.update(len(per_step))
        self.bar.set_postfix(
            loss=f"{mean['loss']:.4f}",
            acc=f"{mean['accuracy']:.3f}",
            clips_s=f"{extra['clips_per_s']:.0f}",
            wait=f"{extra['data_wait']:.1%}",
        )

    def eval(self, step: int, result: dict) -> None:
        if not self.enabled:
            return
        for mode, r in (
            ("full", result),
            ("audio_only", result["audio_only"]),
            ("video_only", result["video_only"]),
        ):
            for k in ("top1", "top5", "map"):
                if k in r:
                    self.writer.scalar(f"eval/{mode}/{k}", r[k], step)
        self.writer.flush()
        self.bar.write(
            f"step {step}: eval top1 {result['top1']:.4f} (audio-only "
            f"{result['audio_only']['top1']:.4f}, video-only {result['video_only']['top1']:.4f})"
        )

    def close(self):
        if self.enabled:
            self.bar.close()
            self.writer.close()


def train(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    devices: Sequence[jax.Device] | None = None,
) -> dict:
    """Train (resuming from `workdir` if it holds checkpoints) and evaluate at the end."""
    workdir = pathlib.Path(workdir)
    main_process = jax.process_index() == 0
    config_lib.validate(config)
    summary = pipeline.check_dataset(config)
    check_processes_agree(config, summary)
    mesh, model, tx, rng, abstract, state_sharding = setup_training(config, devices)
    if main_process:
        workdir.mkdir(parents=True, exist_ok=True)
        config_lib.save(config, workdir)
    local_batch = config.batch_size // jax.process_count()
    iterator = iter(pipeline.train_dataset(config, local_batch))
    manager = checkpoint.make_manager(workdir, config)
    start = manager.latest_step()
    if start is not None:
        state = checkpoint.restore(manager, start, abstract, iterator)
        log.info("resumed from step %d in %s", start, workdir)
    else:
        start = 0
        state = jax.jit(lambda r: init_state(model, tx, config, r), out_shardings=state_sharding)(
            rng
        )
    train_step = make_train_step(model, tx, config, mesh, state_sharding)
    batch_sharding = sharding.batch_sharding(mesh)
    params = lambda s: s.ema_params if s.ema_params is not None else s.params
    logger = _Logger(workdir, config.total_steps, start, main_process)
    preemption = _Preemption()
    pending: list = []
    window_start, data_wait, input_fetch = time.perf_counter(), 0.0, 0.0
    result: dict = {}
    try:
        step = start
        while step < config.total_steps:
            t = time.perf_counter()
            batch = pipeline.to_global(next(iterator), batch_sharding)
            fetch = time.perf_counter() - t
            input_fetch += fetch
            # Dispatch is asynchronous, so fetching mostly overlaps steps still running. The
            # device waited for this batch only if it had run out of dispatched steps by the
            # time the batch arrived (`is_ready` does not block): count the whole fetch then,
            # an upper bound on the device's idle time.
            if not pending or pending[-1]["loss"].is_ready():
                data_wait += fetch
            state, metrics = train_step(state, batch)  # asynchronous: no host sync here
            pending.append(metrics)
            step += 1
            last = step == config.total_steps
            stop = preemption.should_stop(step, at_sync_point=step % config.log_every == 0)
            stop = stop or manager.reached_preemption(step)
            if step % config.log_every == 0 or last or stop:  # stop: log every step run
                per_step = jax.device_get(pending)  # the one host sync per log interval
                _check_finite(state)
                elapsed = time.perf_counter() - window_start
                logger.steps(
                    step - len(pending) + 1,
                    per_step,
                    {
                        "clips_per_s": len(pending) * config.batch_size / elapsed,
                        "step_time_s": elapsed / len(pending),
                        "data_wait": data_wait / elapsed,
                        "input_fetch": input_fetch / elapsed,
                    },
                )
                if train_step._cache_size() > 1:
                    log.warning(
                        "train_step compiled %d times: input shapes or shardings changed",
                        train_step._cache_size(),
                    )
                pending, window_start, data_wait, input_fetch = [], time.perf_counter(), 0.0, 0.0
            evaluate_now = last or (config.eval_every and step % config.eval_every == 0)
            if evaluate_now:
                result = evaluate(
                    model,
                    params(state),
                    config,
                    config.data.eval_split,
                    mesh,
                    summary.class_names,
                    workdir if main_process else None,
                    step,
                )
                logger.eval(step, result)
            if evaluate_now or stop or step % config.checkpoint.every_steps == 0:
                _check_finite(state)
                scores = {k: result[k] for k in ("top1", "map")} if evaluate_now else None
                checkpoint.save(manager, step, state, iterator, scores)
            if stop:
                log.warning("preempted: saved a checkpoint at step %d; rerun to resume", step)
                break
        manager.wait_until_finished()
    finally:
        preemption.restore()
        logger.close()
        manager.close()
        iterator.close()  # stops grain's workers and frees the batches they read ahead
    if result and main_process:
        (workdir / f"eval_{config.data.eval_split}.json").write_text(json.dumps(result, indent=1))
    return result
