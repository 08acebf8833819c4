"""The training loop, top to bottom: config -> mesh -> state -> steps -> checkpoints.

The step itself (step.py) is a pure jitted function, compiled once; this file
does the host-side work: reading data, logging every `log_every` steps (the only host
syncs), checkpointing, evaluating, profiling, and stopping cleanly on SIGTERM or on a
non-finite loss. `train()` reads as: set up, restore or initialise, then steps, each
followed by the log window's bookkeeping and, when due, evaluation and a checkpoint.
"""

import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import tqdm
from etils import epath
from jax.experimental import multihost_utils

from sora_jax import config as config_lib
from sora_jax import evaluators, storage
from sora_jax.data import pipeline
from sora_jax.train import checkpoint, evaluate, fit, ownership, transfer
from sora_jax.train import setup as setup_lib
from sora_jax.train.state import NONFINITE_NAMES, TrainState, init_state
from sora_jax.train.step import abstract_batch, make_train_step
from sora_jax.train.tensorboard import ScalarWriter
from sora_jax.workdir import Workdir

log = logging.getLogger("sora_jax")


class NonFiniteError(RuntimeError):
    """The loss or gradient became NaN/inf; no checkpoint of that state was written."""


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint and exits. With several
    processes, all must stop at the same step (a checkpoint is collective), so the flag
    is shared at log steps, which are host syncs anyway. So is a lost lease on a bucket
    work dir (process 0's): then every process stops without saving anything, since
    another run owns the work dir now."""

    def __init__(self, lock: ownership.Lock):
        self.requested = False
        self._lock = lock
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def should_stop(self, step: int, at_sync_point: bool) -> bool:
        if jax.process_count() == 1:
            flags = np.array([[self.requested, self._lock.lost]])
        elif at_sync_point:
            flags = multihost_utils.process_allgather(
                np.array([self.requested, self._lock.lost], np.int32)
            ).reshape(-1, 2)
        else:
            return False
        if flags[:, 1].any():
            raise ownership.WorkdirBusyError(
                f"{self._lock.path} was taken over by another run at step {step}: stopped "
                "without saving (the lease could not be renewed in time)"
            )
        return bool(flags[:, 0].any())

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def _check_finite(state, manager: ocp.CheckpointManager) -> None:
    """Stop, saying what is known, once the step recorded a NaN or inf (state.py rolled
    that step back, so nothing non-finite is ever saved)."""
    bad_step = int(jax.device_get(state.nonfinite_step))
    if bad_step >= 0:
        what = NONFINITE_NAMES[int(jax.device_get(state.nonfinite_what))]
        saved = manager.latest_step()
        kept = (
            f"the last checkpoint, step {saved}, is from before it: rerun to resume there"
            if saved is not None
            else "no checkpoint was written before it"
        )
        raise NonFiniteError(
            f"the {what} became NaN or inf at step {bad_step + 1}; stopped without saving "
            f"that state ({kept}). If it recurs at the same step, a batch is the likely cause "
            "(look at its clips); if it moves with the learning rate, lower "
            "config.optimizer.learning_rate or set config.optimizer.grad_clip."
        )


class _JsonLines:
    """A log of one JSON object per line, each with its "step". A resumed run runs again
    the steps after its checkpoint: their lines from before (and a line cut short by a
    kill) go, so each step is logged once. Lines are appended to a local file. A bucket
    object cannot be appended to: there the lines are kept in memory (about 10 MB for a
    million steps) and the object rewritten whole at most every UPLOAD_S seconds, before
    every checkpoint (so it holds every step a resume keeps) and at the end, not at
    every log step (which made a long run's uploads grow with the square of its steps)."""

    UPLOAD_S = 60.0

    def __init__(self, path: epath.Path, start: int):
        self.path, self.remote = path, storage.is_remote(path)
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        kept = [line for line in lines if _step_of(line) <= start]
        if len(kept) < len(lines):
            storage.write_atomic(path, "".join(kept))
        self.lines = kept if self.remote else []  # a local file is appended to instead
        self._uploaded, self._pending = time.monotonic(), False

    def append(self, records: list[dict]) -> None:
        new = [json.dumps(r) + "\n" for r in records]
        if not self.remote:
            with self.path.open("a") as f:
                f.writelines(new)
            return
        self.lines += new
        self._pending = True
        if time.monotonic() - self._uploaded >= self.UPLOAD_S:
            self.flush()

    def flush(self) -> None:
        """The bucket's object brought up to date (nothing to do for a local file)."""
        if self.remote and self._pending:
            self.path.write_text("".join(self.lines))
            self._uploaded, self._pending = time.monotonic(), False


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")  # cut short by a kill: dropped


class _Logger:
    """TensorBoard scalars, metrics.jsonl (every step's loss and metrics; and a row of
    NAME/METRIC at each run of config.evals' evaluators) and the progress bar."""

    def __init__(self, workdir: Workdir, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if enabled:
            self.jsonl = _JsonLines(workdir.metrics, start)
            self.throughput = _JsonLines(workdir.throughput, start)  # per log window
            self.writer = ScalarWriter(workdir.tensorboard)
            self.bar = tqdm.tqdm(
                total=total, initial=start, desc="train", unit="step", dynamic_ncols=True
            )

    def steps(self, first_step: int, per_step: list[dict], extra: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.append(
            [
                {"step": first_step + i, **{k: float(v) for k, v in m.items()}}
                for i, m in enumerate(per_step)
            ]
        )
        last = first_step + len(per_step) - 1
        self.throughput.append([{"step": last, "steps": len(per_step), **extra}])
        mean = {k: float(np.mean([m[k] for m in per_step])) for k in per_step[0]}
        for k, v in (mean | extra).items():
            self.writer.scalar(f"train/{k}", v, last)
        self.writer.flush()
        self.bar.update(len(per_step))
        shown = {"loss": f"{mean['loss']:.4f}"}
        for key, name in (("accuracy", "acc"), ("match_accuracy", "match")):
            if key in mean:
                shown[name] = f"{mean[key]:.3f}"
        self.bar.set_postfix(
            **shown, clips_s=f"{extra['clips_per_s']:.0f}", wait=f"{extra['data_wait']:.1%}"
        )

    def eval(self, step: int, result: dict) -> None:
        if not self.enabled:
            return
        scalars = {}
        if "top1" in result:
            for mode, r in (
                ("full", result),
                ("audio_only", result["audio_only"]),
                ("video_only", result["video_only"]),
            ):
                scalars |= {f"eval/{mode}/{k}": r[k] for k in ("top1", "top5", "map") if k in r}
        for group in ("retrieval", "knn"):
            scalars |= {
                f"eval/{group}/{k}": v
                for k, v in result.get(group, {}).items()
                if k.endswith(("_r1", "_r5", "_r10", "_rank", "top1"))
            }
        evaluated = evaluators.flatten(result.get("evals", {}))
        if evaluated:  # a row of its own, beside the steps' rows (which have "loss")
            self.jsonl.append([{"step": step, **evaluated}])
        scalars |= {f"eval/{k}": v for k, v in evaluated.items()}
        for tag, value in scalars.items():
            self.writer.scalar(tag, value, step)
        self.writer.flush()
        self.bar.write(f"step {step}: eval {evaluate.headline(result)}")

    def flush(self) -> None:
        """Every log line so far is in the work dir (before a checkpoint: a resume from it
        must find every step up to it logged)."""
        if self.enabled:
            self.jsonl.flush()
            self.throughput.flush()

    def close(self):
        if self.enabled:
            self.flush()
            self.bar.close()
            self.writer.close()


class _LogWindow:
    """The steps since the last log: their metrics (still on the devices) and where the
    host's time went."""

    def __init__(self):
        self.pending: list[dict] = []
        self.start, self.data_wait, self.input_fetch = time.perf_counter(), 0.0, 0.0

    def fetched(self, seconds: float) -> None:
        """A batch took `seconds` to arrive. Dispatch is asynchronous, so fetching mostly
        overlaps steps still running; the device waited for this batch only if it had
        run out of dispatched steps by the time the batch arrived (`is_ready` does not
        block): count the whole fetch then, an upper bound on the device's idle time."""
        self.input_fetch += seconds
        if not self.pending or self.pending[-1]["loss"].is_ready():
            self.data_wait += seconds

    def summary(self, batch_size: int) -> tuple[list[dict], dict]:
        """(every step's metrics, the window's throughput): the one host sync a window."""
        per_step = jax.device_get(self.pending)
        elapsed = time.perf_counter() - self.start
        return per_step, {
            "clips_per_s": len(per_step) * batch_size / elapsed,
            "step_time_s": elapsed / len(per_step),
            "data_wait": self.data_wait / elapsed,
            "input_fetch": self.input_fetch / elapsed,
        }


class _Profile:
    """A trace of steps `first`..`last` (config.profile_steps) in the TensorBoard dir,
    which TensorBoard's profile tab opens; on process 0 only. For a bucket it is written
    locally and uploaded when it ends (the profiler writes through TensorFlow's file
    system, which this project does not use for buckets)."""

    def __init__(self, steps: Sequence[int], logdir: epath.Path, enabled: bool):
        self.first, self.last = tuple(steps) if steps and enabled else (0, -1)
        self.logdir, self.active = logdir, False
        self._local: tempfile.TemporaryDirectory | None = None

    def before_step(self, step: int) -> None:  # `step` is about to run (1-based)
        if step == self.first:
            if storage.is_remote(self.logdir):
                self._local = tempfile.TemporaryDirectory(prefix="sora_trace_")
            jax.profiler.start_trace(self._local.name if self._local else os.fspath(self.logdir))
            self.active = True

    def after_step(self, step: int, metrics: dict) -> None:
        if self.active and step >= self.last:
            jax.block_until_ready(metrics)  # the trace ends when the traced steps have run
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
            if self._local is not None:
                storage.copy_tree(epath.Path(self._local.name), self.logdir)
                self._local.cleanup()


def _saved_step(config: ml_collections.ConfigDict, workdir: Workdir) -> int | None:
    """The step of the work dir's latest checkpoint; None for a run that starts fresh."""
    if not workdir.has_checkpoints():
        return None
    return checkpoint.make_manager(workdir, config, read_only=True).latest_step()


def _check_not_past_the_end(
    config: ml_collections.ConfigDict, workdir: Workdir, saved: int | None
) -> None:
    """A work dir whose checkpoints are past total_steps would train nothing."""
    config_lib.check(
        saved is None or saved <= config.total_steps,
        "total_steps",
        f"{config.total_steps} is below step {saved} of the checkpoints in {workdir}: "
        "raise it to train on from there, or start a new --workdir",
    )


def _compile_train_step(
    run: setup_lib.Setup, config: ml_collections.ConfigDict
) -> jax.stages.Compiled:
    """The train step compiled for the run's devices before anything is allocated, and
    checked against their memory (fit.py). The loop runs this executable: it is compiled
    once, and a batch of another shape or layout is an error, never a silent recompile."""
    jitted = make_train_step(run.model, run.tx, config, run.mesh, run.state_sharding)
    batch = abstract_batch(config, run.inputs, config.batch_size, run.batch_sharding)
    devices = list(run.mesh.devices.flat)
    options = fit.compiler_options(devices, config.cpu_fast_compile)
    compiled, report = fit.compile_step(jitted, run.abstract_state, batch, options=options)
    fit.check_fits("train step", report, devices, config, *fit.TRAIN_KEYS)
    log.info(
        "train step compiled in %.1f s; %.3f GiB per device",
        report.compile_s,
        report.total_bytes / fit.GiB,
    )
    return compiled


def _checked_init_source(
    run: setup_lib.Setup, config: ml_collections.ConfigDict, resumes: bool
) -> tuple[dict, str] | None:
    """A fresh run's config.init_from, read and held against its model's shapes before
    anything compiles (a wrong source fails in seconds, not after the compile)."""
    if not config.init_from or resumes:
        return None  # a resumed run does not read init_from
    return transfer.check(run.abstract_state.params, config)


def _restore_or_init(
    run: setup_lib.Setup,
    config: ml_collections.ConfigDict,
    manager: ocp.CheckpointManager,
    batches: pipeline.DevicePrefetch,
    init_source: tuple[dict, str] | None,
    workdir: Workdir,
) -> tuple[TrainState, int]:
    """The newest intact checkpoint's state, with the data reader moved to where it was
    (corrupt newer ones are set aside); or a fresh state at step 0 (with
    config.init_parts loaded from config.init_from: `init_source` if read already)."""
    start = checkpoint.intact_step(manager)
    checkpoint.set_aside_newer_than(manager, start, workdir)
    if start is not None:
        state = checkpoint.restore(manager, start, run.abstract_state, batches)
        log.info("resumed from step %d in %s", start, workdir)
        return state, start
    init = jax.jit(
        lambda rng: init_state(run.model, run.tx, run.inputs, config, rng),
        out_shardings=run.state_sharding,
    ).lower(run.rng)
    # The initialiser runs once: on the CPU it is compiled for speed of compiling
    # (fit.CPU_FAST_COMPILE; 2.5 s instead of 9-13 s on 2 cores with LLVM's optimisations
    # alone: it is mostly random-number fusions), giving the same parameters up to float
    # rounding.
    fast = fit.compiler_options(list(run.mesh.devices.flat), fast=True)
    state = init.compile(compiler_options=fast)(run.rng)
    if config.init_from:
        state = transfer.initialise_from(state, config, init_source)
    return state, 0


def _inference_params(state: TrainState):
    return state.ema_params if state.ema_params is not None else state.params


def train(
    config: ml_collections.ConfigDict,
    workdir: "str | os.PathLike[str]",
    devices: Sequence[jax.Device] | None = None,
    allow_config_change: bool = False,
    lease_s: float = ownership.LEASE_S,
) -> dict:
    """Train (resuming from `workdir`, a local path or a gs:// URL, if it holds
    checkpoints) and evaluate at the end. The work dir is this run's alone while it trains
    (ownership.py; `lease_s`: a bucket lease's life); resuming with another config than the
    run's is refused unless `allow_config_change`."""
    workdir = Workdir(workdir)
    setup_lib.check_config(config)
    if config.optimizer.warmup_steps > config.total_steps:  # valid (a smoke test), but say so
        log.warning(
            "config.optimizer.warmup_steps=%d is beyond total_steps=%d: the learning rate "
            "never reaches config.optimizer.learning_rate",
            config.optimizer.warmup_steps,
            config.total_steps,
        )
    summary = pipeline.check_dataset(config)
    setup_lib.check_processes_agree(config, summary)
    lock = ownership.Lock(workdir, lease_s)
    try:
        if not allow_config_change:
            ownership.check_config_unchanged(config, workdir)
        saved = _saved_step(config, workdir)
        if saved is not None:
            setup_lib.check_same_dataset(workdir, summary, config)
        _check_not_past_the_end(config, workdir, saved)
        return _train(config, workdir, devices, summary, lock, resumes=saved is not None)
    finally:
        lock.release()


def _train(
    config: ml_collections.ConfigDict,
    workdir: Workdir,
    devices: Sequence[jax.Device] | None,
    summary: pipeline.DatasetSummary,
    lock: ownership.Lock,
    resumes: bool,
) -> dict:
    main_process = jax.process_index() == 0
    run = setup_lib.build(config, devices)
    init_source = _checked_init_source(run, config, resumes)
    train_step = _compile_train_step(run, config)  # fails here if it cannot fit
    eval_step = evaluate.compile_eval_step(run, config)  # or here
    manager = checkpoint.make_manager(workdir, config)
    writer = checkpoint.Writer(manager)
    if main_process:
        if not workdir.remote:  # a bucket has no folders to make
            workdir.root.mkdir(parents=True, exist_ok=True)
        config_lib.save(config, workdir)
        if not resumes:
            setup_lib.record_dataset(workdir, summary)
    local_batch = config.batch_size // jax.process_count()
    batches = pipeline.DevicePrefetch(
        iter(pipeline.train_dataset(config, local_batch)), run.batch_sharding
    )
    state, step = _restore_or_init(run, config, manager, batches, init_source, workdir)
    evaluator: evaluate.Evaluator | None = None  # made at the first evaluation, kept for the rest
    plugins: dict = {}  # config.evals, likewise
    plugin_schedule = evaluators.schedule(config)
    logger = _Logger(workdir, config.total_steps, step, main_process)
    profile = _Profile(config.profile_steps, workdir.tensorboard, main_process)
    preemption = _Preemption(lock)
    window = _LogWindow()
    result: dict = {}
    try:
        while step < config.total_steps:
            t = time.perf_counter()
            batch = next(batches)
            window.fetched(time.perf_counter() - t)
            profile.before_step(step + 1)
            state, metrics = train_step(state, batch)  # asynchronous: no host sync here
            window.pending.append(metrics)
            step += 1
            profile.after_step(step, metrics)
            last = step == config.total_steps
            stop = preemption.should_stop(step, at_sync_point=step % config.log_every == 0)
            stop = stop or manager.reached_preemption(step)
            if step % config.log_every == 0 or last or stop:  # stop: log every step run
                _check_finite(state, manager)
                logger.steps(step - len(window.pending) + 1, *window.summary(config.batch_size))
                window = _LogWindow()
            evaluate_now = last or bool(config.eval_every and step % config.eval_every == 0)
            plugins_due = evaluators.due(plugin_schedule, step, evaluate_now)
            if last:  # the trained state is safe before the final evaluation can fail
                _check_finite(state, manager)
                logger.flush()
                writer.save(step, state, batches)
            if evaluate_now:
                if evaluator is None:
                    evaluator = evaluate.Evaluator(
                        run, config, config.data.eval_split, summary.class_names, eval_step
                    )
                result = evaluator(
                    _inference_params(state), workdir if main_process else None, step
                )
            if plugins_due:
                if not plugins:
                    context = evaluate.plugin_context(run, config, summary.class_names)
                    plugins = evaluators.build(config, context)
                ran = evaluate.run_evaluators(plugins, plugins_due, _inference_params(state))
                if not evaluate_now:
                    result = {"step": step}
                result["evals"] = ran
            if evaluate_now or plugins_due:
                logger.eval(step, result)
            due = evaluate_now or stop or step % config.checkpoint.every_steps == 0
            if due and not last:
                _check_finite(state, manager)
                scores = None
                if evaluate_now:
                    scores = evaluate.scores(result)
                logger.flush()
                writer.save(step, state, batches, scores)
            if stop:
                log.warning("preempted: saved a checkpoint at step %d; rerun to resume", step)
                break
    finally:
        writer.seal()  # even on the way out of a crash: nothing saved goes unsealed
        profile.stop()
        preemption.restore()
        logger.close()
        manager.close()
        batches.close()  # stops grain's workers and frees the batches they read ahead
        if evaluator is not None:
            evaluator.close()
        for plugin in plugins.values():
            plugin.close()
    if result and main_process:
        storage.write_atomic(
            workdir.eval_result(config.data.eval_split), json.dumps(result, indent=1)
        )
    return result
