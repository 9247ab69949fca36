"""What the test modules share: the tiny configs, small data the tests draw themselves, and helpers
(``from helpers import ...``). Fixtures are in ``conftest.py``.

``TINY`` is the tiny pretraining config file (``configs/pretrain/tiny.yaml``); ``TINY_MODEL`` an even
smaller model section for tests that build a model alone (:func:`tiny_model_config`). Config changes
are dotted ``key=value`` overrides everywhere, as on the command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from softmask.config import Config, ModelConfig, apply_override, config_from_dict, model_config_from_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY = str(CONFIGS / "pretrain" / "tiny.yaml")
TINY_MODEL = {
    "embed_dim": 16,
    "vision": {"image_size": 32, "patch_size": 8, "width": 48, "depth": 2, "num_heads": 2, "mlp_dim": 96},
    "text": {"vocab_size": 120, "hidden_size": 32, "num_layers": 4, "fusion_layer": 2, "num_heads": 2,
             "intermediate_size": 64, "max_positions": 40},
}


def load_benchmark(name: str):
    """A script under benchmarks/ imported as a module (they are not a package)."""
    import importlib.util

    path = ROOT / "benchmarks" / name
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_model_config(*overrides: str) -> ModelConfig:
    """The :data:`TINY_MODEL` section with dotted ``key=value`` overrides relative to ``model``, e.g.
    ``"text.num_layers=5"`` or ``f"init={path}"`` (values read as YAML, as on the command line)."""
    data = json.loads(json.dumps(TINY_MODEL))
    for override in overrides:
        apply_override(data, override)
    return model_config_from_dict(data)


def tiny_config(*overrides: str) -> Config:
    """A whole config whose model section is :data:`TINY_MODEL`, with dotted ``key=value`` overrides of any
    key (as ``load_config`` takes them), e.g. ``"model.text.vocab_size=30522"`` or ``"mlm.mask_sep=false"``."""
    data = {"model": json.loads(json.dumps(TINY_MODEL))}
    for override in overrides:
        apply_override(data, override)
    return config_from_dict(data)


def text_batch(vocab: int = 120, b: int = 3, t: int = 9, seed: int = 0):
    """(B, T) ids starting with a [CLS]-like id, and a mask with padding in the later rows."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, t), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(b, t, dtype=torch.long)
    for row in range(1, b):
        mask[row, t - 2 * row:] = 0
    return ids, mask


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (30, 60, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "disc")


def make_world(root: Path, n: int = 16, seed: int = 0) -> Path:
    """``n`` 64 px images of one coloured shape each and an ALBEF pretrain JSON describing them."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 2]
        img = np.full((64, 64, 3), rng.integers(90, 160), dtype=np.uint8)
        yy, xx = np.mgrid[0:64, 0:64]
        cx, cy = rng.integers(18, 46, size=2)
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < 144
        inside = (abs(xx - cx) < 12) & (abs(yy - cy) < 12) if shape == "square" else disc
        img[inside] = COLOURS[colour]
        Image.fromarray(img).save(root / "images" / f"{i}.png")
        records.append({"image": f"images/{i}.png", "caption": [f"a {colour} {shape}", f"the {shape} is {colour}"]})
    ann = root / "pretrain.json"
    ann.write_text(json.dumps(records))
    return ann


def pretrain_overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train=[{root / 'pretrain.json'}]", f"data.image_root={root}", f"output_dir={out}",
            "data.num_workers=0", "itc.queue_size=20", "train.log_every=1", "train.warmup_steps=2", *extra]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def torchrun_pretrain(nproc: int, args: list[str], cwd: Path) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(29500 + nproc + os.getpid() % 1000), "-m", "softmask", "-q", "pretrain", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]


def bert_lm_state_dict(r, prefix: str, t, layers: int, cross_from: int, cross_width: int,
                       position_ids: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors (``r(*shape)``) under the names of a Hugging Face BertForMaskedLM / BertLMHeadModel
    at ``prefix`` (``bert.*`` and ``cls.predictions.*``, the decoder tied to the word embeddings), with
    ``crossattention`` of key/value width ``cross_width`` in the layers from ``cross_from`` on."""
    h, b = t.hidden_size, prefix + "bert."
    sd = {b + "embeddings.word_embeddings.weight": r(t.vocab_size, h),
          b + "embeddings.position_embeddings.weight": r(t.max_positions, h),
          b + "embeddings.token_type_embeddings.weight": r(2, h),
          b + "embeddings.LayerNorm.weight": r(h), b + "embeddings.LayerNorm.bias": r(h)}
    if position_ids:
        sd[b + "embeddings.position_ids"] = torch.arange(t.max_positions)[None]
    for i in range(layers):
        p = f"{b}encoder.layer.{i}."
        linears = [("attention.self.query", h, h), ("attention.self.key", h, h), ("attention.self.value", h, h),
                   ("attention.output.dense", h, h), ("intermediate.dense", t.intermediate_size, h),
                   ("output.dense", h, t.intermediate_size)]
        norms = ["attention.output.LayerNorm", "output.LayerNorm"]
        if i >= cross_from:
            linears += [("crossattention.self.query", h, h), ("crossattention.self.key", h, cross_width),
                        ("crossattention.self.value", h, cross_width), ("crossattention.output.dense", h, h)]
            norms.append("crossattention.output.LayerNorm")
        for name, out_dim, in_dim in linears:
            sd[p + name + ".weight"], sd[p + name + ".bias"] = r(out_dim, in_dim), r(out_dim)
        for name in norms:
            sd[p + name + ".weight"], sd[p + name + ".bias"] = r(h), r(h)
    c = prefix + "cls.predictions."
    bias = r(t.vocab_size)
    sd.update({c + "bias": bias, c + "decoder.bias": bias,
               c + "decoder.weight": sd[b + "embeddings.word_embeddings.weight"],
               c + "transform.dense.weight": r(h, h), c + "transform.dense.bias": r(h),
               c + "transform.LayerNorm.weight": r(h), c + "transform.LayerNorm.bias": r(h)})
    return sd


def albef_state_dict(cfg, momentum=True, seed=0):
    """Random tensors under the key names of ALBEF's released checkpoints (ALBEF_4M.pth, TCL too):
    a timm ViT under visual_encoder, a BertForMaskedLM under text_encoder with ``crossattention`` in
    the layers from fusion_layer on, projections, ITM head, temperature, momentum copies, queues."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    v, t = cfg.vision, cfg.text
    n = (v.image_size // v.patch_size) ** 2
    sd = {"visual_encoder.cls_token": r(1, 1, v.width), "visual_encoder.pos_embed": r(1, 1 + n, v.width),
          "visual_encoder.patch_embed.proj.weight": r(v.width, 3, v.patch_size, v.patch_size),
          "visual_encoder.patch_embed.proj.bias": r(v.width),
          "visual_encoder.norm.weight": r(v.width), "visual_encoder.norm.bias": r(v.width)}
    for i in range(v.depth):
        p = f"visual_encoder.blocks.{i}."
        for name, shape in [("norm1", (v.width,)), ("norm2", (v.width,)), ("attn.qkv", (3 * v.width, v.width)),
                            ("attn.proj", (v.width, v.width)), ("mlp.fc1", (v.mlp_dim, v.width)),
                            ("mlp.fc2", (v.width, v.mlp_dim))]:
            sd[p + name + ".weight"] = r(*shape)
            sd[p + name + ".bias"] = r(shape[0])
    h = t.hidden_size
    sd.update(bert_lm_state_dict(r, "text_encoder.", t, t.num_layers, t.fusion_layer, v.width))
    sd.update({"vision_proj.weight": r(cfg.embed_dim, v.width), "vision_proj.bias": r(cfg.embed_dim),
               "text_proj.weight": r(cfg.embed_dim, h), "text_proj.bias": r(cfg.embed_dim),
               "itm_head.weight": r(2, h), "itm_head.bias": r(2), "temp": torch.tensor(0.05)})
    if momentum:
        for key in [k for k in sd if k.split(".")[0] in ("visual_encoder", "text_encoder", "vision_proj", "text_proj")]:
            head, _, rest = key.partition(".")
            sd[f"{head}_m.{rest}"] = sd[key].clone()
        sd.update({"image_queue": r(cfg.embed_dim, 64), "text_queue": r(cfg.embed_dim, 64),
                   "queue_ptr": torch.zeros(1, dtype=torch.long)})
    return sd
