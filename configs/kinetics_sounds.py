"""A Kinetics-Sounds-sized run (32 classes, ~20k clips): a realistic single-pod example.

Prepare: sora-prep kinetics_sounds.csv --layout kinetics --out gs://BUCKET/data
  --name kinetics_sounds --fps 12.5 --short-side 128 --workers 64
The base config is this run's architecture and schedule; the data differs, and the visual
tower keeps its activations instead of recomputing them (BENCHMARKS.md section 7).
"""

import ml_collections

from configs import base


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base.get_config()
    c.data.update(dir="gs://BUCKET/data", name="kinetics_sounds")
    c.model.num_classes = 32
    # Compiled for v5e:4x4 (32 clips per chip), keeping the activations costs 1.6 GiB more
    # per chip (3.6 GiB of 16) and saves 23% of the FLOPs, 13% of the HBM traffic and 17%
    # of XLA's estimated cycles. On a slice with more clips per chip, `sora-train`'s fit
    # check says when to turn remat back on.
    c.model.visual.remat = False
    # No bias on the convs a norm follows (the norm's shift stands in for it). Compiled for
    # v5e:4x4 the step then moves 7% fewer HBM bytes, is compute-bound (242 FLOP per byte)
    # and expected 10% shorter (BENCHMARKS.md section 7). Runs of this config from before
    # 2026-12-03 had those biases.
    c.model.visual.conv_bias_before_norm = False
    return base.apply_preset(c, arg)
