"""Iterative pruning's bookkeeping: a per-run store of completed iterations (resume) and plan composition.

Each iteration's plan is relative to the model as it was then; ``compose`` maps them back to the original
unit indices, so the final plan applies to the original checkpoint in one step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from pruneflow.execution import streaming
from pruneflow.selection.plan import LayerShape, PrunePlan
from pruneflow.sizes import format_size

log = logging.getLogger(__name__)


def fingerprint(model: torch.nn.Module, windows: torch.Tensor, config: dict) -> str:
    """sha256 of everything an iteration's result depends on: weights, calibration windows, parameters."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    digest.update(windows.contiguous().cpu().view(-1).to(torch.int64).numpy().tobytes())
    if streaming.is_streamed(model):  # its weights are the files it reads
        digest.update(streaming.digest(model))
        return digest.hexdigest()
    from tqdm import tqdm

    tensors = sorted(model.state_dict().items())
    total, started = sum(t.numel() * t.element_size() for _, t in tensors), time.perf_counter()
    log.info("resume key: hashing %s of weights, a tensor at a time through host memory", format_size(total))
    with tqdm(total=total, desc="resume key (hashing weights)", unit="B", unit_scale=True, leave=False) as bar:
        for name, tensor in tensors:
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
            bar.update(tensor.numel() * tensor.element_size())
    log.info("resume key: %s hashed in %.1f s", format_size(total), time.perf_counter() - started)
    return digest.hexdigest()


class IterationStore:
    """``root/<fingerprint>/iter_KKK.{safetensors,json}``; an iteration counts as done once its JSON exists
    (written last, by atomic rename), so a run killed mid-write resumes from the previous one."""

    def __init__(self, root: Path, key: str):
        self.dir = Path(root) / key[:16]

    def _json(self, k: int) -> Path:
        return self.dir / f"iter_{k:03d}.json"

    def completed(self) -> int:
        k = 0
        while self._json(k).exists():
            k += 1
        return k

    def load(self, k: int) -> tuple[PrunePlan, dict]:
        data = json.loads(self._json(k).read_text())
        return PrunePlan.from_dict(data["plan"]), data["summary"]

    def save(self, k: int, plan: PrunePlan, summary: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        weights = self.dir / f"iter_{k:03d}.safetensors"
        save_file({name: t.contiguous() for name, t in tensors.items()}, str(weights) + ".tmp")
        os.replace(str(weights) + ".tmp", weights)
        text = json.dumps({"plan": json.loads(plan.to_json()), "summary": summary}, indent=1)
        Path(str(self._json(k)) + ".tmp").write_text(text + "\n")
        os.replace(str(self._json(k)) + ".tmp", self._json(k))


def compose(shapes: list[LayerShape], steps: list[PrunePlan]) -> list[dict[str, list[int]]]:
    """Per layer, the original indices of the heads, KV heads and channels that survive every step."""
    kept = [{"kept_heads": list(range(s.heads)), "kept_kv_heads": list(range(s.kv_heads)),
             "kept_channels": list(range(s.channels))} for s in shapes]
    for step in steps:
        if step.kept_layers is not None and len(step.kept_layers) != len(shapes):
            raise ValueError("composing iterative plans that remove whole layers is not supported")
        for layer, plan_layer in zip(kept, step.layers):
            for key in layer:
                layer[key] = [layer[key][i] for i in getattr(plan_layer, key)]
    return kept
