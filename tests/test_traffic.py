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


def test_hbm_bytes_leave_out_arrays_in_a_tpu_cores_own_memory():
    vmem_and_hbm = "(f32[8,128]{1,0:T(8,128)S(1)}, bf16[8,128]{1,0:T(8,128)(2,1)}, s32[]{:S(2)})"
    assert traffic.array_bytes(vmem_and_hbm) == 4096 + 2048 + 4
    assert traffic.array_bytes(vmem_and_hbm, hbm_only=True) == 2048


# A TPU program as XLA:TPU leaves it: a scan whose trip count is only in its condition, a
# fusion per step that slices one row out of a [64, 256] f32 buffer (64 KiB, in a fusion
# nested in it) and one that writes a row back in place, a prefetch of the input into VMEM
# (memory space 1), and an eviction of a result computed there back to HBM.
TPU_LIKE_PROGRAM = """
HloModule jit_f

%cond (p: (s32[], f32[64,256])) -> pred[] {
  %p = (s32[]{:T(128)}, f32[64,256]{1,0:T(8,128)}) parameter(0)
  %i = s32[]{:T(128)} get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(12)
  ROOT %lt = pred[]{:T(512)} compare(%i, %n), direction=LT
}

%slice_row (param_0: f32[64,256], param_1: s32[]) -> f32[1,256] {
  %param_0 = f32[64,256]{1,0:T(8,128)} parameter(0)
  %param_1 = s32[]{:T(128)S(2)} parameter(1)
  %zero = s32[]{:T(128)} constant(0)
  ROOT %ds = f32[1,256]{1,0:T(8,128)} dynamic-slice(%param_0, %param_1, %zero), dynamic_slice_sizes={1,256}
}

%read_row (param_0: f32[64,256], param_1: s32[]) -> f32[1,256] {
  %param_0 = f32[64,256]{1,0:T(8,128)} parameter(0)
  %param_1 = s32[]{:T(128)S(2)} parameter(1)
  %nested = f32[1,256]{1,0:T(8,128)} fusion(%param_0, %param_1), kind=kLoop, calls=%slice_row
  ROOT %copy = f32[1,256]{1,0:T(8,128)} copy(%nested)
}

%write_row (param_0: f32[64,256], param_1: f32[1,256], param_2: s32[]) -> f32[64,256] {
  %param_0 = f32[64,256]{1,0:T(8,128)} parameter(0)
  %param_1 = f32[1,256]{1,0:T(8,128)} parameter(1)
  %param_2 = s32[]{:T(128)S(2)} parameter(2)
  %zero = s32[]{:T(128)} constant(0)
  ROOT %dus = f32[64,256]{1,0:T(8,128)} dynamic-update-slice(%param_0, %param_1, %param_2, %zero)
}

%body (p: (s32[], f32[64,256])) -> (s32[], f32[64,256]) {
  %p = (s32[]{:T(128)}, f32[64,256]{1,0:T(8,128)}) parameter(0)
  %i = s32[]{:T(128)S(2)} get-tuple-element(%p), index=0
  %rows = f32[64,256]{1,0:T(8,128)} get-tuple-element(%p), index=1
  %row = f32[1,256]{1,0:T(8,128)} fusion(%rows, %i), kind=kLoop, calls=%read_row, metadata={op_name="jit(f)/loss/while/body/dynamic_slice"}, backend_config={"estimated_cycles":"100"}
  %new = f32[64,256]{1,0:T(8,128)} fusion(%rows, %row, %i), kind=kLoop, calls=%write_row, metadata={op_name="jit(f)/loss/while/body/dynamic_update_slice"}, backend_config={"estimated_cycles":"300"}
  %one = s32[]{:T(128)S(2)} constant(1)
  %next = s32[]{:T(128)S(2)} add(%i, %one)
  ROOT %t = (s32[]{:T(128)}, f32[64,256]{1,0:T(8,128)}) tuple(%next, %new)
}

ENTRY %main (x: f32[64,256]) -> (f32[64,256], f32[64,256]) {
  %x = f32[64,256]{1,0:T(8,128)} parameter(0)
  %cs = (f32[64,256]{1,0:T(8,128)S(1)}, f32[64,256]{1,0:T(8,128)}, u32[]{:S(2)}) copy-start(%x), metadata={op_name="jit(f)/optimizer/copy"}
  %cd = f32[64,256]{1,0:T(8,128)S(1)} copy-done(%cs), metadata={op_name="jit(f)/optimizer/copy"}
  %y = f32[64,256]{1,0:T(8,128)S(1)} exponential(%cd), metadata={op_name="jit(f)/optimizer/exp"}, backend_config={"estimated_cycles":"50"}
  %es = (f32[64,256]{1,0:T(8,128)}, f32[64,256]{1,0:T(8,128)S(1)}, u32[]{:S(2)}) copy-start(%y)
  %ed = f32[64,256]{1,0:T(8,128)} copy-done(%es)
  %start = s32[]{:T(128)} constant(0)
  %t = (s32[]{:T(128)}, f32[64,256]{1,0:T(8,128)}) tuple(%start, %x)
  %w = (s32[]{:T(128)}, f32[64,256]{1,0:T(8,128)}) while(%t), condition=%cond, body=%body
  %rows = f32[64,256]{1,0:T(8,128)} get-tuple-element(%w), index=1
  ROOT %out = (f32[64,256]{1,0:T(8,128)}, f32[64,256]{1,0:T(8,128)}) tuple(%rows, %ed)
}
"""  # noqa: E501


def test_a_tpu_program_counts_hbm_bytes_once_per_trip_and_slices_as_slices():
    moved = traffic.bytes_by_part(TPU_LIKE_PROGRAM)
    # The prefetch reads the 64 KiB input from HBM once; its copy into VMEM and the
    # exponential there move no HBM bytes, and the unnamed eviction writes 64 KiB.
    assert moved["optimizer"] == {"forward": 64 * 1024, "backward": 0}
    assert moved["prefetch and evict"] == {"forward": 64 * 1024, "backward": 0}
    # Each of the 12 trips reads a 1 KiB row and writes it (the slice), then reads it and
    # writes it back in place (the update): 4 KiB, not the 64 KiB buffer.
    assert moved["loss"] == {"forward": 12 * 4 * 1024, "backward": 0}
    assert "other" not in moved  # the counter lives in scalar memory (S(2))


def test_the_compilers_cycle_estimates_are_summed_by_part_and_trip():
    # 12 trips of the two fusions in the loop (100 + 300 cycles), one exponential (50).
    assert traffic.cycles_by_part(TPU_LIKE_PROGRAM) == {"loss": 12 * 400, "optimizer": 50}
    x = jnp.zeros((256, 64), jnp.float32)
    assert traffic.cycles_by_part(jax.jit(jnp.tanh).lower(x).compile().as_text()) == {}


def test_each_launch_says_which_loop_it_runs_in():
    launched = list(traffic.launches(TPU_LIKE_PROGRAM))
    in_loop = {launch.kernel.name: launch.loop for launch in launched if launch.times == 12}
    assert in_loop == {"row": "body", "new": "body", "next": "body"}  # and the counter
    assert all(launch.loop == "" for launch in launched if launch.times == 1)
