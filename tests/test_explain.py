"""Explanations mean something: on the sight-or-sound set, where each class lives in one
sense, the saliency lies on the object that carries a seen class (far more than for the
same model with its parameters shuffled), the sound carries a heard class, and the
saliency over the spectrogram lies on the tone."""

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from scipy import ndimage

from sora_jax.media.explain import mel_scale
from sora_jax.media.predictor import Predictor
from tests.media import dominant_hz

ROOT = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # a model trained for them (tests/conftest.py: sight_or_sound)


def _object_share(explanation: dict, margin: int) -> tuple[float, float]:
    """(share of the frame saliency on the coloured object, share of the frame it covers).
    The object is its saturated pixels, widened by `margin` (half the occluder: a square
    that overlaps the object's edge hides part of it)."""
    frames = explanation["frames"].astype(int)
    on = (frames.max(-1) - frames.min(-1)) > 90  # [T, S, S]; the background is grey
    on = np.stack([ndimage.binary_dilation(f, iterations=margin) for f in on])
    saliency = explanation["frame_saliency"]
    return float(saliency[on].sum() / saliency.sum()), float(on.mean())


# Not in CI (`long`): the sight-or-sound clips encode to other pixels from run to run
# (x264 with a sound track muxed in; data_prep/synthetic.write_video), so the model these
# quality thresholds judge differs per run, and this failed in 2 of 5 runs on 2026-12-02.
# make test-slow and make test-all still run it; making the clips deterministic is the fix.
@pytest.mark.long
def test_saliency_lies_on_the_object_and_attribution_on_the_sense(sight_or_sound):
    export, raw = sight_or_sound
    trained = Predictor(export)
    # The control (Adebayo et al., 2018, "Sanity checks for saliency maps"): the same
    # artifact with each parameter's values shuffled; a saliency method that only traced
    # edges would draw the same map for it.
    shuffled = Predictor(export)
    rng = np.random.default_rng(0)
    shuffled.params = jax.tree.map(
        lambda p: rng.permutation(np.asarray(p).reshape(-1)).reshape(p.shape), trained.params
    )
    margin = 1  # half of the 2-pixel occluder cells at crop 32 and grid 16
    shares, controls, areas = [], [], []
    for name in ("red", "blue"):
        for clip in sorted((raw / "test" / name).glob("*.mp4"))[:2]:
            explanation = trained.explain_file(clip)
            a = explanation["attribution"]
            assert a["class"] == name
            assert a["video_drop"] > 0.3 and a["audio_drop"] < 0.05, a  # the picture decides
            share, area = _object_share(explanation, margin)
            shares.append(share)
            areas.append(area)
            controls.append(_object_share(shuffled.explain_file(clip), margin)[0])
    # Measured: 0.71 of the saliency on the object (0.62-0.82), which covers 18% of the
    # frame; 0.44 for the shuffled model (hiding a bright object moves any network's
    # features, but the trained one's score depends on it far more).
    assert np.mean(shares) > 0.6 and min(shares) > 0.5, shares
    assert np.mean(shares) > 1.3 * np.mean(controls), (shares, controls)
    assert np.mean(shares) > 3 * np.mean(areas), (shares, areas)

    sound_drops = []
    for name in ("low", "high"):
        for clip in sorted((raw / "test" / name).glob("*.mp4"))[:2]:
            explanation = trained.explain_file(clip)
            a = explanation["attribution"]
            assert a["class"] == name
            assert a["audio_drop"] > 5 * abs(a["video_drop"]), a  # the sound decides
            sound_drops.append(a["audio_drop"])
            # Over the spectrogram: of the 8 bands of mel frequencies occluded, the one
            # holding the tone's pitch carries the most (more than 3x an even share).
            pitch = dominant_hz(trained.inputs(clip)[0]["audio"][explanation["view"]])
            sound = explanation["audio_saliency"]  # [F, 64 mel bins], constant per band
            per_band = sound.reshape(len(sound), 8, -1).sum((0, 2))
            band = int(mel_scale(pitch) // (mel_scale(8000) / 8))
            assert np.argmax(per_band) == band and per_band[band] > 3 / 8 * per_band.sum(), (
                pitch,
                per_band / per_band.sum(),
            )
    # Over both sound classes, as one: a blank picture tells "low" from "high" not at all,
    # and a model may answer one of them by default when only the picture is left (a run
    # gave "low" 0.95 from the picture alone); the sound's drop is then small for that
    # class alone, and large for the other.
    assert np.mean(sound_drops) > 0.1, sound_drops


def test_sora_predict_explains_files_and_timeline_windows(sight_or_sound, tmp_path):
    export, raw = sight_or_sound
    predict = str(pathlib.Path(sys.executable).parent / "sora-predict")
    clip = raw / "test" / "blue" / "blue_000.mp4"
    for extra in ([], ["--timeline"]):
        out = tmp_path / ("timeline" if extra else "files")
        done = subprocess.run(
            [predict, "--export", str(export), *extra, str(clip), "--explain", str(out)],
            cwd=ROOT,
            capture_output=True,
            check=True,
        )
        rows = [json.loads(line) for line in done.stdout.decode().splitlines()]
        explained = [r for r in rows if "explanation" in r]
        assert len(explained) == (4 if extra else 1)  # a 2 s clip has 4 windows
        for row in explained:
            png = pathlib.Path(row["explanation"])
            assert png.stat().st_size > 20_000
            numbers = json.loads(png.with_suffix(".json").read_text())
            assert numbers["attribution"]["class"] == "blue"
            gates = numbers["attribution"]["fusion_gates"]  # the demo config's gated fusion
            assert abs(gates["video"] + gates["audio"] - 1) < 1e-5, gates
            maps = np.load(png.with_suffix(".npz"))
            assert maps["frame_saliency"].shape == (4, 32, 32)
            assert maps["audio_saliency"].shape == maps["log_mel"].shape


def _inside_figure(fig) -> bool:
    """The figure's titles (its own and its axes') lie within it: none clipped at an edge."""
    fig.canvas.draw()
    renderer, box = fig.canvas.get_renderer(), fig.bbox
    texts = [ax.title for ax in fig.axes] + [t for t in fig.texts]
    texts = [t for t in texts if t.get_text()]
    assert any(len(t.get_text()) > 60 for t in texts)  # the long ones are among them
    for text in texts:
        extent = text.get_window_extent(renderer)
        if extent.x0 < box.x0 - 1 or extent.x1 > box.x1 + 1:
            return False
    return True


def test_long_titles_are_wrapped_inside_their_figures():
    """A confusion matrix's title once read "step 30" for step 300, and an explanation's
    was cut at both edges: a title wider than its figure is clipped, not wrapped."""
    import matplotlib.pyplot as plt

    from sora_jax.export.plots import explanation_figure
    from sora_jax.train.metrics import confusion_figure

    title = "kinetics_sounds_with_a_long_name validation (video-only), step 300000"
    fig = confusion_figure(np.eye(4, dtype=int), ["a", "b", "c", "d"], title)
    assert _inside_figure(fig) and "300000" in fig.axes[0].get_title()
    plt.close(fig)
    rng = np.random.default_rng(0)
    explanation = {
        "frames": rng.integers(0, 255, (4, 16, 16, 3), np.uint8),
        "frame_saliency": rng.random((4, 16, 16)),
        "log_mel": rng.random((50, 32)),
        "audio_saliency": rng.random((50, 32)),
        "attribution": {"class": "red_high", "both": 0.9, "video_only": 0.5, "audio_only": None},
    }
    long = "/data/videos/a/rather/deep/folder/of/clips/clip_0001.mp4: red_high 0.987 at 12.5 s"
    fig = explanation_figure(explanation, long)
    assert _inside_figure(fig)
    plt.close(fig)
