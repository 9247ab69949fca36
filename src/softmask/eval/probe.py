"""Linear probes: what a frozen encoder's features carry, measured by a linear classifier trained on
one half of held-out data and scored on the other half.

:func:`pair_relations` labels ordered pairs of objects in the same image by where the second lies
from the first (left, right, above, below), so that a probe on the two objects' box-pooled features
tells whether the image encoder knows where objects are relative to each other.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RELATIONS = ("left", "right", "above", "below")


def pair_relations(boxes: torch.Tensor, present: torch.Tensor, margin: float
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ordered pairs (a, b) of present objects of one image and where b lies from a.

    Args:
        boxes: (B, K, 4) ``[x0, y0, x1, y1]`` in pixels.
        present: (B, K) bool.
        margin: the larger of |dx| and |dy| between the box centres must exceed this, and exceed
            the smaller by it, else the pair is left out (no clear relation).

    Returns:
        ``(image (P,), a (P,), b (P,), label (P,))``, label an index into :data:`RELATIONS`
        (b is left of / right of / above / below a).
    """
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2  # (B, K, 2)
    d = centre[:, None, :, :] - centre[:, :, None, :]  # (B, K_a, K_b, 2): b minus a
    dx, dy = d[..., 0], d[..., 1]
    k = boxes.shape[1]
    pair = present[:, :, None] & present[:, None, :] & ~torch.eye(k, dtype=torch.bool, device=boxes.device)
    horizontal = dx.abs() > dy.abs()
    major = torch.where(horizontal, dx.abs(), dy.abs())
    minor = torch.where(horizontal, dy.abs(), dx.abs())
    clear = pair & (major > margin) & (major - minor > margin)
    label = torch.where(horizontal, torch.where(dx < 0, 0, 1), torch.where(dy < 0, 2, 3))
    image, a, b = clear.nonzero(as_tuple=True)
    return image, a, b, label[image, a, b]


def linear_probe_accuracy(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 300,
                          lr: float = 0.05, seed: int = 0) -> float:
    """Accuracy (%) of a linear classifier (softmax regression from zero weights, Adam, full batch,
    standardised features) trained on a random half of ``features`` (P, F) / ``labels`` (P,) and scored on
    the other half; nan when there are fewer than 4 rows. The same inputs and ``seed`` give the same number."""
    if len(labels) < 4:
        return float("nan")
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=gen)
    train, test = order[: len(order) // 2], order[len(order) // 2:]
    x = features.detach().float().cpu()
    y = labels.cpu()
    mean, std = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    x = (x - mean) / std
    with torch.enable_grad():
        layer = torch.nn.Linear(x.shape[1], classes)
        torch.nn.init.zeros_(layer.weight)  # the problem is convex: no random start (nor global RNG) needed
        torch.nn.init.zeros_(layer.bias)
        optimiser = torch.optim.Adam(layer.parameters(), lr=lr, weight_decay=1e-4)
        for _ in range(steps):
            optimiser.zero_grad()
            F.cross_entropy(layer(x[train]), y[train]).backward()
            optimiser.step()
    with torch.no_grad():
        return 100.0 * float((layer(x[test]).argmax(-1) == y[test]).float().mean())
