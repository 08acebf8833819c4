"""The audio branch: log-mel, then an LSTM or GRU scanned over time."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.recurrent import flip_sequences

from sora_jax.config import check, one_of
from sora_jax.kernels import onednn
from sora_jax.models import melspec
from sora_jax.models.bias import Dense
from sora_jax.models.gru import gru_sequence
from sora_jax.models.lstm import BACKENDS as LSTM_BACKENDS
from sora_jax.models.lstm import lstm_sequence

# A fixed standardisation of log-mel values (about -14 for silence, +9 for a full-scale
# tone): keeps the recurrent gates out of saturation at initialisation, and being a
# constant it costs nothing and needs no statistics in the checkpoint.
_LOG_MEL_CENTER = -4.0
_LOG_MEL_SCALE = 4.0


class _RecurrentWeights(nn.Module):
    """W_h [H, G*H] (and b_h [G*H]), named and initialised as `nn.Dense`'s kernel and bias
    (checkpoints carry over)."""

    shape: tuple[int, int]
    use_bias: bool = False

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), self.shape, jnp.float32)
        if not self.use_bias:
            return kernel, None
        bias = self.param("bias", nn.initializers.zeros_init(), self.shape[-1:], jnp.float32)
        return kernel, bias


def _in_clip_order(run, input_gates, seq_lengths, reverse: bool) -> jax.Array:
    """run(input_gates) over each clip's own frames, reversed in place when `reverse`
    (padding stays at the end, where the masks drop it)."""
    if not reverse:
        return run(input_gates)
    flip = lambda x: flip_sequences(x, seq_lengths, 1, time_major=True)
    return flip(run(flip(input_gates)))


class LSTMRecurrence(nn.Module):
    """The LSTM over a sequence whose input projection was computed for all steps
    beforehand: only `h @ W_h` is left per step, and the backward pass computes the
    recurrent weight gradient once for all steps (lstm.py). Equivalent to
    `flax.linen.LSTMCell` scanned by `nn.RNN` (gate order i, f, g, o)."""

    features: int
    unroll: int = 1
    dtype: jnp.dtype = jnp.float32
    backend: str = "auto"  # lstm.BACKENDS: one kernel per loop on the CPU and TPU (lstm.py)

    @nn.compact
    def __call__(self, input_gates, seq_lengths, reverse: bool = False):  # [F, B, 4H], [B]
        w_h, _ = _RecurrentWeights((self.features, 4 * self.features), name="recurrent")()
        run = lambda gates: lstm_sequence(gates, w_h, self.dtype, self.unroll, self.backend)
        return _in_clip_order(run, input_gates, seq_lengths, reverse)  # [F, B, H]


class GRURecurrence(nn.Module):
    """The GRU over a sequence whose input projection was computed for all steps
    beforehand, with the backward pass of gru.py (the recurrent weight gradient once for
    all steps). Equivalent to `flax.linen.GRUCell` scanned by `nn.RNN` (gate order r, z,
    n); r and z each have two biases that add (the input's and the recurrent's) where
    flax's have one."""

    features: int
    unroll: int = 1
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, input_gates, seq_lengths, reverse: bool = False):  # [F, B, 3H], [B]
        shape = (self.features, 3 * self.features)
        w_h, b_h = _RecurrentWeights(shape, use_bias=True, name="recurrent")()
        run = lambda gates: gru_sequence(gates, w_h, b_h, self.dtype, self.unroll)
        return _in_clip_order(run, input_gates, seq_lengths, reverse)  # [F, B, H]


CELLS = {"lstm": 4, "gru": 3}  # gates per hidden unit


def spec_augment(
    rng: jax.Array,
    mel: jax.Array,  # [B, F, M]
    time_masks: int,
    time_width: int,
    freq_masks: int,
    freq_width: int,
) -> jax.Array:
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


def stack_frames(mel: jax.Array, frame_lengths: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """[B, F, M] log-mel, [B] valid frames -> [B, ceil(F/k), k*M], [B] valid stacks: each k
    consecutive frames side by side, and a stack valid when any of its frames is. Frames
    past a clip's length are zeros, so what follows its end never reaches its last stack."""
    B, F, M = mel.shape
    mel = jnp.where(jnp.arange(F)[None, :, None] < frame_lengths[:, None, None], mel, 0)
    mel = jnp.pad(mel, ((0, 0), (0, -F % k), (0, 0)))
    return mel.reshape(B, -1, k * M), -(-frame_lengths // k)


class AudioEncoder(nn.Module):
    """Waveform [B, S] -> clip feature [B, D] and per-step features [B, F / time_stack, D].

    `lengths` ([B], valid samples) masks padding: frames past a clip's end change neither
    the recurrent state seen by valid frames nor the pooled feature.
    """

    hidden: int = 256
    cell: str = "lstm"
    layers: int = 1
    bidirectional: bool = False
    num_mel_bins: int = 64
    spec_augment: tuple[int, int, int, int] = (0, 0, 0, 0)  # time masks, width, freq masks, width
    # Time steps per iteration of XLA's scan (the `xla` LSTM backend, and the GRU): the
    # small per-step matmuls are dominated by per-iteration overhead (4: 5% faster CPU
    # reference step); same results, and the program still does not grow with the audio.
    unroll: int = 1
    # Log-mel frames per recurrent step: k concatenates k consecutive 10 ms frames into one
    # input of k x num_mel_bins, so the scan runs F/k steps. On a TPU each step is a small
    # matmul that cannot fill the chip, one after another (BENCHMARKS.md section 7).
    time_stack: int = 1
    lstm_backend: str = "auto"  # lstm.BACKENDS (lstm.py)
    dtype: jnp.dtype = jnp.float32

    @staticmethod
    def check_config(a, key: str) -> None:
        """ConfigError naming the key of a setting (config.model.audio) that cannot work."""
        one_of(a.cell, f"{key}.cell", CELLS)
        for name in ("hidden", "layers", "num_mel_bins", "unroll", "time_stack"):
            check(a[name] >= 1, f"{key}.{name}", "must be >= 1")
        check(
            len(a.spec_augment) == 4 and all(x >= 0 for x in a.spec_augment),
            f"{key}.spec_augment",
            "(time masks, max width, mel masks, max width), each >= 0",
        )
        one_of(a.lstm_backend, f"{key}.lstm_backend", LSTM_BACKENDS)
        if a.lstm_backend == "onednn":
            why_not = onednn.unavailable_reason()
            check(why_not is None, f"{key}.lstm_backend", f"'onednn' cannot run: {why_not}")

    @nn.compact
    def __call__(self, waveform, lengths, *, train: bool = False):
        mel = (melspec.log_mel(waveform, self.num_mel_bins) - _LOG_MEL_CENTER) / _LOG_MEL_SCALE
        if train and any(self.spec_augment):
            mel = spec_augment(self.make_rng("dropout"), mel, *self.spec_augment)
        frame_lengths = jnp.minimum(melspec.frame_lengths(lengths), mel.shape[1])  # [B]
        if self.time_stack > 1:
            mel, frame_lengths = stack_frames(mel, frame_lengths, self.time_stack)
        gates_per_unit = CELLS[self.cell]
        directions = (False, True) if self.bidirectional else (False,)
        # Time-major from here on: the scan steps over the leading axis, and transposing the
        # M-wide log-mel once is far cheaper than transposing each 4H-wide projection.
        x = jnp.swapaxes(mel, 0, 1).astype(self.dtype)  # [F, B, M]
        for layer in range(self.layers):
            outputs = []
            for reverse in directions:
                suffix = f"{layer}_{'bwd' if reverse else 'fwd'}"
                # One matmul for every time step at once, outside the scan.
                gates = Dense(  # nn.Dense with a fast bias gradient (bias.py)
                    gates_per_unit * self.hidden, dtype=self.dtype, name=f"input_proj_{suffix}"
                )(x)  # [F, B, G*H]
                name = f"cell_{suffix}"
                if self.cell == "lstm":
                    recurrence = LSTMRecurrence(
                        self.hidden, self.unroll, self.dtype, self.lstm_backend, name=name
                    )
                else:
                    recurrence = GRURecurrence(self.hidden, self.unroll, self.dtype, name=name)
                outputs.append(recurrence(gates, frame_lengths, reverse))  # [F, B, H]
            x = jnp.concatenate(outputs, axis=-1).astype(self.dtype)  # [F, B, H * directions]
        frame_mask = jnp.arange(x.shape[0])[None, :] < frame_lengths[:, None]  # [B, F]
        x = jnp.where(frame_mask.T[..., None], x, 0)
        pooled = jnp.sum(x, axis=0) / jnp.maximum(frame_lengths, 1)[:, None].astype(x.dtype)
        return pooled, jnp.swapaxes(x, 0, 1), frame_mask  # [B, D], [B, F, D], [B, F]
