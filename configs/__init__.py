"""The bundled configs, installed as `uncdiff.configs` so that `--config quickstart.yaml` resolves from any directory."""
