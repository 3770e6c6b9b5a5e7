"""Figures for the run folder and TensorBoard: training curves and confusion matrices.

Matplotlib is used through ``Figure`` objects and the Agg canvas only: no pyplot state, no
display, nothing that depends on the machine's default backend.

Docs: docs/guide/evaluation-and-export.md
"""

from __future__ import annotations

import functools
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from distill_runner.reporting.results import StageResult, label

ANNOTATE_MAX_CLASSES = 20


def _figure(width: float, height: float, layout: str | None = "constrained") -> Figure:
    fig = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def curves_figure(stages: dict[str, StageResult]) -> Figure:
    """Train loss (the sum of the stage's loss terms) and validation accuracy per epoch."""
    fig = _figure(10, 3.8, layout=None)  # fixed margins: its labels are known; a constrained layout doubles its cost
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.91, wspace=0.22)
    loss_ax, acc_ax = fig.subplots(1, 2)
    for stage, info in stages.items():
        history = info.history
        if not history:
            continue
        epochs = range(1, len(history) + 1)
        name = label(stage)
        loss_ax.plot(epochs, [h.get("loss/total", float("nan")) for h in history], marker="o", label=name)
        acc_ax.plot(epochs, [h.get("val/acc", float("nan")) for h in history], marker="o", label=name)
    loss_ax.set(title="train loss (sum of the stage's loss terms)", xlabel="epoch", ylabel="loss")
    acc_ax.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
            ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def _draw_confusion(ax, matrix, class_names, title: str) -> None:
    cm = np.asarray(matrix, dtype=float)
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)  # colour: share of the true class
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    n = len(cm)
    if n <= ANNOTATE_MAX_CLASSES:
        for i in range(n):
            for j in range(n):
                if cm[i, j]:
                    ax.text(
                        j,
                        i,
                        f"{cm[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if share[i, j] > 0.5 else "black",
                    )
        ax.set_xticks(
            range(n), [str(c) for c in class_names], rotation=90 if max(map(len, map(str, class_names))) > 3 else 0
        )
        ax.set_yticks(range(n), [str(c) for c in class_names])
    ax.set(title=title, xlabel="predicted", ylabel="true")


def confusion_figure(matrix, class_names, title: str) -> Figure:
    size = 3 + 0.25 * min(len(matrix), 40)
    fig = _figure(size, size)
    _draw_confusion(fig.subplots(), matrix, class_names, title)
    return fig


def render(fig: Figure) -> np.ndarray:
    """The figure as an RGB image, ``[H, W, 3]`` uint8 (drawn once: the run folder and TensorBoard share it)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def save_curves(path: str | os.PathLike, stages: dict[str, StageResult]) -> None:
    curves_figure(stages).savefig(path, dpi=100)


def confusion_images(matrices: dict[str, list], class_names) -> dict[str, np.ndarray]:
    """Each model's confusion matrix drawn once: counts in the cells, colour = share of the true class."""
    names = tuple(str(c) for c in class_names)
    return {title: _confusion_image(tuple(map(tuple, matrix)), names, title) for title, matrix in matrices.items()}


@functools.lru_cache(maxsize=8)
def _confusion_image(matrix: tuple, class_names: tuple, title: str) -> np.ndarray:
    """Remembered: a sweep's jobs in one process (Hydra's basic launcher, a joblib worker) share the
    reused teacher's and baseline's matrices, so each later job draws only its KD student's."""
    image = render(confusion_figure(matrix, class_names, title))
    image.flags.writeable = False  # shared between jobs
    return image


def save_side_by_side(path: str | os.PathLike, images: list[np.ndarray]) -> None:
    """Images in one PNG, left to right, top-aligned on a white background."""
    from PIL import Image

    height = max(image.shape[0] for image in images)
    padded = [np.pad(im, ((0, height - im.shape[0]), (0, 0), (0, 0)), constant_values=255) for im in images]
    Image.fromarray(np.concatenate(padded, axis=1)).save(path)
