"""Image-to-image BayesDiff and guidance (docs/algorithms.md §5b, §7): the conditional last-layer Laplace fit
against per-sample autograd gradients and against the unconditional fit of a net that ignores its
condition, and the guided-versus-unguided study on a constructed case whose answer is known."""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from uncdiff.data.masks import box_mask
from uncdiff.core.schedule import NoiseSchedule
from uncdiff.evaluation.image_to_image import group_seeds, guidance_markdown, guidance_study, l1_psnr
from uncdiff.uncertainty.bayesdiff import fit_last_layer_laplace
from uncdiff.uncertainty.spec import EstimatorSpec


class TinyNet(nn.Module):
    """`head(features(x, t))` with a nonlinear, t-dependent feature map, reading `in_channels`."""

    def __init__(self, in_channels: int, out_channels: int = 1, hidden: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Conv2d(in_channels, hidden, 3, padding=1)
        self.head = nn.Conv2d(hidden, out_channels, 3, padding=1)

    def features(self, x, t):
        return torch.tanh(self.body(x)) * (1 + t.float()[:, None, None, None] / 1000)

    def forward(self, x, t):
        return self.head(self.features(x, t))


class IgnoresCondition(nn.Module):
    """A conditional net `net(concat(y, x_t), t)` that drops y: the unconditional `net` on the last channels."""

    def __init__(self, net: TinyNet, channels: int):
        super().__init__()
        self.net, self.channels = net, channels
        self.head = net.head

    def features(self, z, t):
        return self.net.features(z[:, -self.channels:], t)

    def forward(self, z, t):
        return self.head(self.features(z, t))


def hand_fit(net, x0, y, schedule, seed, batch_size, prior_precision, sigma_noise):
    """docs/algorithms.md §5b written out: the draws of t and eps per batch from one CPU generator, each image's
    gradient of `sum (net(concat(y, x_t), t) - eps)^2` over the head by autograd, `H = sum 0.5 grad^2`,
    `v = 1 / (H / sigma^2 + prior)`."""
    gen = torch.Generator().manual_seed(seed)
    fisher = [torch.zeros_like(net.head.weight, dtype=torch.float64), torch.zeros_like(net.head.bias, dtype=torch.float64)]
    for start in range(0, len(x0), batch_size):
        xb, yb = x0[start:start + batch_size], y[start:start + batch_size]
        t = torch.randint(0, schedule.num_timesteps, (len(xb),), generator=gen)
        eps = torch.randn(xb.shape, generator=gen)
        for i in range(len(xb)):
            a = schedule.alphas_cumprod[t[i]].float()
            x_t = a.sqrt() * xb[i:i + 1] + (1 - a).sqrt() * eps[i:i + 1]
            loss = (net(torch.cat([yb[i:i + 1], x_t], 1), t[i:i + 1]) - eps[i:i + 1]).pow(2).sum()
            grads = torch.autograd.grad(loss, [net.head.weight, net.head.bias])
            for f, g in zip(fisher, grads):
                f += 0.5 * g.double().pow(2)
    return [(f / sigma_noise**2 + prior_precision).reciprocal() for f in fisher]


def test_conditional_laplace_fit_is_the_closed_form_of_per_image_gradients():
    schedule = NoiseSchedule()
    net = TinyNet(in_channels=2)
    x0, y = torch.randn(6, 1, 5, 5), torch.randn(6, 1, 5, 5)
    fit = fit_last_layer_laplace(net, x0, schedule, num_images=6, prior_precision=2.0, sigma_noise=0.5, seed=3,
                                 batch_size=4, conditions=y)
    var_w, var_b = hand_fit(net, x0, y, schedule, seed=3, batch_size=4, prior_precision=2.0, sigma_noise=0.5)
    torch.testing.assert_close(fit.var_W.double(), var_w, rtol=1e-4, atol=0)
    torch.testing.assert_close(fit.var_b.double(), var_b, rtol=1e-4, atol=0)
    assert fit.num_images == 6 and (var_w < 1 / 2.0).all()  # the data sharpened every weight beyond the prior
    # the condition matters: another y gives another posterior
    other = fit_last_layer_laplace(net, x0, schedule, num_images=6, seed=3, batch_size=4, conditions=y + 1)
    assert not torch.allclose(other.var_W, fit.var_W)


def test_conditional_laplace_fit_of_a_net_ignoring_its_condition_is_the_unconditional_fit():
    schedule = NoiseSchedule()
    plain = TinyNet(in_channels=1)
    x0 = torch.randn(7, 1, 5, 5)
    alone = fit_last_layer_laplace(plain, x0, schedule, num_images=5, seed=1, batch_size=3)
    conditional = fit_last_layer_laplace(IgnoresCondition(plain, 1), x0, schedule, num_images=5, seed=1, batch_size=3,
                                         conditions=torch.randn(7, 1, 5, 5))
    torch.testing.assert_close(conditional.var_W, alone.var_W, rtol=1e-6, atol=0)
    torch.testing.assert_close(conditional.var_b, alone.var_b, rtol=1e-6, atol=0)
    assert conditional.num_images == alone.num_images == 5
    # batches of (x0, y) given as iterables pair up like tensors
    batches = fit_last_layer_laplace(IgnoresCondition(plain, 1), list(x0.split(3)), schedule, num_images=5, seed=1,
                                     batch_size=3, conditions=list(torch.randn(7, 1, 5, 5).split(3)))
    torch.testing.assert_close(batches.var_W, alone.var_W, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="don't pair up"):
        fit_last_layer_laplace(IgnoresCondition(plain, 1), x0, schedule, conditions=torch.randn(7, 1, 4, 4))


# ------------------------------------------------------------------------------------ guidance


def constructed_restore(x0, calls):
    """Outputs `x0 + s * 0.1 * z(seed)` at the generated pixels (`x0` at the known ones), with `s = 1` unguided,
    `s = 1/2` with the guidance named 'halve' and `s = 1` with 'same': the answers are known exactly."""

    def restore(condition, mask, seeds, estimator, guidance=None):
        calls.append((list(seeds), estimator, guidance))
        z = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(s), dtype=x0.dtype)
                         for s in seeds])
        scale = 0.5 if guidance is not None and guidance["name"] == "halve" else 1.0
        return SimpleNamespace(images=torch.where(mask.expand_as(x0) > 0.5, x0 + scale * 0.1 * z, x0))

    return restore


def test_guidance_study_pairs_guided_and_unguided_outputs_by_seed_group():
    n, k, groups = 6, 3, (0, 1, 2, 3)
    x0 = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5
    mask = box_mask(8)[None].repeat(n, 1, 1, 1)
    calls = []
    fid = lambda a, b: float((a - b).pow(2).mean()) * 100  # any distance whose scaling is known
    guided = {"halve": (EstimatorSpec("aleatoric", M=2), {"name": "halve"}),  # stand-ins for GuidanceSpecs
              "same": (EstimatorSpec("aleatoric", M=2), {"name": "same"})}
    study = guidance_study(constructed_restore(x0, calls), x0, x0, mask, guided, num_samples=k, seed_groups=groups,
                           fid=fid)
    # every run of group g uses the seeds of calibration_study's output: sample 0 of the group
    for g in groups:
        runs = [c for c in calls if c[0] == group_seeds(g, 0, k, n)]
        assert [c[2] for c in runs] == [None, {"name": "halve"}, {"name": "same"}]
    assert group_seeds(1, 2, k, n) == [(1 * (k + 1) + 2) * n + i for i in range(n)]
    rows = {(r["guidance"], r["metric"]): r for r in study["rows"]}
    assert study["groups"] == 4 and set(rows) == {(g, m) for g in guided for m in ("l1", "psnr", "fid")}
    halve_l1, halve_psnr, halve_fid = rows["halve", "l1"], rows["halve", "psnr"], rows["halve", "fid"]
    for g, unguided in enumerate(halve_l1["per_group"]["unguided"]):  # halving the error halves L1 ...
        assert halve_l1["per_group"]["guided"][g] == pytest.approx(unguided / 2, rel=1e-9)
        unguided_fid = halve_fid["per_group"]["unguided"][g]
        assert halve_fid["per_group"]["guided"][g] == pytest.approx(unguided_fid / 4, rel=1e-9)  # ... quarters it
    assert halve_psnr["difference"][0] == pytest.approx(20 * math.log10(2), rel=1e-9)  # ... and adds 6.02 dB to each image
    assert halve_psnr["difference"][1] == pytest.approx(0, abs=1e-9)
    unguided_l1 = torch.tensor(halve_l1["per_group"]["unguided"], dtype=torch.float64)
    assert halve_l1["difference"][0] == pytest.approx(float(-unguided_l1.mean() / 2), rel=1e-9)
    assert halve_l1["difference"][1] == pytest.approx(float(unguided_l1.std() / 2), rel=1e-9)
    for metric in ("l1", "psnr", "fid"):
        assert rows["halve", metric]["verdict"] == "better than unguided"
        same = rows["same", metric]
        assert same["difference"] == (0.0, 0.0) and same["verdict"].startswith("within the spread")
    # the unguided column is l1_psnr of the unguided outputs
    first = constructed_restore(x0, [])(x0, mask, group_seeds(0, 0, k, n), None).images
    assert halve_l1["per_group"]["unguided"][0] == pytest.approx(l1_psnr(first, x0, mask)[0], rel=1e-12)
    table = guidance_markdown(study)
    assert "| halve | psnr (higher is better) |" in table and "+6.0206 ± 0.0000 | better than unguided |" in table


def test_guidance_study_with_one_group_gives_no_verdict_and_no_fid_without_an_extractor():
    x0 = torch.rand(4, 1, 8, 8, dtype=torch.float64) - 0.5
    mask = box_mask(8)[None].repeat(4, 1, 1, 1)
    study = guidance_study(constructed_restore(x0, []), x0, x0, mask,
                           {"halve": (EstimatorSpec("aleatoric"), {"name": "halve"})}, num_samples=2,
                           seed_groups=(5,))
    assert [r["metric"] for r in study["rows"]] == ["l1", "psnr"]
    assert all(r["verdict"] == "no spread to judge by" and r["difference"][1] is None for r in study["rows"])
    assert "n/a" not in guidance_markdown(study)
