"""A convolutional pixel path around the RIN (extension ``pixel_unet: C``; not in the published network).

Why: on a CPU budget the RIN learns shapes far more slowly than a convolutional net. On the
single-object probe (``benchmarks/single_object_probe.py``: one flat object, "a photo of a
<colour> <class>"), the Shapes RIN from scratch draws the right class in 7 % of images after 192k
samples, a plain in-context transformer of the same class 7 % after 128k, and a 0.9M-parameter
U-Net 84 % after 96k (docs/benchmarks.md). Transformers on pixels lack the locality prior that
lets a convnet learn edges and corners from few samples (the known data hunger of ViTs; U-ViT,
Bao et al. 2023, and simple diffusion, Hoogeboom et al. 2023, put a transformer *inside* a
convolutional encoder/decoder for this reason).

So this module is a small U-Net whose bottleneck is the RIN. The encoder turns the network input
into feature maps down to the token grid (one stride-2 level per factor 2 of the patch size) and
adds a projection of its last map to the data tokens; the decoder starts from the RIN's final data
tokens plus that map and climbs back with skip connections to a residual on the RIN's output.
Every ResBlock is scaled and shifted by the RIN's time embedding (FiLM, as in ADM). The token
projection, every ResBlock's last conv and the output conv start at zero, so a published RIN
loaded into a network with this path computes exactly what it computed before (warm starts).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PixelUNet", "check_pixel_unet"]

GROUPS = 8  # GroupNorm groups: channels must be a multiple


def check_pixel_unet(channels, patch_size: int) -> None:
    """ValueError naming the bad value unless ``channels`` is 0 (off) or a positive multiple of 8
    with a power-of-two ``patch_size`` (one stride-2 level per factor 2)."""
    if not isinstance(channels, int) or isinstance(channels, bool) or channels < 0 or channels % GROUPS:
        raise ValueError(f"pixel_unet={channels!r}; allowed: 0 (off) or a positive multiple of {GROUPS} (channels)")
    if channels and patch_size & (patch_size - 1):
        raise ValueError(f"pixel_unet needs a power-of-two patch_size, got patch_size={patch_size}")


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, FiLM from the conditioning vector, GroupNorm-SiLU-conv (zero at init), skip."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.film = nn.Linear(cond_dim, 2 * c_out)
        self.norm2 = nn.GroupNorm(GROUPS, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class PixelUNet(nn.Module):
    """Encoder (pixels -> token grid) and decoder (tokens -> pixel residual); widths C at full
    resolution and 2C at every coarser level."""

    def __init__(self, channels: int, in_channels: int, patch_size: int, data_dim: int, cond_dim: int):
        super().__init__()
        check_pixel_unet(channels, patch_size)
        levels = int(math.log2(patch_size))
        widths = [channels] + [2 * channels] * levels  # width at level i (0 = full resolution)
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.enc = nn.ModuleList(ResBlock(widths[i], widths[i], cond_dim) for i in range(levels))
        self.down = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], 3, stride=2, padding=1) for i in range(levels))
        self.enc_grid = ResBlock(widths[-1], widths[-1], cond_dim)
        self.to_tokens = nn.Linear(widths[-1], data_dim)
        self.from_tokens = nn.Linear(data_dim, widths[-1])
        self.dec_grid = ResBlock(widths[-1], widths[-1], cond_dim)
        self.up = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], 3, padding=1) for i in range(levels))
        self.dec = nn.ModuleList(ResBlock(2 * widths[i], widths[i], cond_dim) for i in range(levels))
        self.out_norm = nn.GroupNorm(GROUPS, channels)
        self.out = nn.Conv2d(channels, in_channels, 3, padding=1)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)  # torch's default
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()
        for m in [self.to_tokens, self.out, *(b.conv2 for b in (*self.enc, self.enc_grid, self.dec_grid, *self.dec))]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def encode(self, y: Tensor, cond: Tensor) -> tuple[Tensor, list[Tensor]]:
        """y (B, C_in, S, S), cond (B, D) -> (token addend (B, (S/p)^2, data_dim) row-major, skips)."""
        h = self.stem(y)
        skips = []
        for block, down in zip(self.enc, self.down):
            h = block(h, cond)
            skips.append(h)
            h = down(h)
        h = self.enc_grid(h, cond)
        skips.append(h)
        return self.to_tokens(h.flatten(2).transpose(1, 2)), skips

    def decode(self, x: Tensor, skips: list[Tensor], cond: Tensor) -> Tensor:
        """x (B, N, data_dim) final data tokens -> residual (B, C_in, S, S) on the RIN's output."""
        grid = skips[-1]
        h = self.from_tokens(x).transpose(1, 2).reshape(grid.shape) + grid
        h = self.dec_grid(h, cond)
        for i in reversed(range(len(self.dec))):
            h = self.up[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = self.dec[i](torch.cat([h, skips[i]], dim=1), cond)
        return self.out(F.silu(self.out_norm(h)))
