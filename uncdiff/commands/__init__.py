"""The commands besides `fit`/`validate`: sample, calibrate, evaluate. A command never imports another."""
