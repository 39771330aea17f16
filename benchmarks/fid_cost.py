"""Cost of one validation-epoch FID evaluation (FIDTrajectory: unguided + guided sampling, features,
the three Fréchet distances) with 1 and 2 CPU processes, and on the GPU when there is one.

The model, data and FID options are the config's (its `callbacks.FIDTrajectory` entry), so the
figures say what that config's FID costs; `--num-samples` overrides N. The weights are the
config's freshly initialised ones: sampling costs the same whatever they are. One-time costs (the
digits classifier, the real statistics) are paid before the timed runs, into `--cache-dir`.
Prints, per run, the seconds of the evaluation and the share of sampling and of features.

    python benchmarks/fid_cost.py --config quickstart                       # 1 and 2 CPU processes
    python benchmarks/fid_cost.py --config quickstart --num-samples 48 --processes 1
    python benchmarks/fid_cost.py --config cifar --num-samples 1000         # needs CIFAR-10 and Inception
"""

import argparse
import platform
import time

import lightning as L
import torch

from train_throughput import load_config, make_datamodule, model_options
from uncdiff.callbacks import FIDTrajectory
from uncdiff.lightning.module import DiffusionModule
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec, spec_from_dict


def fid_options(config: dict) -> dict:
    """The config's `FIDTrajectory` options, its sampler, estimator and guidance as specs (as the CLI gives them)."""
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("FIDTrajectory"):
            options = dict(callback.get("init_args") or {})
            for name, spec in (("sampler", SamplerSpec), ("estimator", EstimatorSpec), ("guidance", GuidanceSpec)):
                if name in options:
                    options[name] = spec_from_dict(spec, options[name])
            return options
    raise SystemExit("the config has no callbacks.FIDTrajectory entry")


def evaluate_once(config: dict, options: dict, accelerator: str, processes: int) -> dict:
    """One `trainer.validate` with only FIDTrajectory attached; its logged seconds."""
    callback = FIDTrajectory(**options, progress=False)
    trainer = L.Trainer(accelerator=accelerator, devices=processes,
                        strategy="ddp_spawn" if processes > 1 else "auto", logger=False, limit_val_batches=1,
                        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                        default_root_dir="runs/fid_cost", callbacks=[callback])
    start = time.perf_counter()
    (metrics,) = trainer.validate(DiffusionModule(**model_options(config)), make_datamodule(config), verbose=False)
    metrics = {k.removeprefix("val/fid/"): float(v) for k, v in metrics.items() if k.startswith("val/fid/")}
    metrics["wall"] = time.perf_counter() - start
    return metrics


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="quickstart", choices=["quickstart", "cifar"])
    parser.add_argument("--num-samples", type=int, default=None, help="N per set (default: the config's)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="CPU process counts to time")
    parser.add_argument("--cache-dir", default=None, help="FID cache (default: the config's)")
    args = parser.parse_args()

    config = load_config(args.config)
    options = fid_options(config)
    if args.num_samples is not None:
        options["num_samples"] = args.num_samples
    if args.cache_dir is not None:
        options["cache_dir"] = args.cache_dir
    n = options["num_samples"]

    start = time.perf_counter()  # one-time costs (classifier, real statistics), not part of the timed runs
    evaluate_once(config, {**options, "num_samples": 2}, "cpu", 1)
    print(f"config={args.config} N={n} per set, sampler={options.get('sampler', 'ddim')} "
          f"steps={options.get('steps', 20)}, extractor={options.get('extractor', 'inception')}; "
          f"warm-up incl. one-time caches {time.perf_counter() - start:.1f} s")
    runs = [("cpu", p) for p in args.processes] + ([("gpu", 1)] if torch.cuda.is_available() else [])
    for accelerator, processes in runs:
        m = evaluate_once(config, options, accelerator, processes)
        machine = torch.cuda.get_device_name() if accelerator == "gpu" else \
            f"{platform.machine()} CPU ({torch.get_num_threads()} threads in this process)"
        print(f"{accelerator} x{processes} [{machine}]: {m['seconds']:7.1f} s per evaluation "
              f"({2 * n / m['seconds']:.1f} generated images/s); sampling {m['sampling_seconds']:.1f} s "
              f"({100 * m['sampling_seconds'] / m['seconds']:.0f}%), features + FID {m['feature_seconds']:.1f} s "
              f"({100 * m['feature_seconds'] / m['seconds']:.0f}%); validate() wall {m['wall']:.1f} s")


if __name__ == "__main__":
    main()
