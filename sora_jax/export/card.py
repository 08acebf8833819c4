"""What an export promises, in one place: its outputs and what each means, the input
contract, the preprocessing, and the model card (as JSON, and for people). sora-export
writes it beside the artifacts; nothing here computes with the model."""

import datetime
import hashlib
import json
import os
import pathlib
import subprocess
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

import sora_jax
from sora_jax import config as config_lib
from sora_jax.data.pipeline import DatasetSummary
from sora_jax.inputs import MEANINGS, InputSpec
from sora_jax.media.decode import SAMPLE_RATE
from sora_jax.workdir import Workdir

# Each sense's embedding comes from the same pass of the towers as the fused one.
OUTPUT_MEANINGS = {
    "logits": "class logits (scores: softmax, or sigmoid for a multi-label model)",
    "embedding": "the clip's fused embedding: both senses, as present",
    "video_embedding": "the embedding of the picture alone",
    "audio_embedding": "the embedding of the sound alone",
}
# A model trained with the contrastive objective: the space where picture and sound were
# aligned, the product of pretraining (retrieval, synchronisation and pairing checks).
PROJECTION_MEANINGS = {
    "video_projection": "the picture in the space where it was aligned with sound: a unit "
    "vector; its dot product with a clip's audio_projection says how well they belong "
    "together (what retrieval ranks by)",
    "audio_projection": "the sound in the same space: a unit vector",
}
# Outputs only some fusions have: what the fusion weighed each sense by.
FUSION_OUTPUTS = {
    "gated": {
        "fusion_gates": "the gated fusion's weights [video, audio] for this clip (they sum to "
        "1 over the senses present; 0 for an absent one)",
    },
}


def is_classifier(config: ml_collections.ConfigDict) -> bool:
    """A run that trained its classifier; one that did not (contrastive pretraining) is
    exported as an embedding model, without its untrained logits."""
    return config_lib.trains_classifier(config)


def exported_outputs(config: ml_collections.ConfigDict) -> dict[str, str]:
    """name -> meaning of every output of this config's artifact."""
    outputs = dict(OUTPUT_MEANINGS)
    if not is_classifier(config):
        del outputs["logits"]
    if config_lib.trains_alignment(config):
        outputs |= PROJECTION_MEANINGS
    return outputs | FUSION_OUTPUTS.get(config.model.fusion.kind, {})


# The client's distributions: the artifact needs jax (and flatbuffers to deserialize it),
# the parameters orbax, the preprocessing PyAV, Pillow and NumPy.


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


def input_contract(config: ml_collections.ConfigDict) -> dict:
    """Every input's shape, dtype and meaning, from the one definition the model uses."""
    shapes = InputSpec.from_config(config).shapes("batch")
    contract = {
        name: {"shape": list(shape), "dtype": dtype.name, "meaning": MEANINGS[name]}
        for name, (shape, dtype) in shapes.items()
    }
    contract["audio"]["dtype"] = "int16 (model.jax); float32 in [-1, 1] (model_float.jax)"
    return contract


def output_contract(exported: jax.export.Exported, config: ml_collections.ConfigDict) -> dict:
    """Every output's shape and dtype, read from the artifact itself."""
    avals = jax.tree.unflatten(exported.out_tree, exported.out_avals)
    return {
        name: {
            "shape": ["batch", *(int(d) for d in avals[name].shape[1:])],
            "dtype": np.dtype(avals[name].dtype).name,
            "meaning": meaning,
        }
        for name, meaning in exported_outputs(config).items()
    }


def preprocessing(config: ml_collections.ConfigDict, summary: DatasetSummary) -> dict:
    """The parameters sora_media needs to turn a file into the inputs, and the steps in
    words: what data preparation and evaluation did to the training data."""
    d = config.data
    p = {
        "fps": d.fps,
        "short_side": summary.short_side,
        "jpeg_quality": summary.jpeg_quality,
        "sample_rate": SAMPLE_RATE,
        "num_frames": d.num_frames,
        "frame_stride": d.frame_stride,
        "crop_size": d.crop_size,
        "audio_samples": config_lib.audio_samples(config),
        "temporal_views": d.eval_temporal_views,
        "spatial_views": d.eval_spatial_views,
        "clip_seconds": d.num_frames * d.frame_stride / d.fps,
    }
    span = (d.num_frames - 1) * d.frame_stride + 1
    crops = "the centre square" if d.eval_spatial_views == 1 else "left, centre and right squares"
    p["steps"] = [
        f"Decode with FFmpeg (PyAV). Frames: resampled to {d.fps:g} fps by timestamp (at "
        f"each time k/{d.fps:g} s, the latest frame shown), scaled so the short side is "
        f"{summary.short_side} px (even sizes), turned by the stream's display rotation.",
        f"Each frame JPEG-encoded and decoded again (Pillow, quality {summary.jpeg_quality}), "
        "as the training data was stored.",
        f"Audio: mixed to mono, resampled to {SAMPLE_RATE} Hz, int16.",
        f"Views: {d.eval_temporal_views} windows of {d.num_frames} frames, one every "
        f"{d.frame_stride} frames, starting at round(linspace(0, N - span, "
        f"{d.eval_temporal_views})) for N frames and span {span}; past the end of a short "
        "video the last frame repeats, with frame_mask False.",
        f"Crops: {crops} of side min(H, W), resized to {d.crop_size}x{d.crop_size} "
        "(Pillow, bilinear).",
        f"Each window's audio: {p['audio_samples']} samples from round(start_frame / fps * "
        f"{SAMPLE_RATE}), zero-padded; audio_len the valid count, 0 without a sound track "
        "(then has_audio is False).",
        ("Scores: sigmoid" if config.model.multi_label else "Scores: softmax")
        + " of each view's logits, averaged over the views.",
        "sora_media/ (run by client.py) is the code that does all of this: the code the "
        "model was trained and evaluated with.",
    ]
    return p


def model_card(
    config: ml_collections.ConfigDict,
    summary: DatasetSummary,
    step: int,
    workdir: Workdir,
    platforms: Sequence[str],
    exported: jax.export.Exported,
) -> dict:
    d = config.data
    metrics = None
    eval_file = workdir.eval_result(d.eval_split)
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
        for key in ("retrieval", "knn", "evals"):  # representation; config.evals' measures
            if key in full:
                metrics[key] = full[key]
    return {
        "name": f"{d.name}-sora",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "checkpoint_step": step,
        # "classifier": files in, class scores out; "embedding": files in, embeddings out
        # (a pretrained encoder, whose classifier was never trained).
        "kind": "classifier" if is_classifier(config) else "embedding",
        "class_names": list(summary.class_names) if is_classifier(config) else [],
        "multi_label": bool(config.model.multi_label),
        "inputs": input_contract(config),  # a dict keyed by these names, in any order
        "preprocessing": preprocessing(config, summary),
        "outputs": output_contract(exported, config),
        "objective": {k: float(v.weight) for k, v in config.objectives.items() if v.weight > 0},
        "platforms": list(platforms),
        "saved_model": _saved_model_wanted(config),
        "training_data": {
            "dataset": d.name,
            "splits": summary.splits,
            "fps": summary.fps,
            "fingerprint": summary.fingerprint,  # which clips it learned (sora-curate asks)
        },
        "metrics": metrics,
        "version": code_version(),
        "config": json.loads(config.to_json_best_effort()),
    }


def _saved_model_wanted(config: ml_collections.ConfigDict) -> bool:
    return bool(config.get("export", {}).get("saved_model", True))


def _example_inputs(card: dict, batch: int) -> str:
    """Python source of inputs of the contract's shapes, every frame and sample present
    (a runnable example)."""
    items = []
    for name, spec in card["inputs"].items():
        shape = tuple(batch if d == "batch" else d for d in spec["shape"])
        dtype = spec["dtype"].split()[0]
        fill = card["preprocessing"]["audio_samples"] if name == "audio_len" else 1
        items.append(f'"{name}": np.full({shape}, {fill}, np.{dtype})')
    return "inputs = {" + ", ".join(items) + "}"


def card_markdown(card: dict, export_dir: "os.PathLike[str]") -> str:
    p, m = card["preprocessing"], card["metrics"]
    embedding_model = card.get("kind") == "embedding"
    first = next(iter(card["outputs"]))  # logits, or an embedding model's embedding
    what = "embeddings" if embedding_model else "class scores and embeddings"
    returns = (
        '{"path", "embeddings": {name: [floats] or None}, "has_audio"}'
        if embedding_model
        else '{"path", "scores": {class: p}, "has_audio"}'
    )
    lines = [
        f"# {card['name']}",
        "",
        "A Sora (Spatio-temporal Relational Audio-visual) model exported by sora_jax: a "
        f"clip's frames and its sound in, {what} out.",
        "",
        *(
            [
                "An embedding model: pretrained without labels, its classifier never trained. "
                "Use `embedding` (or each sense's) as features for your own head "
                "(configs/linear_probe.py), and `video_projection` with `audio_projection` "
                "to ask whether a sound belongs to a picture (their dot product).",
                "",
            ]
            if embedding_model
            else [
                f"- classes ({len(card['class_names'])}): {', '.join(card['class_names'])}"
                + (" (multi-label: each scored alone)" if card["multi_label"] else "")
            ]
        ),
        f"- a clip: {p['num_frames']} frames over {p['clip_seconds']:g} s and its sound; "
        f"outputs averaged over {p['temporal_views']} x {p['spatial_views']} views",
        f"- platforms: {', '.join(card['platforms'])}",
        f"- trained on: {card['training_data']['dataset']} {card['training_data']['splits']}",
        f"- checkpoint step: {card['checkpoint_step']}",
        f"- code: sora_jax {card['version']['sora_jax']}, commit {card['version']['git_commit']}",
        "",
        "## Call it",
        "",
        f"Files in, {what.split(' and ')[0]} out (needs only `pip install -r requirements.txt`):",
        "",
        "```bash",
        f"python {export_dir}/client.py clip1.mp4 clip2.mkv",
        "```",
        "",
        "From Python, the same client:",
        "",
        "```python",
        "import sys",
        f'sys.path.insert(0, "{export_dir}")  # this directory',
        "from sora_media.predictor import Predictor",
        f'predictor = Predictor("{export_dir}")',
        f'print(predictor.predict("clip.mp4"))  # {returns}',
        "```",
        "",
        "The artifact on inputs you prepare yourself (see the contract below):",
        "",
        "```python",
        "import jax, numpy as np, orbax.checkpoint as ocp",
        f'model = jax.export.deserialize(open("{export_dir}/model.jax", "rb").read())',
        f'params = ocp.StandardCheckpointer().restore("{export_dir}/params")',
        _example_inputs(card, 2),
        f'print(model.call(params, inputs)["{first}"])',
        "```",
        "",
    ]
    if card["saved_model"]:
        lines += [
            "The same function as a TensorFlow SavedModel (`saved_model/`, signature "
            "`serving_default`, the inputs below as keyword arguments, a dict of the outputs "
            "back), for TF Serving or:",
            "",
            "```python",
            "import numpy as np, tensorflow as tf",
            f'saved = tf.saved_model.load("{export_dir}/saved_model")',
            'serve = saved.signatures["serving_default"]',
            _example_inputs(card, 2),
            f'print(serve(**inputs)["{first}"])',
            "```",
            "",
        ]
    lines += ["## Inputs", "", "| name | shape | dtype | meaning |", "|---|---|---|---|"]
    for name, spec in card["inputs"].items():
        lines.append(f"| `{name}` | {spec['shape']} | {spec['dtype']} | {spec['meaning']} |")
    lines += ["", "## Preprocessing", ""]
    lines += [f"{i}. {step}" for i, step in enumerate(p["steps"], 1)]
    lines += ["", "## Outputs", "", "| name | shape | dtype | meaning |", "|---|---|---|---|"]
    for name, spec in card["outputs"].items():
        lines.append(f"| `{name}` | {spec['shape']} | {spec['dtype']} | {spec['meaning']} |")
    lines += ["", "## Metrics", ""]
    if not card["objective"].get("supervised"):  # weights > 0 only (older cards: all)
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
        lines += [
            f"On the {m['split']} split at step {m['step']}; each sense alone is scored on "
            "the clips that have it.",
            "",
            "| inputs | top-1 | top-5 | mAP | clips |",
            "|---|---|---|---|---|",
        ]
        for mode in ("full", "audio_only", "video_only"):
            r = m[mode]
            lines.append(
                f"| {mode} | {r.get('top1', 0):.4f} | {r.get('top5', 0):.4f} | "
                f"{r.get('map', 0):.4f} | {r.get('num_examples')} |"
            )
    elif not m:
        lines.append("No evaluation was found in the work dir (run sora-eval first).")
    for name, report in (m or {}).get("evals", {}).items():
        lines += ["", *_evaluator_lines(name, report)]
    return "\n".join(lines) + "\n"


def _evaluator_lines(name: str, report: dict) -> list[str]:
    """An evaluator's measures; a `slices` evaluator's as a table, one row per slice."""
    if "slices" not in report:
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items()
        )
        return [f"- {name}: {shown}"]
    slices = report["slices"]
    measures = [k for k in report["overall"] if isinstance(report["overall"][k], float)]
    lines = [
        f"### {name}: by {report['column']}",
        "",
        "Each measure per value of the clips' `" + report["column"] + "`; a slice with too "
        "few clips to trust is marked and never named the worst.",
        "",
        "| " + report["column"] + " | " + " | ".join(measures) + " | clips | |",
        "|---|" + "---|" * len(measures) + "---|---|",
    ]
    rows = [("all", report["overall"], "")]
    rows += [(v, s, "too few clips" if s["too_small"] else "") for v, s in slices.items()]
    for value, measured, note in rows:
        cells = " | ".join(f"{measured[k]:.4f}" if k in measured else "-" for k in measures)
        count = measured.get("num_clips", measured.get("num_examples", ""))
        lines.append(f"| {value} | {cells} | {count} | {note} |")
    if "worst" in report:
        worst = report["worst"]
        lines += [
            "",
            f"Worst slice: {report['column']}={worst['slice']} ({worst['num_clips']} clips), "
            f"{report['gap']:.4f} below all clips.",
        ]
    return lines
