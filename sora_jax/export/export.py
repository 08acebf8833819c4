"""sora-export --workdir DIR --output OUT [--checkpoint STEP]

Writes, for teams that will never import sora_jax:
  OUT/params/          parameters only (no optimizer state), a plain orbax checkpoint
  OUT/model.jax        jax.export of (params, inputs) -> logits, embedding and each sense's
                       embedding alone (video_embedding, audio_embedding), int16 audio
  OUT/model_float.jax  the same with float32 audio in [-1, 1]
  OUT/model_card.json  config, classes, input spec, data, metrics, code version
  OUT/model_card.md    the same, for people
Both artifacts take any batch size (a symbolic batch dimension) and carry code for the
CPU and for the platforms in config.export.platforms.
"""

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

import sora_jax
from sora_jax import config as config_lib
from sora_jax import process
from sora_jax.data.pipeline import DatasetSummary
from sora_jax.inputs import MODEL_INPUTS, InputSpec
from sora_jax.train import setup

if TYPE_CHECKING:  # annotations only
    from sora_jax.models import SoraModel

ARTIFACTS = {"model.jax": jnp.int16, "model_float.jax": jnp.float32}
# Each sense's embedding comes from the same pass of the towers as the fused one.
EXPORTED_OUTPUTS = ("logits", "embedding", "video_embedding", "audio_embedding")


def input_specs(
    config: ml_collections.ConfigDict, audio_dtype: jnp.dtype, batch: int | str = "b"
) -> dict[str, jax.ShapeDtypeStruct]:
    """The exported inputs, with a symbolic batch dimension."""
    (b,) = jax.export.symbolic_shape(batch)
    shapes = InputSpec.from_config(config).shapes(b, audio_dtype)
    return {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in shapes.items()}


def export_inference(
    model: "SoraModel",
    params: dict,
    config: ml_collections.ConfigDict,
    audio_dtype: jnp.dtype,
    platforms: Sequence[str],
) -> jax.export.Exported:
    def infer(params, inputs):
        out = model.apply({"params": params}, inputs, modality_embeddings=True)
        return {k: out[k] for k in EXPORTED_OUTPUTS}

    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    specs = input_specs(config, audio_dtype)
    return jax.export.export(jax.jit(infer), platforms=platforms)(abstract_params, specs)


def code_version() -> dict:
    """Package version, git commit if any, and a hash of the library's source files."""
    root = pathlib.Path(sora_jax.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "sora_jax": sora_jax.__version__,
        "git_commit": commit,
        "source_sha256": digest.hexdigest(),
        "jax": jax.__version__,
    }


def model_card(
    config: ml_collections.ConfigDict,
    summary: DatasetSummary,
    step: int,
    workdir: pathlib.Path,
    platforms: Sequence[str],
) -> dict:
    d = config.data
    metrics = None
    eval_file = workdir / f"eval_{d.eval_split}.json"
    if eval_file.exists():
        full = json.loads(eval_file.read_text())
        brief = lambda r: {k: r[k] for k in ("top1", "top5", "map", "num_examples") if k in r}
        metrics = {"split": d.eval_split, "step": full.get("step")}
        if "top1" in full:  # classification (runs with a supervised loss)
            metrics |= {
                "full": brief(full),
                "audio_only": brief(full["audio_only"]),
                "video_only": brief(full["video_only"]),
            }
        for key in ("retrieval", "knn"):  # representation (runs with a contrastive loss)
            if key in full:
                metrics[key] = full[key]
    return {
        "name": f"{d.name}-sora",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "checkpoint_step": step,
        "class_names": list(summary.class_names),
        "multi_label": bool(config.model.multi_label),
        "inputs": {
            "order": list(MODEL_INPUTS),
            "frames": {
                "shape": ["batch", d.num_frames, d.crop_size, d.crop_size, 3],
                "dtype": "uint8",
                "fps": d.fps,
                "frame_stride": d.frame_stride,
                "short_side_resize": summary.short_side,
                "jpeg_quality": summary.jpeg_quality,
                "note": "RGB pixels 0-255; normalisation happens inside the model",
            },
            "audio": {
                "samples": config_lib.audio_samples(config),
                "sample_rate": 16_000,
                "channels": 1,
                "dtype": {"model.jax": "int16", "model_float.jax": "float32 in [-1, 1]"},
            },
            "clip_seconds": d.num_frames * d.frame_stride / d.fps,
            "views": {"temporal": d.eval_temporal_views, "spatial": d.eval_spatial_views},
        },
        "outputs": {
            "logits": ["batch", config.model.num_classes],
            "embedding": ["batch", config.model.embed_dim],
            "video_embedding": ["batch", config.model.embed_dim],  # the picture alone
            "audio_embedding": ["batch", config.model.embed_dim],  # the sound alone
            "scores": "sigmoid(logits)" if config.model.multi_label else "softmax(logits)",
        },
        # A pretrained encoder (contrastive only) has an untrained classifier: use its
        # embedding, or train a head on it (configs/linear_probe.py, finetune.py).
        "objective": {k: float(v) for k, v in config.loss.items()},
        "platforms": list(platforms),
        "training_data": {"dataset": d.name, "splits": summary.splits, "fps": summary.fps},
        "metrics": metrics,
        "version": code_version(),
        "config": json.loads(config.to_json_best_effort()),
    }


def card_markdown(card: dict) -> str:
    i = card["inputs"]
    lines = [
        f"# {card['name']}",
        "",
        "A Sora (Spatio-temporal Relational Audio-visual) classifier exported by sora_jax.",
        "",
        f"- classes ({len(card['class_names'])}): {', '.join(card['class_names'])}",
        f"- frames: {i['frames']['shape']} uint8 RGB at {i['frames']['fps']} fps "
        f"(every {i['frames']['frame_stride']} frame), short side resized to "
        f"{i['frames']['short_side_resize']} then cropped",
        f"- audio: {i['audio']['samples']} samples, 16 kHz mono",
        f"- views averaged at evaluation: {i['views']['temporal']} temporal x "
        f"{i['views']['spatial']} spatial",
        f"- platforms: {', '.join(card['platforms'])}",
        f"- trained on: {card['training_data']['dataset']} {card['training_data']['splits']}",
        f"- checkpoint step: {card['checkpoint_step']}",
        f"- code: sora_jax {card['version']['sora_jax']}, commit {card['version']['git_commit']}",
        "",
        "## Metrics",
        "",
    ]
    m = card["metrics"]
    if card["objective"].get("supervised", 1.0) == 0:
        lines += [
            "Pretrained without labels (contrastive): the classifier is untrained. Use the "
            "embedding, or train a head on it (sora_jax configs/linear_probe.py).",
            "",
        ]
    if m and "retrieval" in m:
        r = m["retrieval"]
        lines += [
            f"- retrieval on {m['split']} ({r['num_examples']} clips): video->audio r@1 "
            f"{r.get('v2a_r1', 0):.4f}, audio->video r@1 {r.get('a2v_r1', 0):.4f}",
            "",
        ]
    if m and "knn" in m:
        lines += [f"- {m['knn']['k']}-nearest-neighbour top-1: {m['knn']['top1']:.4f}", ""]
    if m and "full" in m:
        lines += ["| inputs | top-1 | top-5 | mAP | clips |", "|---|---|---|---|---|"]
        for mode in ("full", "audio_only", "video_only"):
            r = m[mode]
            lines.append(
                f"| {mode} | {r.get('top1', 0):.4f} | {r.get('top5', 0):.4f} | "
                f"{r.get('map', 0):.4f} | {r.get('num_examples')} |"
            )
    elif not m:
        lines.append("No evaluation was found in the work dir (run sora-eval first).")
    lines += [
        "",
        "## Use without sora_jax",
        "",
        "```python",
        "import jax, numpy as np",
        "import orbax.checkpoint as ocp",
        "model = jax.export.deserialize(open('model.jax', 'rb').read())",
        "params = ocp.StandardCheckpointer().restore('/abs/path/params')",
        "out = model.call(params, inputs)  # inputs: dict with the keys of inputs.order",
        "```",
        "",
    ]
    return "\n".join(lines)


def export(
    workdir: str | pathlib.Path,
    output: str | pathlib.Path,
    step: int | None = None,
    data_dir: str | None = None,
) -> dict:
    workdir, output = pathlib.Path(workdir), pathlib.Path(output).absolute()
    check_output(output, workdir)
    config = config_lib.load(workdir)
    if data_dir:
        config.data.dir = data_dir
    # The artifacts hold XLA's own convolutions and LSTM scan, not the oneDNN custom calls
    # that train on the CPU (models/conv.py, lstm.py): they must run on every platform
    # without sora_jax.
    config.model.visual.conv_backend = "xla"
    config.model.audio.lstm_backend = "xla"
    restored = setup.load_for_inference(config, workdir, step)
    model, params, step = restored.setup.model, jax.device_get(restored.params), restored.step
    summary = restored.dataset
    platforms = tuple(dict.fromkeys(("cpu", *config.get("export", {}).get("platforms", ()))))
    # Written beside OUTPUT and moved into place whole: a failed export leaves any previous
    # one as it was, and nothing this tool did not write is ever deleted.
    staging = output.parent / f".{output.name}.incomplete-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / "params", params)
        checkpointer.wait_until_finished()
        for name, audio_dtype in ARTIFACTS.items():
            exported = export_inference(model, params, config, audio_dtype, platforms)
            (staging / name).write_bytes(exported.serialize())
        card = model_card(config, summary, step, workdir, platforms)
        (staging / "model_card.json").write_text(json.dumps(card, indent=1))
        (staging / "model_card.md").write_text(card_markdown(card))
        _swap_into_place(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return card


EXPORT_ENTRIES = {"params", *ARTIFACTS, "model_card.json", "model_card.md"}


class OutputError(ValueError):
    """An --output that sora-export must not write to."""


def check_output(output: pathlib.Path, workdir: pathlib.Path) -> None:
    """Refuse the work dir, its parents, and any non-empty directory that is not a
    previous export: replacing OUTPUT must never delete what this tool did not write."""
    output, workdir = output.resolve(), workdir.resolve()
    if output == workdir or output in workdir.parents:
        raise OutputError(
            f"--output {output} would replace the work dir {workdir}; choose a new "
            f"directory, e.g. {workdir / 'export'}"
        )
    if output.exists() and not output.is_dir():
        raise OutputError(f"--output {output} is a file, not a directory")
    if output.is_dir():
        held = {p.name for p in output.iterdir()}
        if held and not (held <= EXPORT_ENTRIES and "model_card.json" in held):
            strays = ", ".join(sorted(held - EXPORT_ENTRIES)[:5]) or "no model card"
            raise OutputError(
                f"--output {output} holds files that are not a sora-export ({strays}); "
                "choose an empty or new directory, or a previous export to replace"
            )


def _swap_into_place(staging: pathlib.Path, output: pathlib.Path) -> None:
    if not output.exists():
        staging.rename(output)
        return
    old = output.parent / f".{output.name}.replaced-{os.getpid()}"
    output.rename(old)
    staging.rename(output)
    shutil.rmtree(old)


def main(argv: list[str] | None = None) -> int:
    process.configure()
    parser = argparse.ArgumentParser(
        prog="sora-export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", required=True, help="a sora-train work dir")
    parser.add_argument(
        "--output",
        required=True,
        help="the export directory: new, empty, or a previous export (replaced whole)",
    )
    parser.add_argument("--checkpoint", type=int, default=None, help="step (default: latest)")
    parser.add_argument("--data-dir", default=None, help="override config.data.dir")
    args = parser.parse_args(argv)
    try:
        card = export(args.workdir, args.output, args.checkpoint, args.data_dir)
    except (FileNotFoundError, OutputError) as e:
        print(f"sora-export: {e}", file=sys.stderr)
        return 2
    print(
        f"exported step {card['checkpoint_step']} for {', '.join(card['platforms'])} to "
        f"{pathlib.Path(args.output).absolute()}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
