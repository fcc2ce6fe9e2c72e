"""Counting the memory a run holds, for the tests of the streamed budget and the dry run."""

from __future__ import annotations

import torch


class LiveTensors:
    """The bytes of every tensor storage alive, and their peak, counted at each torch operation (a dispatch mode:
    what the memory budget is about, without the allocator's slack that resident memory adds)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.live: dict[int, list] = {}  # storage address → [bytes, weak references to its tensors]
        self.peak = 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._see(out)
                return out

        self.mode = Mode()

    def _see(self, out) -> None:
        import weakref

        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and t.untyped_storage().nbytes():
                entry = self.live.setdefault(t.untyped_storage().data_ptr(), [t.untyped_storage().nbytes(), []])
                entry[1].append(weakref.ref(t))
        for key in [k for k, (_, refs) in self.live.items() if all(r() is None for r in refs)]:
            del self.live[key]
        self.peak = max(self.peak, sum(size for size, _ in self.live.values()))

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)
