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
from uncdiff.uncertainty.spec import EstimatorSpec, GuidanceSpec, SamplerSpec


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
    parser.add_class_arguments(SamplerSpec, "sampler", help="sampler (docs/algorithms.md §2; null: the checkpoint's)")
    if steps is not None:
        parser.set_defaults({"sampler.steps": steps})


def add_estimator_arguments(parser: ArgumentParser, choose: bool = True) -> None:
    """The estimator (`EstimatorSpec`: --estimator.name, M, variant, window, score, dropout, draws, skip,
    moments, features, chunk_size), its score reference file, BayesDiff's Laplace fit and filtering;
    without `choose` no --estimator.name and --estimator.features (evaluate runs every estimator, the
    generative one in its FID features)."""
    skip = {"reference", "keep_maps"} | (set() if choose else {"name", "features"})
    parser.add_class_arguments(EstimatorSpec, "estimator", skip=skip,
                               help="uncertainty estimator (docs/algorithms.md §3, §5)")
    if choose:
        parser.set_defaults({"estimator.name": "aleatoric"})
    parser.add_argument("--score_reference", type=Optional[str], default=None,
                        help="the score reference file `calibrate` writes (<table>.reference.pt), for "
                             "--estimator.score step_normalized | standardized")
    add_laplace_arguments(parser)
    g = parser.add_argument_group("filtering")
    g.add_argument("--filtering.drop_fraction", type=Optional[float], default=None,
                   help="mark the fraction with the highest scores as dropped (null: 1/6)")


def add_laplace_arguments(parser: ArgumentParser) -> None:
    """BayesDiff's Laplace fit: on how many training images (or pairs)."""
    g = parser.add_argument_group("BayesDiff's Laplace posterior (docs/algorithms.md §5b)")
    g.add_argument("--bayesdiff.laplace_images", type=Optional[int], default=None,
                   help="fit the Laplace posterior on this many training images (null: the checkpoint's own "
                        "posterior if it holds one, else 1000), cached as <checkpoint>.laplace-N.pt; an "
                        "image-to-image model fits on training pairs (docs/image_to_image.md)")


def add_guidance_arguments(parser: ArgumentParser, choose: bool = True) -> None:
    """Guidance (`GuidanceSpec`) and its threshold table file; without `choose` no --guidance.rule and
    --guidance.sign (evaluate runs them all)."""
    parser.add_class_arguments(GuidanceSpec, "guidance", skip={"table"} | (set() if choose else {"rule", "sign"}),
                               help="guidance (docs/algorithms.md §4; estimates with the aleatoric estimator)")
    parser.add_argument("--guidance_table", type=Optional[str], default=None,
                        help="threshold table file from `calibrate` (the threshold of each step and pixel instead "
                             "of the per-image --guidance.quantile)")
