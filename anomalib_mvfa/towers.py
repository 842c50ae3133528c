"""The image towers MVFA's adapters sit on: open_clip's own ViT and timm ViTs inside open_clip.

MVFA needs of a tower: a patch embedding with one class token in front (token 0) and a position
embedding, a stack of transformer blocks that map ``B x T x W`` tokens to the same shape, the width
``W`` and the joint embedding dimension ``C`` of the CLIP model (the adapters map ``W -> C -> W``).
:func:`vision_tower` wraps both kinds behind that one interface:

- :class:`OpenClipTower`: open_clip's ``VisionTransformer`` (OpenAI's CLIP, LAION's, ...);
- :class:`TimmTower`: an open_clip ``TimmModel`` whose ``trunk`` is a timm ``VisionTransformer``
  (BiomedCLIP, whose image tower is timm's ``vit_base_patch16_224``, and other timm towers).

Other towers (convolutional ones, ViTs without a class token or with register tokens, timm ViTs
that size their input dynamically) are refused by name, with what is missing.

Example:
    >>> tower = vision_tower(clip.visual, "tiny-random")  # doctest: +SKIP
    >>> tokens = tower.run_blocks(tower.embed(images), 0, 2)  # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any

import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from .errors import MvfaInputError


class VisionTower:
    """What MVFA uses of an image tower (see the module docstring).

    Attributes:
        depth: Number of transformer blocks (``feature_layers`` count them from 1).
        grid_size: Patch grid ``(h, w)`` at the model's image size.
        width: Token width ``W`` inside the tower.
        embed_dim: The CLIP model's joint embedding dimension ``C``.
    """

    depth: int
    grid_size: tuple[int, int]
    width: int
    embed_dim: int

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch-embed ``images`` into the ``B x (1 + L) x W`` tokens entering block 1 (class token first)."""
        raise NotImplementedError

    def run_blocks(self, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Run blocks ``start + 1`` to ``stop`` (1-based) on ``B x T x W`` tokens."""
        raise NotImplementedError

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tower's own image embedding (``B x C``) from the last block's tokens: final norm and head."""
        raise NotImplementedError


class OpenClipTower(VisionTower):
    """open_clip's ``VisionTransformer``: ``conv1`` patches, ``class_embedding``, ``ln_pre``, ``resblocks``."""

    def __init__(self, visual: VisionTransformer) -> None:
        self.visual = visual
        self.depth = len(visual.transformer.resblocks)
        self.grid_size = tuple(visual.grid_size)
        self.width = visual.conv1.out_channels
        self.embed_dim = visual.output_dim

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``ln_pre(cat(class, patches) + position)``, as open_clip's forward."""
        visual = self.visual
        tokens = visual.conv1(images.to(visual.conv1.weight.dtype)).flatten(2).transpose(1, 2)
        class_token = visual.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        tokens = torch.cat([class_token, tokens], dim=1) + visual.positional_embedding.to(tokens.dtype)
        return visual.ln_pre(tokens)

    def run_blocks(self, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """open_clip's residual blocks (sequence-first in older open_clip versions)."""
        transformer = self.visual.transformer
        batch_first = getattr(transformer, "batch_first", False)
        tokens = tokens if batch_first else tokens.transpose(0, 1)
        for block in transformer.resblocks[start:stop]:
            tokens = block(tokens)
        return tokens if batch_first else tokens.transpose(0, 1)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """``ln_post`` of the class token, then the projection."""
        pooled = self.visual.ln_post(tokens[:, 0])
        return pooled @ self.visual.proj if self.visual.proj is not None else pooled


class TimmTower(VisionTower):
    """A timm ``VisionTransformer`` in open_clip's ``TimmModel``: ``trunk`` blocks, ``head`` projection."""

    def __init__(self, visual: nn.Module, embed_dim: int) -> None:
        self.visual = visual
        trunk = visual.trunk
        self.depth = len(trunk.blocks)
        self.grid_size = tuple(trunk.patch_embed.grid_size)
        self.width = trunk.embed_dim
        self.embed_dim = embed_dim

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """``norm_pre(cat(class, patches) + position)``; with ``no_embed_class`` the position skips the class token."""
        trunk = self.visual.trunk
        tokens = trunk.patch_embed(images.to(trunk.pos_embed.dtype))
        class_token = trunk.cls_token.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        position = trunk.pos_embed.to(tokens.dtype)
        if trunk.no_embed_class:
            tokens = torch.cat([class_token, tokens + position], dim=1)
        else:
            tokens = torch.cat([class_token, tokens], dim=1) + position
        return trunk.norm_pre(trunk.pos_drop(tokens))

    def run_blocks(self, tokens: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Timm's blocks (batch-first)."""
        for block in self.visual.trunk.blocks[start:stop]:
            tokens = block(tokens)
        return tokens

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """Timm's final norm and pooling, then open_clip's head."""
        trunk = self.visual.trunk
        return self.visual.head(trunk.forward_head(trunk.norm(tokens)))


def _timm_refusal(trunk: nn.Module) -> str | None:
    """Why MVFA's adapters cannot sit on this timm trunk, or ``None`` when they can."""
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer  # noqa: PLC0415

    if not isinstance(trunk, TimmVisionTransformer):
        return f"its timm image tower is a {type(trunk).__name__}, not a timm VisionTransformer (no patch tokens)"
    if getattr(trunk, "cls_token", None) is None:
        return "its timm ViT has no class token (MVFA's detection adapters score tokens after it)"
    if getattr(trunk, "num_prefix_tokens", 1) != 1:
        return f"its timm ViT has {trunk.num_prefix_tokens - 1} register token(s) besides the class token"
    if getattr(trunk, "dynamic_img_size", False):
        return "its timm ViT sizes its input dynamically (dynamic_img_size)"
    if getattr(trunk, "pos_embed", None) is None:
        return "its timm ViT has no absolute position embedding"
    return None


def _output_dim(visual: nn.Module) -> int | None:
    """The joint embedding dimension of a ``TimmModel``: its head's last linear layer, else the trunk's classes."""
    linears = [module for module in visual.head.modules() if isinstance(module, nn.Linear)]
    if linears:
        return linears[-1].out_features
    classes = getattr(visual.trunk, "num_classes", 0)
    return classes or None


def vision_tower(visual: Any, backbone: str) -> VisionTower:
    """The :class:`VisionTower` of a CLIP model's image tower ``visual``.

    Raises:
        ValueError: If MVFA's adapters cannot sit on it; the message names ``backbone`` and what is missing.

    Example:
        >>> vision_tower(clip.visual, "ViT-B-16").grid_size  # doctest: +SKIP
        (14, 14)
    """
    if isinstance(visual, VisionTransformer):
        return OpenClipTower(visual)
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        reason = f"its image tower is a {type(visual).__name__}, neither open_clip's ViT nor a timm ViT"
    else:
        reason = _timm_refusal(trunk)
        embed_dim = _output_dim(visual)
        if reason is None and embed_dim is None:
            reason = "its timm tower has no projection to the joint embedding"
        if reason is None:
            return TimmTower(visual, int(embed_dim))
    msg = (
        f"Backbone '{backbone}' cannot carry MVFA's adapters: {reason}. MVFA needs a ViT image tower with "
        "one class token and an absolute position embedding (open_clip's own, or a timm VisionTransformer)."
    )
    raise MvfaInputError(msg)


def resize_timm_tower(visual: nn.Module, image_size: int) -> None:
    """Run a timm tower at ``image_size``: timm resamples its position embedding (bicubic, as open_clip's own)."""
    trunk = visual.trunk
    if tuple(trunk.patch_embed.img_size) != (image_size, image_size):
        trunk.set_input_size(img_size=(image_size, image_size))
    visual.image_size = (image_size, image_size)


def match_timm_grid(visual: nn.Module, pos_embed: torch.Tensor | None) -> None:
    """Size a timm tower for a weights file's position embedding (``1 x (prefix + g*g) x W``) before it loads.

    A file made at another image size than the config's then loads exactly, and
    :func:`resize_timm_tower` resamples it once, to the size asked for.
    """
    trunk = visual.trunk
    if pos_embed is None or pos_embed.shape == trunk.pos_embed.shape:
        return
    prefix = 0 if trunk.no_embed_class else trunk.num_prefix_tokens
    side = math.isqrt(pos_embed.shape[1] - prefix)
    if side * side != pos_embed.shape[1] - prefix:
        return  # not a square grid: the weights check names the shapes
    patch = trunk.patch_embed.patch_size[0]
    trunk.set_input_size(img_size=(side * patch, side * patch))
