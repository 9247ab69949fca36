"""Vision Transformer image encoder (pre-norm ViT, as in DeiT/timm) and position-embedding resizing.

Parameter names follow timm's ViT (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so timm/DeiT and ALBEF
checkpoints map onto it by prefix alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from softmask.config import VisionConfig


def resize_pos_embed(pos_embed: torch.Tensor, new_grid: int | tuple[int, int],
                     num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resample ViT position embeddings to a new patch grid (bicubic), e.g. 224 -> 256 -> 384 px.

    Args:
        pos_embed: (1, P + H*W, D): ``P`` prefix tokens ([CLS], ...) then a square H x W grid.
        new_grid: the target grid, ``n`` for n x n or ``(h, w)``.
        num_prefix_tokens: how many leading tokens are not on the grid; they are kept unchanged.

    Returns:
        (1, P + h*w, D). The input tensor itself when the grid is already the requested size.
    """
    new_h, new_w = (new_grid, new_grid) if isinstance(new_grid, int) else new_grid
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must have shape (1, tokens, dim), got {tuple(pos_embed.shape)}")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise ValueError(
            f"pos_embed has {grid.shape[1]} grid tokens after {num_prefix_tokens} prefix token(s), "
            "which is not a square grid"
        )
    if (old, old) == (new_h, new_w):
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_h, new_w), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


class PatchEmbed(nn.Module):
    """Pixels to one token per patch: (B, 3, H, W) -> (B, H/p * W/p, D).

    ``stem="patch"`` (ViT/DeiT): one linear projection of each non-overlapping p x p patch
    (``proj``, a p x p convolution of stride p). ``stem="conv"`` (ours, off in the paper's configs): a
    convolutional stem in the manner of Xiao et al. 2021, "Early convolutions help transformers see
    better": log2(p) levels, each a 3x3 convolution of stride 2 and then ``convs_per_level - 1`` 3x3
    convolutions of stride 1, each convolution followed by a LayerNorm over the channels (at each
    position, so a token depends on nearby pixels only) and a GELU (``stem``, one flat sequence;
    channels ``channels``/2^k ... ``channels`` from the first level to the last, ``channels`` = 0 meaning
    width/2), then a 1x1 convolution to the width (``proj``). Overlapping receptive fields let a token
    see the edges of a small object that straddles patches; more convolutions per level see shapes.
    """

    def __init__(self, patch_size: int, width: int, stem: str = "patch", convs_per_level: int = 1,
                 channels: int = 0):
        super().__init__()
        if stem == "patch":
            self.stem = None
            self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)
            return
        layers: list[nn.Module] = []
        levels = conv_stem_levels(patch_size)
        last = channels or width // 2
        channels_in = 3
        for level in range(levels):
            channels_out = max(8, last >> (levels - 1 - level))
            for conv in range(convs_per_level):
                layers += [nn.Conv2d(channels_in, channels_out, kernel_size=3, stride=1 if conv else 2, padding=1,
                                     bias=False), ChannelNorm(channels_out), nn.GELU()]
                channels_in = channels_out
        self.stem = nn.Sequential(*layers)
        self.proj = nn.Conv2d(channels_in, width, kernel_size=1)

    @classmethod
    def of(cls, cfg: VisionConfig) -> PatchEmbed:
        return cls(cfg.patch_size, cfg.width, cfg.stem, cfg.stem_convs_per_level, cfg.stem_channels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels if self.stem is None else self.stem(pixels)
        return self.proj(x).flatten(2).transpose(1, 2)


def describe_stem(shapes: dict[str, tuple[int, ...]]) -> str:
    """A patch embedding's structure from its weight shapes (``stem.N.weight``/``proj.weight`` keys),
    e.g. "a linear 16x16 patch projection" or "6 3x3 convolutions with 32, 32, 64, 64, 128, 128 channels"."""
    convs = [shape for name, shape in sorted(shapes.items(), key=lambda kv: _stem_index(kv[0]))
             if name.startswith("stem.") and len(shape) == 4]
    if not convs:
        proj = shapes.get("proj.weight")
        return f"a linear {proj[-2]}x{proj[-1]} patch projection" if proj else "no patch embedding"
    return f"{len(convs)} 3x3 convolutions with {', '.join(str(s[0]) for s in convs)} channels"


def _stem_index(name: str) -> int:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else -1


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of (B, C, H, W) at each position."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_stem_levels(patch_size: int) -> int:
    """How many stride-2 convolutions a conv stem needs for ``patch_size`` (a power of two >= 2)."""
    levels = patch_size.bit_length() - 1
    if patch_size < 2 or 1 << levels != patch_size:
        raise ValueError(f"a conv stem needs a patch size that is a power of two >= 2, got {patch_size}")
    return levels


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection: (B, N, D) -> (B, N, D)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg.width, cfg.num_heads)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg.width, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT: (B, 3, S, S) pixels -> (B, 1 + N, D) tokens after the final LayerNorm, N = (S / p)^2."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embed = PatchEmbed.of(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid * self.grid, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.reset_parameters()

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def freeze_lowest(self, layers: int) -> None:
        """Turn off the gradient of the lowest ``layers`` layers (``train.frozen_image_layers``): 1 = the patch
        embedding, k > 1 = also the position embeddings, [CLS] and the first k - 1 blocks. Nothing below a
        frozen layer trains, so autograd neither stores activations for them nor back-propagates there."""
        if not 0 <= layers <= len(self.blocks) + 1:
            raise ValueError(f"cannot freeze {layers} image-encoder layers: it has a stem and "
                             f"{len(self.blocks)} blocks")
        parts: list[nn.Module | nn.Parameter] = [self.patch_embed] if layers else []
        if layers > 1:
            parts += [self.pos_embed, self.cls_token, *self.blocks[:layers - 1]]
        for part in parts:
            part.requires_grad_(False)

    def forward(self, pixels: torch.Tensor, patch_scale: torch.Tensor | None = None) -> torch.Tensor:
        """``patch_scale`` (B, N), optional: multiplies each patch embedding before the position
        embeddings are added (SoftMask's ``apply_to: patch_embeddings``)."""
        size = self.cfg.image_size
        if pixels.dim() != 4 or pixels.shape[1] != 3 or tuple(pixels.shape[-2:]) != (size, size):
            raise ValueError(
                f"image encoder expects pixels of shape (B, 3, {size}, {size}) "
                f"(model.vision.image_size), got {tuple(pixels.shape)}"
            )
        x = self.patch_embed(pixels)
        if patch_scale is not None:
            x = x * patch_scale[..., None].to(x.dtype)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
