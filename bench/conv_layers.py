"""Per-layer cost of the reference visual tower's convolutions, each implementation.

  python bench/conv_layers.py [--frames 128] [--dtype bfloat16]

For each conv of configs/bench_reference.py (frames = batch x clip frames): forward, input
gradient and weight+bias gradient in ms, for `sora_jax.models.conv.Conv` on its two
backends (oneDNN custom calls, XLA), for flax's `nn.Conv` (XLA's own gradients), and for
PyTorch's channels-last `Conv2d` when torch is installed (`pip install -e .[bench]`). The
first conv's input gradient is never computed in training (frames are data), but is timed
like the others. Last line: JSON.
"""

import os
import sys
import time

import common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.kernels import onednn
from sora_jax.models.conv import Conv

# (input size, in channels, out channels, stride) of the reference tower's eight convs.
LAYERS = [
    (112, 3, 32, 2),
    (56, 32, 32, 1),
    (56, 32, 64, 2),
    (28, 64, 64, 1),
    (28, 64, 128, 2),
    (14, 128, 128, 1),
    (14, 128, 256, 2),
    (7, 256, 256, 1),
]


def _median_ms(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def layer_costs(module: nn.Module, x: jax.Array) -> dict[str, float]:
    params = module.init(jax.random.PRNGKey(0), x)
    # The cotangent is an argument, not a constant XLA could fold into the gradient.
    dy = jax.random.normal(jax.random.PRNGKey(2), module.apply(params, x).shape, x.dtype)
    forward = jax.jit(module.apply)
    input_grad = jax.jit(lambda p, x, dy: jax.vjp(lambda x_: module.apply(p, x_), x)[1](dy))
    param_grad = jax.jit(lambda p, x, dy: jax.vjp(lambda p_: module.apply(p_, x), p)[1](dy))
    return {
        "forward_ms": _median_ms(forward, params, x),
        "input_grad_ms": _median_ms(input_grad, params, x, dy),
        "param_grad_ms": _median_ms(param_grad, params, x, dy),
    }


def torch_layer_costs(shape, cout: int, stride: int, dtype: str) -> dict[str, float]:
    """The same layer in PyTorch (oneDNN underneath), channels-last as in bench/peers.py."""
    import torch

    torch.set_num_threads(os.cpu_count())
    n, size, _, cin = shape
    to = dict(dtype=getattr(torch, dtype), memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(cin, cout, 3, stride, 1).to(**to)
    x = torch.randn(n, cin, size, size).to(**to).requires_grad_()
    y = conv(x)  # one forward pass whose graph every backward timing reuses
    dy = torch.randn_like(y)
    params = list(conv.parameters())

    def timed(fn) -> float:
        fn()
        times = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times)) * 1e3

    def forward():
        with torch.no_grad():
            conv(x)

    def grad(wrt):  # autograd.grad computes only the gradients asked for
        return lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True)

    return {
        "forward_ms": timed(forward),
        "input_grad_ms": timed(grad([x])),
        "param_grad_ms": timed(grad(params)),
    }


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--frames", type=int, default=128, help="batch 16 x 8 frames")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    try:
        import torch  # noqa: F401
    except ImportError:
        has_torch = False
    else:
        has_torch = True
    rows = []
    for size, cin, cout, stride in LAYERS:
        x = jax.random.normal(jax.random.PRNGKey(1), (args.frames, size, size, cin), dtype)
        flax_conv = nn.Conv(cout, (3, 3), strides=(stride, stride), padding="SAME", dtype=dtype)
        row = {"layer": f"{size}x{size} {cin}->{cout} s{stride}"}
        if onednn.conv_unverified_reason() is None:  # else refused on this CPU (onednn.py)
            row["onednn"] = layer_costs(Conv(cout, 3, stride, dtype, backend="onednn"), x)
        row["xla"] = layer_costs(Conv(cout, 3, stride, dtype, backend="xla"), x)
        row["nn_conv"] = layer_costs(flax_conv, x)
        if has_torch:
            row["pytorch"] = torch_layer_costs(x.shape, cout, stride, args.dtype)
        rows.append(row)
    impls = [k for k in rows[0] if k != "layer"]
    totals = {impl: {k: sum(r[impl][k] for r in rows) for k in rows[0][impl]} for impl in impls}
    result = {
        "benchmark": "conv_layers",
        "frames": args.frames,
        "dtype": args.dtype,
        "layers": rows,
        "totals": totals,
    }
    result.update(common.machine())
    table = [
        (r["layer"], "   ".join(" / ".join(f"{v:3.0f}" for v in r[i].values()) for i in impls))
        for r in [*rows, {"layer": "total", **totals}]
    ]
    table.append(("ms: forward / input grad / params grad of", ", ".join(impls)))
    common.emit(result, args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
