"""Per-layer cost of the reference visual tower's convolutions, ours against nn.Conv.

  python bench/conv_layers.py [--frames 128]

For each conv of configs/bench_reference.py (frames = batch x clip frames): forward, input
gradient and weight+bias gradient in ms, for `sora_jax.models.conv.Conv` and for flax's
`nn.Conv` (XLA's own gradients), same parameters. The first conv's input gradient is never
computed in training (frames are data), but is timed like the others. Last line: JSON.
"""

import sys
import time

import common
import flax.linen as nn
import jax
import numpy as np

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
    dy = jax.random.normal(jax.random.PRNGKey(2), module.apply(params, x).shape)
    forward = jax.jit(module.apply)
    input_grad = jax.jit(lambda p, x, dy: jax.vjp(lambda x_: module.apply(p, x_), x)[1](dy))
    param_grad = jax.jit(lambda p, x, dy: jax.vjp(lambda p_: module.apply(p_, x), p)[1](dy))
    return {
        "forward_ms": _median_ms(forward, params, x),
        "input_grad_ms": _median_ms(input_grad, params, x, dy),
        "param_grad_ms": _median_ms(param_grad, params, x, dy),
    }


def main(argv=None) -> int:
    p = common.parser(__doc__)
    p.add_argument("--frames", type=int, default=128, help="batch 16 x 8 frames")
    args = p.parse_args(argv)
    rows = []
    for size, cin, cout, stride in LAYERS:
        x = jax.random.normal(jax.random.PRNGKey(1), (args.frames, size, size, cin))
        flax_conv = nn.Conv(cout, (3, 3), strides=(stride, stride), padding="SAME")
        rows.append(
            {
                "layer": f"{size}x{size} {cin}->{cout} s{stride}",
                "ours": layer_costs(Conv(cout, 3, stride), x),
                "nn_conv": layer_costs(flax_conv, x),
            }
        )
    totals = {
        impl: {k: sum(r[impl][k] for r in rows) for k in rows[0][impl]}
        for impl in ("ours", "nn_conv")
    }
    result = {"benchmark": "conv_layers", "frames": args.frames, "layers": rows, "totals": totals}
    result.update(common.machine())
    table = [
        (
            r["layer"],
            " / ".join(f"{r['ours'][k]:.0f}" for k in r["ours"])
            + "  (nn.Conv "
            + " / ".join(f"{r['nn_conv'][k]:.0f}" for k in r["nn_conv"])
            + ")",
        )
        for r in rows
    ]
    table.append(("ms: forward / input grad / params grad", ""))
    common.emit(result, args.out, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
