"""Where the service's tensors and models live (DESIGN §7, GPU): the device rules, in one place.

``device`` in ``config.toml`` (``"auto"`` picks CUDA when present: :func:`skillhub.stitch.resolve_device`) names one
device for everything that computes:

- the stitcher's state (θ₀, accumulators, merged tensors) lives there, and a published version's merged tensors are
  the stitcher's own, frozen (copy on write): publishing copies nothing device→CPU (:meth:`Stitcher.snapshot` on
  the stitcher's device; the background weights writer and the weights download move one tensor at a time);
- every inference runtime (the merged model of a version, the skill route's patched θ₀, the quality gate's models)
  is moved there when built (:func:`runtime_on`), and takes CPU batches, which it moves itself, and gives its
  embeddings back on the CPU (heads and answers are small CPU tensors);
- the tensors no version changes (a CLIP model's text tower, integer buffers) stay on the CPU, mapped from the base
  file; a runtime takes its copy of them to the device with the rest.

Benchmarks time device work with :func:`synchronize` before reading the clock, since CUDA kernels run
asynchronously.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from skillhub.families import Runtime

RuntimeFactory = Callable[[Mapping[str, "torch.Tensor"]], "Runtime | None"]


def runtime_on(make: RuntimeFactory, device: torch.device | str) -> RuntimeFactory:
    """``make`` (a family's ``runtime``), with every runtime it builds moved to ``device``
    (:meth:`~skillhub.families.Runtime.to`) before anyone uses it."""
    import torch

    dev = torch.device(device)

    def build(tensors: Mapping[str, torch.Tensor]) -> Runtime | None:
        rt = make(tensors)
        if rt is not None:
            rt.to(dev)
        return rt

    build.__doc__ = f"{getattr(make, '__qualname__', 'runtime')} on {dev}"
    return build


def synchronize(device: torch.device | str) -> None:
    """Wait until the work queued on ``device`` is done (a no-op on the CPU): call it before reading a clock."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
