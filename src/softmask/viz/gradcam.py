"""Figures of word-level Grad-CAM (:mod:`softmask.eval.word_gradcam` computes the maps), and the
``softmask gradcam`` pipeline.

:func:`save_overlays` and :func:`save_comparison` draw them with matplotlib's object-oriented API
(``matplotlib.figure.Figure`` rendered by Agg; pyplot and its global backend are not touched).

Shapes: T text tokens, N = g * g image patches, W words, S image side in pixels.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from softmask.eval.word_gradcam import word_gradcam

log = logging.getLogger("softmask")


def upsample_map(grid_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(g, g) map -> (H, W) float array in [0, 1]: bicubic upsampling, then min-max normalisation
    (a constant map gives zeros)."""
    x = F.interpolate(grid_map.detach().float().cpu()[None, None], size=size, mode="bicubic", align_corners=False)
    x = x[0, 0]
    low, high = x.min(), x.max()
    x = (x - low) / (high - low) if high > low else torch.zeros_like(x)
    return x.numpy()


ALPHA = 0.5


def overlay(image: np.ndarray, grid_map: torch.Tensor, alpha: float = ALPHA) -> np.ndarray:
    """uint8 (H, W, 3) image and a (g, g) map -> uint8 (H, W, 3): the map upsampled
    (:func:`upsample_map`), coloured with matplotlib's ``jet`` and blended over the image with weight
    ``alpha``, as the figures draw it."""
    from matplotlib import colormaps

    heat = colormaps["jet"](upsample_map(grid_map, image.shape[:2]))[..., :3]  # (H, W, 3) in [0, 1]
    blended = (1.0 - alpha) * image.astype(np.float32) / 255.0 + alpha * heat
    return (np.clip(blended, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------
PANEL_INCHES = 2.2
MAX_COLUMNS = 6


def safe_name(word: str) -> str:
    """A file-name-safe version of a word: [a-z0-9_-] kept, runs of anything else become ``_``."""
    name = re.sub(r"[^a-z0-9_-]+", "_", word.lower()).strip("_")
    return name or "word"


def word_file_names(words: Sequence[str]) -> list[str]:
    """``01_a.png``, ``02_brown.png``, ``03_dog.png``, ...: 1-based position, then the safe word."""
    width = max(2, len(str(len(words))))
    return [f"{i:0{width}d}_{safe_name(w)}.png" for i, w in enumerate(words, start=1)]


def _figure(rows: int, cols: int, extra_height: float = 0.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PANEL_INCHES * cols, PANEL_INCHES * rows + extra_height), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_visible(False)
    return fig, axes


def _draw(ax, image: np.ndarray, grid_map: torch.Tensor | None, title: str) -> None:
    """The image, with the map as a jet overlay when one is given, titled."""
    ax.imshow(image)
    if grid_map is not None:
        heat = upsample_map(grid_map, image.shape[:2])
        ax.imshow(heat, cmap="jet", alpha=ALPHA, vmin=0.0, vmax=1.0)
    ax.set_title(title, fontsize=9)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (S, S, 3), got {image.dtype} {image.shape}")
    return image


def _title(result: dict) -> str:
    return f"ITM match probability {result['itm_prob']:.3f}  ({result['source']}, fusion layer {result['layer']})"


def save_overlays(image: np.ndarray, result: dict, out_dir: str | Path) -> list[Path]:
    """Write one overlay per word (``01_a.png``, ...), ``sentence.png`` and ``grid.png`` into ``out_dir``.

    Args:
        image: uint8 (S, S, 3), the image the model saw.
        result: the dict of :func:`word_gradcam` (``words``, ``maps`` (W, g, g), ``sentence_map``
            (g, g), ``itm_prob``).
        out_dir: created if needed.

    Returns:
        The paths written: the W word figures, then ``sentence.png``, then ``grid.png``.
    """
    image = _check_image(image)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    words, maps = result["words"], result["maps"]
    written = []
    for word, grid_map, name in zip(words, maps, word_file_names(words), strict=True):
        fig, axes = _figure(1, 1)
        _draw(axes[0, 0], image, grid_map, word)
        written.append(_save(fig, out / name))
    fig, axes = _figure(1, 1)
    _draw(axes[0, 0], image, result["sentence_map"], "sentence: " + " ".join(words))
    written.append(_save(fig, out / "sentence.png"))

    panels = [("image", None), ("sentence", result["sentence_map"])] + list(zip(words, maps, strict=True))
    cols = min(MAX_COLUMNS, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = _figure(rows, cols, extra_height=0.4)
    for ax, (title, grid_map) in zip(axes.flat, panels, strict=False):
        _draw(ax, image, grid_map, title)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"{' '.join(words)}\n{_title(result)}", fontsize=10)
    written.append(_save(fig, out / "grid.png"))
    return written


def save_comparison(image: np.ndarray, results: Sequence[tuple[str, dict]], out_path: str | Path) -> Path:
    """One grid, a row per model: the image, the sentence map and every word map.

    Args:
        image: uint8 (S, S, 3).
        results: (label, :func:`word_gradcam` result) per model; every result must have the same words.
        out_path: the PNG to write (its folder is created if needed).

    Returns:
        ``out_path``.
    """
    image = _check_image(image)
    if not results:
        raise ValueError("save_comparison needs at least one result")
    words = results[0][1]["words"]
    for label, result in results[1:]:
        if result["words"] != words:
            raise ValueError(f"{label}: words {result['words']} differ from {results[0][0]}'s {words}")
    cols = 2 + len(words)
    fig, axes = _figure(len(results), cols, extra_height=0.4)
    for row, (label, result) in enumerate(results):
        panels = [("image", None), ("sentence", result["sentence_map"])] + list(zip(words, result["maps"],
                                                                                  strict=True))
        for ax, (title, grid_map) in zip(axes[row], panels, strict=True):
            _draw(ax, image, grid_map, title)
        axes[row, 0].set_ylabel(f"{label}\nITM {result['itm_prob']:.3f}", fontsize=9)
    fig.suptitle(f"{' '.join(words)}  ({results[0][1]['source']})", fontsize=10)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(fig, out)


# --------------------------------------------------------------------------------------------------
# From files to figures (the ``softmask gradcam`` command)
# --------------------------------------------------------------------------------------------------

MAX_TOKENS = 64  # caption tokens, [CLS] and [SEP] included (capped by the model's max_positions)
DEFAULT_MAX_PIXELS = 100_000_000


def default_layer(model, cfg=None) -> int:
    """The run config's ``softmask.layer`` when there is one, else
    :func:`softmask.config.default_gradcam_layer` (the third fusion layer, ALBEF's Grad-CAM layer)."""
    from softmask.config import default_gradcam_layer

    layer = getattr(getattr(cfg, "softmask", None), "layer", None)
    if layer is not None:
        return int(layer)
    return default_gradcam_layer(model.config.text.num_fusion_layers)


def model_view(image, image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """A decoded image (Pillow, any mode) -> ((1, 3, S, S) normalised pixels, uint8 (S, S, 3) image),
    squashed to the model's side S with Pillow's bicubic filter, normalised as in evaluation."""
    from softmask.data.images import to_tensor
    from softmask.data.transforms import EvalTransform

    uint8 = to_tensor(image, image_size)  # (3, S, S)
    return EvalTransform(image_size)(uint8[None]), uint8.permute(1, 2, 0).numpy()


def prepare_image(path: str | Path, image_size: int, max_pixels: int = DEFAULT_MAX_PIXELS
                  ) -> tuple[torch.Tensor, np.ndarray]:
    """An image file -> :func:`model_view` of it.

    Raises:
        FileNotFoundError: no such file. BadSample: not a readable image (the message names it).
    """
    from softmask.data.images import load_image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return model_view(load_image(str(path), max_pixels), image_size)


def _check_inputs(source: str, image_path: str | Path) -> None:
    from softmask.config import MAP_SOURCES, ConfigError, describe_choices

    if source not in MAP_SOURCES:
        raise ConfigError(f"--source must be {describe_choices(MAP_SOURCES)}, got '{source}'")
    if not Path(image_path).is_file():
        raise FileNotFoundError(f"image not found: {image_path}")


def load_for_gradcam(checkpoints: Sequence[str | Path], labels: Sequence[str] | None = None
                     ) -> list[tuple[str, torch.nn.Module, object, str]]:
    """Load each model with :func:`softmask.inference.load_model`: (label, model, run config or None,
    tokenizer source) per checkpoint, for :func:`draw_gradcam` (labels default to the paths as given)."""
    from softmask.inference import load_model
    from softmask.runs import tokenizer_source

    names = list(labels) if labels is not None else [str(path) for path in checkpoints]
    return [(name, *load_model(path), tokenizer_source(path)) for name, path in zip(names, checkpoints, strict=True)]


def gradcam_figures(checkpoints: Sequence[str | Path], image_path: str | Path, text: str, out_dir: str | Path,
                    layer: int | None = None, source: str = "gradcam", labels: Sequence[str] | None = None,
                    ) -> tuple[list[tuple[str, dict]], list[Path]]:
    """Load each model (:func:`load_for_gradcam`) and :func:`draw_gradcam` the image and caption with them.

    Args:
        checkpoints: run folders, checkpoint files or save_pretrained folders; the first is the main one.
        image_path, text, out_dir, layer, source: as for :func:`draw_gradcam`.
        labels: a name per model for the figures (default: the paths as given).

    Returns:
        ((label, result) per model, the paths written).

    Raises:
        CheckpointError, ConfigError, FileNotFoundError: bad checkpoint, layer, caption or image path.
    """
    _check_inputs(source, image_path)  # before any model is loaded
    return draw_gradcam(load_for_gradcam(checkpoints, labels), image_path, text, out_dir, layer, source)


def draw_gradcam(loaded: Sequence[tuple[str, torch.nn.Module, object, str]], image_path: str | Path, text: str,
                 out_dir: str | Path, layer: int | None = None, source: str = "gradcam", overlays: bool = True,
                 ) -> tuple[list[tuple[str, dict]], list[Path]]:
    """Compute :func:`word_gradcam` of each loaded model (:func:`load_for_gradcam`) for the image and the
    cleaned caption; draw the first model's per-word figures into ``out_dir`` (unless ``overlays`` is
    False) and, with more than one model, ``out_dir/compare.png`` (a row per model).

    Args:
        loaded: (label, model, run config or None, tokenizer source) per model; the first is the main one.
        image_path: the image file.
        text: the caption (cleaned with ``pre_caption``, tokenised with the run's tokenizer or the
            default bert-base-uncased vocabulary, at most ``min(max_positions, 64)`` tokens).
        out_dir: where the PNGs go.
        layer: fusion-layer index; None = :func:`default_layer` of each model.
        source: ``"gradcam"`` or ``"attention"``.
        overlays: draw the main model's per-word figures (else only the comparison).

    Returns:
        ((label, result) per model, the paths written).

    Raises:
        ConfigError, FileNotFoundError: bad layer, caption or image path.
    """
    from softmask.config import ConfigError
    from softmask.data.text import open_tokenizer, pre_caption

    _check_inputs(source, image_path)
    max_tokens = min(min(m.config.text.max_positions for _, m, _, _ in loaded), MAX_TOKENS)
    caption = pre_caption(text, max_words=max_tokens)
    if not caption:
        raise ConfigError(f"--text: nothing is left of {text!r} after cleaning (lower case, punctuation removed)")

    results: list[tuple[str, dict]] = []
    image = None
    for label, model, cfg, vocab in loaded:
        tokenizer = open_tokenizer(vocab, max_tokens)
        ids, mask = tokenizer.encode([caption])
        vocab_size = model.config.text.vocab_size
        if int(ids.max()) >= vocab_size:
            raise ConfigError(f"{label}: the tokenizer's ids reach {int(ids.max())} but the model's "
                              f"text.vocab_size is {vocab_size}")
        fusion = model.config.text.num_fusion_layers
        chosen = default_layer(model, cfg) if layer is None else layer
        if not 0 <= chosen < fusion:
            raise ConfigError(f"{label}: --layer must be a fusion-layer index in [0, {fusion}), got {chosen}")
        if source == "gradcam" and chosen == fusion - 1 and model.config.fused_pooling == "cls":
            log.warning(f"{label}: fusion layer {chosen} is the last one: only its [CLS] row reaches the ITM head, "
                        f"so every word's Grad-CAM map is zero; pass --layer below {chosen}")
        max_pixels = cfg.data.max_image_pixels if cfg is not None else DEFAULT_MAX_PIXELS
        pixels, model_image = prepare_image(image_path, model.config.vision.image_size, max_pixels)
        image = model_image if image is None else image
        result = word_gradcam(model, pixels, ids, mask, chosen, source, **tokenizer.word_tables())
        if results and result["words"] != results[0][1]["words"]:
            raise ConfigError(f"{label} splits the caption into the words {result['words']}, "
                              f"{results[0][0]} into {results[0][1]['words']}: their tokenizers differ")
        results.append((label, result))

    written = save_overlays(image, results[0][1], out_dir) if overlays else []
    if len(results) > 1:
        written.append(save_comparison(image, results, Path(out_dir) / "compare.png"))
    return results, written
