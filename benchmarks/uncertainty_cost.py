"""Cost of uncertainty: network evaluations and wall time per sample, as ratios to plain sampling.

All methods run in one process on the same model, seeds and DDIM steps (20 and 50), alternating
over rounds; the best round of each is kept. Methods: plain; aleatoric (estimate only, every step);
guided, gradient and posterior rules (spec defaults: M = 5, first 15% of the steps, U_t computed
only there); MC-Dropout
(M = 5 passes, every step); BayesDiff with skip k = 1 and k = 5 (S = 10 draws).

    python benchmarks/uncertainty_cost.py --config quickstart --n 64
    python benchmarks/uncertainty_cost.py --config cifar --n 256       # on a GPU
"""

import argparse
import platform
import time

import torch

from train_throughput import model_kwargs, sync
from uncdiff.lightning.module import DiffusionModule
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec

METHODS = {
    "plain": dict(),
    "aleatoric": dict(estimator=EstimatorSpec("aleatoric")),
    # guidance alone: U_t only where it guides (the default window, first 15% of the steps)
    "guided-gradient": dict(estimator=EstimatorSpec(window=(0.0, 0.15)), guidance=GuidanceSpec("gradient")),
    "guided-posterior": dict(estimator=EstimatorSpec(window=(0.0, 0.15)), guidance=GuidanceSpec("posterior")),
    "mc-dropout": dict(estimator=EstimatorSpec("mc_dropout")),
    "bayesdiff-k1": dict(estimator=EstimatorSpec("bayesdiff", skip=1)),
    "bayesdiff-k5": dict(estimator=EstimatorSpec("bayesdiff", skip=5)),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="quickstart", choices=["quickstart", "cifar"])
    parser.add_argument("--n", type=int, default=32, help="samples per measurement (one batch)")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    kwargs = model_kwargs(args.config)
    kwargs["dropout"] = kwargs["dropout"] or 0.1  # MC-Dropout needs dropout layers with a rate
    module = DiffusionModule(**kwargs).to(device).eval()
    with torch.no_grad():  # random (not zero-initialised) weights: the cost doesn't depend on training
        for p in module.ema.ema_model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    fit_images = torch.rand(64, *module.image_shape, device=device) * 2 - 1
    module.fit_laplace(fit_images, num_images=64)

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    print(f"config={args.config} n={args.n} machine={machine}")
    for steps in args.steps:
        best: dict[str, tuple[float, float]] = {}
        for _ in range(args.rounds):
            for name, options in METHODS.items():
                sync(device)
                start = time.perf_counter()
                result = module.sample(args.n, sampler=SamplerSpec("ddim", steps), batch_size=args.n, **options)
                sync(device)
                seconds = (time.perf_counter() - start) / args.n
                best[name] = (result.nfe_per_image, min(seconds, best.get(name, (0, float("inf")))[1]))
        nfe0, sec0 = best["plain"]
        print(f"\nDDIM {steps} steps          NFE/sample   x plain   ms/sample   x plain")
        for name, (nfe, sec) in best.items():
            print(f"  {name:20s} {nfe:10.0f} {nfe / nfe0:9.2f} {1000 * sec:11.2f} {sec / sec0:9.2f}")


if __name__ == "__main__":
    main()
