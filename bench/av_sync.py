"""Does the av_sync objective learn *when* a sound happens? The timing set (flashes and
clicks at random moments, the same in every clip: `sora-prep demo OUT --set timing`) is
pretrained on twice with configs/av_sync.py:small, with and without the av_sync objective
(the control: contrastive alone), and each run's av_sync evaluator scores held-out windows:
the true soundtrack against the same soundtrack shifted by 0.5-1.5 s. Chance is 0.5.

  python bench/av_sync.py [--seeds 0] [--out bench/results/av_sync.json]
"""

import pathlib
import sys
import tempfile

import common
import jax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import av_sync  # noqa: E402
from data_prep import builder, layouts  # noqa: E402
from data_prep.synthetic import make_timing_set  # noqa: E402
from data_prep.worker import PrepSettings  # noqa: E402
from sora_jax.train import trainer  # noqa: E402


def prepare_timing_set(root: pathlib.Path, train: int = 192, test: int = 48) -> pathlib.Path:
    """The README's commands: the timing demo videos, prepared unlabeled at 8 fps."""
    raw = make_timing_set(root / "timing_raw", train, test, seed=0)
    clips = layouts.discover(raw, "unlabeled", seed=0, test_fraction=0.2)
    builder.prepare(clips, root / "data", "timing", PrepSettings(fps=8.0, short_side=48))
    return root / "data"


def sync_run(data_dir: pathlib.Path, workdir: pathlib.Path, weight: float, seed: int, **over):
    """One configs/av_sync.py:small run with objectives.av_sync.weight = `weight`: its final
    evaluation."""
    c = av_sync.get_config("small")
    c.data.dir, c.seed = str(data_dir), seed
    c.objectives.av_sync.weight = weight
    c.update_from_flattened_dict(over)
    return trainer.train(c, workdir, jax.devices()[:1])


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        root = pathlib.Path(scratch)
        data = prepare_timing_set(root)
        for seed in args.seeds:
            for name, weight in (("contrastive_only", 0.0), ("contrastive_and_av_sync", 1.0)):
                result = sync_run(data, root / f"{name}_{seed}", weight, seed)
                sync, retrieval = result["evals"]["sync"], result["retrieval"]
                runs.append(
                    {
                        "run": name,
                        "seed": seed,
                        "sync_accuracy": round(sync["accuracy"], 4),
                        "sync_margin": round(sync["margin"], 4),
                        "windows": sync["num_windows"],
                        "retrieval_v2a_r1": retrieval.get("v2a_r1"),
                        "chance_r1": retrieval.get("chance_r1"),
                    }
                )
                print(runs[-1])
    result = {"machine": common.machine(), "config": "configs/av_sync.py:small", "runs": runs}
    table = [
        (f"{r['run']} seed {r['seed']}", f"sync accuracy {r['sync_accuracy']:.3f}") for r in runs
    ]
    common.emit(result, args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
