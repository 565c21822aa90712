"""TinyViT image encoder, state-dict compatible with MobileSAM's ``mobile_sam.pt``.

Written for maskteacher from the published TinyViT / MobileSAM architecture description:

- stem: two 3x3 stride-2 conv+BN layers with a GELU between them (image -> image/4);
- stage 0: MBConv blocks (1x1 expand x4, 3x3 depthwise, 1x1 project, residual, GELU);
- stages 1..n: transformer blocks = windowed self-attention with a learned relative-position
  bias table (one bias per head and per (|dy|, |dx|) offset inside a window), a 3x3 depthwise
  conv+BN "local conv", and a pre-norm MLP (ratio 4);
- between stages a patch-merging block (1x1 conv, 3x3 depthwise conv, 1x1 conv, each with BN);
  MobileSAM keeps the last merge at stride 1, so the output is image/16 like SAM's ViT;
- neck: 1x1 conv -> LayerNorm2d -> 3x3 conv -> LayerNorm2d to ``out_chans`` (256) channels.

Parameter names follow the official checkpoint (``patch_embed.seq.0.c.weight``,
``layers.1.blocks.0.attn.attention_biases``, ``neck.1.weight``, ...). The ImageNet classifier
(``norm_head``, ``head``) that MobileSAM's checkpoint carries is never used by SAM; it is kept as
buffers so that keys and shapes match while DDP and optimizers never see unused parameters.

Unlike the reference implementation, attention never caches its gathered bias table when switched
to eval mode (see :class:`WindowAttention`), so loading weights after ``.eval()`` cannot leave stale
biases behind.

Tensor layouts: feature maps between stages are (B, C, H, W); transformer blocks work on
channels-last (B, H, W, C) maps.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import LayerNorm2d
from torch import nn
from torchvision.ops import stochastic_depth


class ConvBN(nn.Sequential):
    """Bias-free conv followed by BatchNorm (keys ``c.*`` and ``bn.*``); padding keeps size/stride."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int = 1,
        *,
        stride: int = 1,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        conv = nn.Conv2d(
            in_chans,
            out_chans,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        )
        bn = nn.BatchNorm2d(out_chans)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.zeros_(bn.bias)
        super().__init__(OrderedDict(c=conv, bn=bn))


class _DropPath(nn.Module):
    """Stochastic depth on a residual branch (torchvision's ``stochastic_depth``, row mode)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0:
            return x
        return stochastic_depth(x, self.rate, "row", self.training)


class Stem(nn.Module):
    """(B, 3, S, S) image -> (B, dim, S/4, S/4): conv-BN (stride 2), GELU, conv-BN (stride 2)."""

    def __init__(self, in_chans: int, dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            ConvBN(in_chans, dim // 2, 3, stride=2),
            nn.GELU(),
            ConvBN(dim // 2, dim, 3, stride=2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block on (B, C, H, W): expand, depthwise 3x3, project, add, GELU."""

    def __init__(self, dim: int, *, expand_ratio: float, drop_path: float) -> None:
        super().__init__()
        hidden = int(dim * expand_ratio)
        self.conv1 = ConvBN(dim, hidden, 1)
        self.conv2 = ConvBN(hidden, hidden, 3, groups=hidden)
        # Zero-initialised last BN: a fresh block starts as (GELU of) the identity.
        self.conv3 = ConvBN(hidden, dim, 1, bn_weight_init=0.0)
        self.drop_path = _DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.conv1(x))
        y = F.gelu(self.conv2(y))
        y = self.conv3(y)
        return F.gelu(x + self.drop_path(y))


class PatchMerging(nn.Module):
    """(B, C, H, W) -> (B, C', H/s, W/s): 1x1 conv, GELU, depthwise 3x3 (stride s), GELU, 1x1."""

    def __init__(self, dim: int, out_dim: int, *, stride: int) -> None:
        super().__init__()
        self.conv1 = ConvBN(dim, out_dim, 1)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride=stride, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))
        return self.conv3(x)


def relative_offset_index(window_size: int) -> torch.Tensor:
    """(N, N) long, N = window_size**2: bias-table column for each (query, key) token pair.

    Tokens are numbered row-major inside the window; the column of a pair is
    ``|dy| * window_size + |dx|``, which is the order in which TinyViT's table lists offsets.
    """
    coords = torch.arange(window_size)
    rows = coords.repeat_interleave(window_size)  # (N,) row of each token
    cols = coords.repeat(window_size)  # (N,) column of each token
    dy = (rows[:, None] - rows[None, :]).abs()
    dx = (cols[:, None] - cols[None, :]).abs()
    return dy * window_size + dx


class WindowAttention(nn.Module):
    """Pre-norm multi-head self-attention over (B*, N, C) window tokens with a learned bias table.

    ``qkv`` packs, per head, the query, key and value of width ``dim // num_heads`` one after the
    other (the checkpoint's layout). The bias (heads, N, N) is gathered from ``attention_biases``
    on every call -- never cached -- so it always reflects the current parameter values.
    """

    def __init__(self, dim: int, *, num_heads: int, window_size: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, window_size * window_size))
        self.register_buffer(
            "attention_bias_idxs", relative_offset_index(window_size), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=-1)  # each (B*, heads, N, hd)
        bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)  # (heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class Mlp(nn.Module):
    """Pre-norm MLP on (..., C): LayerNorm, Linear(C, hidden), GELU, Linear(hidden, C)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


class TinyViTBlock(nn.Module):
    """Transformer block on a channels-last map (B, H, W, C).

    Windowed attention (the map is zero-padded bottom/right to whole windows; padded tokens take
    part as keys, as in TinyViT), residual add, depthwise local conv, residual MLP.
    """

    def __init__(
        self,
        dim: int,
        *,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.attn = WindowAttention(dim, num_heads=num_heads, window_size=window_size)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, local_conv_size, groups=dim)
        self.drop_path = _DropPath(drop_path)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window_size
        pad_b, pad_r = (-h) % ws, (-w) % ws
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
        windows = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        out = self.attn(windows)
        out = out.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, nh * ws, nw * ws, c)
        return out[:, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self._windowed_attention(x))
        x = self.local_conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.drop_path(self.mlp(x))


class ConvStage(nn.Module):
    """Stage 0: MBConv blocks then patch merging, on (B, C, H, W)."""

    def __init__(
        self,
        dim: int,
        out_dim: int,
        *,
        depth: int,
        expand_ratio: float,
        drop_path: Sequence[float],
        merge_stride: int,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            MBConv(dim, expand_ratio=expand_ratio, drop_path=drop_path[i]) for i in range(depth)
        )
        self.downsample = PatchMerging(dim, out_dim, stride=merge_stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.downsample(x)


class TransformerStage(nn.Module):
    """Stages 1..n: TinyViT blocks, then patch merging unless it is the last stage; (B, C, H, W)."""

    def __init__(
        self,
        dim: int,
        out_dim: int | None,
        *,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        drop_path: Sequence[float],
        merge_stride: int,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(
                dim,
                num_heads=num_heads,
                window_size=window_size,
                mlp_ratio=mlp_ratio,
                local_conv_size=local_conv_size,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        self.downsample = (
            PatchMerging(dim, out_dim, stride=merge_stride) if out_dim is not None else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        for block in self.blocks:
            x = block(x)
        x = x.permute(0, 3, 1, 2)
        return self.downsample(x) if self.downsample is not None else x


class _FrozenTensors(nn.Module):
    """``weight`` and ``bias`` stored as buffers: present in the state dict, never trained."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)


class TinyViT(nn.Module):
    """TinyViT image encoder for SAM: (B, 3, S, S) normalised image -> (B, out_chans, S/16, S/16).

    ``img_size`` is exposed like segment-anything's ``ImageEncoderViT`` so ``SamPredictor`` and
    ``Sam.postprocess_masks`` work. Nothing in the weights depends on ``img_size`` (attention
    biases are per window), so one checkpoint serves every input size that is a multiple of 16.
    """

    def __init__(
        self,
        *,
        img_size: int = 1024,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        merge_strides: Sequence[int] = (2, 2, 1),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
        drop_path_rate: float = 0.0,
        classifier_classes: int = 1000,
    ) -> None:
        super().__init__()
        n = len(embed_dims)
        if not (len(depths) == len(num_heads) == len(window_sizes) == n >= 2):
            raise ValueError(
                "embed_dims, depths, num_heads and window_sizes need one entry a stage"
            )
        if len(merge_strides) != n - 1:
            raise ValueError(f"merge_strides needs {n - 1} entries (one per patch merging)")
        self.img_size = img_size
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear decay rule
        starts = [sum(depths[:i]) for i in range(n)]

        self.patch_embed = Stem(in_chans, embed_dims[0])
        stages: list[nn.Module] = [
            ConvStage(
                embed_dims[0],
                embed_dims[1],
                depth=depths[0],
                expand_ratio=mbconv_expand_ratio,
                drop_path=rates[: depths[0]],
                merge_stride=merge_strides[0],
            )
        ]
        for i in range(1, n):
            last = i == n - 1
            stages.append(
                TransformerStage(
                    embed_dims[i],
                    None if last else embed_dims[i + 1],
                    depth=depths[i],
                    num_heads=num_heads[i],
                    window_size=window_sizes[i],
                    mlp_ratio=mlp_ratio,
                    local_conv_size=local_conv_size,
                    drop_path=rates[starts[i] : starts[i] + depths[i]],
                    merge_stride=1 if last else merge_strides[i],
                )
            )
        self.layers = nn.ModuleList(stages)
        # Unused ImageNet classifier of the pre-trained TinyViT (checkpoint compatibility only).
        width = embed_dims[-1]
        self.norm_head = _FrozenTensors(torch.ones(width), torch.zeros(width))
        self.head = _FrozenTensors(
            torch.zeros(classifier_classes, width), torch.zeros(classifier_classes)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(width, out_chans, kernel_size=1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )
        self.apply(_init_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.neck(x)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
