"""Weight loading from the checkpoints users already hold, by explicit key mapping.

Formats:
  * Hugging Face BERT folders (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``):
    layers below ``fusion_layer`` go to the text encoder, the rest to the fusion encoder; the
    cross-attention starts random; the MLM head loads when the checkpoint has one.
  * Hugging Face ViT/DeiT folders, and timm/DeiT state dicts (``.pth``/``.safetensors``, also
    nested under ``model``/``state_dict``) for the image encoder.
  * ALBEF/TCL released checkpoints (``visual_encoder.*``, ``text_encoder.bert.*``,
    ``text_encoder.cls.*``, projections, ``itm_head``, ``temp``; momentum copies and queues are
    reported and skipped).
  * softmask's own ``save_pretrained`` folders.

Every loader returns a :class:`LoadReport` (loaded, missing, ignored and unexpected keys, in one
readable summary), fails with a :class:`CheckpointError` naming the key and both shapes on a shape
mismatch, and never executes pickled code (``torch.load(weights_only=True)``; safetensors preferred).
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from softmask.checkpoint_files import CheckpointError, read_safetensors, read_torch_file, resolve_checkpoint
from softmask.models.key_maps import (
    Ignore,
    Target,
    albef_paired_rule,
    albef_rule,
    bert_rule,
    hf_vit_rule,
    strip_prefix,
    vit_rule,
)
from softmask.models.vit import PatchEmbed, describe_stem

log = logging.getLogger("softmask")





# --------------------------------------------------------------------------------------------------
# Paths and raw state dicts
# --------------------------------------------------------------------------------------------------


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _weights_file(directory: Path) -> Path:
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return directory / name
    raise CheckpointError(f"{directory}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def _read_file(path: Path) -> dict:
    if path.name.endswith(".index.json"):
        index = json.loads(path.read_text())
        merged: dict = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            merged.update(_read_file(path.parent / shard))
        return merged
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    return read_torch_file(path, "model weights: a torch.save or .safetensors file, or a Hugging Face folder")


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Descend into ``model`` / ``state_dict`` / ``module`` nesting and keep the tensors."""
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in ("model", "state_dict", "module", "model_state_dict")
                      if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: found no tensors (nor a 'model' or 'state_dict' entry holding them)")
    sd = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if all(k.startswith("module.") for k in sd):  # saved from a DDP wrapper
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file or folder (Hugging Face layout, sharded or not), on the CPU."""
    path = Path(path)
    file = _weights_file(path) if path.is_dir() else path
    return _unwrap(_read_file(file), file)


def _read_hf_config(path: Path) -> dict | None:
    config = path / "config.json" if path.is_dir() else None
    if config is None or not config.is_file():
        return None
    try:
        return json.loads(config.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{config}: not valid JSON ({exc})") from None


# --------------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------------

FORMAT_NAMES = {
    "softmask": "a softmask checkpoint",
    "albef": "an ALBEF/TCL checkpoint",
    "hf-vit": "a Hugging Face ViT/DeiT checkpoint",
    "timm-vit": "a timm/DeiT ViT state dict",
    "hf-bert": "a Hugging Face BERT checkpoint",
    "unknown": "no checkpoint format softmask knows",
}


def detect_format(sd: dict[str, torch.Tensor]) -> str:
    """One of the keys of :data:`FORMAT_NAMES`."""
    keys = set(sd)
    if any(k.startswith("fusion_encoder.") for k in keys):
        return "softmask"
    if any(k.startswith("visual_encoder.") for k in keys) and any(k.startswith("text_encoder.") for k in keys):
        return "albef"
    bare = {strip_prefix(k, ("vit.", "deit.")) for k in keys}
    if any(k.startswith("embeddings.patch_embeddings.") for k in bare):
        return "hf-vit"
    if "patch_embed.proj.weight" in keys:
        return "timm-vit"
    if any(strip_prefix(k, ("bert.",)) == "embeddings.word_embeddings.weight" for k in keys):
        return "hf-bert"
    return "unknown"


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------


def compact_keys(keys: list[str] | set[str]) -> str:
    """``a.0.b.weight, a.1.b.weight, a.1.b.bias`` -> ``a.{0-1}.b.{bias,weight}``-style summary."""
    by_pattern: dict[str, set[int]] = defaultdict(set)
    plain: set[str] = set()
    for key in keys:
        m = re.search(r"\.(\d+)\.", key)
        if m:
            by_pattern[key[: m.start(1)] + "{}" + key[m.end(1):]].add(int(m[1]))
        else:
            plain.add(key)
    names = set(plain)
    for pattern, idx in by_pattern.items():
        ordered = sorted(idx)
        if len(ordered) == 1:
            span = str(ordered[0])
        elif ordered == list(range(ordered[0], ordered[-1] + 1)):
            span = f"{{{ordered[0]}-{ordered[-1]}}}"
        else:
            span = "{" + ",".join(map(str, ordered)) + "}"
        names.add(pattern.replace("{}", span, 1))
    leaves: dict[str, list[str]] = defaultdict(list)
    for name in names:
        stem, _, leaf = name.rpartition(".")
        leaves[stem].append(leaf)
    parts = []
    for stem in sorted(leaves):
        leaf = sorted(leaves[stem])
        tail = leaf[0] if len(leaf) == 1 else "{" + ",".join(leaf) + "}"
        parts.append(f"{stem}.{tail}" if stem else tail)
    return ", ".join(parts)


@dataclass
class LoadReport:
    """What one checkpoint load did. ``missing`` are model tensors in scope that the checkpoint did
    not provide (left as initialised); ``ignored`` are checkpoint tensors known and deliberately
    unused (reason per key); ``unexpected`` are checkpoint tensors not understood."""

    source: str
    slot: str
    fmt: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    ignored: dict[str, str] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.slot}: loaded {len(self.loaded)} tensors from {self.source} ({FORMAT_NAMES[self.fmt]})"]
        for note in self.notes:
            lines.append(f"  note: {note}")
        if self.missing:
            lines.append(f"  not in the checkpoint, left as initialised ({len(self.missing)}): "
                         f"{compact_keys(self.missing)}")
        by_reason: dict[str, list[str]] = defaultdict(list)
        for key, reason in self.ignored.items():
            by_reason[reason].append(key)
        for reason, keys in by_reason.items():
            lines.append(f"  ignored, {reason} ({len(keys)}): {compact_keys(keys)}")
        if self.unexpected:
            lines.append(f"  unexpected, not understood ({len(self.unexpected)}): {compact_keys(self.unexpected)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Size checks (before any tensor is copied)
# --------------------------------------------------------------------------------------------------


def _mismatch(source: Path | str, setting: str, ours: object, what: str, theirs: object) -> CheckpointError:
    return CheckpointError(f"{setting} is {ours} but the checkpoint {source} has {theirs} ({what})")


def _count(sd: dict, pattern: str) -> int:
    found = {int(m[1]) for k in sd if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def _check_vit(model, sd: dict, source: Path, key: str, hf_config: dict | None) -> None:
    """``sd`` in our ViT naming without prefix."""
    cfg = model.config.vision
    has_stem = any(k.startswith("patch_embed.stem.") for k in sd)
    if "patch_embed.proj.weight" in sd and has_stem != (cfg.stem == "conv"):
        raise _mismatch(source, f"{key}.stem", cfg.stem, "patch embedding",
                        "a convolutional stem" if has_stem else "a linear patch projection")
    if has_stem:  # the whole stem's structure must be the config's (its patch size included)
        theirs = {k[len("patch_embed."):]: tuple(v.shape) for k, v in sd.items() if k.startswith("patch_embed.")}
        ours = {k: tuple(v.shape) for k, v in PatchEmbed.of(cfg).state_dict().items()}
        if theirs != ours:
            raise _mismatch(source, f"{key}.stem_convs_per_level/stem_channels/patch_size",
                            f"{cfg.stem_convs_per_level}/{cfg.stem_channels}/{cfg.patch_size} "
                            f"({describe_stem(ours)})", "convolutional stem", describe_stem(theirs))
        patch = None
    else:
        patch = sd["patch_embed.proj.weight"].shape[-1] if "patch_embed.proj.weight" in sd else None
    checks = [("width", cfg.width, "width", sd["cls_token"].shape[-1] if "cls_token" in sd else None),
              ("depth", cfg.depth, "blocks", _count(sd, r"blocks\.(\d+)\.")),
              ("patch_size", cfg.patch_size, "patch size", patch),
              ("mlp_dim", cfg.mlp_dim, "MLP width",
               sd["blocks.0.mlp.fc1.weight"].shape[0] if "blocks.0.mlp.fc1.weight" in sd else None)]
    if hf_config:
        checks.append(("num_heads", cfg.num_heads, "num_attention_heads", hf_config.get("num_attention_heads")))
    for name, ours, what, theirs in checks:
        if theirs is not None and ours != theirs:
            raise _mismatch(source, f"{key}.{name}", ours, what, theirs)


def _check_bert(model, sd: dict, source: Path, key: str, hf_config: dict | None,
                expect_fusion: bool, first_layers: bool = False) -> None:
    """``sd`` in Hugging Face BERT naming without the ``bert.`` prefix."""
    cfg = model.config.text
    word = sd.get("embeddings.word_embeddings.weight")
    pos = sd.get("embeddings.position_embeddings.weight")
    fc1 = sd.get("encoder.layer.0.intermediate.dense.weight")
    checks = [("hidden_size", cfg.hidden_size, "hidden size", None if word is None else word.shape[1]),
              ("vocab_size", cfg.vocab_size, "vocabulary size", None if word is None else word.shape[0]),
              ("max_positions", cfg.max_positions, "position embeddings", None if pos is None else pos.shape[0]),
              ("intermediate_size", cfg.intermediate_size, "intermediate size", None if fc1 is None else fc1.shape[0]),
              ("num_layers", cfg.num_layers, "layers", _count(sd, r"encoder\.layer\.(\d+)\."))]
    if first_layers and checks[-1][3] is not None and checks[-1][3] >= cfg.num_layers:
        checks.pop()  # model.text.init_layers=first: the deeper layers are reported as ignored
    if hf_config:
        checks.append(("num_heads", cfg.num_heads, "num_attention_heads", hf_config.get("num_attention_heads")))
        act = hf_config.get("hidden_act", "gelu")
        if act != "gelu":
            raise CheckpointError(f"the checkpoint {source} uses hidden_act '{act}'; softmask's BERT uses 'gelu'")
    if expect_fusion:
        cross = [int(m[1]) for k in sd if (m := re.match(r"encoder\.layer\.(\d+)\.crossattention\.", k))]
        if cross:
            checks.append(("fusion_layer", cfg.fusion_layer, "cross-attention from layer", min(cross)))
    for name, ours, what, theirs in checks:
        if theirs is not None and ours != theirs:
            raise _mismatch(source, f"{key}.{name}", ours, what, theirs)


# --------------------------------------------------------------------------------------------------
# Applying a mapping
# --------------------------------------------------------------------------------------------------


def _map(sd: dict[str, torch.Tensor], rule: Callable[[str], Target | Ignore | None],
         report: LoadReport) -> dict[str, tuple[torch.Tensor, str]]:
    """Rename ``sd`` by ``rule``; fused targets (qkv, kv) are concatenated from their parts."""
    mapped: dict[str, tuple[torch.Tensor, str]] = {}
    parts: dict[str, dict[int, tuple[torch.Tensor, str]]] = defaultdict(dict)
    for key, tensor in sd.items():
        result = rule(key)
        if result is None:
            report.unexpected.append(key)
        elif isinstance(result, Ignore):
            report.ignored[key] = result.reason
        else:
            target, part = result
            if part is None:
                mapped[target] = (tensor, key)
            else:
                parts[target][part] = (tensor, key)
    for target, pieces in parts.items():
        need = 3 if ".qkv." in target else 2
        if sorted(pieces) != list(range(need)):
            report.unexpected.extend(src for _, src in pieces.values())
            continue
        ordered = [pieces[i] for i in range(need)]
        mapped[target] = (torch.cat([t for t, _ in ordered], dim=0), "+".join(s for _, s in ordered))
    return mapped


def _apply(model, mapped: dict[str, tuple[torch.Tensor, str]], report: LoadReport, source: Path,
           scope: tuple[str, ...]) -> LoadReport:
    own = model.state_dict()
    pos_key = "visual_encoder.pos_embed"
    if pos_key in mapped and pos_key in own and mapped[pos_key][0].shape != own[pos_key].shape:
        mapped[pos_key] = _fit_pos_embed(mapped[pos_key], own[pos_key], report, source)
    for target, (tensor, src) in mapped.items():
        if target not in own:
            report.unexpected.append(src)
        elif tuple(tensor.shape) != tuple(own[target].shape):
            raise CheckpointError(
                f"{source}: shape mismatch for '{src}' (-> model '{target}'): checkpoint "
                f"{tuple(tensor.shape)}, model {tuple(own[target].shape)}"
            )
    loadable = {t: v for t, v in mapped.items() if t in own}
    if not loadable:
        raise CheckpointError(
            f"{source}: none of its tensors fit the model ({report.slot}, {FORMAT_NAMES[report.fmt]})"
        )
    with torch.no_grad():
        for target, (tensor, _) in loadable.items():
            own[target].copy_(tensor)
    report.loaded = sorted(loadable)
    report.missing = sorted(k for k in own if k.startswith(scope) and k not in loadable)
    return report


def _fit_pos_embed(entry: tuple[torch.Tensor, str], own: torch.Tensor, report: LoadReport,
                   source: Path) -> tuple[torch.Tensor, str]:
    from softmask.models.vit import resize_pos_embed

    tensor, src = entry
    if tensor.dim() != 3 or tensor.shape[-1] != own.shape[-1]:
        return entry  # the shape check reports it
    extra = 1
    if "dist_token" in report.ignored or "embeddings.distillation_token" in {
            strip_prefix(k, ("vit.", "deit.")) for k in report.ignored}:
        tensor = torch.cat([tensor[:, :1], tensor[:, 2:]], dim=1)  # drop the distillation token's slot
        report.notes.append("dropped the DeiT distillation token's position embedding")
    grid = int(round((own.shape[1] - extra) ** 0.5))
    old = tensor.shape[1] - extra
    if old != grid * grid:
        try:
            tensor = resize_pos_embed(tensor, grid, num_prefix_tokens=extra)
        except ValueError as exc:
            raise CheckpointError(f"{source}: '{src}': {exc}") from None
        side = int(round(old ** 0.5))
        report.notes.append(f"position embeddings resized from a {side}x{side} to a {grid}x{grid} patch grid")
    return tensor, src


# --------------------------------------------------------------------------------------------------
# Public loaders
# --------------------------------------------------------------------------------------------------


_read_once: dict[Path, dict[str, torch.Tensor]] | None = None


@contextlib.contextmanager
def read_each_file_once():
    """Within this block every checkpoint is read from disk once and its tensors shared by the loaders
    that open it again (continued pretraining opens ``model.init`` for the online weights, then for the
    momentum encoders and queues: one read of a multi-GB file instead of two). The tensors are
    released at the end of the block; the loaders never modify them."""
    global _read_once
    outer = _read_once
    _read_once = {} if outer is None else outer
    try:
        yield
    finally:
        _read_once = outer


def _open(path: str | Path, key: str) -> tuple[Path, dict[str, torch.Tensor], str, LoadReport]:
    """Resolve, read (once inside :func:`read_each_file_once`) and recognise a checkpoint; an empty report."""
    source = resolve_checkpoint(path, key)
    if _read_once is None:
        sd = read_state_dict(source)
    else:
        key_path = source.resolve()
        if key_path not in _read_once:
            _read_once[key_path] = read_state_dict(source)
        sd = _read_once[key_path]
    fmt = detect_format(sd)
    return source, sd, fmt, LoadReport(str(source), key, fmt)


def _wrong_format(source: Path, key: str, fmt: str, expected: str) -> CheckpointError:
    return CheckpointError(f"{key}: {source} looks like {FORMAT_NAMES[fmt]}; expected {expected}")


def load_vision_checkpoint(model, path: str | Path, key: str = "model.vision.init") -> LoadReport:
    """Load a timm/DeiT state dict or a Hugging Face ViT/DeiT folder into ``model.visual_encoder``."""
    source, sd, fmt, report = _open(path, key)
    if fmt == "timm-vit":
        rule = vit_rule("visual_encoder.")
    elif fmt == "hf-vit":
        rule = hf_vit_rule("visual_encoder.")
    else:
        raise _wrong_format(source, key, fmt, "a ViT/DeiT checkpoint (timm state dict or Hugging Face folder)")
    mapped = _map(sd, rule, report)
    bare = {t[len("visual_encoder."):]: v for t, (v, _) in mapped.items()}
    _check_vit(model, bare, source, "model.vision", _read_hf_config(source))
    return _apply(model, mapped, report, source, ("visual_encoder.",))


def load_text_checkpoint(model, path: str | Path, key: str = "model.text.init") -> LoadReport:
    """Load a Hugging Face BERT folder (or state dict) into the text and fusion encoders and the MLM
    head: BERT layers below ``fusion_layer`` become text layers, the rest fusion layers."""
    source, sd, fmt, report = _open(path, key)
    if fmt != "hf-bert":
        raise _wrong_format(source, key, fmt, "a BERT checkpoint (Hugging Face folder or state dict)")
    bare = {strip_prefix(k, ("bert.",)): v for k, v in sd.items()}
    first = model.config.text.init_layers == "first"
    _check_bert(model, bare, source, "model.text", _read_hf_config(source), expect_fusion=False,
                first_layers=first)
    depth = model.config.text.num_layers
    mapped = _map(sd, bert_rule(model.config.text.fusion_layer, keep_layers=depth if first else None), report)
    report = _apply(model, mapped, report, source, ("text_encoder.", "fusion_encoder.", "mlm_head."))
    new_cross = [k for k in report.missing if ".cross_attn." in k or ".cross_norm." in k]
    if new_cross:
        report.notes.append(f"{len(new_cross)} cross-attention tensors are new and start random (expected)")
    return report


def load_model_checkpoint(model, path: str | Path, key: str = "model.init") -> LoadReport:
    """Load a whole-model checkpoint: an ALBEF/TCL ``.pth`` or a softmask ``save_pretrained`` folder."""
    source, sd, fmt, report = _open(path, key)
    if fmt == "softmask":
        return _apply(model, _map(sd, lambda k: (k, None), report), report, source, ("",))
    if fmt != "albef":
        raise _wrong_format(source, key, fmt, "an ALBEF/TCL checkpoint or a softmask save_pretrained folder")
    vit = {k[len("visual_encoder."):]: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    _check_vit(model, vit, source, "model.vision", None)
    bert = {strip_prefix(k[len("text_encoder."):], ("bert.",)): v
            for k, v in sd.items() if k.startswith("text_encoder.")}
    _check_bert(model, bert, source, "model.text", None, expect_fusion=True)
    mapped = _map(sd, albef_rule(model.config.text.fusion_layer), report)
    return _apply(model, mapped, report, source, ("",))


_ALBEF_MOMENTUM_ENCODERS = re.compile(r"(visual_encoder_m|text_encoder_m|vision_proj_m|text_proj_m)\.")
# An ALBEF/TCL pretraining checkpoint's momentum encoders, and the online names they mirror.
ALBEF_MOMENTUM_PREFIXES = {"visual_encoder_m.": "visual_encoder.", "text_encoder_m.": "text_encoder.",
                           "vision_proj_m.": "vision_proj.", "text_proj_m.": "text_proj."}
ALBEF_QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr")


def read_albef_training_state(path: str | Path, key: str = "model.init"
                              ) -> tuple[Path, dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """What continued pretraining takes from an ALBEF/TCL pretraining checkpoint besides the online
    weights: ``(file, momentum tensors under the online model's ALBEF names, queue tensors)``, or None
    for a checkpoint without momentum encoders (a fine-tuned one, a softmask folder, ...). Queues are
    ALBEF's ``image_queue``/``text_queue`` (dim, size) and ``queue_ptr`` (1,), as stored."""
    source, sd, fmt, _ = _open(path, key)
    if fmt != "albef":
        return None
    momentum = {online + k[len(prefix):]: v for k, v in sd.items()
                for prefix, online in ALBEF_MOMENTUM_PREFIXES.items() if k.startswith(prefix)}
    if not momentum:
        return None
    return source, momentum, {k: sd[k] for k in ALBEF_QUEUE_KEYS if k in sd}


def load_albef_momentum(momentum_model, source: Path, momentum: dict[str, torch.Tensor],
                        key: str = "model.init") -> LoadReport:
    """Load :func:`read_albef_training_state`'s momentum tensors into ``momentum_model`` (the online
    model's copy). ALBEF keeps no momentum ITM head or temperature: they stay the online model's."""
    report = LoadReport(str(source), f"{key} (momentum model)", "albef")
    mapped = _map(momentum, albef_rule(momentum_model.config.text.fusion_layer), report)
    return _apply(momentum_model, mapped, report, source, ("",))


def load_albef_task_checkpoint(task_model, path: str | Path, heads: Callable[[str], Target | Ignore | None],
                               paired_fusion: bool = False, prepare: Callable[[dict], None] | None = None,
                               key: str = "--checkpoint") -> LoadReport:
    """Load an ALBEF fine-tuned task checkpoint (its scripts save ``{"model": state_dict}``) into a task
    model: the backbone (``visual_encoder.*``, ``text_encoder.*`` as a BertModel or BertForMaskedLM) into
    ``task_model.backbone``, and what ``heads(key)`` places (``cls_head.*``, VQA's ``text_decoder.*``)
    into the task's heads. Other momentum copies (``*_m``) are reported and skipped. With
    ``paired_fusion`` (NLVR2) the file's fusion layers come in pairs (:func:`albef_paired_rule`);
    ``prepare(state_dict)`` runs before anything is loaded.

    Raises:
        CheckpointError: not ALBEF's layout, sizes that do not fit, or tensors that fit nowhere.
    """
    source, sd, fmt, report = _open(path, key)
    if fmt != "albef":
        raise _wrong_format(source, key, fmt, "an ALBEF fine-tuned task checkpoint")
    if prepare is not None:
        prepare(sd)
    fusion_layer = task_model.backbone.config.text.fusion_layer
    backbone = (albef_paired_rule if paired_fusion else albef_rule)(fusion_layer)

    def rule(name: str) -> Target | Ignore | None:
        target = heads(name)
        if target is not None:
            return target
        if re.match(r"[a-z_]+_m\.", name) and not _ALBEF_MOMENTUM_ENCODERS.match(name):
            return Ignore("momentum copy of a task head (used by distillation in fine-tuning only)")
        target = backbone(name)
        if isinstance(target, tuple):
            return "backbone." + target[0], target[1]
        return target

    vit = {k[len("visual_encoder."):]: v for k, v in sd.items() if k.startswith("visual_encoder.")}
    _check_vit(task_model.backbone, vit, source, "model.vision", None)
    bert = {strip_prefix(k[len("text_encoder."):], ("bert.",)): v
            for k, v in sd.items() if k.startswith("text_encoder.")}
    if paired_fusion:  # check the sizes as a single-image BERT: the first layer of each pair
        bert = {_unpaired(k, fusion_layer): v for k, v in bert.items() if _unpaired(k, fusion_layer)}
    _check_bert(task_model.backbone, bert, source, "model.text", None, expect_fusion=True)
    return _apply(task_model, _map(sd, rule, report), report, source, ("",))


def _unpaired(key: str, fusion_layer: int) -> str:
    """A paired (NLVR2) BERT key renumbered as in a single-image BERT; "" for the second of a pair."""
    m = re.match(r"encoder\.layer\.(\d+)\.(.+)", key)
    if m is None or int(m[1]) < fusion_layer:
        return key
    i, second = divmod(int(m[1]) - fusion_layer, 2)
    return "" if second else f"encoder.layer.{fusion_layer + i}.{m[2]}"


def load_softmask_folder(model, directory: str | Path, strict: bool = True) -> LoadReport:
    """Load ``model.safetensors`` of a ``save_pretrained`` folder; with ``strict`` every tensor of the
    model must be present and every tensor of the file must be used."""
    directory = Path(directory)
    report = load_model_checkpoint(model, directory, key=str(directory))
    if strict and (report.missing or report.unexpected or report.fmt != "softmask"):
        raise CheckpointError(f"{directory}: does not match its config.yaml\n{report.summary()}")
    return report


def load_init_checkpoints(model) -> list[LoadReport]:
    """Apply ``vision.init``, ``text.init`` and then ``init`` of ``model.config``; log each summary."""
    cfg = model.config
    reports = []
    if cfg.vision.init:
        reports.append(load_vision_checkpoint(model, cfg.vision.init))
    if cfg.text.init:
        reports.append(load_text_checkpoint(model, cfg.text.init))
    if cfg.init:
        reports.append(load_model_checkpoint(model, cfg.init))
    for report in reports:
        log.info(report.summary())
    return reports
