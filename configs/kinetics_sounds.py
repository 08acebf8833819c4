"""A Kinetics-Sounds-sized run (32 classes, ~20k clips): a realistic single-pod example.

Prepare: sora-prep kinetics_sounds.csv --layout kinetics --out gs://BUCKET/data
  --name kinetics_sounds --fps 12.5 --short-side 128 --workers 64
The base config is this run's architecture and schedule; only the data differs.
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    c.data.update(dir="gs://BUCKET/data", name="kinetics_sounds")
    c.model.num_classes = 32
    return base.apply_preset(c, arg)
