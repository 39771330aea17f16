"""Train and sample uncdiff models.

    python train.py fit --config configs/quickstart.yaml      # LightningCLI (uncdiff/cli.py)
    python train.py sample --checkpoint CKPT --out DIR ...     # uncdiff/sample_cmd.py
    python train.py calibrate --checkpoint CKPT --out tau.pt   # uncdiff/calibrate_cmd.py (guidance threshold table)
    python train.py evaluate --checkpoint CKPT --out DIR ...   # uncdiff/evaluate_cmd.py
"""

import sys

COMMANDS = {"sample": "uncdiff.commands.sample", "calibrate": "uncdiff.commands.calibrate", "evaluate": "uncdiff.commands.evaluate"}

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        import importlib

        importlib.import_module(COMMANDS[sys.argv[1]]).main(sys.argv[2:])
    else:
        from uncdiff.lightning.cli import main

        main()
