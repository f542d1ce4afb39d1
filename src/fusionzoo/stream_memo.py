"""Reuse of a modality stream's stage outputs across forwards of the same images.

Interpretation runs every batch several times (Chen et al. 2023, Sec. 3; :func:`fusionzoo.interpret.run`):
the full input, each coalition with modalities removed (under ``zero`` and ``mean`` a removed
modality is one constant image), and each modality permuted across the batch (the perceptual
score). A middle-fusion stream that has not yet taken in another modality's features (or a
late-fusion model's whole per-modality network) computes,
for each image, a function of that image's own input alone (in eval mode and without autograd,
batch norm uses its running statistics). So when the same input image comes again in the same
batch's passes, its stage outputs are those computed before: :class:`StreamMemo` keeps them per
distinct input image, runs the encoder only on images it has not seen, and gathers each
forward's batch from what it holds.

For ``esanet_resnet18`` with two modalities this skips the depth encoder in every pass but the
first (the depth stream never takes in RGB): the rgb-only and permuted-RGB passes see the full
pass's depth images, the permuted-depth pass a permutation of them, and a removed depth is one
constant image computed once.

Usage (what ``interpret.run`` does around each batch)::

    with reusing_streams(model):
        out_full = model(batch)                # computes and records every stream
        out_pass = model(batch_with_rgb_zeroed)  # depth stream gathered from the memo
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["StreamMemo", "StreamRows", "reusing_streams", "stream_rows"]

# integer view of each float element size: an exact, batch-independent fingerprint of an image
# (an integer sum of its bit patterns), checked by torch.equal before an image is reused
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
Batch = torch.Tensor | Sequence[torch.Tensor]  # a stage's input: a map, or a decoder's maps


@dataclass
class _Stream:
    """The distinct input images one stream has seen in this memo's scope and their outputs."""

    inputs: list[torch.Tensor] = field(default_factory=list)  # memo row -> (C, H, W) input image
    by_key: dict[int, list[int]] = field(default_factory=dict)  # fingerprint -> memo rows
    stages: dict[int, torch.Tensor] = field(default_factory=dict)  # stage index -> (rows, ...) outputs
    # each stage tensor's _version when stored: a forward that returned it (the first, whole
    # batch) and then changed it in place would leave wrong outputs behind, so it is not reused
    versions: dict[int, int] = field(default_factory=dict)


class StreamRows:
    """One forward's view of a stream's memo: the memo row of each image of the batch (``index``,
    ``(B,)``) and the batch positions of the images the memo had not seen (``new``, ``(U,)``,
    each distinct input once).

    Call :meth:`stage` (or :meth:`stages` for an encoder run whole) in place of the encoder, and
    :meth:`stop` as soon as the stream's next input is no longer its own output (a fusion
    operator fed another modality's features back into it, or a tap listener replaced it).
    """

    def __init__(self, stream: _Stream, index: torch.Tensor, new: torch.Tensor, known: int, whole: bool) -> None:
        self.stream, self.index, self.new, self.known = stream, index, new, known
        self.whole = whole  # every image is new, in batch order: run the batch as it is, no gather
        self.active = True

    def stop(self) -> None:
        """The stream has taken in something other than its own input: compute from here on."""
        self.active = False

    def goes_on_with(self, own: torch.Tensor, used: torch.Tensor) -> None:
        """:meth:`stop` unless what the stream goes on with, ``used``, is its own output ``own``
        (not a fusion operator's mixed stream fed back, nor a tap listener's replacement)."""
        if used is not own:
            self.stop()

    def _covered(self, k: int) -> bool:
        have = self.stream.stages.get(k)
        if have is None:
            return self.known == 0
        return have.shape[0] == self.known and have._version == self.stream.versions[k]

    def _gather(self, k: int, out_new: torch.Tensor | None) -> torch.Tensor:
        st = self.stream
        if out_new is not None:
            st.stages[k] = out_new if k not in st.stages else torch.cat([st.stages[k], out_new])
            st.versions[k] = st.stages[k]._version
        if self.whole:
            return out_new  # type: ignore[return-value]
        return st.stages[k][self.index]

    def _new_rows(self, x: Batch) -> Batch:
        if self.whole:
            return x
        return x[self.new] if isinstance(x, torch.Tensor) else [v[self.new] for v in x]

    def stage(self, k: int, fn: Callable[[Batch], torch.Tensor], x: Batch) -> torch.Tensor:
        """Stage ``k``'s output for the batch: ``fn`` (the stage) on the new images only; ``x`` is
        the stage's input for the whole batch (the input images for the first stage, else what
        this method returned for the previous stages: a tensor, or a list of them for a decoder)."""
        if not self.active or not self._covered(k):
            self.active = False  # an earlier forward stopped before stage k: nothing to reuse
            return fn(x)
        return self._gather(k, fn(self._new_rows(x)) if self.new.numel() else None)

    def stages(self, fn: Callable[[torch.Tensor], list[torch.Tensor]], x: torch.Tensor, count: int) -> list[torch.Tensor]:
        """Every stage's output at once, for an encoder run whole (``fn`` returns ``count`` maps)."""
        if not self.active or not all(self._covered(k) for k in range(count)):
            self.active = False
            return fn(x)
        outs: list[torch.Tensor | None] = [None] * count
        if self.new.numel():
            outs = list(fn(self._new_rows(x)))
        return [self._gather(k, o) for k, o in enumerate(outs)]


class StreamMemo:
    """Stage outputs of each stream per distinct input image, for one batch's forwards (see the
    module docstring). Owned by a model while :func:`reusing_streams` is open."""

    def __init__(self) -> None:
        self._streams: dict[str, _Stream] = {}

    def rows(self, name: str, x: torch.Tensor) -> StreamRows:
        """Match the images of ``x`` (``(B, ...)``, the stream's input) to those seen before in
        stream ``name`` (same bits, :func:`torch.equal`) and register the others."""
        st = self._streams.setdefault(name, _Stream())
        known = len(st.inputs)
        b = x.shape[0]
        flat = x.detach().reshape(b, -1)
        keys = flat.view(_INT_OF_SIZE[x.element_size()]).sum(1, dtype=torch.int64).tolist()
        index, new = [], []
        for i, key in enumerate(keys):
            rows = st.by_key.setdefault(key, [])
            row = next((r for r in rows if torch.equal(st.inputs[r], x[i])), None)
            if row is None:
                row = len(st.inputs)
                st.inputs.append(x[i])
                rows.append(row)
                new.append(i)
            index.append(row)
        whole = known == 0 and len(new) == b
        return StreamRows(st, torch.tensor(index, device=x.device), torch.tensor(new, dtype=torch.long, device=x.device),
                          known, whole)


# every stage computed on the whole batch (no memo open, training, or autograd on): an inactive
# view, which stage() and stages() answer by running the stage (stop() leaves it inactive)
_COMPUTED = StreamRows(_Stream(), torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), 0, False)
_COMPUTED.active = False


def stream_rows(module: nn.Module, name: str, x: torch.Tensor) -> StreamRows:
    """How ``module`` runs stream ``name`` on ``x`` in this forward: through its open
    :class:`StreamMemo` in eval mode without autograd, else computed as usual (a training or
    Grad-CAM forward never reuses outputs)."""
    memo = getattr(module, "stream_memo", None)
    if memo is None or module.training or torch.is_grad_enabled():
        return _COMPUTED
    return memo.rows(name, x)


@contextlib.contextmanager
def reusing_streams(model: nn.Module) -> Iterator[None]:
    """Give every submodule of ``model`` that can reuse its streams (``stream_memo`` attribute:
    :class:`~fusionzoo.models.middle.MiddleFusionModel`) a fresh :class:`StreamMemo` for the
    forwards inside the block, dropped at its end. Forwards in training mode or with autograd on
    compute as usual."""
    owners = [m for m in model.modules() if hasattr(m, "stream_memo")]
    for m in owners:
        m.stream_memo = StreamMemo()
    try:
        yield
    finally:
        for m in owners:
            m.stream_memo = None
