"""Lightning glue: the LightningModule, data modules, the W&B logger and the CLI."""
