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
import contextlib
import errno
import importlib.metadata
import inspect
import json
import logging
import os
import pathlib
import shutil
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

from sora_jax import config as config_lib
from sora_jax import media, process, storage
from sora_jax.export.card import (  # noqa: F401 (also read as export.X by tests and tools)
    FUSION_OUTPUTS,
    OUTPUT_MEANINGS,
    PROJECTION_MEANINGS,
    card_markdown,
    code_version,
    exported_outputs,
    input_contract,
    is_classifier,
    model_card,
    output_contract,
    preprocessing,
)
from sora_jax.inputs import MODEL_INPUTS, InputSpec
from sora_jax.train import setup
from sora_jax.train.checkpoint import CorruptCheckpointError
from sora_jax.workdir import Workdir, checkpoint_choice

if TYPE_CHECKING:  # annotations only
    from sora_jax.models import SoraModel

ARTIFACTS = {"model.jax": jnp.int16, "model_float.jax": jnp.float32}
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
    scratch = None if storage.is_remote(output) else output.parent
    if scratch is not None:
        scratch.mkdir(parents=True, exist_ok=True)
        # The parameters twice (params/, the SavedModel's variables) and the artifacts:
        # refused before writing, rather than failing half way in orbax's threads.
        needed = 3 * sum(np.asarray(x).nbytes for x in jax.tree.leaves(params)) + (10 << 20)
        free = storage.free_bytes(scratch)
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
        previous = check_output(output, workdir)  # again: nothing arrived in OUTPUT meanwhile
        if storage.is_remote(output):
            _upload_into_place(staging, output, previous)
        else:
            _swap_into_place(staging, pathlib.Path(output), previous)
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


def check_output(output: epath.Path, workdir: Workdir) -> list[str]:
    """Refuse the work dir, its parents, and any non-empty directory that is not a
    previous export: replacing OUTPUT must never delete what this tool did not write.
    Returns the files of the previous export in OUTPUT (none when there is none), the only
    ones a swap may delete."""
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
            present = storage.files_under(output)
            strays = sorted(set(present) - set(written or present))
            if strays:
                raise OutputError(
                    f"--output {output} is a previous export with files it did not write "
                    f"({', '.join(strays[:5])}): move them out first, or choose a new directory"
                )
            # An export from before manifests: its files are what is there now, all under
            # this tool's own entries (checked above).
            return present if written is None else written
    return []


def _swap_into_place(staging: pathlib.Path, output: pathlib.Path, previous: list[str]) -> None:
    """Rename the new export into place. Of the previous one only the files its manifest
    lists are deleted: a file written into it after the last check (a user's, or another
    tool's) is kept, in a folder beside OUTPUT that the log names."""
    if not output.exists():
        staging.rename(output)
        return
    old = output.parent / f".{output.name}.replaced-{os.getpid()}"
    output.rename(old)
    staging.rename(output)
    kept = _delete_written(old, previous)
    if kept:
        rescued = output.parent / f"{output.name}.not-an-export-{os.getpid()}"
        old.rename(rescued)
        logging.warning(
            "sora-export: %d file(s) appeared in %s while it was exported (%s); they were "
            "not deleted: they are in %s",
            len(kept),
            output,
            ", ".join(kept[:5]),
            rescued,
        )


def _delete_written(folder: pathlib.Path, written: list[str]) -> list[str]:
    """Delete the files in `written` (relative paths) and the folders they leave empty.
    Returns what is left: files this tool did not write."""
    for name in written:
        (folder / name).unlink(missing_ok=True)
    for top, _, _ in sorted(os.walk(folder), key=lambda walked: -len(walked[0])):
        with contextlib.suppress(OSError):  # not empty: something else is there
            os.rmdir(top)
    return storage.files_under(epath.Path(folder)) if folder.exists() else []


def _upload_into_place(staging: pathlib.Path, output: epath.Path, previous: list[str]) -> None:
    """A bucket has no rename to swap a folder whole: the previous export's model card goes
    first (a reader takes a folder without one for no export), then its other files (by its
    manifest, so an object written meanwhile stays), and the new export goes up with its
    model card last."""
    for name in sorted(previous, key=lambda name: name != "model_card.json"):
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
