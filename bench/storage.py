"""What a bucket costs a run: a checkpoint's save and restore (digests sealed and checked,
as the trainer does), and random reads of prepared clips, in a GCS bucket against the
local disk.

The bucket is fake-gcs-server on 127.0.0.1 (tests/gcs_server.py): the figures measure the
clients' own cost per byte and per request (HTTP, JSON, gcsfs, tensorstore, ArrayRecord's
GCS reader) without a network. A real bucket adds its latency to every request (tens of ms)
and is bounded by the VM's bandwidth, not by this server.

  python bench/storage.py [--configs CONFIG ...] [--reads 200] [--repeats 3]
"""

import pathlib
import sys
import tempfile
import time

import common
import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_prep import builder, layouts  # noqa: E402
from data_prep.synthetic import make_demo_dataset  # noqa: E402
from data_prep.worker import PrepSettings  # noqa: E402
from sora_jax.data import pipeline  # noqa: E402
from sora_jax.train import checkpoint, setup  # noqa: E402
from sora_jax.train.state import init_state  # noqa: E402
from tests import gcs_server  # noqa: E402


def checkpoint_costs(config, where: str, repeats: int) -> dict:
    """Median seconds to save a checkpoint of a fresh train state (and seal it), and to
    find it intact and restore it, over `repeats` checkpoints; the state's bytes."""
    run = setup.build(config, jax.devices()[:1])
    state = jax.jit(
        lambda rng: init_state(run.model, run.tx, run.inputs, config, rng),
        out_shardings=run.state_sharding,
    )(run.rng)
    jax.block_until_ready(state)
    config.checkpoint.keep = repeats
    saves, restores = [], []
    for step in range(1, repeats + 1):
        manager = checkpoint.make_manager(where, config)
        start = time.perf_counter()
        writer = checkpoint.Writer(manager)
        writer.save(step, state)
        writer.seal()  # waits for the write, then records the digests
        saves.append(time.perf_counter() - start)
        manager.close()
        reader = checkpoint.make_manager(where, config)
        start = time.perf_counter()
        intact = checkpoint.intact_step(reader)  # reads every file back for its digest
        jax.block_until_ready(checkpoint.restore(reader, intact, run.abstract_state))
        restores.append(time.perf_counter() - start)
        reader.close()
    size = sum(x.nbytes for x in jax.tree.leaves(state) if hasattr(x, "nbytes"))
    return {
        "state_mb": size / 2**20,
        "save_s": float(np.median(saves)),
        "restore_s": float(np.median(restores)),
        "repeats": repeats,
    }


def read_costs(data_dir: str, name: str, reads: int) -> dict:
    """Random reads of single clips (what a training step's shuffled batch does)."""
    config = common.load_config("configs/demo.py", [f"data.dir={data_dir}", f"data.name={name}"])
    source = pipeline.data_source(config, "train")
    order = np.random.default_rng(0).integers(0, len(source), reads)
    source[int(order[0])]  # opens the shards
    start = time.perf_counter()
    size = 0
    for i in order:
        example = source[int(i)]
        size += sum(len(f) for f in example["frames"]) + example["audio"].nbytes
    elapsed = time.perf_counter() - start
    return {"clips_per_s": reads / elapsed, "mb_per_s": size / 2**20 / elapsed, "reads": reads}


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument(
        "--configs",
        nargs="+",
        default=["configs/demo.py", "configs/small.py", "configs/bench_reference.py"],
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--reads", type=int, default=200)
    args = p.parse_args(argv)
    result = {"machine": common.machine(), "server": "fake-gcs-server on 127.0.0.1"}
    table = []
    with tempfile.TemporaryDirectory() as scratch, gcs_server.running(pathlib.Path(scratch, "gcs")):
        bucket = f"gs://{gcs_server.BUCKET}"
        for path in args.configs:
            config = common.load_config(path, args.set)
            name = pathlib.Path(path).stem
            costs = {
                "local": checkpoint_costs(config, f"{scratch}/runs/{name}", args.repeats),
                "bucket": checkpoint_costs(config, f"{bucket}/runs/{name}", args.repeats),
            }
            result[f"checkpoint_{name}"] = costs
            for where, c in costs.items():
                table.append(
                    (
                        f"{name} checkpoint, {where}",
                        f"{c['state_mb']:.1f} MB: save {c['save_s']:.2f} s, "
                        f"restore {c['restore_s']:.2f} s",
                    )
                )
        raw = make_demo_dataset(f"{scratch}/raw", train_per_class=24, test_per_class=2, seed=0)
        entries, settings = layouts.discover(raw), PrepSettings(fps=8.0, short_side=40)
        reads = {}
        for where, data_dir in (("local", f"{scratch}/data"), ("bucket", f"{bucket}/data")):
            builder.prepare(entries, data_dir, "bench_storage", settings)
            reads[where] = read_costs(data_dir, "bench_storage", args.reads)
            table.append(
                (
                    f"random clip reads, {where}",
                    f"{reads[where]['clips_per_s']:.0f} clips/s "
                    f"({reads[where]['mb_per_s']:.1f} MB/s)",
                )
            )
        result["data_reads"] = reads
    common.emit(result, args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
