"""A ring buffer of momentum features for ITC (ALBEF's image and text queues)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeatureQueue(nn.Module):
    """A first-in first-out queue of ``size`` feature vectors of width ``dim`` (and optionally ids).

    Buffers (all persistent, so a checkpoint's state_dict restores the queue exactly):

    - ``feats`` (size, dim): the contents, initialised to L2-normalised random vectors.
    - ``ptr`` (): long, the slot the next row is written to.
    - ``filled`` (): long, how many real rows have been written so far, capped at ``size``.
    - ``ids`` (size,): long, with ``with_ids=True`` only; ``-1`` in slots never written.

    Unfilled slots: as in ALBEF, the random initial vectors are ordinary entries of :meth:`all`
    and take part in the ITC softmax as negatives until they are overwritten. Callers that want
    only real entries can select them with :meth:`filled_mask` (or ``all()[:filled]`` before the
    first wrap-around). Their ids are ``-1``, so :func:`softmask.objectives.itc.id_positives`
    never counts them as positives when real ids are non-negative.

    The queue does not gather across processes: in distributed training, gather the batch's
    features from all ranks before :meth:`enqueue` (as ALBEF does) so every rank holds the same
    queue.
    """

    def __init__(self, dim: int, size: int, with_ids: bool = False):
        super().__init__()
        if dim <= 0 or size <= 0:
            raise ValueError(f"FeatureQueue needs dim > 0 and size > 0, got dim={dim}, size={size}")
        self.dim = int(dim)
        self.size = int(size)
        self.with_ids = bool(with_ids)
        self.register_buffer("feats", F.normalize(torch.randn(self.size, self.dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))
        if self.with_ids:
            self.register_buffer("ids", torch.full((self.size,), -1, dtype=torch.long))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}, with_ids={self.with_ids}"

    @torch.no_grad()
    def enqueue(self, feats: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Write ``feats`` (B, dim) (and ``ids`` (B,) long) at ``ptr``, wrapping around.

        The result is the same as writing the rows one by one: any ``size`` and any B work, and
        when B > size only the last ``size`` rows stay. ``ptr`` advances by B modulo ``size``.
        The features are detached and cast to the queue's dtype.
        """
        if feats.dim() != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"enqueue expects feats of shape (B, {self.dim}), got {tuple(feats.shape)}")
        if self.with_ids and ids is None:
            raise ValueError("this queue keeps ids: pass ids (B,) to enqueue")
        if not self.with_ids and ids is not None:
            raise ValueError("this queue was built without ids (with_ids=False) but ids were passed")
        batch = feats.shape[0]
        if ids is not None and ids.shape != (batch,):
            raise ValueError(f"enqueue expects ids of shape ({batch},), got {tuple(ids.shape)}")
        if batch == 0:
            return
        keep = min(batch, self.size)
        # Sequential writes of all B rows would leave the last `keep` rows at these slots.
        slots = (self.ptr + (batch - keep) + torch.arange(keep, device=self.feats.device)) % self.size
        self.feats.index_copy_(0, slots, feats.detach()[batch - keep:].to(self.feats.dtype))
        if ids is not None:
            self.ids.index_copy_(0, slots, ids.detach()[batch - keep:].to(self.ids.dtype))
        self.ptr.copy_((self.ptr + batch) % self.size)
        self.filled.copy_(torch.clamp(self.filled + batch, max=self.size))

    def all(self) -> torch.Tensor:
        """A detached copy of the contents, (size, dim), in slot order (unfilled slots included)."""
        return self.feats.detach().clone()

    def all_ids(self) -> torch.Tensor:
        """A copy of the ids, (size,) long, ``-1`` where never written (``with_ids=True`` only)."""
        if not self.with_ids:
            raise ValueError("this queue was built without ids (with_ids=False)")
        return self.ids.detach().clone()

    def filled_mask(self) -> torch.Tensor:
        """(size,) bool: True for slots holding real (enqueued) rows, False for random initial ones.

        Slots are filled from 0 upwards, so the first ``filled`` slots are the real ones."""
        return torch.arange(self.size, device=self.feats.device) < self.filled
