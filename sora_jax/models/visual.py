"""The visual tower: a per-frame 2D ConvNet, then pooling over space and time."""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from sora_jax.config import check, one_of
from sora_jax.kernels import onednn
from sora_jax.models.conv import Conv

# Pixels are normalised inside the model so that exported models take raw uint8 frames.
# (NumPy constants: a jnp array here would start the XLA backend at import time, before
# jax.distributed.initialize may run.)
_PIXEL_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255.0
_PIXEL_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255.0

NORMS = ("none", "group", "layer")
TEMPORAL_POOLS = ("mean", "max", "attention")


def normalize_pixels(frames: jnp.ndarray, dtype: jnp.dtype) -> jnp.ndarray:
    """uint8 or float pixels in [0, 255] -> zero-mean, unit-variance `dtype`."""
    return ((frames.astype(jnp.float32) - _PIXEL_MEAN) / _PIXEL_STD).astype(dtype)


def _group_count(width: int, max_groups: int = 8) -> int:
    return max(g for g in range(1, max_groups + 1) if width % g == 0)


class Norm(nn.Module):
    """`none`, `group` or `layer` normalisation: none of them keeps running statistics,
    so the model stays a pure function under sharding and in export."""

    kind: str
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if self.kind == "none":
            return x
        if self.kind == "group":
            return nn.GroupNorm(num_groups=_group_count(x.shape[-1]), dtype=self.dtype)(x)
        if self.kind == "layer":
            return nn.LayerNorm(dtype=self.dtype)(x)
        raise ValueError(f"unknown norm {self.kind!r}")


class ConvBlock(nn.Module):
    """3x3 conv (stride s) -> norm -> ReLU -> 3x3 conv -> norm [+ shortcut] -> ReLU.

    Without a norm a ReLU that directly follows a conv is computed by the conv (`relu`),
    which the oneDNN kernels fuse: one pass over the activation fewer.

    With `conv_bias_before_norm` False a conv that a norm follows has no bias: the norm
    subtracts its group's mean and adds its own learned shift, so the bias adds little,
    while its gradient costs passes over the activation. Compiled for TPUs, leaving it
    out made kinetics_sounds' step compute-bound on v5e (BENCHMARKS.md section 7).
    """

    width: int
    stride: int
    norm: str = "none"
    residual: bool = False
    dtype: jnp.dtype = jnp.float32
    conv_backend: str = "auto"
    conv_bias_before_norm: bool = True

    @nn.compact
    def __call__(self, x):  # x: [N, H, W, C]
        bias = self.norm == "none" or self.conv_bias_before_norm

        def conv(width, k, stride, name, relu=False):
            return Conv(
                width,
                k,
                stride,
                self.dtype,
                backend=self.conv_backend,
                relu=relu,
                use_bias=bias,
                name=name,
            )

        norm = lambda name: Norm(self.norm, self.dtype, name=name)
        fuse_a = self.norm == "none"
        y = norm("norm_a")(conv(self.width, 3, self.stride, "conv_a", relu=fuse_a)(x))
        if not fuse_a:
            y = nn.relu(y)
        fuse_b = self.norm == "none" and not self.residual
        y = norm("norm_b")(conv(self.width, 3, 1, "conv_b", relu=fuse_b)(y))
        if self.residual:
            shortcut = x
            if x.shape[-1] != self.width or self.stride != 1:
                shortcut = norm("shortcut_norm")(
                    conv(self.width, 1, self.stride, "shortcut_proj")(x)
                )
            y = y + shortcut
        return y if fuse_b else nn.relu(y)


class TemporalPool(nn.Module):
    """[B, T, D] per-frame features -> [B, D], ignoring padded frames."""

    kind: str = "mean"
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, seq, frame_mask):  # seq: [B, T, D], frame_mask: [B, T] bool
        mask = frame_mask[..., None]
        if self.kind == "mean":
            total = jnp.sum(jnp.where(mask, seq, 0), axis=1)
            return total / jnp.maximum(jnp.sum(mask, axis=1), 1).astype(seq.dtype)
        if self.kind == "max":
            return jnp.max(jnp.where(mask, seq, jnp.finfo(seq.dtype).min), axis=1)
        if self.kind == "attention":
            scores = nn.Dense(1, dtype=self.dtype, name="frame_score")(seq).astype(jnp.float32)
            scores = jnp.where(mask, scores, -1e9)
            weights = nn.softmax(scores, axis=1).astype(seq.dtype)  # [B, T, 1]
            return jnp.sum(weights * seq, axis=1)
        raise ValueError(f"unknown temporal pooling {self.kind!r}")


class VisualTower(nn.Module):
    """Frames [B, T, H, W, 3] -> clip feature [B, D] and per-frame features [B, T, D].

    Frames share one 2D ConvNet (folded into the batch), so the tower costs T images and
    leaves relations across time to pooling and to the fusion head.
    """

    widths: Sequence[int] = (32, 64, 128, 256)
    blocks: Sequence[int] = (1, 1, 1, 1)
    strides: Sequence[int] = (2, 2, 2, 2)
    norm: str = "none"
    residual: bool = False
    temporal_pool: str = "mean"
    remat: bool = False  # recompute stage activations in the backward pass to save memory
    dtype: jnp.dtype = jnp.float32
    conv_backend: str = "auto"  # onednn.BACKENDS: oneDNN kernels on the CPU, else XLA's
    conv_bias_before_norm: bool = True  # a bias on the convs a norm follows (ConvBlock)

    @staticmethod
    def check_config(v, key: str) -> None:
        """ConfigError naming the key of a setting (config.model.visual) that cannot work."""
        one_of(v.norm, f"{key}.norm", NORMS)
        one_of(v.temporal_pool, f"{key}.temporal_pool", TEMPORAL_POOLS)
        check(
            len(v.widths) == len(v.blocks) == len(v.strides) >= 1,
            key,
            f"widths {tuple(v.widths)}, blocks {tuple(v.blocks)} and strides "
            f"{tuple(v.strides)} must have one entry per stage",
        )
        check(
            all(x > 0 for x in (*v.widths, *v.blocks, *v.strides)),
            key,
            "widths, blocks and strides must be positive",
        )
        one_of(v.conv_backend, f"{key}.conv_backend", onednn.BACKENDS)
        if v.conv_backend == "onednn":
            why_not = onednn.unavailable_reason() or onednn.conv_unverified_reason()
            check(why_not is None, f"{key}.conv_backend", f"'onednn' cannot run: {why_not}")

    @nn.compact
    def __call__(self, frames, frame_mask):  # frames: [B, T, H, W, 3], frame_mask: [B, T]
        B, T = frames.shape[:2]
        x = normalize_pixels(frames, self.dtype).reshape((B * T, *frames.shape[2:]))
        block_cls = nn.remat(ConvBlock) if self.remat else ConvBlock
        for stage, (width, count, stride) in enumerate(
            zip(self.widths, self.blocks, self.strides, strict=True)
        ):
            for i in range(count):
                x = block_cls(
                    width,
                    stride if i == 0 else 1,
                    self.norm,
                    self.residual,
                    self.dtype,
                    self.conv_backend,
                    self.conv_bias_before_norm,
                    name=f"stage{stage}_block{i}",
                )(x)
        seq = jnp.mean(x, axis=(1, 2)).reshape((B, T, -1))  # global average over space
        pooled = TemporalPool(self.temporal_pool, self.dtype, name="temporal_pool")(seq, frame_mask)
        return pooled, seq
