"""The client of an exported model: media files in, class scores out.

    python EXPORT/client.py FILE...        # one JSON line per file
    from sora_media import Predictor       # with EXPORT on sys.path

Each file is decoded as data preparation decodes it (frames at the model's fps, short
side resized, the JPEG round trip of the stored dataset, 16 kHz mono audio), cut into the
views evaluation uses (evenly spaced windows x centre or three crops, each window's own
audio), and the artifact's scores are averaged over the views: what sora-eval reports
for a prepared clip, sora-predict and this client report for the raw file.

Imports NumPy, PyAV, Pillow, jax and orbax only (requirements.txt beside the artifact).
"""

import argparse
import json
import pathlib
import time
from collections.abc import Iterator, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from .decode import (
    SAMPLE_RATE,
    DecodeError,
    decode_incrementally,
    decode_video,
    open_file,
    open_stream,
    stored_example,
)
from .explain import explain_window
from .sampling import ClipSpec, eval_views
from .timeline import StreamReader, Window, read_ahead, sliding_windows

# Bytes of a stream after its last media packet that are more than a container's closing
# elements (cues, tags): garbage, or what the demuxer could not follow.
TRAILING_BYTES = 16 << 10


class Predictor:
    """An export directory: the artifact, its parameters and the model card's
    preprocessing, loaded once; `predict(path)` per file."""

    def __init__(self, export_dir: str | pathlib.Path):
        if "://" in str(export_dir):  # pathlib would make gs://b/x a local folder gs:/b/x
            raise ValueError(
                f"{export_dir}: the client reads a local folder; copy the export first "
                f"(gcloud storage cp -r {export_dir} .), or use sora-predict, which does"
            )
        export_dir = pathlib.Path(export_dir).absolute()
        self.card = json.loads((export_dir / "model_card.json").read_text())
        if "preprocessing" not in self.card:
            raise ValueError(
                f"{export_dir} was written by an older sora-export (its model card has no "
                "preprocessing): export the run again"
            )
        self.model = jax.export.deserialize((export_dir / "model.jax").read_bytes())
        self.call = jax.jit(self.model.call)  # compiled once per batch size
        self.params = ocp.StandardCheckpointer().restore(export_dir / "params")
        self.class_names: list[str] = self.card["class_names"]
        p = self.card["preprocessing"]
        self.spec = ClipSpec(
            num_frames=p["num_frames"],
            frame_stride=p["frame_stride"],
            crop_size=p["crop_size"],
            fps=p["fps"],
            audio_samples=p["audio_samples"],
            num_classes=len(self.class_names),
        )
        self.short_side, self.jpeg_quality = p["short_side"], p["jpeg_quality"]
        self.views = (p["temporal_views"], p["spatial_views"])

    def _decode(self, path: str | pathlib.Path):
        video = decode_video(path, self.spec.fps, self.short_side)
        views = eval_views(stored_example(video, self.jpeg_quality), self.spec, *self.views)
        return {k: views[k] for k in self.card["inputs"]}, video

    def inputs(self, path: str | pathlib.Path) -> tuple[dict[str, np.ndarray], bool]:
        """The artifact's inputs for a file, one row per view [V, ...], and whether the
        file has a sound track. Raises DecodeError (or FileNotFoundError) naming why a
        file cannot be read."""
        inputs, video = self._decode(path)
        return inputs, video.has_audio

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        """Class scores from logits [..., C]: softmax, or sigmoid for a multi-label model."""
        logits = np.asarray(logits, np.float32)
        if self.card["multi_label"]:
            return 1 / (1 + np.exp(-logits))
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        return probs / probs.sum(-1, keepdims=True)

    def log_scores(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """log of the class scores [B, C] of a batch of inputs."""
        self._require_classes("a class score")
        logits = np.asarray(self.call(self.params, inputs)["logits"], np.float64)
        if self.card["multi_label"]:
            return -np.logaddexp(0, -logits)
        top = logits.max(-1, keepdims=True)
        return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))

    def explain(self, window: dict[str, np.ndarray], grid: int = 16) -> dict:
        """Why the model scored one view (inputs without a batch axis) as it did: see
        `explain.explain_window`; with a gated fusion, the attribution also has the
        weights the fusion gave each sense ("fusion_gates")."""
        explanation = explain_window(self.log_scores, window, self.class_names, grid)
        out = self.call(self.params, {k: np.asarray(v)[None] for k, v in window.items()})
        if "fusion_gates" in out:
            video, audio = np.asarray(out["fusion_gates"], np.float64)[0]
            explanation["attribution"]["fusion_gates"] = {
                "video": float(video),
                "audio": float(audio),
            }
        return explanation

    def explain_file(self, path: str | pathlib.Path, grid: int = 16) -> dict:
        """The explanation of a file's prediction: `explain_views` of its views."""
        return self.explain_views(self._decode(path)[0], grid)

    def explain_views(self, inputs: dict[str, np.ndarray], grid: int = 16) -> dict:
        """The explanation of a prediction from views [V, ...], on the view that gave the
        top class the highest score (the view that did most for the prediction), with
        "view": its index among the views."""
        probs = np.exp(self.log_scores(inputs))  # [V, C]
        view = int(np.argmax(probs[:, int(np.argmax(probs.mean(0)))]))
        return self.explain({k: v[view] for k, v in inputs.items()}, grid) | {"view": view}

    @property
    def is_classifier(self) -> bool:
        """False for an embedding model (a pretrained encoder: no classes, no scores)."""
        return self.card.get("kind", "classifier") == "classifier"

    def _require_classes(self, what: str) -> None:
        if not self.is_classifier:
            raise ValueError(
                f"{what} needs class scores, and this export is an embedding model (pretrained "
                "without labels): predict gives its embeddings; train a head on them first"
            )

    def _averaged(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        out = self.call(self.params, inputs)
        probs = self.probabilities(out["logits"])  # [V, C]
        return probs.mean(0), np.asarray(out["embedding"]).mean(0)

    def embeddings(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray | None]:
        """Every embedding output of the views [V, ...], as one per clip: a sense's own
        embedding and projection averaged over the views that have that sense (None where
        none has it, never a vector that looks like data), projections made unit length
        again, as sora-eval's retrieval reads them."""
        out = self.call(self.params, inputs)
        result = {}
        for name in self.card["outputs"]:
            if name == "logits" or name.startswith("fusion_"):
                continue
            x = np.asarray(out[name], np.float32)  # [V, D]
            sense = name.split("_")[0]
            present = np.asarray(inputs.get(f"has_{sense}", np.ones(len(x), bool)), bool)
            if not present.any():
                result[name] = None
                continue
            x = x[present].mean(0)
            if name.endswith("_projection"):
                x = x / max(float(np.linalg.norm(x)), 1e-6)
            result[name] = x
        return result

    def scores(self, path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray, bool]:
        """(class scores [C], embedding [E], has_audio), each averaged over the views."""
        inputs, video = self._decode(path)
        return *self._averaged(inputs), video.has_audio

    def input_specs(self) -> dict[str, jax.ShapeDtypeStruct]:
        """The artifact's inputs, batch of one."""
        (_, inputs), _ = jax.tree.unflatten(self.model.in_tree, self.model.in_avals)
        return {k: jax.ShapeDtypeStruct((1, *v.shape[1:]), v.dtype) for k, v in inputs.items()}

    def window_seconds(self) -> float:
        """The time one view of the model spans."""
        return ((self.spec.num_frames - 1) * self.spec.frame_stride + 1) / self.spec.fps

    def predict(
        self, path: str | pathlib.Path, with_embedding: bool = False, with_inputs: bool = False
    ) -> dict:
        """{"path", "scores": {class: probability}, "has_audio"}, or {"path", "error"}
        for a file that cannot be read; "warning" when the file is shorter than the
        model's window (the rest of each view is padding, so its scores mean less). With
        `with_embedding`, also "embedding": the clip's embedding [E] (an array, not JSON);
        with `with_inputs`, also "inputs": the views it scored (to explain them)."""
        try:
            inputs, video = self._decode(path)
        except (DecodeError, FileNotFoundError) as e:
            return {"path": str(path), "error": str(e)}
        if self.is_classifier:
            probs, embedding = self._averaged(inputs)
            scores = {name: float(p) for name, p in zip(self.class_names, probs, strict=True)}
            result = {"path": str(path), "scores": scores, "has_audio": video.has_audio}
        else:  # an embedding model: its embeddings are what it gives
            found = self.embeddings(inputs)
            embedding = found["embedding"]
            shown = {
                k: None if v is None else [round(float(x), 6) for x in v] for k, v in found.items()
            }
            result = {"path": str(path), "embeddings": shown, "has_audio": video.has_audio}
        seconds = (
            len(video.frames) / video.fps if video.has_video else len(video.audio) / SAMPLE_RATE
        )
        warnings = []
        if seconds < self.window_seconds() - 1e-6:
            warnings.append(
                f"{seconds:.2f} s long, shorter than the model's window of "
                f"{self.window_seconds():.2f} s: the rest of each view is padding"
            )
        if video.truncated():  # scored on the part that is there, and said so
            warnings.append(f"{video.truncated()}: scored on what decoded")
        if warnings:
            result["warning"] = "; ".join(warnings)
        if with_embedding:
            result["embedding"] = embedding
        return (result | {"inputs": inputs}) if with_inputs else result

    def timeline(
        self,
        source: "str | pathlib.Path | StreamReader",
        hop_seconds: float = 0.0,
        batch: int = 8,
        with_inputs: bool = False,
    ) -> Iterator[dict]:
        """The model's window slid over a whole file, or a live stream (a `StreamReader`):
        one dict per window, {"path", "start_s", "end_s", "scores", "has_audio",
        "has_video"}, as soon as it is scored, then {"path", "summary": ...} (or {"path",
        "error"}). Windows start every `hop_seconds` (0: half a window); a file's are
        scored `batch` at a time, a stream's one by one, as soon as each has arrived.
        Memory stays bounded by a few windows however long the input. `with_inputs`:
        each window's dict also has "inputs", the model's inputs for it (to explain it).
        The summary's timing leaves out the time the caller spends between windows
        (explaining a window, say): that is its "caller_s"."""
        self._require_classes("a timeline")
        live = isinstance(source, StreamReader)
        name = source.name if live else str(source)
        span = (self.spec.num_frames - 1) * self.spec.frame_stride + 1
        hop = max(1, round(hop_seconds * self.spec.fps)) if hop_seconds else max(1, span // 2)
        batch = 1 if live else batch
        began = time.perf_counter()
        zeros = {k: np.zeros((batch, *v.shape[1:]), v.dtype) for k, v in self.input_specs().items()}
        jax.block_until_ready(self.call(self.params, zeros))  # compiled before the clock starts
        compile_seconds = time.perf_counter() - began
        began, model_seconds, latencies, rows = time.perf_counter(), 0.0, [], []
        caller_seconds = 0.0  # spent by the caller between windows (e.g. explaining one)
        pending: list[Window] = []

        def scored() -> Iterator[dict]:
            nonlocal model_seconds, caller_seconds
            inputs = {k: np.stack([w.inputs[k] for w in pending]) for k in self.card["inputs"]}
            if len(pending) < batch:  # a fixed batch: the artifact compiles once
                inputs = {
                    k: np.concatenate([v, v[-1:].repeat(batch - len(v), 0)])
                    for k, v in inputs.items()
                }
            began_model = time.perf_counter()
            probs = self.probabilities(self.call(self.params, inputs)["logits"])
            done = time.perf_counter()
            model_seconds += done - began_model
            for window, p in zip(pending, probs, strict=False):
                latencies.append(done - window.ready_at)
                row = {
                    "path": name,
                    "start_s": round(window.start / self.spec.fps, 4),
                    "end_s": round(window.end / self.spec.fps, 4),
                    "scores": {c: float(x) for c, x in zip(self.class_names, p, strict=True)},
                    "has_audio": bool(window.inputs["has_audio"]),
                    "has_video": bool(window.inputs["has_video"]),
                }
                rows.append((row["start_s"], row["end_s"], int(np.argmax(p))))
                handed = time.perf_counter()
                yield (row | {"inputs": window.inputs}) if with_inputs else row
                caller_seconds += time.perf_counter() - handed
            pending.clear()

        position: dict = {}  # where the last media packet ended (decode_incrementally)
        try:
            container = open_stream(source) if live else open_file(source)
            with container:
                has_video, has_audio = bool(container.streams.video), bool(container.streams.audio)
                events = read_ahead(
                    decode_incrementally(
                        container, self.spec.fps, self.short_side, position=position
                    )
                )
                for window in sliding_windows(
                    events, self.spec, hop, has_video, has_audio, self.jpeg_quality
                ):
                    pending.append(window)
                    if len(pending) == batch:
                        yield from scored()
                if pending:
                    yield from scored()
        except DecodeError as e:
            yield {"path": name, "error": str(e)}
            return
        finally:
            if live:
                source.close()
        elapsed = time.perf_counter() - began - caller_seconds
        latencies = latencies or [0.0]
        seconds = rows[-1][1] if rows else 0.0
        summary_warning = {}
        media_end = position.get("media_end", 0)
        if live and media_end and source.bytes_read - media_end > TRAILING_BYTES:
            summary_warning["warning"] = (
                f"{source.bytes_read - media_end} bytes after byte {media_end} of the stream "
                "held no media (garbage, or a container this reader cannot follow): skipped"
            )
        yield {
            "path": name,
            "summary": {
                **summary_warning,
                "seconds": seconds,
                "windows": len(rows),
                "has_audio": has_audio,
                "has_video": has_video,
                "segments": self._segments(rows),
                "timing": {
                    "compile_s": round(compile_seconds, 4),
                    "seconds": round(elapsed, 4),
                    "decode_s": round(elapsed - model_seconds, 4),  # decoding and preprocessing
                    "model_s": round(model_seconds, 4),
                    "caller_s": round(caller_seconds, 4),  # not in the figures around it
                    "real_time_factor": round(seconds / elapsed, 3),
                    "windows_per_s": round(len(rows) / elapsed, 3),
                    "latency_ms": {
                        "p50": round(1000 * float(np.percentile(latencies, 50)), 3),
                        "p99": round(1000 * float(np.percentile(latencies, 99)), 3),
                    },
                },
            },
        }

    def _segments(self, rows: list[tuple[float, float, int]]) -> list[dict]:
        """Runs of windows with the same top class; a boundary lies halfway between the
        centres of the last window of one run and the first of the next."""
        segments: list[dict] = []
        for i, (start, end, top) in enumerate(rows):
            if segments and segments[-1]["class"] == self.class_names[top]:
                continue
            if segments:
                previous = rows[i - 1]
                boundary = round((previous[0] + previous[1] + start + end) / 4, 4)
                segments[-1]["end_s"] = boundary
            else:
                boundary = 0.0
            segments.append({"class": self.class_names[top], "start_s": boundary})
        if segments:
            segments[-1]["end_s"] = rows[-1][1]
        return segments


def main(argv: Sequence[str] | None = None, export_dir: str | pathlib.Path | None = None) -> int:
    """Print one JSON line per file; exit code 3 when some file could not be read."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("files", nargs="+", help="video (or audio) files")
    if export_dir is None:
        parser.add_argument("--export", required=True, help="the sora-export directory")
    args = parser.parse_args(argv)
    try:
        predictor = Predictor(export_dir or args.export)
    except (OSError, ValueError) as e:  # not an export, or one this client cannot read
        parser.error(str(e))
    failed = 0
    for path in args.files:
        result = predictor.predict(path)
        failed += "error" in result
        print(json.dumps(result), flush=True)
    return 3 if failed else 0
