"""Copy on write between the :class:`~skillhub.stitch.Stitcher` and the versions it publishes.

A snapshot hands the live merged tensors out (no copy) and freezes them: a published version holds them and nothing
may change them again. Before the stitcher next writes a frozen tensor it switches to a copy: the spare that
:meth:`Versions.prepare` made ahead of time (off the path of the change, when the service is idle after a
publication), else one made there and then. The grain is one tensor: a tensor no change touched is shared by
every version since it was last written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from skillhub.stitchstate import TensorState


class Versions:
    """The merged tensors published versions hold (id of a tensor's state -> that tensor), and their spare copies
    (id -> (the tensor copied, its copy))."""

    def __init__(self) -> None:
        self.frozen: dict[int, torch.Tensor] = {}
        self.spare: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def freeze(self, st: TensorState) -> None:
        """``st.merged`` now belongs to a published version."""
        self.frozen[id(st)] = st.merged

    def prepare(self) -> None:
        """Copy every frozen merged tensor that has no spare copy yet (safe to call from another thread while the
        stitcher works: a copy is used only if it is still a copy of the live tensor)."""
        for sid, src in list(self.frozen.items()):
            spare = self.spare.get(sid)
            if spare is None or spare[0] is not src:
                self.spare[sid] = (src, src.clone())

    def writable(self, st: TensorState, *, whole: bool = False) -> None:
        """Before ``st.merged`` is written: if a published version holds it, switch to a copy (the spare when it
        is a copy of this very tensor; else an exact copy now, or an uninitialised one when ``whole`` is about to
        be overwritten)."""
        import torch

        sid = id(st)
        frozen = self.frozen.get(sid)
        if frozen is None or frozen is not st.merged:
            return
        spare = self.spare.pop(sid, None)
        if spare is not None and spare[0] is st.merged:
            st.merged = spare[1]
        else:
            st.merged = torch.empty_like(st.merged) if whole else st.merged.clone()
        del self.frozen[sid]
