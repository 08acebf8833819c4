"""sora-embed: clip embeddings for downstream teams, from a work dir or an export.

  sora-embed --workdir W [--checkpoint STEP] --split test --out OUT.npz
  sora-embed --export E FILE... --out OUT.npz

Each clip goes through evaluation's views (sora-eval's sampling; raw files through
data preparation's decoding first, as sora-predict does), and its embeddings are
averaged over them. OUT.npz holds, row i for clip i:

  id               [N] str    unique: "SPLIT/KEY" of a prepared clip, or a file's absolute path
  path             [N] str    where the clip came from
  label            [N] int32  class index; -1 when unlabeled (raw files, unlabeled data)
  label_name       [N] str
  embedding        [N, E] float32  both senses fused (the model's clip embedding): features
                                   for a downstream head, kNN or clustering
  video_embedding  [N, E] float32  the picture alone (the sound marked absent); NaN rows
                                   where has_video is False
  audio_embedding  [N, E] float32  the sound alone; NaN rows where has_audio is False
  video_projection [N, P] float32  models trained contrastively (pretrain_av.py): the
  audio_projection [N, P] float32  picture and the sound in the space where they were
                                   aligned, unit vectors; video_projection @
                                   audio_projection.T ranks which sound belongs to which
                                   picture (sora-eval's retrieval); NaN rows as above
  has_video        [N] bool        a view of the clip has a picture
  has_audio        [N] bool        a view of the clip has sound (a window past the end of
                                   a clip's sound has none)
  class_names      [C] str

Why .npz: the embeddings are a dense matrix, and `np.load(OUT)["embedding"]` is it, one
float32 array NumPy and JAX use as it is (`jnp.asarray`), with no extra dependency;
pandas takes the per-clip columns with `pd.DataFrame({k: z[k] for k in ("id", "path",
"label", "label_name")})`. Parquet would store a list per row and need pyarrow to read.
The file is written whole or not at all; an existing OUT is refused unless --overwrite.

Exit code 0, 3 when some files could not be decoded (each named on stderr), 2 on bad
arguments.
"""

import argparse
import os
import pathlib
import sys
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sora_jax import process
from sora_jax.workdir import checkpoint_choice

BATCH = 8  # clips per call; the last batch is padded, so the model compiles once
EMBEDDINGS = ("embedding", "video_embedding", "audio_embedding")
PROJECTIONS = ("video_projection", "audio_projection")  # models trained contrastively


class Embedder:
    """A work dir's checkpoint or an export dir, as `embed(views) -> {name: [N, D]}`: the
    fused embedding and each sense's alone, and for a model trained with the contrastive
    objective each sense's projection into the space where they were aligned, all from
    one pass of the model."""

    def __init__(self, workdir: str | None, export: str | None, step: int | str | None = None):
        from sora_jax import config as config_lib

        if export:
            from sora_jax import storage
            from sora_jax.export.predict import Predictor

            predictor = Predictor(storage.download(storage.path(export)))
            if not set(EMBEDDINGS) <= set(predictor.card["outputs"]):
                raise ValueError(
                    f"{export} was exported before exports gave each sense's embedding: "
                    "export it again with this version of sora-export"
                )
            self.config = config_lib.from_dict(predictor.card["config"])
            self.outputs = tuple(
                k for k in (*EMBEDDINGS, *PROJECTIONS) if k in predictor.card["outputs"]
            )
            self.class_names = tuple(predictor.card["class_names"])
            self.short_side, self.jpeg_quality = predictor.short_side, predictor.jpeg_quality
            self.trained_on = predictor.card["training_data"].get("fingerprint", "")
            self._apply = lambda inputs: predictor.model.call(predictor.params, inputs)
        else:
            from sora_jax.train import setup

            self.config = config_lib.load(workdir)
            restored = setup.load_for_inference(self.config, workdir, step)
            model, params = restored.setup.model, restored.params
            projected = config_lib.trains_alignment(self.config)
            self.outputs = EMBEDDINGS + (PROJECTIONS if projected else ())
            self.class_names = restored.dataset.class_names
            self.short_side = restored.dataset.short_side
            self.jpeg_quality = restored.dataset.jpeg_quality
            self.trained_on = restored.dataset.fingerprint
            outputs = self.outputs

            @jax.jit
            def apply(params, inputs):
                out = model.apply({"params": params}, inputs, modality_embeddings=True)
                return {k: out[k] for k in outputs}

            self._apply = lambda inputs: apply(params, inputs)

    def trained_on_clip(self, dataset: str, fingerprint: str, split: str, index: int) -> bool:
        """Did this model learn from clip `index` of `split` of the dataset prepared as
        `fingerprint` (named `dataset`)? A model that did may have memorised the clip
        (sora-curate's av_score asks). Unknown (an export from before cards kept the
        fingerprint): yes if the names agree."""
        from sora_jax.data.pipeline import in_training_fold

        d = self.config.data
        same = self.trained_on == fingerprint if self.trained_on else d.name == dataset
        same |= dataset in {part["name"] for part in d.get("mixture", ())}
        return (
            same
            and d.train_split == split
            and in_training_fold(index, d.get("folds", 0), d.get("holdout_fold", 0))
        )

    def embed(self, views: dict[str, np.ndarray], clips: int) -> dict[str, np.ndarray]:
        """views: [clips * V, ...], each clip's V views in a row -> {name: [clips, D]}. A
        sense's own outputs are averaged over the views that have the sense (as sora-eval
        does), NaN for a clip where none has it; projections are unit vectors again."""
        out = self._apply(jax.tree.map(jnp.asarray, views))
        result = {}
        for k in self.outputs:
            x = np.asarray(out[k], np.float32).reshape(clips, -1, out[k].shape[-1])  # [N, V, D]
            sense = k.split("_")[0]
            present = np.ones(x.shape[:2], bool)
            if sense in ("video", "audio"):
                present = np.asarray(views[f"has_{sense}"], bool).reshape(clips, -1)
            count = present.sum(axis=1, keepdims=True)  # [N, 1]
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = (x * present[..., None]).sum(axis=1) / count  # NaN: no view has it
            if k in PROJECTIONS:
                mean = mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), 1e-6)
            result[k] = mean.astype(np.float32)
        result["has_video"] = present_any(views, "has_video", clips)
        result["has_audio"] = present_any(views, "has_audio", clips)
        return result


def present_any(views: dict[str, np.ndarray], key: str, clips: int) -> np.ndarray:
    """[clips] bool: some view of the clip has the sense."""
    return np.asarray(views[key], bool).reshape(clips, -1).any(axis=1)


def _split_clips(config: ml_collections.ConfigDict, split: str) -> Iterator[tuple[dict, str]]:
    from sora_jax.data import pipeline

    source = pipeline.data_source(config, split)
    for i in range(len(source)):
        example = source[i]
        key = example["path"]
        yield example, key.decode() if isinstance(key, bytes) else str(key)


def _file_clips(
    files: list[str], embedder: Embedder, failures: list[str]
) -> Iterator[tuple[dict, str]]:
    from sora_jax.media.decode import DecodeError, decode_video, stored_example

    for name in files:
        path = pathlib.Path(name).absolute()
        try:
            video = decode_video(path, embedder.config.data.fps, embedder.short_side)
        except (DecodeError, FileNotFoundError) as e:
            failures.append(name)
            print(f"sora-embed: {name}: {e}", file=sys.stderr)
            continue
        yield stored_example(video, embedder.jpeg_quality), str(path)


def embed_clips(
    embedder: Embedder, clips: Iterator[tuple[dict, str]], id_of: Callable[[str], str]
) -> dict[str, np.ndarray]:
    """Every clip's row of the output file."""
    from sora_jax.data import pipeline
    from sora_jax.media.sampling import eval_views

    config = embedder.config
    spec = pipeline.clip_spec(config)
    views_per_clip = (config.data.eval_temporal_views, config.data.eval_spatial_views)
    names = ("id", "path", "label", "has_video", "has_audio", *embedder.outputs)
    rows: dict[str, list] = {k: [] for k in names}
    pending: list[dict] = []

    def flush():
        n = len(pending)
        padded = pending + [pending[-1]] * (BATCH - n)
        views = {k: np.concatenate([p[k] for p in padded]) for k in padded[0] if k != "label"}
        for name, values in embedder.embed(views, BATCH).items():
            rows[name].extend(values[:n])
        pending.clear()

    for example, path in clips:
        views = eval_views(example, spec, *views_per_clip)
        rows["id"].append(id_of(path))
        rows["path"].append(path)
        rows["label"].append(int(example["label"]) if "label" in example else -1)
        pending.append({k: v for k, v in views.items() if k != "label"})
        if len(pending) == BATCH:
            flush()
    if pending:
        flush()
    if not rows["id"]:
        raise ValueError("no clip to embed")
    out = {k: np.asarray(v) for k, v in rows.items()}
    for name in embedder.outputs:
        out[name] = np.asarray(rows[name], np.float32).reshape(len(out["id"]), -1)
    names = np.asarray(embedder.class_names, dtype=str)
    out["label"] = out["label"].astype(np.int32)
    out["label_name"] = np.asarray(
        [names[i] if 0 <= i < len(names) else "" for i in out["label"]], dtype=str
    ).reshape(-1)
    out["class_names"] = names
    for key in ("id", "path"):
        out[key] = out[key].astype(str)
    return out


def write_npz(out: pathlib.Path, arrays: dict[str, np.ndarray], overwrite: bool) -> None:
    """Whole or not at all: written beside OUT, then renamed over it."""
    if out.exists() and not overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
    if len(set(arrays["id"])) != len(arrays["id"]):
        raise ValueError("two clips have the same id (a file given twice?)")
    staging = out.parent / f".{out.name}.incomplete-{os.getpid()}.npz"
    np.savez(staging, **arrays)
    staging.replace(out)


def main(argv: list[str] | None = None) -> int:
    process.configure()
    parser = argparse.ArgumentParser(
        prog="sora-embed", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--workdir", help="a sora-train work dir")
    source.add_argument("--export", help="a sora-export dir")
    parser.add_argument(
        "--checkpoint",
        type=checkpoint_choice,
        default=None,
        help="--workdir: a step, best or latest (default: latest)",
    )
    parser.add_argument("--split", default=None, help="a split of the run's prepared dataset")
    parser.add_argument("--data-dir", default=None, help="override config.data.dir")
    parser.add_argument("files", nargs="*", help="video files (instead of --split)")
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    if bool(args.split) == bool(args.files):
        parser.error("give either --split or files")
    out = pathlib.Path(args.out)
    if out.suffix != ".npz":
        parser.error(f"--out {out}: the output is a .npz file")
    if out.exists() and not args.overwrite:
        print(f"sora-embed: --out {out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    from sora_jax.train.checkpoint import CorruptCheckpointError

    try:
        embedder = Embedder(args.workdir, args.export, args.checkpoint)
    except (FileNotFoundError, ValueError, CorruptCheckpointError) as e:  # StorageError too
        print(f"sora-embed: {e}", file=sys.stderr)
        return 2
    if args.data_dir:
        embedder.config.data.dir = args.data_dir
    failures: list[str] = []
    if args.split:
        clips, id_of = _split_clips(embedder.config, args.split), f"{args.split}/{{}}".format
    else:
        clips, id_of = _file_clips(args.files, embedder, failures), str
    try:
        arrays = embed_clips(embedder, clips, id_of)
        write_npz(out, arrays, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"sora-embed: {e}", file=sys.stderr)
        return 2
    print(
        f"wrote {len(arrays['id'])} clips' embeddings ({arrays['embedding'].shape[1]} dims) "
        f"to {out}" + (f"; {len(failures)} files failed" if failures else "")
    )
    return 3 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
