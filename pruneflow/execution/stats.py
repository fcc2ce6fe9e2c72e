"""Running moments of the activations a layer sees (the statistics most scorers share)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

CHUNK_TOKENS = 256  # rows of an activation converted to the accumulation dtype at a time


@dataclass
class InputStats:
    """Running first and second moments of one Linear layer's input channels over calibration tokens, kept in
    the accumulation dtype on the device the activations come from."""

    total: torch.Tensor | None = None
    total_sq: torch.Tensor | None = None
    count: int = 0

    def add(self, x: torch.Tensor, dtype: torch.dtype = torch.float64) -> None:
        """Add the rows of ``x`` (tokens, in_features), a few at a time (the converted copy stays small)."""
        if self.total is None:
            self.total = torch.zeros(x.shape[-1], dtype=dtype, device=x.device)
            self.total_sq = torch.zeros_like(self.total)
        for rows in x.split(CHUNK_TOKENS):
            rows = rows.to(dtype)
            self.total += rows.sum(0)
            self.total_sq += (rows * rows).sum(0)
        self.count += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    @property
    def l2(self) -> torch.Tensor:  # ‖X_j‖₂ over all tokens
        return self.total_sq.sqrt()

    @property
    def var(self) -> torch.Tensor:  # unbiased variance over tokens
        return (self.total_sq - self.total ** 2 / self.count) / max(1, self.count - 1)
