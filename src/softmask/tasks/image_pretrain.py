"""``softmask pretrain-vision``: supervised pretraining of the image encoder alone, our stand-in for
the ImageNet-pretrained DeiT that ALBEF (and the paper) start from.

On a world folder, each image teaches two things (both on by default):
  * **objects**: for every object, its shape, colour, size and pattern, classified from the mean of
    the patch tokens under its visible box (:func:`box_pool`). Per object rather than per image, because
    the captions bind attributes to objects ("a red circle and a blue square"): an image-level label
    cannot say which object is red, a box-pooled one makes the patch tokens carry what is where;
  * **presence**: from the [CLS] token, which attribute values and which colour-shape pairs the image
    holds (multi-label), so that the [CLS] that ITC projects summarises the whole scene.
On an ImageNet-style folder (``image_pretrain.folder``): one class per image, from the [CLS] token.

The result, ``OUTPUT_DIR/model/model.safetensors``, is a ViT state dict in timm's key names (the
heads under ``head.``, which the loader ignores as a classifier head), so ``model.vision.init``
loads it through the same path as a DeiT checkpoint; ``image_encoder.json`` beside it records the
ViT's shape and the class names. Training runs on the shared loop (checkpoints, ``resume=auto``,
``metrics.jsonl``); at the end the held-out images are scored per attribute into
``OUTPUT_DIR/metrics_test.json``.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from softmask.config import Config, ConfigError, VisionConfig, to_dict
from softmask.data.labelled_images import InMemorySource, LabelledImages, image_folder
from softmask.models.vit import VisionTransformer
from softmask.runs import WEIGHTS_FILE
from softmask.train import dist
from softmask.world.objects import OBJECT_ATTRIBUTES, world_objects

log = logging.getLogger("softmask")

INFO_FILE = "image_encoder.json"  # an image encoder folder's config and classes, beside its WEIGHTS_FILE


def box_pool(patch_tokens: torch.Tensor, boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """Mean of the patch tokens under each box, each patch weighted by the share of it the box covers.

    Args:
        patch_tokens: (B, N, D), N = g * g patches in row-major order (as the ViT's patch embedding).
        boxes: (B, K, 4) ``[x0, y0, x1, y1]`` in pixels of an ``image_size`` square (x1/y1 exclusive);
            a box that covers no patch (e.g. all zeros) pools to zeros.
        image_size: the side of the image the boxes are measured in.

    Returns:
        (B, K, D).
    """
    b, n, _ = patch_tokens.shape
    grid = int(round(n ** 0.5))
    if grid * grid != n:
        raise ValueError(f"box_pool needs a square patch grid, got {n} patches")
    edges = torch.arange(grid + 1, device=boxes.device, dtype=boxes.dtype) * (image_size / grid)
    lo, hi = edges[:-1], edges[1:]  # (g,) each

    def overlap(start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:  # (B, K) -> (B, K, g)
        return (torch.minimum(end[..., None], hi) - torch.maximum(start[..., None], lo)).clamp_min(0)

    ox, oy = overlap(boxes[..., 0], boxes[..., 2]), overlap(boxes[..., 1], boxes[..., 3])
    weights = (oy[..., :, None] * ox[..., None, :]).flatten(-2)  # (B, K, g*g), rows then columns
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-6)
    return weights.to(patch_tokens.dtype) @ patch_tokens


class ImageEncoderWithHeads(nn.Module):
    """The ViT of ``vision`` and the pretraining heads for ``classes`` (see the module docstring); with
    ``position`` (worlds only) also a head that regresses each object's box centre."""

    def __init__(self, vision: VisionConfig, classes: dict[str, list[str]], position: bool = False):
        super().__init__()
        self.config, self.classes = vision, classes
        self.visual_encoder = VisionTransformer(vision)
        width = vision.width
        if "label" in classes:
            self.head = nn.ModuleDict({"label": nn.Linear(width, len(classes["label"]))})
        else:
            self.head = nn.ModuleDict({name: nn.Linear(width, len(classes[name]))
                                       for name in (*OBJECT_ATTRIBUTES, "presence")})
            if position:
                self.head["position"] = nn.Linear(width, 2)  # box centre (x, y) / image side
        for layer in self.head.values():
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)

    def forward(self, pixels: torch.Tensor, boxes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) normalised pixels [and (B, K, 4) object boxes] -> logits: ``label`` (B, C), or
        ``presence`` (B, P) and per attribute (B, K, values)."""
        tokens = self.visual_encoder(pixels)
        cls = tokens[:, 0]
        if "label" in self.head:
            return {"label": self.head["label"](cls)}
        out = {"presence": self.head["presence"](cls)}
        if boxes is not None:
            pooled = box_pool(tokens[:, 1:], boxes.to(tokens.dtype), self.config.image_size)
            out.update({a: self.head[a](pooled) for a in OBJECT_ATTRIBUTES})
            if "position" in self.head:
                out["position"] = self.head["position"](pooled)  # (B, K, 2)
            out["object_features"] = pooled  # (B, K, D), what the attribute heads read
        return out

    def save_pretrained(self, directory: str | Path) -> Path:
        """``model.safetensors`` (timm key names; heads under ``head.``) and ``image_encoder.json``."""
        from softmask.checkpoint_files import write_safetensors

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k[len("visual_encoder."):] if k.startswith("visual_encoder.") else k: v
                   for k, v in self.state_dict().items()}
        write_safetensors(tensors, directory / WEIGHTS_FILE, kind="image_encoder")
        (directory / INFO_FILE).write_text(json.dumps({"vision": to_dict(self.config), "classes": self.classes},
                                                      indent=1))
        return directory


def load_image_encoder(directory: str | Path) -> ImageEncoderWithHeads:
    """Read a folder written by :meth:`ImageEncoderWithHeads.save_pretrained` (heads included)."""
    from softmask.checkpoint_files import read_safetensors
    from softmask.config import config_from_dict

    directory = Path(directory)
    info_path = directory / INFO_FILE
    if not info_path.is_file():
        raise FileNotFoundError(f"{directory}: no {INFO_FILE}; not a folder written by softmask pretrain-vision")
    info = json.loads(info_path.read_text())
    vision = config_from_dict({"model": {"vision": info["vision"]}}).model.vision
    sd = read_safetensors(directory / WEIGHTS_FILE)
    model = ImageEncoderWithHeads(vision, info["classes"], position="head.position.weight" in sd)
    model.load_state_dict({k if k.startswith("head.") else f"visual_encoder.{k}": v for k, v in sd.items()})
    return model


def attribute_losses(logits: dict[str, torch.Tensor], batch: dict, cfg: Config) -> dict[str, torch.Tensor]:
    """The weighted total ``loss`` and its parts from :meth:`ImageEncoderWithHeads.forward`'s logits and a
    batch's labels (``label``; or ``objects`` (B, K, 4) with -100 for absent objects and ``presence``)."""
    if "label" in logits:
        loss = F.cross_entropy(logits["label"].float(), batch["label"])
        return {"loss": loss, "loss_label": loss.detach()}
    ip = cfg.image_pretrain
    targets, presence_logits, presence_labels = batch["objects"], logits["presence"], batch["presence"]
    if "colourless" in batch:  # colourless images: no colour label, no presence labels
        colourless = batch["colourless"]
        targets = targets.clone()
        targets[colourless, :, OBJECT_ATTRIBUTES.index("colour")] = -100
        presence_logits, presence_labels = presence_logits[~colourless], presence_labels[~colourless]
    presence = F.binary_cross_entropy_with_logits(presence_logits.float(), presence_labels.float())
    objects = sum(F.cross_entropy(logits[a].flatten(0, 1).float(), targets[..., i].flatten())
                  for i, a in enumerate(OBJECT_ATTRIBUTES)) / len(OBJECT_ATTRIBUTES)
    out = {"loss": ip.presence_weight * presence + ip.object_weight * objects,
           "loss_presence": presence.detach(), "loss_objects": objects.detach()}
    if ip.position_weight > 0:
        boxes, present = batch["boxes"].float(), batch["objects"][..., 0] != -100
        centre = (boxes[..., :2] + boxes[..., 2:]) / (2 * cfg.model.vision.image_size)  # (B, K, 2) in [0, 1]
        position = F.smooth_l1_loss(logits["position"].float()[present], centre[present], beta=0.05)
        out["loss"] = out["loss"] + ip.position_weight * position
        out["loss_position"] = position.detach()
    return out


def without_colour(images: torch.Tensor, rows: torch.Tensor, generator: torch.Generator | None = None
                   ) -> torch.Tensor:
    """uint8 images (B, 3, S, S) with those of ``rows`` (B,) bool made colourless: each becomes one random
    convex mix of its red, green and blue (weights drawn per image), in all three channels."""
    weights = torch.rand(int(rows.sum()), 3, generator=generator).to(images.device)
    weights = weights / weights.sum(1, keepdim=True)
    grey = (images[rows].float() * weights[:, :, None, None]).sum(1, keepdim=True).round().clamp(0, 255)
    out = images.clone()
    out[rows] = grey.to(images.dtype).expand(-1, 3, -1, -1)
    return out


class ImagePretrainObjective(nn.Module):
    """The loop's objective: augment (or only normalise) the uint8 images (with ``image_pretrain.colourless_share``
    some made colourless), run the heads, return the losses."""

    def __init__(self, cfg: Config, model: ImageEncoderWithHeads, transform: nn.Module):
        super().__init__()
        self.cfg, self.model, self.transform = cfg, model, transform

    def forward(self, batch: dict, step: int, micro: int = 0) -> dict[str, torch.Tensor]:
        device = self.model.visual_encoder.cls_token.device
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        images, share = batch["images"], self.cfg.image_pretrain.colourless_share
        if share > 0 and "objects" in batch:
            b = len(images)
            rows = torch.zeros(b, dtype=torch.bool)
            rows[torch.randperm(b)[:min(b - 1, round(share * b))]] = True
            batch["colourless"] = rows.to(device)
            images = without_colour(images, batch["colourless"])
        logits = self.model(self.transform(images), batch.get("boxes"))
        return attribute_losses(logits, batch, self.cfg)


@torch.no_grad()
def evaluate_image_encoder(model: ImageEncoderWithHeads, data: LabelledImages, batch_size: int = 256,
                           device: str | torch.device = "cpu",
                           confusions: dict[str, torch.Tensor] | None = None,
                           unseen_pairs: set[tuple[str, str]] = frozenset()) -> dict[str, float]:
    """Accuracy (%) on held-out images. World: per attribute over the objects (``acc_shape`` ...), all four
    attributes right (``acc_object``), the presence labels' micro F1 (``presence_f1``), and
    ``relation_probe``: a linear probe on two objects' box-pooled features that tells where the second
    lies from the first (left, right, above, below; chance about 25), trained on half of the held-out
    pairs and scored on the other half (:mod:`softmask.eval.probe`). Folder: ``acc`` (top-1) and
    ``acc_top5``. A ``confusions`` dict given for a world is filled with each attribute's (true, predicted)
    counts, (values, values) long. With ``unseen_pairs`` (the (colour, shape) pairs training never showed),
    shape accuracy is also split into ``acc_shape_seen_pairs`` and ``acc_shape_unseen_pairs`` (each present
    when some held-out object is of that kind)."""
    from softmask.data.transforms import EvalTransform
    from softmask.eval.probe import RELATIONS, linear_probe_accuracy, pair_relations

    transform = EvalTransform(model.config.image_size).to(device)
    model = model.to(device).eval()
    correct: dict[str, float] = {}
    counts: dict[str, float] = {}

    def add(key: str, hits: torch.Tensor, total: int) -> None:
        correct[key] = correct.get(key, 0.0) + float(hits.sum())
        counts[key] = counts.get(key, 0.0) + total

    tp = fp = fn = 0.0
    pair_features, pair_labels = [], []
    unseen_table = None
    if unseen_pairs and "label" not in model.head:  # (colours, shapes) bool: is this pair unseen
        colours, shapes = data.classes["colour"], data.classes["shape"]
        unseen_table = torch.tensor([[(c, s) in unseen_pairs for s in shapes] for c in colours], device=device)
    for start in range(0, len(data), batch_size):
        rows = slice(start, start + batch_size)
        pixels = transform(data.images[rows].to(device))
        if "label" in model.head:
            logits, labels = model(pixels)["label"], data.labels["label"][rows].to(device)
            add("acc", logits.argmax(-1) == labels, len(labels))
            top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
            add("acc_top5", (top == labels[:, None]).any(-1), len(labels))
            continue
        boxes = data.labels["boxes"][rows].to(device)
        logits = model(pixels, boxes)
        objects = data.labels["objects"][rows].to(device)
        valid = objects[..., 0] != -100
        image, first, second, relation = pair_relations(boxes, valid, margin=model.config.image_size / 16)
        feats = logits["object_features"]
        pair_features.append(torch.cat([feats[image, first], feats[image, second]], dim=-1).cpu())
        pair_labels.append(relation.cpu())
        all_right = valid.clone()
        for i, a in enumerate(OBJECT_ATTRIBUTES):
            predicted = logits[a].argmax(-1)
            right = predicted == objects[..., i]
            add(f"acc_{a}", right[valid], int(valid.sum()))
            if a == "shape" and unseen_table is not None:
                unseen = valid & unseen_table[objects[..., 1].clamp_min(0), objects[..., 0].clamp_min(0)]
                for key, chosen in (("seen", valid & ~unseen), ("unseen", unseen)):
                    if chosen.any():
                        add(f"acc_shape_{key}_pairs", right[chosen], int(chosen.sum()))
            all_right &= right
            if confusions is not None:
                n = logits[a].shape[-1]
                pairs = (objects[..., i][valid] * n + predicted[valid]).cpu()
                confusions[a] = confusions.get(a, torch.zeros(n, n, dtype=torch.long)) + \
                    torch.bincount(pairs, minlength=n * n).view(n, n)
        add("acc_object", all_right[valid], int(valid.sum()))
        predicted, truth = logits["presence"] > 0, data.labels["presence"][rows].to(device) > 0.5
        tp += float((predicted & truth).sum())
        fp += float((predicted & ~truth).sum())
        fn += float((~predicted & truth).sum())
    metrics = {key: 100.0 * correct[key] / max(1.0, counts[key]) for key in correct}
    if "label" not in model.head:
        metrics["presence_f1"] = 100.0 * 2 * tp / max(1.0, 2 * tp + fp + fn)
        metrics["relation_probe"] = linear_probe_accuracy(torch.cat(pair_features), torch.cat(pair_labels),
                                                          len(RELATIONS))
    metrics["images"] = float(len(data))
    return metrics


def plot_confusions(confusions: dict[str, torch.Tensor], classes: dict[str, list[str]], out: Path) -> Path:
    """One panel per attribute: the held-out objects' (true, predicted) counts, each row normalised to
    percent of its true value, the diagonal being the per-value accuracy."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(confusions), 4.6), layout="constrained")
    for panel, (name, counts) in enumerate(confusions.items()):
        ax = fig.add_subplot(1, len(confusions), panel + 1)
        share = 100.0 * counts.float() / counts.sum(1, keepdim=True).clamp_min(1)
        ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=100)
        labels = classes[name]
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=8)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        for (row, col), value in zip(itertools.product(range(len(labels)), repeat=2), share.flatten().tolist(),
                                     strict=True):
            ax.text(col, row, f"{value:.0f}", ha="center", va="center", fontsize=7,
                    color="white" if value > 60 else "black")
        accuracy = 100.0 * float(counts.diag().sum()) / max(1, int(counts.sum()))
        ax.set_title(f"{name}: {accuracy:.1f}% right")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    fig.savefig(out, dpi=90)
    return out


def _labelled_data(cfg: Config) -> tuple[LabelledImages, LabelledImages, nn.Module]:
    """(train, held-out, training transform) for the config's world folder or image folder."""
    from softmask.data.transforms import EvalTransform, training_transform
    from softmask.world.objects import heldout_pairs_of

    ip, size, pixels = cfg.image_pretrain, cfg.model.vision.image_size, cfg.data.max_image_pixels
    if bool(cfg.world) == bool(ip.folder):
        raise ConfigError("pretrain-vision needs exactly one of world=DIR (a folder written by `softmask world`) "
                          "and image_pretrain.folder=DIR (an ImageNet-style class_name/image.jpg folder)")
    if cfg.world:
        exclude = heldout_pairs_of(ip.exclude_heldout_of) if ip.exclude_heldout_of else set()
        train_data = world_objects(cfg.world, "train", size, pixels, exclude)
        if exclude:
            log.info(f"left out the training images holding {', '.join(' '.join(p) for p in sorted(exclude))} "
                     f"(held out by {ip.exclude_heldout_of})")
        # No geometric augmentation: the boxes must stay where the objects are; the world's generator
        # gives as many distinct images as asked for.
        return train_data, world_objects(cfg.world, "test", size, pixels), EvalTransform(size)
    train_data, held_out = image_folder(ip.folder, size, ip.val_share, cfg.seed, pixels)
    return train_data, held_out, training_transform(size, cfg.data.augment)


def _pairs_never_trained_on(cfg: Config) -> set[tuple[str, str]]:
    """The (colour, shape) pairs no training image of a world run holds: the world's own held-out pairs
    and those of ``image_pretrain.exclude_heldout_of``; empty for an image folder."""
    from softmask.world.objects import heldout_pairs_of

    if not cfg.world:
        return set()
    excluded = cfg.image_pretrain.exclude_heldout_of
    return heldout_pairs_of(cfg.world) | (heldout_pairs_of(excluded) if excluded else set())


def pretrain_vision(cfg: Config) -> dict[str, float]:
    """Train the image encoder of ``cfg.model.vision`` into ``cfg.output_dir``; returns the held-out
    metrics (also written to ``OUTPUT_DIR/metrics_test.json``)."""
    from softmask.train.loop import train

    if cfg.model.vision.init:
        raise ConfigError("pretrain-vision starts from random weights; model.vision.init must be empty")
    if cfg.train.frozen_image_layers:
        raise ConfigError("pretrain-vision trains every layer of the image encoder; train.frozen_image_layers "
                          "must be 0")
    info = dist.init_distributed()
    try:
        train_data, held_out, transform = _labelled_data(cfg)
        log.info(f"image-encoder pretraining on {len(train_data)} images, {len(held_out)} held out")
        torch.manual_seed(cfg.seed)
        model = ImageEncoderWithHeads(cfg.model.vision, train_data.classes,
                                      position=bool(cfg.world) and cfg.image_pretrain.position_weight > 0)
        objective = ImagePretrainObjective(cfg, model, transform)
        source = InMemorySource(train_data, cfg.train.batch_size, cfg.seed, info.rank, info.world_size)
        torch.manual_seed(cfg.seed + 1 + info.rank)
        train(cfg, objective, source, info)
        confusions: dict[str, torch.Tensor] = {}
        metrics = evaluate_image_encoder(model, held_out, device=info.device, confusions=confusions,
                                         unseen_pairs=_pairs_never_trained_on(cfg))
        if info.is_main:
            out = Path(cfg.output_dir)
            (out / "metrics_test.json").write_text(json.dumps(metrics, indent=2))
            log.info(f"held-out metrics written to {out / 'metrics_test.json'}")
            if confusions:
                log.info(f"one confusion matrix per attribute: "
                         f"{plot_confusions(confusions, train_data.classes, out / 'confusion.png')}")
        return metrics
    finally:
        dist.cleanup()
