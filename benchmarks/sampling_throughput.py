"""Sampling throughput against diffusers, same UNet, same batch, one process (docs/diffusers.md).

A randomly initialised diffusers `UNet2DModel` (weights don't change the cost) is saved as a
pipeline folder and loaded with `DiffusionModule.from_diffusers`; diffusers' `DDIMPipeline` runs on
the very network object uncdiff samples with. Methods, DDIM eta = 0, uniform (= leading) spacing:

  (a) diffusers DDIMPipeline          (b) uncdiff plain DDIM
  (c) aleatoric scores on every step  (d) gradient guidance on the paper's window (first 15%)
  (e) BayesDiff, skip k = 5 (no x0 clipping: its propagation needs affine steps)

A round runs every method once, in an order that rotates from round to round, so that a slow spell
of a shared machine hits each method in turn; each method's time is divided by (a)'s in the same
round. Printed: per method, the median and interquartile range over the rounds of images/s and of
the ratio to (a), network evaluations per image (NFE) and their ratio to (a), `overhead` = median
wall ratio / NFE ratio (1.00 = no cost beyond the network), and peak memory (GPU: torch's peak
allocation; CPU: the process's peak RSS so far, which only grows). The spread of the ratios is the
noise of the measurement: a difference inside it is not one.

    python benchmarks/sampling_throughput.py --rounds 15 --out benchmarks/results/sampling_throughput_cpu.txt
    python benchmarks/sampling_throughput.py --size cifar --n 256       # google/ddpm-cifar10-32's UNet, GPU
    python benchmarks/sampling_throughput.py --size cifar --autocast bf16 --compile
"""

import argparse
import contextlib
import resource
import tempfile
import time

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from report import header, quartiles, write
from uncdiff.lightning.module import DiffusionModule
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec

# google/ddpm-cifar10-32's unet/config.json (35.7M parameters), and a tiny one for CPUs.
UNETS = {
    "cifar": dict(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256),
                  layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
                  downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, norm_num_groups=32),
    "tiny": dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=8, attention_head_dim=8),
}
METHODS = {
    "(b) uncdiff DDIM": dict(),
    "(c) aleatoric, every step": dict(estimator=EstimatorSpec("aleatoric")),
    "(d) gradient guidance": dict(estimator=EstimatorSpec(window=(0.0, 0.15)), guidance=GuidanceSpec("gradient")),
    "(e) BayesDiff k=5": dict(estimator=EstimatorSpec("bayesdiff", skip=5)),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=tuple(UNETS), default="tiny")
    parser.add_argument("--n", type=int, default=16, help="images per batch (one batch per measurement)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of every method once")
    parser.add_argument("--autocast", choices=("none", "bf16", "fp16"), default="none")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet (shared by all methods)")
    parser.add_argument("--note", default="", help="a line for the results file (e.g. what else ran)")
    parser.add_argument("--out", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: a spread needs two")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        DDPMPipeline(unet=UNet2DModel(**UNETS[args.size]), scheduler=DDPMScheduler()).save_pretrained(folder)
        module = DiffusionModule.from_diffusers(folder).to(device)
        scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    unet = module.ema.ema_model.unet  # the one network object every method runs
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    module.fit_laplace(torch.rand(64, *module.image_shape, device=device) * 2 - 1, num_images=64)
    if args.compile:
        unet.compile()
    pipeline = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.autocast)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext

    def diffusers_ddim():
        pipeline(batch_size=args.n, num_inference_steps=args.steps, eta=0.0, output_type="np",
                 generator=torch.Generator(device).manual_seed(0))
        return args.steps

    def ours(options):
        return module.sample(args.n, sampler=SamplerSpec("ddim", args.steps, spacing="leading"), batch_size=args.n,
                             **options).nfe_per_image

    runs = {"(a) diffusers DDIMPipeline": diffusers_ddim,
            **{name: (lambda options=options: ours(options)) for name, options in METHODS.items()}}
    names = list(runs)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    nfe: dict[str, float] = {}
    memory: dict[str, float] = {}
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            start = time.perf_counter()
            with autocast():
                nfe[name] = runs[name]()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
            memory[name] = max(memory.get(name, 0.0), peak_memory_mib(device))

    base = names[0]
    lines = header(device) + ([f"note: {args.note}"] if args.note else []) + [
        f"UNet2DModel {args.size} ({params:.1f}M parameters), batch {args.n}, DDIM {args.steps} steps, "
        f"autocast {args.autocast}, compile {args.compile}; median [interquartile range] of {args.rounds} rounds",
        f"{'method':28s} {'images/s':>22s} {'x wall (a)':>22s} {'NFE/img':>8s} {'x NFE (a)':>9s} "
        f"{'overhead':>8s} {'peak MiB':>9s}"]
    for name in names:
        rate = quartiles([args.n / s for s in seconds[name]])
        ratio = quartiles([s / s0 for s, s0 in zip(seconds[name], seconds[base])])
        nfe_ratio = nfe[name] / nfe[base]
        lines.append(f"{name:28s} {rate[1]:8.2f} [{rate[0]:5.2f}, {rate[2]:5.2f}] "
                     f"{ratio[1]:8.3f} [{ratio[0]:5.3f}, {ratio[2]:5.3f}] {nfe[name]:8.0f} {nfe_ratio:9.2f} "
                     f"{ratio[1] / nfe_ratio:8.2f} {memory[name]:9.0f}")
    lines.append("seconds per round: " + "; ".join(f"{name.split()[0]} " + ", ".join(f"{s:.3f}" for s in seconds[name])
                                                   for name in names))
    write(lines, args.out)


if __name__ == "__main__":
    main()
