"""An epoch's loss terms, summed on the device, and the check that they stay finite: both read the device only
every SYNC_EVERY steps and at the epoch's end, so a GPU is not left idle while Python prepares the next batch.

Docs: docs/architecture.md
"""

from __future__ import annotations

import torch

from distill_runner import distributed

# Training steps between reads of the device (the non-finite check and the progress bar's running loss). Each read
# waits for all queued kernels, so reading every step would leave a GPU idle while Python prepares the next batch.
SYNC_EVERY = 25


class EpochLosses:
    """The loss terms of one epoch's steps. ``place`` and ``restart`` go into the non-finite error (where it
    happened; where to restart from); ``checked`` is False under fp16 (the gradient scaler skips steps with
    non-finite gradients itself)."""

    def __init__(self, place: str, restart: str, checked: bool):
        self.place, self.restart, self.checked = place, restart, checked
        self.names: list[str] = []  # the loss terms, in the recipe's order
        self.sums: torch.Tensor | None = None  # per term, then the total: sum of loss x batch size (float64)
        self.window: list[torch.Tensor] = []  # [terms..., total] of the steps not yet checked for non-finite values
        self.seen = 0  # samples

    def values(self, terms: dict[str, torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        """One step's [terms..., total] (detached, float64), queued for the non-finite check."""
        if not self.names:
            self.names.extend(terms)
        values = torch.stack([*(terms[k] for k in self.names), loss]).detach().double()
        self.window.append(values)
        return values

    def add(self, values: torch.Tensor, n: int) -> None:
        """Count one step's ``values`` for its ``n`` samples."""
        self.seen += n
        self.sums = values * n if self.sums is None else self.sums.add_(values, alpha=n)

    @property
    def window_full(self) -> bool:
        return len(self.window) == SYNC_EVERY

    def running_total(self) -> float:
        """The mean total loss so far (a read of the device)."""
        return self.sums[-1].item() / self.seen

    def check(self, step: int, over_processes: bool) -> None:
        """Raise FloatingPointError naming the first of the window's steps (the last is ``step``) whose loss is not
        finite, here or, with ``over_processes`` under torchrun, in any process (so that all of them stop together
        instead of leaving the others waiting in the next gradient all-reduce). One read of the device.

        The check runs every SYNC_EVERY steps, so the optimizer has taken the steps after the bad one; only the
        checkpoint of the epoch's start is good (no checkpoint is written before the epoch's last steps are
        checked)."""
        window, self.window = self.window, []
        if not self.checked or not window:
            return
        rows = torch.stack(window)
        bad = (~torch.isfinite(rows).all(1)).double().cpu()
        bad = distributed.sum_over_processes(bad) if over_processes else bad
        if not bad.any():
            return
        first = int(bad.nonzero()[0, 0])
        values = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.names, rows[first].tolist()))
        raise FloatingPointError(
            f"non-finite loss in {self.place}, batch {step + 1 - len(window) + first}: {values}{self.restart}"
        )

    def means(self) -> dict[str, float]:
        """``{"loss/<term>": mean, ..., "loss/total": mean}`` over the samples of all processes: the epoch's one
        read of the sums."""
        sums = dict(zip([*self.names, "total"], self.sums.tolist())) if self.sums is not None else {}
        totals = distributed.sum_over_processes(torch.tensor([*sums.values(), self.seen], dtype=torch.float64))
        totals = totals.tolist()
        return {f"loss/{k}": v / totals[-1] for k, v in zip(sums, totals)}
