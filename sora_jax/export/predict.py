"""sora-predict --export OUT FILE... [--top-k 5] [--embeddings DIR]

Classifies raw video files with an exported model. Each file goes through the same code
as data preparation (PyAV decode, fps resampling, resize, JPEG round trip) and
evaluation (the same multi-view sampling, scores averaged over views), so predictions
match sora-eval's for the same clip. A file without audio is predicted from video alone;
a file that cannot be decoded gets an error line and the others go on.

stdout: one JSON object per file. Exit code 0, or 3 when some files failed.
"""

import argparse
import json
import pathlib
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from sora_jax import process
from sora_jax.data.decode import DecodeError, decode_video, stored_example
from sora_jax.data.sampling import ClipSpec, eval_views


class Predictor:
    """An export directory, loaded with jax and orbax only."""

    def __init__(self, export_dir: str | pathlib.Path):
        export_dir = pathlib.Path(export_dir).absolute()
        self.card = json.loads((export_dir / "model_card.json").read_text())
        self.model = jax.export.deserialize((export_dir / "model.jax").read_bytes())
        self.params = ocp.StandardCheckpointer().restore(export_dir / "params")
        i = self.card["inputs"]
        self.spec = ClipSpec(
            num_frames=i["frames"]["shape"][1],
            frame_stride=i["frames"]["frame_stride"],
            crop_size=i["frames"]["shape"][2],
            fps=i["frames"]["fps"],
            audio_samples=i["audio"]["samples"],
            num_classes=len(self.card["class_names"]),
        )
        self.short_side = i["frames"]["short_side_resize"]
        self.views = (i["views"]["temporal"], i["views"]["spatial"])
        self.jpeg_quality = i["frames"]["jpeg_quality"]

    def scores(self, path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray, bool]:
        """(class scores [C], embedding [E], has_audio) averaged over the clip's views."""
        video = decode_video(path, self.spec.fps, self.short_side)
        example = stored_example(video, self.jpeg_quality)
        views = eval_views(example, self.spec, *self.views)
        inputs = {k: views[k] for k in self.card["inputs"]["order"]}
        out = self.model.call(self.params, inputs)
        logits = np.asarray(out["logits"], np.float32)
        if self.card["multi_label"]:
            probs = 1 / (1 + np.exp(-logits))
        else:
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
        return probs.mean(0), np.asarray(out["embedding"]).mean(0), video.has_audio


def main(argv: list[str] | None = None) -> int:
    process.configure()
    parser = argparse.ArgumentParser(
        prog="sora-predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--export", required=True, help="a sora-export output directory")
    parser.add_argument("files", nargs="+", help="video files")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--embeddings", default=None, help="write <DIR>/<file stem>.npy")
    args = parser.parse_args(argv)
    predictor = Predictor(args.export)
    names = predictor.card["class_names"]
    if args.embeddings:
        pathlib.Path(args.embeddings).mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in args.files:
        try:
            probs, embedding, has_audio = predictor.scores(path)
        except (DecodeError, FileNotFoundError) as e:
            failed += 1
            print(json.dumps({"path": path, "error": str(e)}))
            print(f"{path}: error: {e}", file=sys.stderr)
            continue
        top = np.argsort(-probs)[: args.top_k]
        result = {
            "path": path,
            "has_audio": has_audio,
            "top": [{"class": names[i], "score": float(probs[i])} for i in top],
        }
        if args.embeddings:
            out = pathlib.Path(args.embeddings) / f"{pathlib.Path(path).stem}.npy"
            np.save(out, embedding)
            result["embedding"] = str(out)
        print(json.dumps(result))
        best = ", ".join(f"{names[i]} {probs[i]:.3f}" for i in top[:3])
        print(
            f"{path}: {best}" + ("" if has_audio else "  (no audio: video only)"), file=sys.stderr
        )
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
