"""Lightning callbacks of uncdiff, configured in the YAML configs like any other callback."""

from uncdiff.callbacks.fid_trajectory import FIDTrajectory
from uncdiff.callbacks.invalid_rate import InvalidRate
from uncdiff.callbacks.image_to_image import ImageToImagePanels
from uncdiff.callbacks.sample_grid import SampleGrid
from uncdiff.callbacks.uncertainty_sampling import UncertaintySampling

__all__ = ["FIDTrajectory", "ImageToImagePanels", "InvalidRate", "SampleGrid", "UncertaintySampling"]
