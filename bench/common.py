"""Shared by the bench/ scripts: loading configs, machine facts, JSON output."""

import argparse
import ast
import contextlib
import importlib.util
import json
import os
import pathlib
import platform
import sys
import time

from sora_jax import process

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

# Benchmarks time compilation too: a persistent compilation cache (the tests set one) would
# turn compile times into file reads. Set before any script imports jax.
os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
# The bench scripts are entry points: the same process settings as sora-train's.
process.configure()


def load_config(path: str, overrides: list[str]):
    """A config file's get_config() (FILE:PRESET for a preset), with KEY=VALUE overrides
    (Python literals)."""
    path, _, preset = path.partition(":")
    spec = importlib.util.spec_from_file_location("bench_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(preset) if preset else module.get_config()
    for item in overrides:
        key, value = item.split("=", 1)
        with contextlib.suppress(ValueError, SyntaxError):  # else: a plain string
            value = ast.literal_eval(value)
        node = config
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return config


class _Parser(argparse.ArgumentParser):
    """Config overrides as the commands take them, `--config.KEY=VALUE` (one syntax for
    sora-train and the bench scripts), collected into `args.set` as "KEY=VALUE"."""

    def parse_args(self, args=None, namespace=None):
        argv = list(sys.argv[1:] if args is None else args)
        overrides = [a.removeprefix("--config.") for a in argv if a.startswith("--config.")]
        for item in overrides:
            if "=" not in item:
                self.error(f"--config.{item}: give KEY=VALUE, e.g. --config.batch_size=8")
        parsed = super().parse_args([a for a in argv if not a.startswith("--config.")], namespace)
        parsed.set = overrides
        return parsed


def parser(description: str, config: bool = True) -> argparse.ArgumentParser:
    """The scripts' arguments: --config (unless the script names its own configs, config
    False), --config.KEY=VALUE overrides and --out."""
    p = _Parser(
        description=description,
        epilog="Override any config value as sora-train does: --config.KEY=VALUE, e.g. "
        "--config.batch_size=8.",
    )
    if config:
        p.add_argument("--config", default="configs/bench_reference.py")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    return p


# What holds each framework's CPU kernels to one vector ISA, so that one host can stand in
# for an older one. YNNPACK (XLA's dots) and TensorFlow's Eigen kernels have no such
# switch: they keep the host's ISA.
ISA_CAPS = {
    "AVX2": {
        "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN: this project's kernels, PyTorch's, TensorFlow's
        "ATEN_CPU_CAPABILITY": "avx2",  # PyTorch's own kernels and torch.compile's code
        "MKL_ENABLE_INSTRUCTIONS": "AVX2",  # PyTorch's BLAS
    }
}
XLA_ISA_FLAG = "--xla_cpu_max_isa"  # XLA's generated code (JAX and Keras with XLA)


def hold_to_isa(isa: str) -> None:
    """Hold every framework's CPU kernels to `isa` (a key of ISA_CAPS) in this process.

    Call it before JAX, PyTorch or TensorFlow starts: each reads its setting once."""
    for name, value in ISA_CAPS[isa].items():
        os.environ[name] = value
    flags = os.environ.get("XLA_FLAGS", "")
    if XLA_ISA_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_ISA_FLAG}={isa}".strip()


ISA_FLAGS = {
    *("sse4_2", "avx", "avx2", "fma"),
    *("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile"),
}


def machine() -> dict:
    import jax  # late import: some scripts set XLA flags first

    cpu, model, flags = platform.processor() or platform.machine(), "", set()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                cpu = model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "device": str(jax.devices()[0].device_kind),
        "platform": jax.devices()[0].platform,
        "device_count": jax.device_count(),
        "cpu": cpu,
        # The vector ISAs that decide which kernels run (oneDNN's, XLA's): results from
        # hosts with other ones do not compare.
        "isa": sorted(flags & ISA_FLAGS),
        "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def emit(result: dict, out: str | None, table: list[tuple[str, str]]) -> None:
    """A short table for people, then the JSON object as the last line."""
    width = max(len(k) for k, _ in table)
    for key, value in table:
        print(f"{key:<{width}}  {value}")
    if out:
        path = pathlib.Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def matmul_peak_flops(n: int = 2048, repeats: int = 10) -> float:
    """This machine's measured float32 matmul rate (FLOP/s): the denominator of MFU."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    return 2 * n**3 / median_time(lambda: f(a).block_until_ready(), repeats)
