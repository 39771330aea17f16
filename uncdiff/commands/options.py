"""The options every command shares, as jsonargparse parsers configured like `fit`: `--config FILE.yaml`
(a bare name is looked up in the bundled configs), `--print_config`, and every option on the command
line as well, in nested groups (`--sampler.steps`, `--estimator.M`, `--guidance.lam`). The resolved
config is what a run records (`config_yaml`, `record_config`).
"""

import argparse
import time
from pathlib import Path
from typing import Literal, Optional, Sequence, Union

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter, Namespace

from uncdiff.io.files import write_atomic
from uncdiff.lightning.cli import resolve_config_args
from uncdiff.lightning.loading import DATASETS
from uncdiff.uncertainty.bayesdiff import MOMENT_ESTIMATORS
from uncdiff.uncertainty.estimators import SCORES, VARIANTS

ESTIMATOR_CHOICES = ("none", "aleatoric", "mc_dropout", "bayesdiff")
GUIDANCE_CHOICES = ("none", "gradient", "posterior")


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with the command's description (its docstring) kept as written."""


def new_parser(prog: str, description: str) -> ArgumentParser:
    """A command's parser, with `--config FILE.yaml` and (from jsonargparse) `--print_config`."""
    parser = ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    parser.add_argument("--config", action=ActionConfigFile,
                        help="a YAML file of this command's options (`--print_config` writes one; a bare name is "
                             "looked up in the bundled configs); options after it override it")
    return parser


def parse_options(parser: ArgumentParser, argv: Sequence[str]) -> Namespace:
    """Parse a command line (`--print_config` prints and exits; a bad option exits with a message)."""
    return parser.parse_args(resolve_config_args(list(argv)))


def config_yaml(parser: ArgumentParser, options: Namespace) -> str:
    """The full resolved config of a run, as `--print_config` prints it: `--config` it again. Every
    option is recorded, the unset (None) ones included."""
    return parser.dump(options, skip_unset=False)


def record_config(folder: Path, text: str) -> Path:
    """Write a run's config as `<folder>/config.yaml`. A resumed run (its settings are checked to be
    the same) whose config differs elsewhere (processes, progress bar) records its own as
    `config-<time>.yaml` beside it: nothing is overwritten."""
    path = folder / "config.yaml"
    if path.is_file() and path.read_text() != text:
        stamp, k = time.strftime("%Y%m%d-%H%M%S"), 0
        path = folder / f"config-{stamp}.yaml"
        while path.exists():
            k += 1
            path = folder / f"config-{stamp}-{k}.yaml"
    if not path.is_file():
        write_atomic(path, text.encode())
    return path


def add_model_arguments(parser: ArgumentParser, out_help: str) -> None:
    """The checkpoint, the output, the training data and the processes: every command."""
    parser.add_argument("--checkpoint", type=str, required=True, help="a checkpoint written by `fit`")
    parser.add_argument("--out", type=str, required=True, help=out_help)
    g = parser.add_argument_group("training data (BayesDiff's Laplace fit, evaluate's real images)")
    g.add_argument("--data.name", type=Optional[Literal[DATASETS]], default=None,
                   help="the training data, instead of the run's config")
    g.add_argument("--data.root", type=str, default="data", help="where CIFAR-10 lies (with --data.name cifar10)")
    g.add_argument("--data.run_config", type=Optional[str], default=None,
                   help="the training run's config (default: the newest config-*.yaml in the checkpoint's run "
                        "directory)")
    add_fabric_arguments(parser)



def add_fabric_arguments(parser: ArgumentParser) -> None:
    """The processes a command runs on (Lightning Fabric) and its progress bar."""
    g = parser.add_argument_group("processes (Lightning Fabric)")
    g.add_argument("--fabric.accelerator", type=str, default="auto", help="auto | cpu | gpu | cuda | mps")
    g.add_argument("--fabric.devices", type=Union[int, str], default="auto",
                   help="devices per node, or 'auto' (all GPUs)")
    g.add_argument("--fabric.num_nodes", type=int, default=1, help="nodes")
    g.add_argument("--fabric.strategy", type=str, default="auto", help="auto | ddp | ddp_spawn ...")
    g.add_argument("--progress", type=bool, default=True, help="show a progress bar")


def add_sampler_arguments(parser: ArgumentParser, n: Optional[int] = 64, steps: Optional[int] = None,
                          n_help: str = "number of samples, seeds seed..seed+n-1") -> None:
    """Seeds, batch and sampler: every command (`n` None: `--n` may be null, as `n_help` says)."""
    g = parser.add_argument_group("samples")
    g.add_argument("--n", type=int if n is not None else Optional[int], default=n, help=n_help)
    g.add_argument("--seed", type=int, default=0, help="seed of the first sample")
    g.add_argument("--batch_size", type=int, default=256,
                   help="samples per batch; also the unit of work and of resuming, so part of the run's settings")
    g = parser.add_argument_group("sampler (docs/algorithms.md §2)")
    g.add_argument("--sampler.name", type=Optional[Literal["ddim", "ddpm"]], default=None,
                   help="default: the checkpoint's")
    g.add_argument("--sampler.steps", type=Optional[int], default=steps,
                   help="sampler steps (null: the checkpoint's sample_steps)")
    g.add_argument("--sampler.eta", type=Optional[float], default=None, help="DDIM eta (null: 0)")
    g.add_argument("--sampler.spacing", type=Optional[Literal["uniform", "quadratic", "leading", "trailing", "linspace"]],
                   default=None, help="DDIM timestep spacing; leading/trailing/linspace are diffusers' (null: uniform, "
                   "or a diffusers model's timestep_spacing)")
    g.add_argument("--sampler.clipped_eps", type=Optional[Literal["rederive", "keep"]], default=None,
                   help="DDIM with x0 clipping: eps re-derived from the clipped x0, or the network's kept "
                   "(diffusers' default) (null: rederive, not recorded)")
    g.add_argument("--sampler.variance", type=Optional[Literal["beta_tilde", "beta"]], default=None,
                   help="DDPM variance (null: beta_tilde, or a diffusers model's variance_type)")
    g.add_argument("--sampler.clip", type=Optional[bool], default=None,
                   help="clip x0 to [-1, 1] (null: on, or a diffusers model's clip_sample and range; off for "
                   "BayesDiff, which needs affine steps)")


def add_estimator_arguments(parser: ArgumentParser, choose: bool = True) -> None:
    """Estimator, BayesDiff and filtering options; `choose` adds --estimator.name (evaluate runs them all)."""
    g = parser.add_argument_group("uncertainty (docs/algorithms.md §3, §5)")
    if choose:
        g.add_argument("--estimator.name", type=str, default="aleatoric", help=" | ".join(ESTIMATOR_CHOICES))
    g.add_argument("--estimator.M", type=Optional[int], default=None,
                   help="perturbations (aleatoric, guided) or dropout passes (mc_dropout) (null: 5)")
    g.add_argument("--estimator.variant", type=Literal[VARIANTS], default="centered", help="aleatoric map (§3)")
    g.add_argument("--estimator.window", type=float, nargs=2, default=[0.0, 1.0], metavar=("START", "STOP"),
                   help="steps whose maps are summed into the score, as fractions of the steps")
    g.add_argument("--estimator.score", type=Literal[SCORES], default="sum",
                   help="score variant (§3): sum of the per-step totals, or each step's total divided by "
                        "(step_normalized) or standardized with (standardized) the reference statistics")
    g.add_argument("--estimator.score_reference", type=Optional[str], default=None,
                   help="the score reference file `calibrate` writes (<table>.reference.pt), for the "
                        "step_normalized and standardized scores")
    g.add_argument("--estimator.dropout", type=Optional[float], default=None,
                   help="MC-Dropout rate (null: the model's own)")
    add_bayesdiff_arguments(parser)
    g = parser.add_argument_group("filtering")
    g.add_argument("--filtering.drop_fraction", type=Optional[float], default=None,
                   help="mark the fraction with the highest scores as dropped (null: 1/6)")


def add_bayesdiff_arguments(parser: ArgumentParser) -> None:
    """BayesDiff's options: the propagation's draws, skip and moments, and the Laplace fit's images."""
    g = parser.add_argument_group("BayesDiff (docs/algorithms.md §5b)")
    g.add_argument("--bayesdiff.draws", type=int, default=10, help="draws S per UQ step")
    g.add_argument("--bayesdiff.skip", type=int, default=5, help="UQ every k-th step")
    g.add_argument("--bayesdiff.moments", type=Literal[MOMENT_ESTIMATORS], default=MOMENT_ESTIMATORS[0],
                   help="how Cov(x_t, eps) is estimated: regression, or the paper's Monte Carlo form (paper)")
    g.add_argument("--bayesdiff.laplace_images", type=Optional[int], default=None,
                   help="fit the Laplace posterior on this many training images (null: the checkpoint's own "
                        "posterior if it holds one, else 1000), cached as <checkpoint>.laplace-N.pt; an "
                        "image-to-image model fits on training pairs (docs/palette.md)")


def add_guidance_arguments(parser: ArgumentParser, choose: bool = True) -> None:
    """Guidance options; `choose` adds --guidance.rule and --guidance.sign (evaluate runs them all)."""
    g = parser.add_argument_group("guidance (docs/algorithms.md §4; uses the aleatoric estimator)")
    if choose:
        g.add_argument("--guidance.rule", type=Literal[GUIDANCE_CHOICES], default="none", help="update rule")
        g.add_argument("--guidance.sign", type=int, default=1, help="gradient rule: +1 or -1")
    g.add_argument("--guidance.lam", type=float, default=1.0, help="gradient rule: step size lambda")
    g.add_argument("--guidance.grad_wrt", type=Literal["eps", "x_t"], default="eps",
                   help="gradient rule: differentiate U with respect to eps_bar, or x_t (the released code)")
    g.add_argument("--guidance.reduce", type=Literal["sum", "mean"], default="sum",
                   help="gradient rule: U summed over pixels per image, or also averaged over the batch (the "
                        "released code)")
    g.add_argument("--guidance.prior_precision", type=Union[float, Literal["abar_inverse"]], default=1.0,
                   help="posterior rule: precision of the N(0, 1/p) prior on eps; abar_inverse = the paper's 1/abar[t]")
    g.add_argument("--guidance.quantile", type=float, default=0.95, help="per-image percentile threshold q")
    g.add_argument("--guidance.table", type=Optional[str], default=None,
                   help="threshold table file from `calibrate` (threshold 'table' instead of the per-image "
                        "percentile)")
    g.add_argument("--guidance.window", type=float, nargs=2, default=[0.0, 0.15], metavar=("START", "STOP"),
                   help="guided steps, as fractions of the steps (default: the first 3 of 20)")


