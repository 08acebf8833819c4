"""sora-train --config configs/demo.py --workdir DIR [--config.KEY=VALUE ...]

Every key of the config file can be overridden on the command line (e.g.
--config.model.fusion.kind=attention --config.total_steps=1000); unknown keys and wrong
types fail before anything compiles. Rerunning with the same --workdir resumes from its
latest checkpoint.
"""

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")


def _main(argv) -> None:
    del argv
    import jax

    from sora_jax.config import ConfigError
    from sora_jax.train import trainer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "no TPU here" notes
    config = _CONFIG.value
    trainer.maybe_initialize_distributed(config)
    try:
        result = trainer.train(config, _WORKDIR.value)
    except (ConfigError, FileNotFoundError, trainer.NonFiniteError) as e:
        print(f"sora-train: {e}", file=sys.stderr)
        sys.exit(2)
    if result and jax.process_index() == 0:
        print(
            f"final eval top1 {result['top1']:.4f} (audio-only "
            f"{result['audio_only']['top1']:.4f}, video-only {result['video_only']['top1']:.4f})"
        )


def main() -> None:
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(_main)


if __name__ == "__main__":
    main()
