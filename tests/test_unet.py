"""The Ho et al. U-Net (docs/algorithms.md §1): size of the CIFAR-10 network, shapes, the time embedding, the
named last layer BayesDiff needs, and construction-time errors for shapes it can't take."""

import pytest
import torch
from torch import nn

from uncdiff.core.unet import UNet, timestep_embedding

TINY = dict(image_size=16, in_channels=3, base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
            attn_resolutions=(8,), dropout=0.1)


@pytest.fixture(scope="module")
def cifar():
    torch.manual_seed(0)
    return UNet().eval()


def test_cifar_unet_size_and_head(cifar):
    n_params = sum(p.numel() for p in cifar.parameters())
    assert abs(n_params - 35.7e6) < 0.3e6  # Ho et al., CIFAR-10: 35.7M
    head = cifar.head
    assert isinstance(head, nn.Conv2d)
    assert (head.in_channels, head.out_channels, head.kernel_size) == (128, 3, (3, 3))
    assert head.padding == (1, 1)
    last_module = list(cifar.modules())[-1]
    assert last_module is head  # registered last: the stable "last layer"


def test_cifar_unet_shapes_and_features_feed_the_head(cifar):
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500])
    with torch.no_grad():
        h = cifar.features(x, t)
        out = cifar(x, t)
    assert h.shape == (1, 128, 32, 32)
    assert out.shape == x.shape
    torch.testing.assert_close(cifar.head(h), out, rtol=0, atol=0)


@pytest.mark.parametrize("batch", [1, 2])
def test_tiny_unet_output_shape(batch):
    torch.manual_seed(0)
    net = UNet(**TINY).eval()
    x = torch.randn(batch, 3, 16, 16)
    with torch.no_grad():
        assert net(x, torch.randint(0, 1000, (batch,))).shape == x.shape
        assert net.features(x, torch.zeros(batch, dtype=torch.long)).shape == (batch, 32, 16, 16)


def test_single_level_and_grayscale_configs():
    net = UNet(image_size=8, in_channels=1, base_channels=8, channel_mults=(1,), num_res_blocks=1,
               attn_resolutions=(8,)).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert net(x, torch.tensor([0, 999])).shape == x.shape


def randomize_zero_layers(net):
    """Ho et al. zero-initialise the layers closing each branch; give them weights so the
    properties below don't depend on initialisation."""
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                nn.init.normal_(p, std=0.1)


def test_zero_initialised_output_layers():
    net = UNet(**TINY)
    assert not net.head.weight.any() and not net.head.bias.any()
    x = torch.randn(2, 3, 16, 16)
    assert not net(x, torch.tensor([3, 500])).any()  # Ho et al.: the untrained net predicts 0


def test_output_depends_on_t():
    torch.manual_seed(0)
    net = UNet(**TINY).eval()
    with torch.no_grad():
        randomize_zero_layers(net)
    x = torch.randn(1, 3, 16, 16).expand(3, -1, -1, -1)
    t = torch.tensor([0, 1, 999])
    with torch.no_grad():
        out = net(x, t)
    assert (out[0] - out[1]).abs().max() > 1e-6
    assert (out[0] - out[2]).abs().max() > 1e-4
    # and each image only sees its own t: a batch gives what one-at-a-time gives
    with torch.no_grad():
        singles = torch.cat([net(x[i:i + 1], t[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(out, singles, rtol=1e-5, atol=1e-5)


def test_timestep_embedding_is_sinusoidal():
    # Transformer encoding as in Ho et al.: [sin(t w_k), cos(t w_k)], w_k = 10000^(-k / (half - 1)).
    t = torch.tensor([0, 1, 250, 999])
    dim = 16
    emb = timestep_embedding(t, dim)
    k = torch.arange(dim // 2, dtype=torch.float64)
    w = 10000.0 ** (-k / (dim // 2 - 1))
    args = t.double()[:, None] * w[None]
    torch.testing.assert_close(emb.double(), torch.cat([args.sin(), args.cos()], 1), rtol=0, atol=1e-4)


def test_dropout_active_only_in_train_mode():
    torch.manual_seed(0)
    net = UNet(**TINY)
    randomize_zero_layers(net)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([10])
    with torch.no_grad():
        net.eval()
        assert torch.equal(net(x, t), net(x, t))
        net.train()
        assert not torch.equal(net(x, t), net(x, t))


@pytest.mark.parametrize("option,kwargs", [
    ("image_size", dict(image_size=30)),  # 4 levels need a multiple of 8
    ("image_size", dict(image_size=4)),
    ("attn_resolutions", dict(attn_resolutions=(16, 7))),
    ("attn_resolutions", dict(attn_resolutions=(64,))),
    ("base_channels", dict(base_channels=127)),
    ("channel_mults", dict(channel_mults=())),
    ("dropout", dict(dropout=1.0)),
    ("dropout", dict(dropout=-0.1)),
])
def test_bad_configs_raise_naming_the_option(option, kwargs):
    with pytest.raises(ValueError, match=option):
        UNet(**kwargs)
