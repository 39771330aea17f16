"""Core math: the noise schedule, the samplers and the U-Net. Imports nothing else of uncdiff."""
