"""Figures of sora-predict: a timeline's class scores over time, and explanations drawn
over the frames and the spectrogram a prediction came from."""

import pathlib
from collections.abc import Sequence

import numpy as np

from sora_jax.train.metrics import fitted_title


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """[start, end) index ranges where `flags` is True."""
    runs, start = [], None
    for i, flag in enumerate([*flags, False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def timeline_png(rows: list[dict], path: str | pathlib.Path, title: str, top: int = 5) -> None:
    """The scores of the `top` classes (by their highest score) over time, one line each
    at the windows' centres; shaded where windows had no sound or no picture."""
    plt = _pyplot()
    centres = np.array([(r["start_s"] + r["end_s"]) / 2 for r in rows])
    classes = list(rows[0]["scores"])
    scores = np.array([[r["scores"][c] for c in classes] for r in rows])  # [W, C]
    shown = np.argsort(-scores.max(0))[:top]
    fig, ax = plt.subplots(figsize=(max(6.0, min(16.0, 0.05 * len(rows) + 6)), 3.6))
    missing = (("has_audio", "no sound", "0.85"), ("has_video", "no picture", "0.7"))
    for key, label, color in missing:
        for i, (a, b) in enumerate(_runs([not r[key] for r in rows])):
            start, end = rows[a]["start_s"], rows[b - 1]["end_s"]
            ax.axvspan(start, end, color=color, alpha=0.6, lw=0, label=None if i else label)
    for c in shown:
        ax.plot(centres, scores[:, c], marker=".", lw=1.5, label=classes[c])
    ax.set_xlim(rows[0]["start_s"], rows[-1]["end_s"])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("score")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def explanation_png(explanation: dict, path: str | pathlib.Path, title: str) -> None:
    """explanation_figure, saved."""
    plt = _pyplot()
    fig = explanation_figure(explanation, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def explanation_figure(explanation: dict, title: str):
    """Top row: the sampled frames with the saliency over them (red: where hiding the
    picture lowered the top class most). Bottom: the log-mel spectrogram and the saliency
    over it, with the modality attribution."""
    plt = _pyplot()
    frames = explanation["frames"]  # [T, S, S, 3] uint8
    saliency = explanation["frame_saliency"]  # [T, S, S], >= 0
    spectrogram = explanation["log_mel"]  # [F, M]
    sound_map = explanation["audio_saliency"]  # [F, M]
    t = len(frames)
    fig = plt.figure(figsize=(max(6.0, 1.6 * t), 5.4))
    grid = fig.add_gridspec(2, max(t, 2), height_ratios=(1, 1.1))
    # One scale for both senses' maps (both are falls of the same log-probability), so the
    # sense that did not matter stays dark.
    top = max(float(saliency.max()), float(explanation["audio_saliency"].max()), 1e-9)
    for i in range(t):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(frames[i])
        ax.imshow(
            saliency[i], cmap="jet", alpha=0.45 * (saliency[i] / top) ** 0.5, vmin=0, vmax=top
        )
        ax.set_axis_off()
        ax.set_title(f"frame {i}", fontsize=8)
    ax = fig.add_subplot(grid[1, :])
    ax.imshow(spectrogram.T, origin="lower", aspect="auto", cmap="gray")
    ax.imshow(sound_map.T, origin="lower", aspect="auto", cmap="jet", alpha=0.45, vmin=0, vmax=top)
    ax.set_xlabel("audio frame (10 ms)")
    ax.set_ylabel("mel bin")
    a = explanation["attribution"]
    shown = lambda key: "absent" if a[key] is None else f"{a[key]:.3f}"
    gates = a.get("fusion_gates")
    weighed = (
        f"; fusion gates video {gates['video']:.2f}, audio {gates['audio']:.2f}" if gates else ""
    )
    width = fig.get_figwidth()
    attribution = (
        f"score of {a['class']}: both senses {a['both']:.3f}, video only {shown('video_only')}, "
        f"audio only {shown('audio_only')}{weighed}"
    )
    ax.set_title(fitted_title(attribution, width * 0.85, 9), fontsize=9)
    fig.suptitle(fitted_title(title, width * 0.9, 10), fontsize=10)
    fig.tight_layout()
    return fig
