"""aot/traffic.py: a compiled program's kernel traffic, charged to the part of the model
and the pass its metadata names (the TPU program's: tests/test_aot.py)."""

import jax
import jax.numpy as jnp
import pytest

from sora_jax.aot import traffic


@pytest.mark.parametrize(
    "op_name,part,direction",
    [
        ("jit(train_step)/jvp(SoraModel)/visual/stage0_block0/conv_a/conv_general_dilated",
         "visual convolutions", "forward"),
        ("jit(train_step)/transpose(jvp(SoraModel))/visual/stage1_block0/norm_b/GroupNorm_0/mul",
         "visual norms", "backward"),
        ("jit(train_step)/jvp(SoraModel)/visual/temporal_pool/reduce_sum",
         "visual other", "forward"),
        ("jit(train_step)/jvp(SoraModel)/audio/cell_0_fwd/while/body/dot_general",
         "audio", "forward"),
        ("jit(train_step)/transpose(jvp(SoraModel))/fusion/video_from_audio/"
         "MultiHeadDotProductAttention_0/query/dot_general", "fusion attention", "backward"),
        ("jit(train_step)/jvp(SoraModel)/contrastive/video_out/dot_general", "projection",
         "forward"),
        ("jit(train_step)/jvp(SoraModel)/fusion/classifier/dot_general", "fusion other",
         "forward"),
        ("jit(train_step)/jvp(loss)/log_softmax", "loss", "forward"),
        ("jit(train_step)/optimizer/mul", "optimizer", "forward"),
        ("jit(train_step)/jit(_threefry_fold_in)/add", "other", "forward"),
    ],
)  # fmt: skip
def test_a_kernel_is_charged_to_the_part_and_pass_its_name_stack_says(op_name, part, direction):
    assert traffic.part_of(op_name) == part
    assert traffic.pass_of(op_name) == direction


def test_array_bytes_of_arrays_and_tuples():
    assert traffic.array_bytes("f32[8,16]{1,0}") == 512
    assert traffic.array_bytes("(bf16[4,4]{1,0}, s32[], /*index=2*/pred[3]{0})") == 32 + 4 + 3
    assert traffic.array_bytes("token[]") == 0


def _moved(f, *args) -> dict[str, dict[str, int]]:
    return traffic.bytes_by_part(jax.jit(f).lower(*args).compile().as_text())


def test_the_bytes_of_a_scope_are_its_kernels_operands_and_results():
    x = jnp.zeros((256, 64), jnp.float32)  # 64 KiB

    def f(x):
        with jax.named_scope("optimizer"):
            y = jnp.tanh(x) * 2.0  # one elementwise kernel: reads x, writes y
        with jax.named_scope("loss"):
            # Reads x, writes a scalar: in one kernel, or (XLA:CPU's choice, with this
            # project's CPU settings) through a temporary x * x, written and read back.
            return y, jnp.sum(x * x)

    moved = _moved(f, x)
    assert moved["optimizer"]["forward"] == 2 * x.nbytes
    assert x.nbytes + 4 <= moved["loss"]["forward"] <= 3 * x.nbytes + 1024
    assert set(moved) <= {"optimizer", "loss", "other"}  # other: kernels XLA left unnamed


def test_a_loop_counts_once_per_trip():
    def scanned(steps):
        def f(h, w):
            def cell(h, _):
                with jax.named_scope("loss"):
                    return jnp.tanh(h @ w), None

            return jax.lax.scan(cell, h, None, length=steps)[0]

        return f

    h, w = jnp.zeros((8, 128)), jnp.zeros((128, 128))
    ten = _moved(scanned(10), h, w)["loss"]["forward"]
    twenty = _moved(scanned(20), h, w)["loss"]["forward"]
    per_trip = twenty - ten
    assert per_trip >= 10 * w.nbytes  # each trip reads the 64 KiB weight
    assert ten >= 10 * w.nbytes and abs(ten - per_trip) <= w.nbytes
