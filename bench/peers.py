"""The reference model's train step in Flax (this project), PyTorch (eager and
torch.compile) and Keras, in one run, so the ratios compare like with like.

  pip install -e '.[bench]'     # torch; Keras comes with TensorFlow
  python bench/peers.py --config configs/bench_reference.py

Every framework trains the same architecture (configs/bench_reference.py) on the same
random clips: uint8 frames normalised inside, log-mel from the raw waveform, a one-layer
LSTM, concat fusion, AdamW, softmax cross-entropy, in the config's compute dtype
(`--config.model.dtype=bfloat16`: float32 parameters, bfloat16 compute, which is PyTorch's
CPU autocast and Keras's `mixed_bfloat16` policy). Peers use their idiomatic fast paths
(PyTorch channels-last; Keras with and without XLA, written the fastest of the ways
tried, `--keras-variant all` times them all). Last line: JSON.

Which kernels run depends on the host (oneDNN's AMX and AVX-512 paths, XLA's), so `--out`
keeps one run per host kind (`host_kind`: the CPU model and its widest vector ISA) and
replaces only this host kind's. `--max-isa AVX2` holds every framework to AVX2, so an
AVX-512 host stands in for an AVX2 one (its own host kind, "held to AVX2").
"""

import functools
import json
import os
import pathlib
import sys
import time

import common
import jax
import numpy as np
from train_step import measure, random_batch

from sora_jax import config as config_lib
from sora_jax import process
from sora_jax.models import melspec

MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


def _timed(step, steps: int, warmup: int) -> tuple[float, float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), 0.0


def torch_step(config, batch, compiled: bool, steps: int, warmup: int) -> dict:
    import torch
    from torch import nn

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    # The device Flax runs on, when this PyTorch build has it: a GPU run compares GPUs.
    on_gpu = jax.devices()[0].platform == "gpu" and torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    m = config.model
    mel = torch.from_numpy(melspec.mel_matrix(m.audio.num_mel_bins)).to(device)
    window = torch.hann_window(melspec.WINDOW, periodic=True, device=device)

    class Reference(nn.Module):
        def __init__(self):
            super().__init__()
            layers, cin = [], 3
            for w in m.visual.widths:
                layers += [
                    nn.Conv2d(cin, w, 3, 2, 1),
                    nn.ReLU(),
                    nn.Conv2d(w, w, 3, 1, 1),
                    nn.ReLU(),
                ]
                cin = w
            self.visual = nn.Sequential(*layers)
            self.lstm = nn.LSTM(m.audio.num_mel_bins, m.audio.hidden, batch_first=True)
            self.head = nn.Sequential(
                nn.Linear(cin + m.audio.hidden, m.embed_dim),
                nn.ReLU(),
                nn.Linear(m.embed_dim, m.num_classes),
            )
            self.register_buffer("mean", torch.from_numpy(MEAN).view(1, 3, 1, 1))
            self.register_buffer("std", torch.from_numpy(STD).view(1, 3, 1, 1))

        def forward(self, frames, wave):  # frames [B, T, H, W, 3] uint8, wave [B, S] int16
            B, T, H, W, _ = frames.shape
            x = frames.reshape(B * T, H, W, 3).permute(0, 3, 1, 2).float()
            x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
            v = self.visual(x).mean((2, 3)).reshape(B, T, -1).mean(1)
            w = wave.float() / 32768.0
            frames_a = w.unfold(1, melspec.WINDOW, melspec.HOP) * window
            spec = torch.fft.rfft(frames_a, n=melspec.FFT_SIZE).abs() ** 2
            logmel = (torch.log(spec @ mel + 1e-6) + 4.0) / 4.0
            a = self.lstm(logmel)[0].mean(1)
            return self.head(torch.cat([v, a], -1))

    model = Reference().to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(
        model.parameters(),
        lr=config.optimizer.learning_rate,
        weight_decay=config.optimizer.weight_decay,
    )
    frames = torch.from_numpy(batch["frames"]).to(device)
    wave = torch.from_numpy(batch["audio"]).to(device)
    labels = torch.from_numpy(batch["label"]).long().to(device)
    loss_fn = nn.CrossEntropyLoss()

    low_precision = config.model.dtype == "bfloat16"

    def train_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low_precision):
            loss = loss_fn(model(frames, wave).float(), labels)
        loss.backward()
        opt.step()
        return loss

    if compiled:
        train_step = torch.compile(train_step)
    start = time.perf_counter()
    train_step()
    first = time.perf_counter() - start
    step_s, _ = _timed(lambda: train_step().item(), steps, warmup)
    return {
        "framework": "pytorch_compile" if compiled else "pytorch_eager",
        "version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # its kernels' ISA
        "device": "gpu" if on_gpu else "cpu",
        "dtype": config.model.dtype,
        "step_ms": step_s * 1e3,
        "clips_per_s": len(labels) / step_s,
        "first_step_s": first,
    }


# The Keras peer's ways of writing the same step, tried in turn (BENCHMARKS.md section 2):
# `layers` wraps each convolution in its own TimeDistributed, `tower` the whole visual tower
# in one; `train_on_batch` is Keras's own compiled step, `tf_function` a GradientTape step
# in one `tf.function`, TensorFlow 2's custom training loop.
KERAS_VARIANTS = {
    "layers+train_on_batch": ("layers", "train_on_batch"),
    "tower+train_on_batch": ("tower", "train_on_batch"),
    "layers+tf_function": ("layers", "tf_function"),
    "tower+tf_function": ("tower", "tf_function"),
}
# The fastest way of each, measured here in float32 (BENCHMARKS.md section 2): without XLA
# a tf.function step, with XLA Keras's own jit-compiled one; the tower in one
# TimeDistributed in both.
KERAS_FASTEST = {False: "tower+tf_function", True: "tower+train_on_batch"}


def keras_step(
    config, batch, jit_compile: bool, steps: int, warmup: int, variant: str = "fastest"
) -> dict:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    # TensorFlow's own XLA reads XLA_FLAGS when it first compiles: give it XLA's defaults,
    # not the YNNPACK setting process.configure() added for JAX (JAX read it at start-up).
    flags = os.environ.get("XLA_FLAGS", "").split()
    os.environ["XLA_FLAGS"] = " ".join(f for f in flags if f != process.YNN_SETTING)
    import keras
    import tensorflow as tf

    variant = KERAS_FASTEST[jit_compile] if variant == "fastest" else variant
    wrap, step_kind = KERAS_VARIANTS[variant]
    keras.backend.clear_session()  # each variant starts from nothing built by the last
    keras.utils.set_random_seed(0)
    policy = "mixed_bfloat16" if config.model.dtype == "bfloat16" else "float32"
    keras.mixed_precision.set_global_policy(policy)
    m, d = config.model, config.data
    mel = tf.constant(melspec.mel_matrix(m.audio.num_mel_bins))
    samples = config_lib.audio_samples(config)
    L = keras.layers

    def log_mel(wave):
        w = tf.cast(wave, tf.float32) / 32768.0
        frames = tf.signal.frame(w, melspec.WINDOW, melspec.HOP)
        frames = frames * tf.signal.hann_window(melspec.WINDOW, periodic=True)
        spec = tf.abs(tf.signal.rfft(frames, [melspec.FFT_SIZE])) ** 2
        return (tf.math.log(tf.matmul(spec, mel) + 1e-6) + 4.0) / 4.0

    def convs() -> list:
        out = []
        for w in m.visual.widths:
            out.append(L.Conv2D(w, 3, strides=2, padding="same", activation="relu"))
            out.append(L.Conv2D(w, 3, padding="same", activation="relu"))
        return out

    frames_in = keras.Input((d.num_frames, d.crop_size, d.crop_size, 3), dtype="uint8")
    wave_in = keras.Input((samples,), dtype="int16")
    x = L.Lambda(lambda f: (tf.cast(f, tf.float32) - MEAN) / STD)(frames_in)
    if wrap == "tower":  # the frames folded into the batch once: [B*T, H, W, C]
        tower = keras.Sequential([*convs(), L.GlobalAveragePooling2D()])
        x = L.TimeDistributed(tower)(x)
    else:
        for conv in convs():
            x = L.TimeDistributed(conv)(x)
        x = L.TimeDistributed(L.GlobalAveragePooling2D())(x)
    v = L.GlobalAveragePooling1D()(x)
    a = L.LSTM(m.audio.hidden, return_sequences=True)(L.Lambda(log_mel)(wave_in))
    a = L.GlobalAveragePooling1D()(a)
    h = L.Dense(m.embed_dim, activation="relu")(L.Concatenate()([v, a]))
    logits = L.Dense(m.num_classes, dtype="float32")(h)  # the loss in float32, as the others
    model = keras.Model([frames_in, wave_in], logits)
    optimizer = keras.optimizers.AdamW(
        config.optimizer.learning_rate, weight_decay=config.optimizer.weight_decay
    )
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x_in = [tf.constant(batch["frames"]), tf.constant(batch["audio"])]
    y = tf.constant(batch["label"])
    if step_kind == "train_on_batch":
        model.compile(optimizer=optimizer, loss=loss_fn, jit_compile=jit_compile)

        def train_step():
            return model.train_on_batch(x_in, y)

    else:

        @tf.function(jit_compile=jit_compile)
        def compiled_step(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            grads = tape.gradient(loss, model.trainable_variables)
            optimizer.apply(grads, model.trainable_variables)
            return loss

        def train_step():
            return float(compiled_step(x_in, y))  # waits for the step, as .item() does

    start = time.perf_counter()
    train_step()
    first = time.perf_counter() - start
    step_s, _ = _timed(train_step, steps, warmup)
    return {
        "framework": "keras_xla" if jit_compile else "keras",
        "variant": variant,
        "version": keras.__version__,
        "device": "gpu" if tf.config.list_logical_devices("GPU") else "cpu",
        "dtype": config.model.dtype,
        "step_ms": step_s * 1e3,
        "clips_per_s": len(batch["label"]) / step_s,
        "first_step_s": first,
    }


# The widest vector ISA a host has, by its /proc/cpuinfo flag, widest first.
WIDEST = {"amx_bf16": "AMX", "avx512_bf16": "AVX-512 BF16", "avx512f": "AVX-512", "avx2": "AVX2"}


def host_kind(machine: dict) -> str:
    """The CPU model and the widest vector ISA it has (or was held to, `--max-isa`): what
    decides which kernels run."""
    widest = next((name for flag, name in WIDEST.items() if flag in machine["isa"]), "no AVX2")
    held = machine.get("held_to_isa")
    return f"{machine['cpu']}, {widest}" + (f", held to {held}" if held else "")


def write_host_run(path: pathlib.Path, result: dict) -> None:
    """Put `result` in `path` under its host kind, keeping the other hosts' runs."""
    hosts = json.loads(path.read_text())["hosts"] if path.exists() else {}
    hosts[host_kind(result)] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "peers", "hosts": hosts}, indent=1) + "\n")


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--skip",
        action="append",
        default=[],
        help="leave out a peer: pytorch_eager, pytorch_compile, keras, keras_xla",
    )
    p.add_argument(
        "--keras-variant",
        choices=["fastest", *KERAS_VARIANTS, "all"],
        default="fastest",
        help="how the Keras peer is written (default: the fastest measured, with and "
        "without XLA); 'all' times every way",
    )
    p.add_argument(
        "--max-isa",
        choices=sorted(common.ISA_CAPS),
        default=None,
        help="hold every framework's CPU kernels to this vector ISA, to stand in for an "
        "older host (YNNPACK's dots and TensorFlow's Eigen kernels keep this host's)",
    )
    args = p.parse_args(argv)
    if args.max_isa:
        common.hold_to_isa(args.max_isa)
    config = common.load_config(args.config, args.set)
    batch = random_batch(config, config.batch_size)
    flax = {
        "framework": "flax",
        "device": jax.devices()[0].platform,
        **measure(config, args.steps, args.warmup),
    }
    results = [flax]
    runs = {
        "pytorch_eager": lambda: torch_step(config, batch, False, args.steps, args.warmup),
        "pytorch_compile": lambda: torch_step(config, batch, True, args.steps, args.warmup),
    }
    variants = list(KERAS_VARIANTS) if args.keras_variant == "all" else [args.keras_variant]
    for variant in variants:
        suffix = "" if len(variants) == 1 else f" [{variant}]"
        for name, jit_compile in (("keras", False), ("keras_xla", True)):
            runs[name + suffix] = functools.partial(
                keras_step, config, batch, jit_compile, args.steps, args.warmup, variant
            )
    for name, run in runs.items():
        if name.split(" ")[0] in args.skip:
            continue
        try:
            results.append(run())
        except Exception as e:
            results.append({"framework": name, "error": f"{type(e).__name__}: {e}"[:500]})
    ok = [r for r in results if "step_ms" in r]
    for r in ok:
        r["flax_speedup"] = r["step_ms"] / flax["step_ms"]  # >1: Flax is faster
    # How close each framework comes to the machine: the model's FLOPs (the same for all)
    # per second over the float32 matmul rate XLA reaches here in this run, train_step.py's
    # MFU denominator. Float32 only.
    peak = common.matmul_peak_flops() if config.model.dtype == "float32" else None
    for r in ok if peak else ():
        r["fraction_of_peak"] = flax["flops_per_step"] / (r["step_ms"] / 1e3) / peak
    result = {
        "benchmark": "peers",
        "config": args.config,
        "overrides": args.set,
        "batch": config.batch_size,
        "results": results,
        **({"peak_matmul_flops_per_s": peak} if peak else {}),
        **common.machine(),
        **({"held_to_isa": args.max_isa} if args.max_isa else {}),
    }
    table = [
        (
            f"{r['framework']} ({r['device']}){' ' + r['variant'] if 'variant' in r else ''}",
            f"{r['step_ms']:8.1f} ms  {r['clips_per_s']:6.1f} clips/s  "
            f"flax is {r['flax_speedup']:.2f}x"
            + (f"  {r['fraction_of_peak']:.0%} of the matmul peak" if peak else ""),
        )
        for r in ok
    ]
    table += [(r["framework"], r["error"]) for r in results if "error" in r]
    if args.out:
        write_host_run(pathlib.Path(args.out), result)
    common.emit(result, None, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
