"""Lightning callbacks of uncdiff, configured in the YAML configs like any other callback."""

from callbacks.fid_trajectory import FIDTrajectory
from callbacks.sample_grid import SampleGrid
from callbacks.uncertainty_sampling import UncertaintySampling

__all__ = ["FIDTrajectory", "SampleGrid", "UncertaintySampling"]
