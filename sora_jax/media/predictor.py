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
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from .decode import SAMPLE_RATE, DecodeError, decode_video, stored_example
from .sampling import ClipSpec, eval_views


class Predictor:
    """An export directory: the artifact, its parameters and the model card's
    preprocessing, loaded once; `predict(path)` per file."""

    def __init__(self, export_dir: str | pathlib.Path):
        export_dir = pathlib.Path(export_dir).absolute()
        self.card = json.loads((export_dir / "model_card.json").read_text())
        if "preprocessing" not in self.card:
            raise ValueError(
                f"{export_dir} was written by an older sora-export (its model card has no "
                "preprocessing): export the run again"
            )
        self.model = jax.export.deserialize((export_dir / "model.jax").read_bytes())
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

    def _averaged(self, inputs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        out = self.model.call(self.params, inputs)
        logits = np.asarray(out["logits"], np.float32)  # [V, C]
        if self.card["multi_label"]:
            probs = 1 / (1 + np.exp(-logits))
        else:
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
        return probs.mean(0), np.asarray(out["embedding"]).mean(0)

    def scores(self, path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray, bool]:
        """(class scores [C], embedding [E], has_audio), each averaged over the views."""
        inputs, video = self._decode(path)
        return *self._averaged(inputs), video.has_audio

    def window_seconds(self) -> float:
        """The time one view of the model spans."""
        return ((self.spec.num_frames - 1) * self.spec.frame_stride + 1) / self.spec.fps

    def predict(self, path: str | pathlib.Path, with_embedding: bool = False) -> dict:
        """{"path", "scores": {class: probability}, "has_audio"}, or {"path", "error"}
        for a file that cannot be read; "warning" when the file is shorter than the
        model's window (the rest of each view is padding, so its scores mean less). With
        `with_embedding`, also "embedding": the clip's embedding [E] (an array, not JSON)."""
        try:
            inputs, video = self._decode(path)
        except (DecodeError, FileNotFoundError) as e:
            return {"path": str(path), "error": str(e)}
        probs, embedding = self._averaged(inputs)
        scores = {name: float(p) for name, p in zip(self.class_names, probs, strict=True)}
        result = {"path": str(path), "scores": scores, "has_audio": video.has_audio}
        seconds = (
            len(video.frames) / video.fps if video.has_video else len(video.audio) / SAMPLE_RATE
        )
        if seconds < self.window_seconds() - 1e-6:
            result["warning"] = (
                f"{seconds:.2f} s long, shorter than the model's window of "
                f"{self.window_seconds():.2f} s: the rest of each view is padding"
            )
        return (result | {"embedding": embedding}) if with_embedding else result


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
