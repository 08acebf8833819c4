"""The headline figures over seeds: how far one quoted number moves when only the run's
seed (initialisation, data order, augmentation) changes. The data sets are made once,
with the seeds the README's commands use.

  1. `make demo`'s training (configs/demo.py on the demo set): fused, audio-only and
     video-only top-1 on its test split.
  2. The README's pretrain-then-transfer chain on the paired set: pretraining retrieval
     recall@1 (configs/pretrain_av.py:small), the linear probe's top-1
     (configs/linear_probe.py:small) and its control (the same probe of a random encoder).

  python bench/seeds.py [--seeds 0 1 2] [--out bench/results/seeds.json]
  python bench/seeds.py --demo-only --preset wide [--config.KEY=VALUE ...]

--preset and --config.KEY=VALUE change the demo's config: a model choice's cost in
accuracy at the demo's size, against the same seeds without it. --demo-only skips the
chain (2.).
"""

import pathlib
import sys
import tempfile
from collections.abc import Callable

import common
import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from configs import demo, linear_probe, pretrain_av  # noqa: E402
from data_prep import builder, layouts  # noqa: E402
from data_prep.synthetic import make_demo_dataset, make_paired_set  # noqa: E402
from data_prep.worker import PrepSettings  # noqa: E402
from sora_jax.train import trainer  # noqa: E402


def _spread(values: list[float]) -> dict:
    return {
        "values": [round(v, 4) for v in values],
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "mean": round(float(np.mean(values)), 4),
    }


def _pretrain_then_transfer(root: pathlib.Path, seed: int, one: list, add: Callable) -> None:
    """The README's chain on the paired set: pretraining's retrieval, then the linear probe
    of the pretrained encoder and of a random one (the control)."""
    c = pretrain_av.get_config("small")
    c.data.update(dir=str(root / "data"), name="paired_unlabeled")
    c.seed = seed
    r = trainer.train(c, root / f"pretrain_{seed}", one)["retrieval"]
    add("pretrain_v2a_r1", r["v2a_r1"])
    add("pretrain_a2v_r1", r["a2v_r1"])
    for name, init_from in (("probe", root / f"pretrain_{seed}"), ("control", "")):
        c = linear_probe.get_config("small")
        c.data.update(dir=str(root / "data"), name="paired")
        c.model.num_classes, c.seed, c.init_from = 10, seed, str(init_from)
        add(f"{name}_top1", trainer.train(c, root / f"{name}_{seed}", one)["top1"])


def main(argv=None) -> int:
    p = common.parser(__doc__, config=False)  # the demo's config, with any overrides
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--demo-only", action="store_true", help="only the demo's training")
    p.add_argument("--preset", default="", help="a preset of configs/demo.py, e.g. wide")
    args = p.parse_args(argv)
    one = jax.devices()[:1]  # as the README's commands run here
    figures: dict[str, list[float]] = {}
    add = lambda key, value: figures.setdefault(key, []).append(float(value))
    with tempfile.TemporaryDirectory() as scratch:
        root = pathlib.Path(scratch)
        # The data of `make demo` (sora-prep demo, then sora-prep --fps 8 --short-side 40).
        raw = make_demo_dataset(root / "demo_raw", 48, 16, 0)
        builder.prepare(layouts.discover(raw), root / "data", "sora_demo", PrepSettings(8.0, 40))
        if not args.demo_only:  # the paired set of the README's pretraining section
            paired = make_paired_set(root / "paired_raw", 24, 8, 0)
            unlabeled = layouts.discover(paired / "train", "unlabeled", seed=0, test_fraction=0.2)
            settings = PrepSettings(fps=8.0, short_side=128)
            builder.prepare(unlabeled, root / "data", "paired_unlabeled", settings, workers=2)
            builder.prepare(layouts.discover(paired), root / "data", "paired", settings, workers=2)
        for seed in args.seeds:
            c = common.load_config(f"{demo.__file__}:{args.preset}", args.set)
            c.data.update(dir=str(root / "data"), name="sora_demo")
            c.seed = seed
            r = trainer.train(c, root / f"demo_{seed}", one)
            add("demo_top1", r["top1"])
            add("demo_audio_only_top1", r["audio_only"]["top1"])
            add("demo_video_only_top1", r["video_only"]["top1"])
            if not args.demo_only:
                _pretrain_then_transfer(root, seed, one, add)
            print(f"seed {seed}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in figures.items()))
    result = {
        "machine": common.machine(),
        "seeds": args.seeds,
        "demo_preset": args.preset,
        "demo_overrides": args.set,
        **{k: _spread(v) for k, v in figures.items()},
    }
    table = [
        (k, f"{s['min']:.3f}-{s['max']:.3f} (mean {s['mean']:.3f})")
        for k, s in ((k, result[k]) for k in figures)
    ]
    common.emit(result, args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
