"""The real-vs-real FID floor of a config: the FID a perfect generator would get, measured with the
config's FIDTrajectory extractor on real images only (docs/algorithms.md §6).

FID is biased upwards at small set sizes, so a generated set of N images never reaches 0 even if it
were drawn from the data distribution itself. To see how close a model is, compare its FID with
this floor: split the real images of the config's `real_split` at random into two disjoint halves
A and B, and compute the FID of N images of A against all of B, over several random splits
(mean ± std). N is the callback's `num_samples` and, for reference, the whole half.

The callback's reference is the whole split, about twice a half, and a smaller reference adds its
own bias. `--reference rest` measures N random images against all the other images instead (still
disjoint, with a reference closer to the callback's in size).

    python benchmarks/real_vs_real_fid.py --config digits                   # 10 splits
    python benchmarks/real_vs_real_fid.py --config digits --reference rest --set-sizes 300
    python benchmarks/real_vs_real_fid.py --config quickstart --splits 20 --set-sizes 200 500

The extractor is the config's (the digits classifier: the shipped weights unless its extractor_options
say otherwise).
"""

import argparse
import statistics

import torch

from uncdiff.evaluation.fid import datamodule_images, fid_between, make_extractor
from fid_cost import fid_options
from train_throughput import load_config, make_datamodule, model_options  # the other benchmarks' config reading


def real_images(config: dict, split: str) -> torch.Tensor:
    """All images of the config's data module's `split`, float `[N, C, H, W]` in [-1, 1]."""
    return torch.cat(list(datamodule_images(make_datamodule(config), split)()))


def floor(images: torch.Tensor, extractor, set_size: int, splits: int, seed: int,
          reference: str = "half") -> list[float]:
    """For `splits` random orders of `images`: FID(the first `set_size` images, the reference), the
    reference being the second half (`half`) or all images after the first `set_size` (`rest`)."""
    half = len(images) // 2
    if not 2 <= set_size <= half:
        raise SystemExit(f"set size {set_size} must be in [2, {half}] (half of the {len(images)} real images)")
    generator = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(splits):
        order = torch.randperm(len(images), generator=generator)
        start = half if reference == "half" else set_size
        values.append(fid_between(images[order[:set_size]], images[order[start:]], extractor))
    return values


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="digits", help="a bundled config's name (digits, quickstart)")
    parser.add_argument("--splits", type=int, default=10, help="random halvings per set size")
    parser.add_argument("--set-sizes", type=int, nargs="+", default=None,
                        help="N (default: the callback's num_samples and the whole half)")
    parser.add_argument("--reference", choices=["half", "rest"], default="half",
                        help="the other half, or every image not in the set")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.splits < 2:
        raise SystemExit(f"--splits must be >= 2 (a standard deviation), got {args.splits}")

    config = load_config(args.config)
    options = fid_options(config)
    split = options.get("real_split", "train")
    extractor_options = dict(options.get("extractor_options") or {})
    name = options.get("extractor", "inception")
    if name == "digits-classifier":
        extractor_options.setdefault("cache_dir", options.get("cache_dir", "cache"))
        extractor_options.setdefault("image_size", model_options(config)["image_size"])
    extractor = make_extractor(name, **extractor_options)
    images = real_images(config, split)
    sizes = args.set_sizes or [options.get("num_samples", 10_000), len(images) // 2]

    against = (f"the other half ({len(images) - len(images) // 2})" if args.reference == "half"
               else "all the other images")
    print(f"config={args.config}: {len(images)} real images ({split} split), extractor {extractor.name}, "
          f"{args.splits} random splits (seed {args.seed}); FID(N images, {against})")
    for n in sizes:
        values = floor(images, extractor, n, args.splits, args.seed, args.reference)
        print(f"N={n:5d}: {statistics.mean(values):8.3f} ± {statistics.stdev(values):.3f} (std), "
              f"min {min(values):.3f}, max {max(values):.3f}")


if __name__ == "__main__":
    main()
