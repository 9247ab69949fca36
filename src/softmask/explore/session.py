"""The model work behind ``softmask explore``, without any web code: loaded models, the image gallery,
uploads, and the three requests of the page (analyse a pair, retrieve images for a caption).

Everything is computed by the project's own code: :func:`softmask.inference.load_model` and
:func:`~softmask.runs.tokenizer_source` load each model with the vocabulary it was trained with;
:func:`softmask.eval.word_gradcam.word_gradcam` gives the ITM match probability and the per-word maps
(words grouped from WordPiece exactly as in ``softmask gradcam``); retrieval ranks the gallery by the
model's ITC similarity and re-ranks the top candidates by its ITM match logit, the rule of
:func:`softmask.eval.retrieval.evaluate_retrieval` that ``softmask evaluate world`` uses (the tests
check that both give the same order), keeping only the gallery's ITC features between requests.

Errors a user can cause (a bad image, an empty caption, a layer out of range, an unknown image name)
raise :class:`ExploreError` with a message meant for the page.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from softmask.config import MAP_SOURCES, Config, ConfigError, describe_choices
from softmask.data.images import BadSample, decode_image, load_image
from softmask.data.text import Tokenizer, open_tokenizer, pre_caption
from softmask.eval.word_gradcam import word_gradcam
from softmask.models.vlp import VisionLanguageModel
from softmask.viz.gradcam import default_layer, model_view, overlay

log = logging.getLogger("softmask")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_TOKENS = 64  # caption tokens, [CLS] and [SEP] included, capped by each model's max_positions
MAX_UPLOAD_BYTES = 20 * 2**20
MAX_PIXELS = 100_000_000  # decoded-size cap of an upload or a gallery image (decompression bombs)
MAX_GALLERY = 5000
UPLOADS_KEPT = 32
DISPLAY_SIDE = 224  # overlays are drawn at least this large, whatever the model's input side
RERANK = 16  # ITC candidates re-ranked by ITM in retrieval
GALLERY_CHUNK = 64  # gallery images encoded at once
TOP = 5


class ExploreError(ValueError):
    """Something the user chose or sent cannot be used; the message says what, for the page."""


@dataclass
class LoadedModel:
    """One model of the page: its label (the path as given), the model in eval mode, its run config
    (None for a saved folder) and its tokenizer."""

    label: str
    model: VisionLanguageModel
    cfg: Config | None
    tokenizer: Tokenizer
    gallery_features: torch.Tensor | None = None  # (I, E), computed at the first retrieval

    @property
    def fusion_layers(self) -> int:
        return self.model.config.text.num_fusion_layers

    @property
    def default_layer(self) -> int:
        return default_layer(self.model, self.cfg)

    @property
    def image_size(self) -> int:
        return self.model.config.vision.image_size


def load_models(paths: list[str]) -> list[LoadedModel]:
    """Load every model (run folder, checkpoint file or saved folder) before anything is served.

    Raises:
        CheckpointError, ConfigError: as :func:`softmask.inference.load_model`, naming the path.
    """
    from softmask.inference import load_model
    from softmask.runs import tokenizer_source

    loaded = []
    for path in paths:
        model, cfg = load_model(path)
        tokenizer = open_tokenizer(tokenizer_source(path),
                                   min(model.config.text.max_positions, MAX_TOKENS))
        tokenizer.check_fits(model.config.text.vocab_size, f"{path}: the model's text.vocab_size")
        loaded.append(LoadedModel(str(path), model, cfg, tokenizer))
    return loaded


@dataclass
class Gallery:
    """The images a user can pick: the test split of a world folder (``world`` True: the images of
    ``annotations/retrieval_test.json``), the image files of any other folder, or none."""

    root: Path | None
    names: list[str] = field(default_factory=list)
    world: bool = False

    def path(self, name: str) -> Path:
        """The file of a gallery image; only names the gallery lists are served (no other path)."""
        if self.root is None or name not in self._known:
            raise ExploreError(f"no image '{name}' in the gallery")
        return self.root / name

    def __post_init__(self) -> None:
        self._known = set(self.names)


def open_gallery(folder: str | Path | None) -> Gallery:
    """The gallery of ``--images``: a world folder (``world.json`` and ``annotations/retrieval_test.json``)
    gives its test split, in the annotation's order; another folder its image files, sorted by name.

    Raises:
        ConfigError: the folder does not exist, or holds no image.
    """
    if folder is None or str(folder) == "":
        return Gallery(None)
    root = Path(folder).expanduser()
    if root.is_file():
        raise ConfigError(f"--images {folder}: is a file; give a folder of images or a `softmask world` folder")
    if not root.is_dir():
        raise ConfigError(f"--images {folder}: no such folder")
    test = root / "annotations" / "retrieval_test.json"
    if (root / "world.json").is_file() and test.is_file():
        names = [record["image"] for record in json.loads(test.read_text())]
        return Gallery(root, names[:MAX_GALLERY], world=True)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not names:
        raise ConfigError(f"--images {folder}: no {'/'.join(IMAGE_SUFFIXES)} file in it (nor a world folder)")
    if len(names) > MAX_GALLERY:
        log.warning(f"--images {folder}: {len(names)} images; the page shows the first {MAX_GALLERY}")
    return Gallery(root, names[:MAX_GALLERY])


def jpeg_data_uri(image: np.ndarray, quality: int = 92) -> str:
    """uint8 (H, W, 3) -> ``data:image/jpeg;base64,...`` (JPEG: a tenth of PNG's encoding time for
    these smooth overlays, which is most of a request's time on a CPU)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def display_image(image: np.ndarray) -> np.ndarray:
    """The model's view (S, S, 3) enlarged (bicubic) to at least :data:`DISPLAY_SIDE` for the page."""
    side = image.shape[0]
    if side >= DISPLAY_SIDE:
        return image
    return np.asarray(Image.fromarray(image).resize((DISPLAY_SIDE, DISPLAY_SIDE), Image.Resampling.BICUBIC))


class Explorer:
    """The state of one ``softmask explore`` server: the models, the gallery and recent uploads. Model
    calls are serialised by a lock (the web server runs requests in threads)."""

    def __init__(self, models: list[LoadedModel], gallery: Gallery):
        if not models:
            raise ValueError("Explorer needs at least one model")
        self.models, self.gallery = models, gallery
        self.uploads: OrderedDict[str, Image.Image] = OrderedDict()
        self.lock = threading.Lock()

    # ---- what the page needs to draw itself -----------------------------------------------------

    def info(self) -> dict:
        """The models (label, fusion layers, default layer, image size), the gallery's names and whether
        it is a world's test split, and the Grad-CAM sources."""
        return {
            "models": [{"label": m.label, "fusion_layers": m.fusion_layers, "default_layer": m.default_layer,
                        "image_size": m.image_size} for m in self.models],
            "images": list(self.gallery.names),
            "world": self.gallery.world,
            "sources": list(MAP_SOURCES),
            "top": TOP,
            "rerank": RERANK,
        }

    # ---- images ---------------------------------------------------------------------------------

    def add_upload(self, data: bytes, filename: str) -> str:
        """Decode an uploaded file and keep it (the last :data:`UPLOADS_KEPT`); returns its image id
        ``upload:<hash>``.

        Raises:
            ExploreError: empty, too large, or not a readable image (the message names the file).
        """
        name = Path(filename or "upload").name
        if not data:
            raise ExploreError(f"{name}: the file is empty")
        if len(data) > MAX_UPLOAD_BYTES:
            raise ExploreError(f"{name}: {len(data) / 2**20:.1f} MiB is larger than the "
                               f"{MAX_UPLOAD_BYTES // 2**20} MiB an upload may be")
        try:
            image = decode_image(data, name, MAX_PIXELS)
        except BadSample as exc:
            raise ExploreError(f"{exc}; upload a PNG or JPEG image") from None
        key = "upload:" + hashlib.sha1(data).hexdigest()[:16]
        self.uploads[key] = image
        self.uploads.move_to_end(key)
        while len(self.uploads) > UPLOADS_KEPT:
            self.uploads.popitem(last=False)
        return key

    def image(self, image_id: str) -> Image.Image:
        """A gallery image by name, or an upload by its id.

        Raises:
            ExploreError: unknown id, or a gallery file that cannot be read.
        """
        if image_id.startswith("upload:"):
            if image_id not in self.uploads:
                raise ExploreError("that upload is no longer kept; upload the image again")
            return self.uploads[image_id]
        try:
            return load_image(str(self.gallery.path(image_id)), MAX_PIXELS)
        except BadSample as exc:
            raise ExploreError(str(exc)) from None

    # ---- analyse: scores and per-word maps ------------------------------------------------------

    def analyse(self, image_id: str, caption: str, layer: int | None = None, source: str = "gradcam") -> dict:
        """Each model's view of one image-caption pair.

        Args:
            image_id: a gallery name or an upload id.
            caption: any text; cleaned as in training (lower case, punctuation removed).
            layer: the fusion layer of the maps; None = each model's default (its run's
                ``softmask.layer``, else the third fusion layer).
            source: ``"gradcam"`` or ``"attention"``.

        Returns:
            ``{"caption": cleaned caption, "image": data URI of the first model's view, "results":
            [{"label", "layer", "itm_prob", "itc_sim", "words": [...], "overlays": [data URI per
            word], "sentence": data URI}, ...]}`` (one result per model, in order).

        Raises:
            ExploreError: bad image id, nothing left of the caption, a layer out of range, bad source.
        """
        if source not in MAP_SOURCES:
            raise ExploreError(f"the map source must be {describe_choices(MAP_SOURCES)}, got '{source}'")
        cleaned = pre_caption(caption, MAX_TOKENS)
        if not cleaned:
            raise ExploreError(f"nothing is left of the caption {caption!r} after cleaning "
                               "(lower case, punctuation removed): type some words")
        image = self.image(image_id)
        results, shown = [], None
        with self.lock:
            for entry in self.models:
                chosen = entry.default_layer if layer is None else int(layer)
                if not 0 <= chosen < entry.fusion_layers:
                    raise ExploreError(f"{entry.label}: the layer must be a fusion layer in "
                                       f"[0, {entry.fusion_layers}), got {chosen}")
                pixels, view = model_view(image, entry.image_size)
                ids, mask = entry.tokenizer.encode([cleaned])
                result = word_gradcam(entry.model, pixels, ids, mask, chosen, source,
                                      **entry.tokenizer.word_tables())
                big = display_image(view)
                shown = shown or jpeg_data_uri(big)
                results.append({
                    "label": entry.label,
                    "layer": chosen,
                    "source": source,
                    "itm_prob": result["itm_prob"],
                    "itc_sim": result["itc_sim"],
                    "words": result["words"],
                    "overlays": [jpeg_data_uri(overlay(big, word_map)) for word_map in result["maps"]],
                    "sentence": jpeg_data_uri(overlay(big, result["sentence_map"])),
                })
        return {"caption": cleaned, "image": shown, "results": results}

    # ---- retrieve: the gallery ranked for a caption -----------------------------------------------

    def retrieve(self, caption: str, top: int = TOP) -> dict:
        """Each model's ``top`` gallery images for ``caption``: the :data:`RERANK` best by ITC similarity,
        re-ranked by the ITM match logit (ALBEF's rule, as ``softmask evaluate world`` ranks them).

        Returns:
            ``{"caption", "results": [{"label", "top": [{"image", "itm_logit", "itm_prob", "itc_sim"}, ...]}]}``.

        Raises:
            ExploreError: no gallery, or nothing left of the caption.
        """
        if not self.gallery.names:
            raise ExploreError("no gallery to retrieve from: start softmask explore with --images FOLDER")
        cleaned = pre_caption(caption, MAX_TOKENS)
        if not cleaned:
            raise ExploreError(f"nothing is left of the caption {caption!r} after cleaning: type some words")
        out = []
        with self.lock:
            for entry in self.models:
                feats = self._gallery_features(entry)
                ids, mask = entry.tokenizer.encode([cleaned])
                ranked = rank_gallery(entry.model, feats, lambda rows, e=entry: self._pixels(
                    [self.gallery.names[i] for i in rows], e.image_size), ids, mask, RERANK)
                out.append({"label": entry.label, "top": [
                    {"image": self.gallery.names[i], "itm_logit": logit, "itm_prob": p, "itc_sim": s}
                    for i, logit, p, s in ranked[:top]]})
        return {"caption": cleaned, "results": out}

    def _gallery_features(self, entry: LoadedModel) -> torch.Tensor:
        """(I, E) ITC features of the gallery's images for one model, computed at the first retrieval (in
        chunks) and kept; only these are kept, so a large gallery costs I * E floats per model."""
        if entry.gallery_features is None:
            log.info(f"{entry.label}: encoding {len(self.gallery.names)} gallery images for retrieval")
            feats = []
            for start in range(0, len(self.gallery.names), GALLERY_CHUNK):
                names = self.gallery.names[start:start + GALLERY_CHUNK]
                feats.append(image_features(entry.model, self._pixels(names, entry.image_size)))
            entry.gallery_features = torch.cat(feats)
        return entry.gallery_features

    def _pixels(self, names: list[str], image_size: int) -> torch.Tensor:
        """(len(names), 3, S, S) normalised gallery images."""
        return torch.cat([model_view(self.image(name), image_size)[0] for name in names])


@torch.inference_mode()
def image_features(model: VisionLanguageModel, pixels: torch.Tensor) -> torch.Tensor:
    """(I, 3, S, S) normalised images -> (I, E) ITC image features (float32)."""
    return model.image_feat(model.encode_image(pixels)).float()


@torch.inference_mode()
def rank_gallery(model: VisionLanguageModel, image_feat: torch.Tensor, pixels_of: Callable[[list[int]], torch.Tensor],
                 input_ids: torch.Tensor, attention_mask: torch.Tensor, candidates: int
                 ) -> list[tuple[int, float, float, float]]:
    """One caption (tokens and mask (1, T)) against a gallery: the ``candidates`` images of highest ITC
    similarity, ordered by the ITM match logit (best first; ties keep the ITC order), as
    :func:`softmask.eval.retrieval.evaluate_retrieval` ranks with ``score="itm"``.

    Args:
        image_feat: (I, E) the gallery's ITC image features (:func:`image_features`).
        pixels_of: gallery indices -> their (K, 3, S, S) normalised images, re-encoded for the fusion.

    Returns:
        ``[(gallery index, ITM match logit, ITM match probability, ITC similarity), ...]``, ``candidates``
        entries (or all the gallery's, when it is smaller).
    """
    text_embeds = model.encode_text(input_ids, attention_mask)
    text_feat = model.text_feat(text_embeds, attention_mask).float()
    sim = (image_feat @ text_feat.T)[:, 0]  # (I,)
    top = sim.topk(min(candidates, len(sim))).indices  # (K,)
    k = len(top)
    image_embeds = model.encode_image(pixels_of(top.tolist()))
    mask = attention_mask.expand(k, -1)
    logits = model.itm_logits(model.fuse(text_embeds.expand(k, -1, -1), mask, image_embeds), mask).float()  # (K, 2)
    probs = logits.softmax(-1)[:, 1]
    order = torch.argsort(-logits[:, 1], stable=True)
    return [(int(top[i]), float(logits[i, 1]), float(probs[i]), float(sim[top[i]])) for i in order.tolist()]
