"""Train and sample uncdiff models: `python train.py <command>` is `uncdiff <command>` (uncdiff/__main__.py).

    python train.py fit --config quickstart.yaml                # LightningCLI (uncdiff/lightning/cli.py)
    python train.py sample --checkpoint CKPT --out DIR ...      # uncdiff/commands/sample.py
    python train.py calibrate --checkpoint CKPT --out tau.pt    # uncdiff/commands/calibrate.py
    python train.py evaluate --checkpoint CKPT --out DIR ...    # uncdiff/commands/evaluate.py
    python train.py calibrate_intervals --checkpoint CKPT --out FILE.json   # uncdiff/commands/calibrate_intervals.py

Every command takes --config FILE.yaml and --print_config; docs/cli.md lists the options.
"""

from uncdiff.__main__ import main

if __name__ == "__main__":
    main()
