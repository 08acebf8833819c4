"""sora-export --workdir DIR --output OUT [--checkpoint STEP]

Writes, for teams that will never import sora_jax:
  OUT/params/          parameters only (no optimizer state), a plain orbax checkpoint
  OUT/model.jax        jax.export of (params, inputs) -> logits, embedding and each sense's
                       embedding alone (video_embedding, audio_embedding; a gated fusion
                       also its weights on each sense, fusion_gates), int16 audio
  OUT/model_float.jax  the same with float32 audio in [-1, 1]
  OUT/saved_model/     the same function as a TensorFlow SavedModel (jax2tf), parameters
                       inside, for TF Serving and tf.saved_model.load
  OUT/client.py        `python OUT/client.py FILE...`: files in, scores out, through
  OUT/sora_media/      the decoding and view sampling of sora_jax.media, copied as it is
  OUT/requirements.txt what the client needs (no sora_jax, flax, optax or tensorflow)
  OUT/model_card.json  the input contract, preprocessing, outputs, classes, data,
                       metrics and code version
  OUT/model_card.md    the same, for people, with code to call the model
The artifacts take any batch size (a symbolic batch dimension) and carry code for the
CPU and for the platforms in config.export.platforms.
"""

import argparse
import datetime
import errno
import hashlib
import importlib.metadata
import inspect
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

import sora_jax
from sora_jax import config as config_lib
from sora_jax import media, process, storage
from sora_jax.data.pipeline import DatasetSummary
from sora_jax.inputs import MEANINGS, MODEL_INPUTS, InputSpec
from sora_jax.media.decode import SAMPLE_RATE
from sora_jax.train import setup
from sora_jax.train.checkpoint import CorruptCheckpointError
from sora_jax.workdir import Workdir, checkpoint_choice

if TYPE_CHECKING:  # annotations only
    from sora_jax.models import SoraModel

ARTIFACTS = {"model.jax": jnp.int16, "model_float.jax": jnp.float32}
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
CLIENT_REQUIREMENTS = ("jax", "orbax-checkpoint", "flatbuffers", "numpy", "av", "pillow")
CLIENT_SCRIPT = pathlib.Path(__file__).with_name("client_script.py")


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
        out, state = model.apply(
            {"params": params}, inputs, modality_embeddings=True, mutable=["intermediates"]
        )
        sown = state.get("intermediates", {}).get("fusion", {})
        fused = FUSION_OUTPUTS.get(config.model.fusion.kind, {})
        return {  # a fusion's own outputs from the pass with both senses (then each alone)
            name: sown[name][0] if name in fused else out[name] for name in exported_outputs(config)
        }

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
        for key in ("retrieval", "knn"):  # representation (runs with a contrastive loss)
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
        "objective": {k: float(v) for k, v in config.loss.items()},
        "platforms": list(platforms),
        "saved_model": _saved_model_wanted(config),
        "training_data": {"dataset": d.name, "splits": summary.splits, "fps": summary.fps},
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
    return "\n".join(lines) + "\n"


def client_requirements() -> str:
    """requirements.txt: the client's distributions, at least the versions exported with
    (an artifact is read by its jax version and later ones)."""
    lines = ["# What client.py (and any code calling model.jax) needs: pip install -r this"]
    for dist in CLIENT_REQUIREMENTS:
        lines.append(f"{dist}>={importlib.metadata.version(dist)}")
    return "\n".join(lines) + "\n"


def write_client(directory: pathlib.Path) -> None:
    """client.py, sora_media/ (sora_jax.media as it is) and requirements.txt."""
    package = directory / "sora_media"
    package.mkdir()
    for source in sorted(pathlib.Path(media.__file__).parent.glob("*.py")):
        shutil.copyfile(source, package / source.name)
    shutil.copyfile(CLIENT_SCRIPT, directory / "client.py")
    (directory / "requirements.txt").write_text(client_requirements())


def write_saved_model(
    exported: jax.export.Exported,
    params: dict,
    config: ml_collections.ConfigDict,
    platforms: Sequence[str],
    directory: pathlib.Path,
) -> None:
    """The int16-audio artifact as a TensorFlow SavedModel: jax2tf wraps the exported
    function itself (not a new lowering of the model), so both compute the same thing;
    the parameters are the SavedModel's variables."""
    import tensorflow as tf  # only here: nothing else in sora-export needs TensorFlow
    from jax.experimental import jax2tf

    specs = input_specs(config, jnp.int16)
    converted = jax2tf.convert(
        exported.call,
        polymorphic_shapes=[None, {name: "(b, ...)" for name in specs}],
        with_gradient=False,
        native_serialization_platforms=tuple(platforms),
    )
    module = tf.Module()
    # A flat list: TensorFlow wraps a tracked dict in a type the artifact does not take.
    leaves, treedef = jax.tree.flatten(params)
    module.params = [tf.Variable(x, trainable=False) for x in leaves]

    # TF Serving's signatures take flat keyword arguments: the inputs, by name.
    def serve(frames, frame_mask, audio, audio_len, has_video, has_audio):
        inputs = dict(
            frames=frames,
            frame_mask=frame_mask,
            audio=audio,
            audio_len=audio_len,
            has_video=has_video,
            has_audio=has_audio,
        )
        return converted(jax.tree.unflatten(treedef, list(module.params)), inputs)

    assert tuple(inspect.signature(serve).parameters) == tuple(specs) == MODEL_INPUTS
    signature = [
        tf.TensorSpec((None, *spec.shape[1:]), tf.as_dtype(spec.dtype), name=name)
        for name, spec in specs.items()
    ]
    module.serve = tf.function(serve, input_signature=signature, autograph=False)
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})


def export(
    workdir: "str | os.PathLike[str]",
    output: "str | os.PathLike[str]",
    step: int | str | None = None,
    data_dir: str | None = None,
) -> dict:
    """Export a work dir's checkpoint to `output`; either may be local or in a bucket."""
    workdir, output = Workdir(workdir), storage.absolute(output)
    if not storage.is_remote(output):  # a link to a previous export: replace what it names
        output = epath.Path(os.path.realpath(output))
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
    # Written on the local disk first (beside OUTPUT when it is local) and then moved or
    # uploaded into place: a failed export leaves any previous one as it was, and nothing
    # this tool did not write is ever deleted.
    scratch = None if storage.is_remote(output) else pathlib.Path(output).parent
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
        # The parameters twice (params/, the SavedModel's variables) and the artifacts:
        # refused before writing, rather than failing half way in orbax's threads.
        needed = 3 * sum(np.asarray(x).nbytes for x in jax.tree.leaves(params)) + (10 << 20)
        free = storage.free_bytes(epath.Path(scratch))
        if free is not None and free < needed:
            raise OSError(
                errno.ENOSPC, f"{scratch} has {free >> 20} MB free, an export needs ~{needed >> 20}"
            )
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{output.name}.incomplete-", dir=scratch))
    try:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(staging / "params", params)
        checkpointer.wait_until_finished()
        artifacts = {}
        for name, audio_dtype in ARTIFACTS.items():
            artifacts[name] = export_inference(model, params, config, audio_dtype, platforms)
            (staging / name).write_bytes(artifacts[name].serialize())
        card = model_card(config, summary, step, workdir, platforms, artifacts["model.jax"])
        if card["saved_model"]:
            write_saved_model(
                artifacts["model.jax"], params, config, platforms, staging / "saved_model"
            )
        write_client(staging)
        # Every file the export holds, so that a later export into the same folder can tell
        # them from anything a user added (which it must never delete).
        card["files"] = sorted(
            {*storage.files_under(epath.Path(staging)), "model_card.json", "model_card.md"}
        )
        (staging / "model_card.json").write_text(json.dumps(card, indent=1))
        (staging / "model_card.md").write_text(card_markdown(card, output))
        check_output(output, workdir)  # again: nothing arrived in OUTPUT meanwhile
        if storage.is_remote(output):
            _upload_into_place(staging, output)
        else:
            _swap_into_place(staging, pathlib.Path(output))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return card


EXPORT_ENTRIES = {
    "params",
    *ARTIFACTS,
    "saved_model",
    "client.py",
    "sora_media",
    "requirements.txt",
    "model_card.json",
    "model_card.md",
}


class OutputError(ValueError):
    """An --output that sora-export must not write to."""


def check_output(output: epath.Path, workdir: Workdir) -> None:
    """Refuse the work dir, its parents, and any non-empty directory that is not a
    previous export: replacing OUTPUT must never delete what this tool did not write."""
    if not storage.is_remote(output):
        output = epath.Path(os.path.realpath(output))
    root = workdir.root if workdir.remote else epath.Path(os.path.realpath(workdir.root))
    if os.fspath(output) == os.fspath(root) or output in root.parents:
        raise OutputError(
            f"--output {output} would replace the work dir {root}; choose a new "
            f"directory, e.g. {root / 'export'}"
        )
    kept = Workdir(root)
    for inner in (kept.checkpoints, kept.corrupt_checkpoints, kept.unverified_checkpoints):
        if os.fspath(output) == os.fspath(inner) or inner in output.parents:
            raise OutputError(
                f"--output {output} is inside the run's {inner.name}/, which only the trainer "
                f"writes; choose a new directory, e.g. {root / 'export'}"
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
        if held:
            try:
                written = json.loads((output / "model_card.json").read_text()).get("files")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise OutputError(f"--output {output}: its model_card.json is damaged ({e})") from e
            strays = sorted(set(storage.files_under(output)) - set(written or []))
            if written is not None and strays:
                raise OutputError(
                    f"--output {output} is a previous export with files it did not write "
                    f"({', '.join(strays[:5])}): move them out first, or choose a new directory"
                )


def _swap_into_place(staging: pathlib.Path, output: pathlib.Path) -> None:
    if not output.exists():
        staging.rename(output)
        return
    old = output.parent / f".{output.name}.replaced-{os.getpid()}"
    output.rename(old)
    staging.rename(output)
    shutil.rmtree(old)


def _upload_into_place(staging: pathlib.Path, output: epath.Path) -> None:
    """A bucket has no rename to swap a folder whole: the previous export's model card goes
    first (a reader takes a folder without one for no export), then what else it held of
    this tool's entries (check_output allowed no others), and the new export goes up with
    its model card last."""
    for name in ("model_card.json", *sorted(EXPORT_ENTRIES - {"model_card.json"})):
        storage.remove_tree(output / name)
    storage.copy_tree(epath.Path(staging), output, last=("model_card.json",))


def _out_of_space(error: BaseException | None) -> bool:
    """Whether `error`, or one it was raised from, is a full disk (orbax wraps it)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):  # tensorstore's, as a ValueError
            return True
        error = error.__cause__ or error.__context__
    return False


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
    parser.add_argument(
        "--checkpoint",
        type=checkpoint_choice,
        default=None,
        help="a step, best (by the run's checkpoint.best_metric) or latest (the default)",
    )
    parser.add_argument("--data-dir", default=None, help="override config.data.dir")
    args = parser.parse_args(argv)
    try:
        card = export(args.workdir, args.output, args.checkpoint, args.data_dir)
    except (FileNotFoundError, OutputError, CorruptCheckpointError, storage.StorageError) as e:
        print(f"sora-export: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not _out_of_space(e):
            raise
        print(
            f"sora-export: no space left for {args.output} ({str(e).splitlines()[0][:200]}): "
            "nothing was replaced, any previous export is as it was",
            file=sys.stderr,
        )
        return 2
    print(
        f"exported step {card['checkpoint_step']} for {', '.join(card['platforms'])} to "
        f"{storage.absolute(args.output)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
