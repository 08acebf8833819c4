"""The model library: shapes, reference equality with flax cells, masks, precision."""

import itertools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import demo
from sora_jax.inputs import InputSpec
from sora_jax.kernels import platform
from sora_jax.models import AudioEncoder, build_model, dummy_inputs, melspec
from sora_jax.models.audio import stack_frames
from sora_jax.models.conv import conv2d
from sora_jax.models.sora import unit
from sora_jax.objectives import total as objective
from tests.conftest import compiled, initialised, run_compiled

B, T, SIZE, SAMPLES = 2, 3, 32, 16_000


def tiny_config(**model_overrides):
    c = demo.get_config("runlocal")
    c.model.fusion.heads = 2
    c.model.num_classes = 5
    for key, value in model_overrides.items():
        node = c.model
        *path, leaf = key.split(".")
        for part in path:
            node = node[part]
        node[leaf] = value
    return c


def init_params(model, inputs):
    """The model's initial parameters."""
    return initialised(model, inputs, seed=0)["params"]


def random_inputs(rng, batch=B, frames=T, size=SIZE, samples=SAMPLES):
    inputs = InputSpec(frames, size, samples).random(batch, np.random.default_rng(rng))
    return jax.tree.map(jnp.asarray, inputs)


OPTIONS = {
    "fusion.kind": ("concat", "mean", "gated", "attention"),
    "audio.cell": ("lstm", "gru"),
    "visual.norm": ("none", "group", "layer"),
    "visual.temporal_pool": ("mean", "max", "attention"),
    "visual.residual": (False, True),
    "visual.conv_bias_before_norm": (False, True),
    "audio.bidirectional": (False, True),
    "dtype": ("float32", "bfloat16"),
}


def all_pairs(options: dict[str, tuple]) -> list[tuple]:
    """Combinations in which every value of every option meets every value of every other
    option at least once (greedy, deterministic): 14 instead of the 576 of the product,
    and the options interact only in pairs (a fusion with a cell, a norm with a dtype)."""
    values = list(options.values())
    pairs = lambda combo: {
        (i, combo[i], j, combo[j]) for i, j in itertools.combinations(range(len(combo)), 2)
    }
    uncovered = set().union(*(pairs(c) for c in itertools.product(*values)))
    chosen = []
    while uncovered:
        best = max(itertools.product(*values), key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


OPTION_PAIRS = all_pairs(OPTIONS)


@pytest.mark.parametrize("options", OPTION_PAIRS, ids=lambda c: "-".join(map(str, c)))
def test_every_pair_of_options_has_the_right_shapes_and_dtypes(options):
    config = tiny_config(**dict(zip(OPTIONS, options, strict=True)))
    model = build_model(config.model)
    inputs = dummy_inputs(InputSpec(T, SIZE, SAMPLES), B)
    # Abstract evaluation traces the whole model (every option's code path) without the
    # cost of compiling each variant; `test_jit_runs_*` below compiles real ones.
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs))
    params = variables["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    out = jax.eval_shape(
        lambda p: model.apply(
            {"params": p}, inputs, train=True, rngs={"dropout": jax.random.key(1)}
        ),
        params,
    )
    assert out["logits"].shape == (B, 5) and out["logits"].dtype == jnp.float32
    assert out["embedding"].shape == (B, 16) and out["embedding"].dtype == jnp.float32


@pytest.mark.parametrize(
    "fusion,cell", itertools.product(("concat", "mean", "gated", "attention"), ("lstm", "gru"))
)
def test_jit_runs_and_gives_finite_outputs(fusion, cell):
    model = build_model(tiny_config(**{"fusion.kind": fusion, "audio.cell": cell}).model)
    inputs = random_inputs(0)
    params = init_params(model, inputs)
    out = run_compiled(lambda p, x: model.apply({"params": p}, x), params, inputs)
    assert np.isfinite(np.asarray(out["logits"])).all()
    assert out["logits"].shape == (B, 5)


_CONVS = ("conv_", "shortcut_proj")


def _conv_biases(params) -> set[str]:
    """The visual tower's conv biases, by path (the norms' own shifts left out)."""
    paths = flax.traverse_util.flatten_dict(params["visual"])
    return {"/".join(p[:-1]) for p in paths if p[-1] == "bias" and p[-2].startswith(_CONVS)}


def _with_zero_conv_biases(params):
    """A bias-less model's parameters with a zero bias on each of its convs."""

    def walk(tree):
        if tree.keys() >= {"kernel"} and tree["kernel"].ndim == 4:
            return {**tree, "bias": jnp.zeros(tree["kernel"].shape[-1:], tree["kernel"].dtype)}
        return {k: walk(v) if isinstance(v, dict) else v for k, v in tree.items()}

    return walk(params)


def test_convs_a_norm_follows_have_no_bias_unless_asked():
    inputs = dummy_inputs(InputSpec(T, SIZE, SAMPLES), B)
    shapes = lambda config: jax.eval_shape(
        lambda: build_model(config.model).init(jax.random.key(0), inputs)
    )["params"]
    # runlocal's tower: two residual blocks with group norms, the second with a shortcut.
    assert _conv_biases(shapes(tiny_config(**{"visual.conv_bias_before_norm": False}))) == set()
    assert _conv_biases(shapes(tiny_config())) == {  # the default, as runs before it had
        f"stage{s}_block0/{conv}" for s in (0, 1) for conv in ("conv_a", "conv_b", "shortcut_proj")
    }
    # Without a norm every conv keeps its bias, whatever the setting.
    plain = tiny_config(**{"visual.norm": "none", "visual.conv_bias_before_norm": False})
    assert len(_conv_biases(shapes(plain))) == 6


@pytest.mark.slow  # two models compiled per backend
@pytest.mark.parametrize("backend", ["auto", "xla"])  # oneDNN's kernels here, and XLA's
def test_no_conv_bias_is_a_zero_bias(backend):
    inputs = random_inputs(3)
    settings = {"visual.conv_backend": backend}
    without = tiny_config(**settings, **{"visual.conv_bias_before_norm": False})
    without = build_model(without.model)
    with_bias = build_model(tiny_config(**settings).model)
    params = init_params(without, inputs)
    apply = lambda model: lambda p, x: model.apply({"params": p}, x)["logits"]
    want = run_compiled(apply(with_bias), _with_zero_conv_biases(params), inputs)
    got = run_compiled(apply(without), params, inputs)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert float(np.abs(want).max()) > 1e-3


def test_on_a_tpu_a_conv_without_bias_is_the_convolution_alone():
    x, w = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 8))
    ops = lambda b: {e.primitive.name for e in jax.make_jaxpr(lambda x: conv2d(x, w, b, 1))(x).eqns}
    with platform.targeting("tpu"):
        assert ops(None) == {"conv_general_dilated"}
        assert "add" in ops(jnp.ones(8))


def _flax_reference_rnn(encoder_params, mel, lengths, cell, hidden, bidirectional):
    """Run flax's own LSTMCell/GRUCell step by step in Python, with our weights."""
    gates = 4 if cell == "lstm" else 3
    names = ("i", "f", "g", "o") if cell == "lstm" else ("r", "z", "n")
    flax_cell = nn.LSTMCell(hidden) if cell == "lstm" else nn.GRUCell(hidden)
    step = jax.jit(flax_cell.apply)  # one program, not each op of the cell on its own
    outputs = []
    for direction in ("fwd", "bwd") if bidirectional else ("fwd",):
        proj = encoder_params[f"input_proj_0_{direction}"]
        rec = encoder_params[f"cell_0_{direction}"]["recurrent"]
        split = lambda a: np.split(np.asarray(a), gates, axis=-1)
        wx, bx, wh = split(proj["kernel"]), split(proj["bias"]), split(rec["kernel"])
        bh = split(rec["bias"]) if cell == "gru" else [np.zeros(hidden)] * gates
        p = {}
        for k, name in enumerate(names):
            if cell == "lstm":  # flax: input dense has no bias, recurrent dense has one
                p[f"i{name}"] = {"kernel": wx[k]}
                p[f"h{name}"] = {"kernel": wh[k], "bias": bx[k]}
            else:  # flax GRU: input dense has a bias, recurrent only for n
                p[f"i{name}"] = {"kernel": wx[k], "bias": bx[k]}
                p[f"h{name}"] = {"kernel": wh[k]} | ({"bias": bh[k]} if name == "n" else {})
        if cell == "gru":  # our r/z recurrent biases fold into the input bias
            for k, name in enumerate(("r", "z")):
                p[f"i{name}"]["bias"] = bx[k] + bh[k]
        seq = np.zeros((mel.shape[0], mel.shape[1], hidden), np.float32)
        for b in range(mel.shape[0]):
            n = int(lengths[b])
            steps = range(n) if direction == "fwd" else range(n - 1, -1, -1)
            carry = flax_cell.initialize_carry(jax.random.key(0), (1, mel.shape[-1]))
            for t in steps:
                carry, h = step({"params": p}, carry, mel[b : b + 1, t])
                seq[b, t] = np.asarray(h[0])
        outputs.append(seq)
    return np.concatenate(outputs, axis=-1)


@pytest.mark.parametrize("unroll", [1, 4])  # 4: 23 and 13 frames leave remainders
@pytest.mark.parametrize(
    "cell,bidirectional", [("lstm", False), ("gru", False), ("lstm", True), ("gru", True)]
)
def test_scanned_cells_match_flax_cells_step_by_step(cell, bidirectional, unroll):
    hidden, mels = 12, 16
    encoder = AudioEncoder(
        hidden=hidden, cell=cell, bidirectional=bidirectional, num_mel_bins=mels, unroll=unroll
    )
    rng = np.random.default_rng(1)
    wave = jnp.asarray(rng.normal(0, 0.3, (2, 4000)).astype(np.float32))
    lengths = jnp.array([4000, 2500], jnp.int32)
    params = initialised(encoder, wave, lengths, seed=0)["params"]
    apply = lambda p, w, n: encoder.apply({"params": p}, w, n)
    pooled, seq, _mask = run_compiled(apply, params, wave, lengths)
    mel = (np.asarray(melspec.log_mel(wave, mels)) + 4.0) / 4.0
    frame_lengths = np.asarray(melspec.frame_lengths(lengths))
    expected = _flax_reference_rnn(params, mel, frame_lengths, cell, hidden, bidirectional)
    got = np.asarray(seq)
    for b in range(2):
        n = frame_lengths[b]
        rel = np.linalg.norm(got[b, :n] - expected[b, :n]) / np.linalg.norm(expected[b, :n])
        assert rel < 1e-5, (b, rel)
        assert not got[b, n:].any()
        np.testing.assert_allclose(pooled[b], expected[b, :n].mean(0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "cell,bidirectional,time_stack", [("lstm", True, 1), ("gru", False, 1), ("lstm", True, 3)]
)
def test_audio_padding_past_the_length_changes_nothing(cell, bidirectional, time_stack):
    encoder = AudioEncoder(
        hidden=8, cell=cell, bidirectional=bidirectional, num_mel_bins=16, time_stack=time_stack
    )
    rng = np.random.default_rng(2)
    clip = rng.normal(0, 0.3, (1, 5000)).astype(np.float32)
    noise = rng.normal(0, 0.9, (1, 3000)).astype(np.float32)
    short = jnp.asarray(np.concatenate([clip, np.zeros_like(noise)], 1))
    noisy = jnp.asarray(np.concatenate([clip, noise], 1))
    lengths = jnp.array([5000], jnp.int32)
    params = initialised(encoder, short, lengths, seed=0)["params"]
    apply = compiled(lambda w, n: encoder.apply({"params": params}, w, n), short, lengths)
    a, b = apply(short, lengths), apply(noisy, lengths)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))


def test_stacked_frames_are_consecutive_frames_side_by_side():
    mel = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3) + 1  # [B, F, M]
    stacked, lengths = stack_frames(mel, jnp.array([5, 3]), 2)
    assert stacked.shape == (2, 3, 6) and lengths.tolist() == [3, 2]
    np.testing.assert_array_equal(stacked[0, 1], np.concatenate([mel[0, 2], mel[0, 3]]))
    np.testing.assert_array_equal(stacked[0, 2, 3:], 0)  # the padding after frame 5
    np.testing.assert_array_equal(stacked[1, 1], np.concatenate([mel[1, 2], np.zeros(3)]))


def test_padded_frames_do_not_change_the_visual_feature():
    model = build_model(tiny_config().model)
    x = random_inputs(3)
    params = init_params(model, x)
    x["frame_mask"] = jnp.array([[True, True, False], [True, True, False]])
    other = dict(x, frames=x["frames"].at[:, 2].set(255))
    apply = compiled(lambda inp: model.apply({"params": params}, inp)["logits"], x)
    a, b = apply(x), apply(other)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("fusion", ["concat", "mean", "gated", "attention"])
def test_missing_modality_acts_only_through_its_mask(fusion):
    model = build_model(tiny_config(**{"fusion.kind": fusion}).model)
    x = random_inputs(4)
    params = init_params(model, x)
    apply = compiled(lambda inp: model.apply({"params": params}, inp)["logits"], x)
    y = random_inputs(5)
    # Video-only: whatever the audio holds, the output is the same.
    video_only = dict(x, has_audio=jnp.zeros(B, bool))
    np.testing.assert_array_equal(apply(video_only), apply(dict(video_only, audio=y["audio"])))
    # Audio-only: whatever the frames hold, the output is the same.
    audio_only = dict(x, has_video=jnp.zeros(B, bool))
    np.testing.assert_array_equal(apply(audio_only), apply(dict(audio_only, frames=y["frames"])))
    # ... and the masks do matter: the three modes give three different answers.
    both, v, a = apply(x), apply(video_only), apply(audio_only)
    assert not np.allclose(both, v) and not np.allclose(both, a) and not np.allclose(v, a)


def test_unit_vectors_have_a_finite_gradient_at_zero():
    # The 3-line check that pretraining crashed on: x / max(|x|, eps) has a NaN gradient
    # at x = 0, which a later jnp.where mask does not stop.
    naive = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)
    zero = jnp.zeros((2, 4))
    assert np.isnan(jax.grad(lambda x: jnp.sum(naive(x)))(zero)).any()  # the bug, as it was
    grad = jax.grad(lambda x: jnp.sum(jnp.where(False, unit(x), 0.0)))(zero)
    assert np.isfinite(grad).all()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 8)), jnp.float32)
    np.testing.assert_allclose(jnp.linalg.norm(unit(x), axis=-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("fusion", ["concat", "mean"])
def test_contrastive_gradients_stay_finite_when_clips_lack_a_sound(fusion):
    """Clips with no sound (a file without a track, a window past the sound's end) are
    masked out of the contrastive loss, and the gradient of the rest stays finite: with
    zero-initialised biases, a sound-less clip's audio projection is exactly 0."""
    config = tiny_config(**{"fusion.kind": fusion})
    config.objectives.supervised.weight, config.objectives.contrastive.weight = 0.0, 1.0
    model = build_model(config.model, contrastive=True)
    x = random_inputs(7, batch=4)
    x = dict(x, has_audio=jnp.asarray([True, False, True, False]), audio_len=x["audio_len"] * 0)
    init = lambda key: model.init(key, x, modality_embeddings=True)["params"]
    params = run_compiled(init, jax.random.PRNGKey(0))

    def loss(params):
        out = model.apply({"params": params}, x, modality_embeddings=True)
        return objective(out, x, config)[0]

    value, grads = run_compiled(jax.value_and_grad(loss), params)
    assert np.isfinite(value)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("fusion", ["concat", "mean", "gated", "attention"])
def test_each_sense_alone_in_one_pass_is_the_clip_with_the_other_marked_missing(fusion):
    # Evaluation, export and sora-embed read each sense's scores and embedding from the
    # one pass of the towers (modality_embeddings=True): they must be what the model
    # gives a clip whose other sense is missing.
    model = build_model(tiny_config(**{"fusion.kind": fusion}).model)
    x = random_inputs(6)
    params = init_params(model, x)
    apply = lambda both: compiled(
        lambda inp: model.apply({"params": params}, inp, modality_embeddings=both), x
    )
    one_pass, alone_apply = apply(True)(x), apply(False)
    for sense, missing in (("video", "has_audio"), ("audio", "has_video")):
        alone = alone_apply(dict(x, **{missing: jnp.zeros(B, bool)}))
        for key in ("logits", "embedding"):
            np.testing.assert_allclose(
                one_pass[f"{sense}_{key}"], alone[key], rtol=1e-5, atol=1e-6, err_msg=sense
            )


def test_bfloat16_compute_stays_close_to_float32():
    config = tiny_config(**{"fusion.kind": "attention"})
    x = random_inputs(6)
    params = init_params(build_model(config.model), x)
    outputs = {}
    for dtype in ("float32", "bfloat16"):
        config.model.dtype = dtype
        model = build_model(config.model)
        apply = compiled(lambda p, m=model: m.apply({"params": p}, x), params)
        outputs[dtype] = np.asarray(apply(params)["embedding"])
    rel = np.linalg.norm(outputs["bfloat16"] - outputs["float32"]) / np.linalg.norm(
        outputs["float32"]
    )
    assert rel < 1e-2, rel


@pytest.mark.slow
def test_tiny_model_overfits_a_batch_of_eight_clips():
    model = build_model(
        tiny_config(**{"modality_dropout": 0.0, "audio.spec_augment": (0, 0, 0, 0)}).model
    )
    x = random_inputs(7, batch=8, samples=8000)
    labels = jnp.arange(8) % 5
    params = init_params(model, x)
    tx = optax.adam(3e-3)
    opt_state = tx.init(params)

    def loss_fn(p):
        logits = model.apply({"params": p}, x)["logits"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @jax.jit
    def step(p, s):
        loss, grads = jax.value_and_grad(loss_fn)(p)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    first = None
    for _ in range(200):
        params, opt_state, loss = step(params, opt_state)
        first = loss if first is None else first
    assert float(loss) < 0.1 * float(first), (float(first), float(loss))


@pytest.mark.parametrize("unroll, backend", [(1, "xla"), (4, "xla"), (1, "onednn")])
def test_audio_branch_is_scanned_not_unrolled(unroll, backend):
    """The compiled program is the same size for 100 and 1600 log-mel frames (a scan of
    `unroll` steps per iteration, or one custom call per loop, never a loop unrolled over
    time)."""
    encoder = AudioEncoder(
        hidden=16,
        num_mel_bins=16,
        layers=2,
        bidirectional=True,
        unroll=unroll,
        lstm_backend=backend,
    )

    def program_lines(num_frames):
        samples = 400 + (num_frames - 1) * 160
        wave = jnp.zeros((2, samples), jnp.int16)
        lengths = jnp.full((2,), samples, jnp.int32)
        params = jax.eval_shape(lambda: encoder.init(jax.random.key(0), wave, lengths))
        hlo = jax.jit(lambda p, w, n: encoder.apply(p, w, n)).lower(params, wave, lengths).as_text()
        return len(hlo.splitlines()), hlo.count("stablehlo.while"), hlo.count("SoraLstmForward")

    assert program_lines(100) == program_lines(1600)
    _, loops, calls = program_lines(100)
    assert (loops, calls) == ((0, 4) if backend == "onednn" else (4, 0))  # per layer, direction


def test_the_power_spectrum_is_an_fft_but_on_tpus_one_matmul():
    """Both give the log-mel of the same audio (melspec.power_spectrum says why two)."""
    rng = np.random.default_rng(8)
    wave = jnp.asarray((rng.normal(0, 0.3, (2, 8000)) * 8000).astype(np.int16))
    # A function of its own each: jit caches traces by function, not by target platform.
    on_cpu = jax.jit(lambda w: melspec.log_mel(w)).lower(wave)
    with platform.targeting("tpu"):  # traced as for a TPU, run here
        for_tpu = jax.jit(lambda w: melspec.log_mel(w)).lower(wave)
    assert "fft" in on_cpu.as_text() and "fft" not in for_tpu.as_text()
    assert "dot_general" in for_tpu.as_text()
    want, got = on_cpu.compile()(wave), for_tpu.compile()(wave)
    np.testing.assert_allclose(got, want, atol=1e-4)
    assert float(np.abs(want).mean()) > 1.0  # a signal, not the log of the floor
