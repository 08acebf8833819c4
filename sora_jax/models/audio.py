"""The audio branch: log-mel, then an LSTM or GRU scanned over time."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from sora_jax.models import melspec
from sora_jax.models.bias import Dense

# A fixed standardisation of log-mel values (about -14 for silence, +9 for a full-scale
# tone): keeps the recurrent gates out of saturation at initialisation, and being a
# constant it costs nothing and needs no statistics in the checkpoint.
_LOG_MEL_CENTER = -4.0
_LOG_MEL_SCALE = 4.0


class HoistedLSTMCell(nn.RNNCellBase):
    """An LSTM step whose input projection was computed for all steps beforehand.

    Equivalent to `flax.linen.LSTMCell` (gate order i, f, g, o), but the input matmul is
    one large [B*F, M] x [M, 4H] product outside the scan; only `h @ W_h` stays inside.
    """

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, carry, input_gates):  # input_gates: [B, 4H] = x_t @ W_x + b
        c, h = carry
        recurrent = nn.Dense(4 * self.features, use_bias=False, dtype=self.dtype, name="recurrent")
        gates = input_gates.astype(jnp.float32) + recurrent(h).astype(jnp.float32)
        i, f, g, o = jnp.split(gates, 4, axis=-1)
        c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
        h = nn.sigmoid(o) * jnp.tanh(c)
        return (c, h), h

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        zeros = jnp.zeros((*input_shape[:-1], self.features), jnp.float32)
        return zeros, zeros

    @property
    def num_feature_axes(self) -> int:
        return 1


class HoistedGRUCell(nn.RNNCellBase):
    """A GRU step (as `flax.linen.GRUCell`, gate order r, z, n) with a hoisted input
    projection; the recurrent bias of `n` stays inside because it is gated by `r`."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, carry, input_gates):  # input_gates: [B, 3H]
        h = carry
        recurrent = nn.Dense(3 * self.features, use_bias=True, dtype=self.dtype, name="recurrent")
        xr, xz, xn = jnp.split(input_gates.astype(jnp.float32), 3, axis=-1)
        hr, hz, hn = jnp.split(recurrent(h).astype(jnp.float32), 3, axis=-1)
        r = nn.sigmoid(xr + hr)
        z = nn.sigmoid(xz + hz)
        n = jnp.tanh(xn + r * hn)
        h = (1.0 - z) * n + z * h
        return h, h

    @nn.nowrap
    def initialize_carry(self, rng, input_shape):
        return jnp.zeros((*input_shape[:-1], self.features), jnp.float32)

    @property
    def num_feature_axes(self) -> int:
        return 1


CELLS = {"lstm": (HoistedLSTMCell, 4), "gru": (HoistedGRUCell, 3)}


def spec_augment(rng, mel, time_masks: int, time_width: int, freq_masks: int, freq_width: int):
    """SpecAugment: zero (the standardised mean) random bands of time and of mel bins."""
    B, F, M = mel.shape
    keep = jnp.ones((B, F, M), bool)
    for axis, count, width, size in (
        (1, time_masks, time_width, F),
        (2, freq_masks, freq_width, M),
    ):
        for _ in range(count):
            rng, k_width, k_start = jax.random.split(rng, 3)
            w = jax.random.randint(k_width, (B, 1, 1), 0, width + 1)
            start = jax.random.randint(k_start, (B, 1, 1), 0, jnp.maximum(size - w, 1))
            pos = jnp.arange(size).reshape((1, -1, 1) if axis == 1 else (1, 1, -1))
            keep &= ~((pos >= start) & (pos < start + w))
    return jnp.where(keep, mel, 0.0)


class AudioEncoder(nn.Module):
    """Waveform [B, S] -> clip feature [B, D] and per-frame features [B, F, D].

    `lengths` ([B], valid samples) masks padding: frames past a clip's end change neither
    the recurrent state seen by valid frames nor the pooled feature.
    """

    hidden: int = 256
    cell: str = "lstm"
    layers: int = 1
    bidirectional: bool = False
    num_mel_bins: int = 64
    spec_augment: tuple[int, int, int, int] = (0, 0, 0, 0)  # time masks, width, freq masks, width
    # Time steps per iteration of the scan: the small per-step matmuls are dominated by
    # per-iteration overhead on the CPU (4: 5% faster reference step); same results, and
    # the compiled program still does not grow with the audio length.
    unroll: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, waveform, lengths, *, train: bool = False):
        mel = (melspec.log_mel(waveform, self.num_mel_bins) - _LOG_MEL_CENTER) / _LOG_MEL_SCALE
        if train and any(self.spec_augment):
            mel = spec_augment(self.make_rng("dropout"), mel, *self.spec_augment)
        frame_lengths = jnp.minimum(melspec.frame_lengths(lengths), mel.shape[1])  # [B]
        cell_cls, gates_per_unit = CELLS[self.cell]
        directions = (False, True) if self.bidirectional else (False,)
        x = mel.astype(self.dtype)  # [B, F, M]
        for layer in range(self.layers):
            outputs = []
            for reverse in directions:
                suffix = f"{layer}_{'bwd' if reverse else 'fwd'}"
                # One matmul for every time step at once, outside the scan.
                gates = Dense(  # nn.Dense with a fast bias gradient (bias.py)
                    gates_per_unit * self.hidden, dtype=self.dtype, name=f"input_proj_{suffix}"
                )(x)  # [B, F, G*H]
                rnn = nn.RNN(
                    cell_cls(self.hidden, dtype=self.dtype, name=f"cell_{suffix}"),
                    reverse=reverse,
                    keep_order=True,
                    unroll=self.unroll,
                    name=f"rnn_{suffix}",
                )
                outputs.append(rnn(gates, seq_lengths=frame_lengths))
            x = jnp.concatenate(outputs, axis=-1).astype(self.dtype)  # [B, F, H * directions]
        frame_mask = jnp.arange(x.shape[1])[None, :] < frame_lengths[:, None]  # [B, F]
        seq = jnp.where(frame_mask[..., None], x, 0)
        pooled = jnp.sum(seq, axis=1) / jnp.maximum(frame_lengths, 1)[:, None].astype(x.dtype)
        return pooled, seq, frame_mask
