"""Pixel-wise uncertainty: the estimators, guidance, BayesDiff and the sampling loop that runs them."""
