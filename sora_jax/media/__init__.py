"""From a media file to the model's inputs: decoding (PyAV), clip windows, crops and views,
and the client of an exported model.

This package imports NumPy, PyAV, Pillow and (the client only) jax and orbax, never the
rest of sora_jax: sora-export copies it beside the artifact as `sora_media/`, so a
downstream team runs the very code data preparation, evaluation and sora-predict run.
"""
