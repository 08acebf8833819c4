"""Classification metrics on host NumPy arrays, and the confusion-matrix picture."""

import io
import os
from collections.abc import Sequence

import numpy as np

from sora_jax import storage


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    k = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def mean_average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Mean over classes with at least one positive of the average precision."""
    aps = []
    for c in range(scores.shape[1]):
        positives = targets[:, c] > 0.5
        if not positives.any():
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        hits = positives[order]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        aps.append(float(np.sum(precision * hits) / hits.sum()))
    return float(np.mean(aps)) if aps else 0.0


def confusion_matrix(predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def classification_report(
    scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str], multi_label: bool
) -> dict:
    """top-1, top-5, mAP and per-class accuracy for one set of clip scores."""
    n, c = scores.shape
    if multi_label:
        targets = labels
        first = np.argmax(targets, axis=1)
        return {
            "map": mean_average_precision(scores, targets),
            "top1": float(np.mean(targets[np.arange(n), np.argmax(scores, 1)] > 0.5)),
            "num_examples": int(n),
            "first_label_top5": top_k_accuracy(scores, first, 5),
        }
    predictions = np.argmax(scores, axis=1)
    matrix = confusion_matrix(predictions, labels, c)
    per_class = {
        name: (float(matrix[i, i] / matrix[i].sum()) if matrix[i].sum() else None)
        for i, name in enumerate(class_names)
    }
    one_hot = np.eye(c)[labels]
    return {
        "top1": top_k_accuracy(scores, labels, 1),
        "top5": top_k_accuracy(scores, labels, 5),
        "map": mean_average_precision(scores, one_hot),
        "num_examples": int(n),
        "per_class_accuracy": per_class,
        "confusion_matrix": matrix.tolist(),
    }


def fitted_title(text: str, width_inches: float, fontsize: float) -> str:
    """`text` broken into lines that fit a figure `width_inches` wide at `fontsize`
    (matplotlib clips a title wider than its figure at both edges, and a long one lost its
    step's last digits)."""
    import textwrap

    chars = max(16, int(width_inches * 72 / (0.62 * fontsize)))  # a glyph's average width
    return "\n".join(textwrap.wrap(text, chars)) or text


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], title: str):
    """The confusion matrix drawn, counts in the cells (up to 30 classes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix)
    size = max(4.0, 0.45 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(fitted_title(title, size * 0.8, 12), fontsize=12)
    if len(class_names) <= 30:
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(
                j,
                i,
                str(v),
                ha="center",
                va="center",
                color="white" if v > matrix.max() / 2 else "black",
                fontsize=8,
            )
    fig.tight_layout()
    return fig


def save_confusion_png(
    matrix: np.ndarray, class_names: Sequence[str], path: "str | os.PathLike[str]", title: str
) -> None:
    import matplotlib.pyplot as plt

    fig = confusion_figure(matrix, class_names, title)
    png = io.BytesIO()  # then one write: `path` may be in a bucket
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)
    storage.write_atomic(storage.path(path), png.getvalue())


def classification_by_mode(
    outputs: dict[str, np.ndarray],
    labels: np.ndarray,
    class_names: Sequence[str],
    multi_label: bool,
) -> dict[str, dict]:
    """Each mode's report over the clips it applies to: every clip for the fused scores,
    the clips with a sound track for audio-only, those with frames for video-only (a clip
    without that sense has nothing to be scored on; counted in, it read as a wrong answer).
    `num_examples` says how many; a mode no clip applies to reports only that 0."""
    applies = {"full": None, "audio_only": "has_audio", "video_only": "has_video"}
    reports = {}
    for mode, sense in applies.items():
        keep = np.ones(len(labels), bool) if sense is None else np.asarray(outputs[sense], bool)
        reports[mode] = (
            classification_report(outputs[mode][keep], labels[keep], class_names, multi_label)
            if keep.any()
            else {"num_examples": 0}
        )
    return reports
