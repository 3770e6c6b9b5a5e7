"""What the end-of-run evaluation measures.

Prediction quality (accuracy, per-class precision/recall/F1, confusion matrix, ROC-AUC, expected
calibration error), model cost (parameters, saved size, multiply-adds, latency, throughput) and
representation similarity (linear CKA). The quality metrics are pure functions of logits and
targets; the cost metrics run the model.

Docs: docs/guide/evaluation-and-export.md
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from distill_runner.models.features import INPUT, module_path
from distill_runner.precision import Precision

ECE_BINS = 15


# --------------------------------------------------------------------------- prediction quality


def classification_report(
    logits: torch.Tensor, targets: torch.Tensor, num_classes: int, ece_bins: int = ECE_BINS
) -> dict:
    """Accuracy, per-class precision/recall/F1/support, macro-F1, confusion matrix, ROC-AUC
    (two-class data sets only, else None) and ECE for one model's logits on a split.

    Per-class lists are indexed by class id. The confusion matrix has the true class in rows and
    the predicted class in columns. Macro-F1 is the unweighted mean of per-class F1 over the
    classes that occur in the targets or the predictions (scikit-learn's default label set).
    """
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    y = targets.numpy()
    probs = torch.softmax(logits.double(), dim=1).numpy()
    pred = probs.argmax(1)
    labels = list(range(num_classes))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    return {
        "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
        "per_class": {
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": support.tolist(),
        },
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "confusion": confusion_matrix(y, pred, labels=labels).tolist(),
        "roc_auc": binary_roc_auc(probs, y) if num_classes == 2 else None,
        "ece": expected_calibration_error(probs, y, ece_bins),
    }


def binary_roc_auc(probs: np.ndarray, targets: np.ndarray) -> float | None:
    """ROC-AUC of the probability of class 1; None when the targets hold only one class."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(targets)) < 2:
        return None
    return float(roc_auc_score(targets, probs[:, 1]))


def expected_calibration_error(
    probs: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor, bins: int = ECE_BINS
) -> float:
    """ECE (Naeini et al. 2015; Guo et al. 2017): confidences (the top softmax probability) are
    put in ``bins`` equal-width bins ``(k/bins, (k+1)/bins]``, and

        ECE = sum over bins of |B| / n * |accuracy(B) - mean confidence(B)|.
    """
    probs, targets = np.asarray(probs, dtype=np.float64), np.asarray(targets)
    if len(targets) == 0:
        return float("nan")
    confidence, pred = probs.max(1), probs.argmax(1)
    correct = (pred == targets).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges[1:-1], confidence, side="left"), 0, bins - 1)  # (lo, hi]
    ece = 0.0
    for b in range(bins):
        in_bin = index == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


# --------------------------------------------------------------------------- representations


def linear_cka(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) between two feature matrices of the same n examples
    (rows), each flattened to [n, features]:

        CKA(X, Y) = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F * ||Yc^T Yc||_F),  Xc, Yc column-centred.

    1 for identical representations; invariant to orthogonal transforms and isotropic scaling.
    Computed in float64, in the n x n Gram form when there are more features than examples.
    """
    x = torch.as_tensor(x).reshape(len(x), -1).double()
    y = torch.as_tensor(y).reshape(len(y), -1).double()
    if len(x) != len(y):
        raise ValueError(f"CKA needs the same examples in both: {len(x)} vs {len(y)} rows")
    x, y = x - x.mean(0), y - y.mean(0)
    if max(x.shape[1], y.shape[1]) > len(x):  # Gram form: <K, L> = ||Y^T X||_F^2 for K = XX^T, L = YY^T
        gram_x, gram_y = x @ x.T, y @ y.T
        hsic, norm_x, norm_y = (gram_x * gram_y).sum(), gram_x.norm(), gram_y.norm()
    else:
        hsic, norm_x, norm_y = (y.T @ x).pow(2).sum(), (x.T @ x).norm(), (y.T @ y).norm()
    if norm_x == 0 or norm_y == 0:  # constant features (NaN or infinite ones, e.g. a diverged model, give NaN too)
        return float("nan")
    return float(hsic / (norm_x * norm_y))


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The model's last ``nn.Linear`` (the classifier head): its input is the penultimate feature."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layer to take penultimate features from")
    return linears[-1]


@contextmanager
def capture(
    model: nn.Module, layers: Sequence[str] = (), penultimate: bool = True, max_samples: int | None = None
) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Record features while the model runs: the input of the last ``nn.Linear`` under the key
    ``"penultimate"`` and the output of each named module in ``layers``, each flattened to
    [batch, features], in float32 on the CPU, for the first ``max_samples`` examples.

    Yields ``{key: [batch tensors]}``; join them with ``torch.cat``.
    """
    captured: dict[str, list[torch.Tensor]] = {}
    handles, last = [], {}

    def store(key: str, value) -> None:
        if isinstance(value, (tuple, list)):
            value = value[0]
        if not isinstance(value, torch.Tensor):
            return
        kept = captured.setdefault(key, [])
        room = None if max_samples is None else max_samples - sum(len(t) for t in kept)
        if room is None or room > 0:
            kept.append(value.detach()[:room].float().cpu().flatten(1))

    def store_all(values: dict) -> None:
        for key, value in values.items():
            store(key, value)

    try:
        if penultimate:
            handles.append(last_linear(model)[1].register_forward_pre_hook(lambda m, args: store("penultimate", args)))
        for name in dict.fromkeys(layers):  # a layer paired twice is recorded once
            module = model.get_submodule(module_path(name))
            if name.endswith(INPUT):  # a pre-ReLU tap: the module's last call's input (copied: the ReLU is in place)
                handles.append(
                    module.register_forward_pre_hook(lambda m, args, name=name: last.update({name: args[0].clone()}))
                )
            else:
                handles.append(module.register_forward_hook(lambda m, args, out, name=name: store(name, out)))
        if any(name.endswith(INPUT) for name in layers):  # kept once the whole model has run
            handles.append(model.register_forward_hook(lambda m, args, out: store_all(last)))
        yield captured
    finally:
        for h in handles:
            h.remove()


def feature_layers(recipe) -> list[tuple[str, str]]:
    """(teacher layer, student layer) pairs of a recipe whose terms pair layers (feature hints,
    attention); empty for logit-only recipes."""
    if not recipe.teacher_layers or not recipe.student_layers:
        return []
    return list(zip(recipe.teacher_layers, recipe.student_layers))


# --------------------------------------------------------------------------- cost


def saved_size_bytes(model: nn.Module) -> int:
    """Bytes of ``torch.save(model.state_dict())``: the on-disk size when no file is at hand."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


@torch.inference_mode()
def flops_per_image(model: nn.Module, image_shape: tuple[int, int, int], device: torch.device) -> int:
    """FLOPs of one forward pass on one image, as ``torch.utils.flop_counter.FlopCounterMode``
    counts them: 2 per multiply-add of matmuls and convolutions (elementwise ops, normalisation
    and pooling are not counted). Multiply-adds (MACs) are half of it."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False)
    with counter:
        model(torch.zeros(1, *image_shape, device=device))
    model.train(was_training)
    return int(counter.get_total_flops())


def _timer(model: nn.Module, x: torch.Tensor, device: torch.device, precision: Precision):
    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with precision.autocast():
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return timed


def _repeat(timed, warmup: int, min_repeats: int, max_repeats: int, budget_s: float) -> list[float]:
    """Run ``timed`` ``warmup`` times, then at least ``min_repeats`` times and until
    ``max_repeats`` runs or ``budget_s`` seconds of timed runs, whichever comes first."""
    for _ in range(warmup):
        timed()
    times: list[float] = []
    while len(times) < min_repeats or (len(times) < max_repeats and sum(times) < budget_s):
        times.append(timed())
    return times


@torch.inference_mode()
def throughput(
    model: nn.Module,
    batch_size: int,
    image_shape: tuple[int, int, int],
    device: torch.device,
    precision: Precision,
    warmup: int = 1,
    min_repeats: int = 3,
    max_repeats: int = 20,
    budget_s: float = 2.0,
) -> float:
    """Inference images/s at ``batch_size``: the median of timed batches after warm-up.

    Times at least ``min_repeats`` batches and stops after ``max_repeats`` or once ``budget_s``
    seconds were spent timing, so a slow teacher on a CPU does not dominate the run.
    """
    model = model.to(device).eval()
    x = torch.randn(batch_size, *image_shape, device=device)
    times = _repeat(_timer(model, x, device, precision), warmup, min_repeats, max_repeats, budget_s)
    return batch_size / statistics.median(times)


# Batch-1 latency is taken in LATENCY_ROUNDS rounds; it counts as measured under contention when the slowest
# round's median is more than SPREAD_LIMIT times the fastest's, or (on a CPU) when the process got less than
# CPU_SHARE_MIN seconds of CPU time per second of wall time while timing: another program had the cores.
LATENCY_ROUNDS = 5
SPREAD_LIMIT = 1.5
CPU_SHARE_MIN = 0.7
LATENCY_ATTEMPTS = 3  # a contended measurement is taken again (contention is often brief), at most this often


@dataclass
class Latency:
    """A batch-1 latency measurement: the median of the rounds' medians, and how far to trust it."""

    seconds: float
    repeats: int  # timed forward passes, all rounds together
    threads: int  # torch threads during the measurement (eval.latency_threads)
    rounds: list[float]  # each round's median, seconds
    cpu_share: float | None  # process CPU seconds per wall second while timing (None: not a CPU measurement)
    contention: str | None  # why the figure is not to be trusted; None: stable


def contention(rounds: Sequence[float], cpu_share: float | None) -> str | None:
    """Why timings taken in ``rounds`` (each round's median) with ``cpu_share`` CPU seconds per wall second
    look disturbed by other work on the machine; None when they look stable."""
    reasons = []
    if rounds and min(rounds) > 0 and max(rounds) / min(rounds) > SPREAD_LIMIT:
        reasons.append(f"rounds range {min(rounds) * 1e3:.3g}-{max(rounds) * 1e3:.3g} ms "
                       f"({max(rounds) / min(rounds):.1f}x, over {SPREAD_LIMIT}x)")  # fmt: skip
    if cpu_share is not None and cpu_share < CPU_SHARE_MIN:
        reasons.append(f"the process got {cpu_share:.2f} CPU-seconds per second (under {CPU_SHARE_MIN})")
    return "; ".join(reasons) or None


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the block, the previous count restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def latency(
    model: nn.Module,
    image_shape: tuple[int, int, int],
    device: torch.device,
    precision: Precision,
    threads: int = 1,
    warmup: int = 3,
    min_repeats: int = 5,
    max_repeats: int = 200,
    budget_s: float = 0.5,
) -> Latency:
    """Batch-1 latency as a deployment runs it: ``threads`` torch threads, ``warmup`` untimed passes, then
    LATENCY_ROUNDS rounds sharing ``budget_s`` seconds (each at least ``min_repeats`` passes); the result is
    the median of the rounds' medians. A measurement under contention (:func:`contention`) is taken again,
    up to LATENCY_ATTEMPTS times; the last one says why it is not to be trusted."""
    model = model.to(device).eval()
    x = torch.randn(1, *image_shape, device=device)
    timed = _timer(model, x, device, precision)
    with torch_threads(threads):
        for _ in range(warmup):
            timed()
        for _ in range(LATENCY_ATTEMPTS):
            measured = _latency_rounds(timed, device, threads, min_repeats, max_repeats, budget_s)
            if measured.contention is None:
                break
    return measured


def _latency_rounds(timed, device: torch.device, threads: int, min_repeats, max_repeats, budget_s) -> Latency:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    rounds = [_repeat(timed, 0, min_repeats, max(max_repeats // LATENCY_ROUNDS, min_repeats),
                      budget_s / LATENCY_ROUNDS) for _ in range(LATENCY_ROUNDS)]  # fmt: skip
    wall = time.perf_counter() - wall0
    cpu_share = (time.process_time() - cpu0) / wall if device.type == "cpu" and wall > 0 else None
    medians = [statistics.median(r) for r in rounds]
    return Latency(statistics.median(medians), sum(map(len, rounds)), threads, medians, cpu_share,
                   contention(medians, cpu_share))  # fmt: skip
