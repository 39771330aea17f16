"""uncdiff: DDPM training and sampling with pixel-wise uncertainty.

The sub-packages are the layers; imports point one way (each imports only those above it):

    core         schedule, samplers, U-Net: plain PyTorch on an `eps_model(x, t)` callable
    io           files: atomic writes, safe loading, images, the sample store
    uncertainty  estimators, guidance, BayesDiff, the uncertainty-aware sampling loop
    evaluation   FID, metrics, AUSE, the experiments and their reports
    lightning    LightningModule, data modules, logger, CLI; `uncdiff.callbacks` beside it
    commands     sample, calibrate, evaluate
"""
