"""The training and evaluation commands.

  sora-train --config configs/demo.py --workdir DIR [--config.KEY=VALUE ...]
  sora-eval --workdir DIR [--split test] [--checkpoint STEP]

sora-train: every key of the config file can be overridden on the command line (e.g.
--config.model.fusion.kind=attention --config.total_steps=1000); unknown keys and wrong
types fail before anything compiles. A config file may take a preset after a colon
(`configs/demo.py:runlocal`). Rerunning with the same --workdir resumes from its latest
checkpoint (the newest intact one: see train/checkpoint.py), with the same config: a
changed one is refused unless --allow_config_change is given. One sora-train at a time
may use a work dir.

sora-eval: full, audio-only and video-only scores of a work dir's checkpoint; prints a
summary, writes DIR/eval_<split>.json and confusion-matrix PNGs, and prints one JSON
object on the last line of stdout.
"""

import argparse
import difflib
import importlib.util
import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from sora_jax import process
from sora_jax.workdir import checkpoint_choice

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (optionally FILE:PRESET).", lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints and logs: a local path or gs://BUCKET/PATH."
)
_LEASE = flags.DEFINE_float(
    "lease_seconds",
    60.0,
    "A gs:// work dir: how long a killed owner on another host keeps the work dir from the "
    "next run (its owner renews the lease every third of this).",
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a work dir's run with a config that differs from the one it was started with.",
)


def _quiet_logs() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU here" notes


def _train(argv) -> None:
    del argv
    import jax

    from sora_jax.config import ConfigError
    from sora_jax.data.pipeline import CorruptDataError
    from sora_jax.storage import StorageError
    from sora_jax.train import checkpoint, evaluate, ownership, setup, trainer

    _quiet_logs()
    config = _CONFIG.value
    setup.maybe_initialize_distributed(config)
    try:
        result = trainer.train(
            config,
            _WORKDIR.value,
            allow_config_change=_ALLOW_CONFIG_CHANGE.value,
            lease_s=_LEASE.value,
        )
    except (
        ConfigError,
        StorageError,
        FileNotFoundError,
        trainer.NonFiniteError,
        ownership.WorkdirBusyError,
        checkpoint.CorruptCheckpointError,
        checkpoint.OutOfSpaceError,
        CorruptDataError,
    ) as e:
        print(f"sora-train: {e}", file=sys.stderr)
        sys.exit(2)
    if result and jax.process_index() == 0:
        print(f"final eval {evaluate.headline(result)}")


def _config_arg(argv: list[str]) -> str:
    """--config's value (FILE or FILE:PRESET), or ""."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        given.append(argv[argv.index("--config") + 1])
    return given[0] if given else ""


def _unknown_key(argv: list[str]) -> str:
    """For an override naming no key of the config: which key, where, and the nearest
    keys there. (ml_collections raises a bare KeyError, and absl shows its traceback.)"""
    path, _, preset = _config_arg(argv).partition(":")
    spec = importlib.util.spec_from_file_location("_sora_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset or None)
    for arg in argv:
        if not arg.startswith("--config.") or "=" not in arg:
            continue
        group, walked = config, "config"
        for part in arg[2:].split("=", 1)[0].split(".")[1:]:
            if not hasattr(group, "keys"):
                return f"{arg.split('=')[0]}: {walked} is a value, not a group of keys"
            if part not in group:
                nearest = difflib.get_close_matches(part, list(group.keys()), n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(nearest)}?" if nearest else ""
                return f"{arg.split('=')[0]}: {walked} has no key {part!r}{hint}"
            group, walked = group[part], f"{walked}.{part}"
    return ""


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a user's mistakes as one line and exit code 2."""
    config_file = _config_arg(argv[1:]).partition(":")[0]
    if config_file and not os.path.isfile(config_file):
        # (ml_collections defers this error until the config is first read, as a traceback)
        print(f"sora-train: --config {config_file}: no such file", file=sys.stderr)
        sys.exit(2)
    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:
        print(f"sora-train: {_unknown_key(argv[1:]) or e}", file=sys.stderr)
    except flags.Error as e:
        print(f"sora-train: {e}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    """sora-train."""
    process.configure()
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(_train, flags_parser=_parse_flags)


def eval_main(argv: list[str] | None = None) -> int:
    """sora-eval."""
    process.configure()
    parser = argparse.ArgumentParser(
        prog="sora-eval",
        description="Evaluate a sora-train work dir: full, audio-only and video-only "
        "scores; the last line of stdout is one JSON object.",
    )
    parser.add_argument("--workdir", required=True, help="a sora-train work dir")
    parser.add_argument("--split", default=None, help="default: the config's data.eval_split")
    parser.add_argument(
        "--checkpoint",
        type=checkpoint_choice,
        default=None,
        help="a step, best (by the run's checkpoint.best_metric) or latest (the default)",
    )
    parser.add_argument("--data-dir", default=None, help="override config.data.dir")
    args = parser.parse_args(argv)

    import jax

    from sora_jax import config as config_lib
    from sora_jax import evaluators, storage
    from sora_jax.train import checkpoint, evaluate, setup
    from sora_jax.workdir import Workdir

    _quiet_logs()
    try:
        workdir = Workdir(args.workdir)
        config = config_lib.load(workdir)
        if args.data_dir:
            config.data.dir = args.data_dir
        setup.maybe_initialize_distributed(config)
        split = args.split or config.data.eval_split
        config.data.eval_split = split  # checked with the dataset: a split it has
        restored = setup.load_for_inference(config, workdir, args.checkpoint)
        class_names = restored.dataset.class_names
        evaluator = evaluate.Evaluator(restored.setup, config, split, class_names)
        # The run's own evaluators (config.evals), each on its own split.
        plugins = evaluators.build(
            config, evaluate.plugin_context(restored.setup, config, class_names)
        )
    except (
        config_lib.ConfigError,
        storage.StorageError,
        FileNotFoundError,
        checkpoint.CorruptCheckpointError,
    ) as e:
        print(f"sora-eval: {e}", file=sys.stderr)
        return 2
    from sora_jax.data.pipeline import CorruptDataError

    try:
        result = evaluator(restored.params, workdir, restored.step)
        if plugins:
            result["evals"] = evaluate.run_evaluators(plugins, list(plugins), restored.params)
    except CorruptDataError as e:
        print(f"sora-eval: {e}", file=sys.stderr)
        return 2
    finally:
        evaluator.close()
        for plugin in plugins.values():
            plugin.close()
    if jax.process_index() == 0:
        path = workdir.eval_result(split)
        storage.write_atomic(path, json.dumps(result, indent=1))
        brief = {"split": split, "step": restored.step, "details": str(path)}
        if "top1" in result:
            for mode in evaluate.MODES:
                r = result if mode == "full" else result[mode]
                if "top1" not in r:
                    print(f"{mode:<11} no clip of the split has this sense", file=sys.stderr)
                    continue
                print(
                    f"{mode:<11} top1 {r['top1']:.4f}  "
                    + (f"top5 {r['top5']:.4f}  " if "top5" in r else "")
                    + f"mAP {r['map']:.4f}  ({r['num_examples']} clips)",
                    file=sys.stderr,
                )
            brief |= evaluate.brief(result) | {
                "audio_only": evaluate.brief(result["audio_only"]),
                "video_only": evaluate.brief(result["video_only"]),
            }
        for key in ("retrieval", "knn"):
            if key in result:
                brief[key] = result[key]
        brief |= result.get("evals", {})  # each evaluator's metrics under its name
        if "retrieval" in result or "evals" in result:
            print(evaluate.headline(result), file=sys.stderr)
        print(json.dumps(brief))
    return 0


if __name__ == "__main__":
    main()
