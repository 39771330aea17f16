"""The DDPM noise-prediction U-Net of Ho et al. (docs/algorithms.md §1).

With the CIFAR-10 settings (128 channels, mults 1,2,2,2, 2 res blocks, attention at 16x16,
dropout 0.1) it has 35.7M parameters. The last layer is the conv `head` (base channels ->
image channels, 3x3); `features(x, t)` returns its input, so BayesDiff's last-layer Laplace
can treat the rest of the network as a frozen feature map.
"""

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding `[B] -> [B, dim]` (Transformer positional encoding of t)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float):
        super().__init__()
        self.norm1 = norm(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb = nn.Linear(temb_dim, out_ch)
        self.norm2 = norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Single-head self-attention over the H*W positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Level(nn.Module):
    """The res blocks (and attention) of one resolution on one side of the U."""

    def __init__(self, blocks: list[ResBlock], attn: bool):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList([Attention(b.conv2.out_channels) for b in blocks] if attn else [])


class UNet(nn.Module):
    """`forward(x [B, C, H, W], t [B]) -> eps [B, C, H, W]` (`[B, out_channels, H, W]` when given)."""

    def __init__(self, image_size: int = 32, in_channels: int = 3, base_channels: int = 128,
                 channel_mults: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.1, out_channels: Optional[int] = None):
        super().__init__()
        check_unet_config(image_size, base_channels, channel_mults, attn_resolutions, dropout)
        self.image_size, self.in_channels, self.base_channels = image_size, in_channels, base_channels
        temb_dim = 4 * base_channels
        self.time_mlp = nn.Sequential(nn.Linear(base_channels, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        chans = [base_channels * m for m in channel_mults]
        skip_chans, ch, res = [base_channels], base_channels, image_size
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i, out_ch in enumerate(chans):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, out_ch, temb_dim, dropout))
                ch = out_ch
                skip_chans.append(ch)
            self.down.append(Level(blocks, res in attn_resolutions))
            last = i == len(chans) - 1
            self.downsample.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            if not last:
                skip_chans.append(ch)
                res //= 2

        self.mid = Level([ResBlock(ch, ch, temb_dim, dropout), ResBlock(ch, ch, temb_dim, dropout)], attn=False)
        self.mid_attn = Attention(ch)

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, out_ch in reversed(list(enumerate(chans))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(ch + skip_chans.pop(), out_ch, temb_dim, dropout))
                ch = out_ch
            self.up.append(Level(blocks, res in attn_resolutions))
            self.upsample.append(nn.Identity() if i == 0 else nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)))
            if i > 0:
                res *= 2

        self.norm_out = norm(ch)
        # out_channels: the predicted eps's channels, when the input also carries a condition (docs/algorithms.md §7)
        self.head = nn.Conv2d(ch, in_channels if out_channels is None else out_channels, 3, padding=1)
        # Ho et al. initialise the layers that close each residual branch, and the output, to zero.
        for module in self.modules():
            if isinstance(module, ResBlock):
                zero_(module.conv2)
            elif isinstance(module, Attention):
                zero_(module.proj)
        zero_(self.head)

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Input of the last conv `head`: `[B, base_channels, H, W]`."""
        temb = self.time_mlp(timestep_embedding(t, self.base_channels))
        h = self.conv_in(x)
        skips = [h]
        for level, down in zip(self.down, self.downsample):
            h = run_level(level, h, temb, skips)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        h = self.mid.blocks[0](h, temb)
        h = self.mid.blocks[1](self.mid_attn(h), temb)
        for level, up in zip(self.up, self.upsample):
            h = run_level(level, h, temb, skips, pop=True)
            h = up(h)
        return F.silu(self.norm_out(h))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x, t))


def zero_(layer: nn.Module) -> None:
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


def run_level(level: Level, h, temb, skips: list, pop: bool = False):
    """Down path (`pop=False`): push each block's output; up path: concat the matching skip."""
    for j, block in enumerate(level.blocks):
        h = block(torch.cat([h, skips.pop()], dim=1) if pop else h, temb)
        if level.attns:
            h = level.attns[j](h)
        if not pop:
            skips.append(h)
    return h


def check_unet_config(image_size: int, base_channels: int, channel_mults: Sequence[int],
                      attn_resolutions: Sequence[int], dropout: float) -> None:
    """Fail at construction, naming the option, for shapes the U-Net can't take."""
    levels = len(channel_mults)
    if levels < 1:
        raise ValueError("channel_mults must have at least one entry")
    factor = 2 ** (levels - 1)
    if image_size < factor or image_size % factor:
        raise ValueError(f"image_size {image_size} must be divisible by 2**(len(channel_mults) - 1) = {factor}")
    resolutions = {image_size // 2**i for i in range(levels)}
    missing = set(attn_resolutions) - resolutions
    if missing:
        raise ValueError(f"attn_resolutions {sorted(missing)} are not among the U-Net's resolutions {sorted(resolutions)}")
    if base_channels % 2 or base_channels < 4:
        raise ValueError(f"base_channels must be even and >= 4 (sinusoidal embedding), got {base_channels}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
