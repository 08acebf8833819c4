"""sora-predict --export OUT FILE... [--top-k 5] [--embeddings DIR]

Classifies raw video files with an exported model, through the export's own client
(sora_jax.media.predictor, copied beside the artifact as sora_media/): the same decoding
as data preparation and the same views as evaluation, so predictions match sora-eval's
for the same clip and `python OUT/client.py FILE...`'s up to float rounding. A file without
audio is predicted from video alone; a file that cannot be decoded gets an error line and
the others go on.

stdout: one JSON object per file, the client's ({"path", "scores", "has_audio"}, and
"warning" for a file shorter than the model's window) with the top classes; exit code 0,
or 3 when some files failed.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

from sora_jax import process
from sora_jax.media.predictor import Predictor

__all__ = ["Predictor", "main"]


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
    try:
        predictor = Predictor(args.export)
    except (OSError, ValueError) as e:  # not an export, or one written by an older version
        parser.error(str(e))
    if args.embeddings:
        stems = [pathlib.Path(path).stem for path in args.files]
        clashes = sorted({s for s in stems if stems.count(s) > 1})
        if clashes:  # <DIR>/<stem>.npy would be overwritten
            parser.error(f"--embeddings: several files are named {', '.join(clashes)}")
        pathlib.Path(args.embeddings).mkdir(parents=True, exist_ok=True)
    failed = 0
    for path in args.files:
        result = predictor.predict(path, with_embedding=bool(args.embeddings))
        if "error" in result:
            failed += 1
            print(json.dumps(result))
            print(f"{path}: error: {result['error']}", file=sys.stderr)
            continue
        scores = result["scores"]
        top = sorted(scores, key=scores.get, reverse=True)[: args.top_k]
        result["top"] = [{"class": name, "score": scores[name]} for name in top]
        if args.embeddings:
            out = pathlib.Path(args.embeddings) / f"{pathlib.Path(path).stem}.npy"
            np.save(out, result.pop("embedding"))
            result["embedding"] = str(out)
        print(json.dumps(result))
        best = ", ".join(f"{name} {scores[name]:.3f}" for name in top[:3])
        print(
            f"{path}: {best}" + ("" if result["has_audio"] else "  (no audio: video only)"),
            file=sys.stderr,
        )
    return 3 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
