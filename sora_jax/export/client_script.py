"""Scores media files with the model in this directory.

    pip install -r requirements.txt
    python client.py FILE...

One JSON line per file: {"path", "scores": {class: probability}, "has_audio"} from a
classifier, {"path", "embeddings": {name: [floats], or null for a sense the file lacks},
"has_audio"} from an embedding model (model_card.json's "kind"); "warning" when the file
is shorter than the model's window; or {"path", "error"} for a file that cannot be read
(then the exit code is 3). From Python:

    sys.path.insert(0, THIS_DIRECTORY)
    from sora_media.predictor import Predictor
    Predictor(THIS_DIRECTORY).predict("clip.mp4")

sora_media/ is sora_jax's own decoding and view sampling (sora_jax.media), copied here
by sora-export: a file is prepared exactly as the model's training and evaluation data
were, and scored exactly as sora-predict scores it.
"""

import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sora_media.predictor import main  # noqa: E402  (after this directory is on the path)

if __name__ == "__main__":
    sys.exit(main(export_dir=HERE))
