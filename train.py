"""Train and sample uncdiff models: `python train.py fit --config configs/quickstart.yaml`."""

from uncdiff.cli import main

if __name__ == "__main__":
    main()
