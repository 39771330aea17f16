"""What only a CUDA device can show: a seed's image on the GPU is the CPU's, bf16 autocast sampling and
bf16-mixed training, torch.compile and channels_last give the eager network's outputs, DDP on every
GPU present. Skipped without CUDA; `benchmarks/gpu_check.sh` runs them on a GPU machine.

Independent truths: the same network on the CPU (or eager, contiguous, fp32), and test_ddp.py's
property (the ranks see disjoint data and end with identical weights).
"""

import lightning as L
import pytest
import torch

from conftest import tiny_model_kwargs
from test_ddp import RecordRank
from uncdiff.lightning.data import DigitsDataModule
from uncdiff.lightning.module import DiffusionModule

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (benchmarks/gpu_check.sh runs it)")
SEEDS, STEPS = list(range(8)), 4


def random_module() -> DiffusionModule:
    """The tiny model with random, not zero-initialised, output layers (a zero network samples alike anywhere)."""
    torch.manual_seed(0)
    module = DiffusionModule(**tiny_model_kwargs())
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return module.eval()


def network_inputs(module: DiffusionModule) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, *module.image_shape, generator=generator).cuda()
    t = torch.randint(0, module.schedule.num_timesteps, (4,), generator=generator).cuda()
    return x, t


def test_a_seed_gives_the_same_image_on_the_gpu_as_on_the_cpu():
    module = random_module()
    cpu = module.sample(seeds=SEEDS, sampler={"steps": STEPS}).images
    gpu = module.cuda().sample(seeds=SEEDS, sampler={"steps": STEPS}).images
    # cuDNN may convolve in TF32 (10-bit mantissa): close, not equal
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=2e-2)


def test_bf16_autocast_sampling_stays_close_to_fp32():
    module = random_module().cuda()
    fp32 = module.sample(seeds=SEEDS, sampler={"steps": STEPS}, estimator={"name": "aleatoric", "M": 2})
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = module.sample(seeds=SEEDS, sampler={"steps": STEPS}, estimator={"name": "aleatoric", "M": 2})
    assert torch.isfinite(bf16.images).all() and torch.isfinite(bf16.scores).all()
    assert (bf16.images - fp32.images).abs().mean() < 0.05  # bf16 keeps 8 bits of mantissa
    assert torch.corrcoef(torch.stack([bf16.scores, fp32.scores]).double())[0, 1] > 0.9


def test_bf16_mixed_training_on_the_gpu():
    module = random_module().train()
    before = {k: v.clone() for k, v in module.net.state_dict().items()}
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=3, gradient_clip_val=1.0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, use_distributed_sampler=False)
    trainer.fit(module, DigitsDataModule(image_size=8, batch_size=8))
    after = module.net.state_dict()
    assert all(v.dtype == before[k].dtype and torch.isfinite(v).all() for k, v in after.items())  # fp32 master weights
    assert any(not torch.equal(after[k].cpu(), before[k]) for k in before)


def test_compiled_network_matches_eager():
    module = random_module().cuda()
    net, (x, t) = module.net, network_inputs(module)
    with torch.no_grad():
        eager = net(x, t)
        compiled = torch.compile(net)(x, t)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=5e-3)


def test_channels_last_matches_contiguous():
    module = random_module().cuda()
    net, (x, t) = module.net, network_inputs(module)
    with torch.no_grad():
        contiguous = net(x, t)
        net = net.to(memory_format=torch.channels_last)
        channels_last = net(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(channels_last, contiguous, rtol=1e-3, atol=5e-3)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DDP needs two GPUs")
def test_ddp_on_every_gpu(tmp_path):
    devices = torch.cuda.device_count()
    trainer = L.Trainer(accelerator="gpu", devices=devices, strategy="ddp_spawn", max_steps=4, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, use_distributed_sampler=False, callbacks=[RecordRank(tmp_path)])
    trainer.fit(DiffusionModule(**tiny_model_kwargs()), DigitsDataModule(image_size=8, batch_size=8))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(devices)]
    rows = [{tuple(x.flatten().tolist()) for x in rank["seen"]} for rank in ranks]
    assert all(not rows[i] & rows[j] for i in range(devices) for j in range(i + 1, devices))
    for rank in ranks[1:]:
        for key in ("net", "ema"):
            for name, value in ranks[0][key].items():
                torch.testing.assert_close(rank[key][name], value, rtol=0, atol=0, msg=f"{key}.{name}")
