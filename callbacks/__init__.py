"""Lightning callbacks of uncdiff, configured in the YAML configs like any other callback."""

from callbacks.sample_grid import SampleGrid

__all__ = ["SampleGrid"]
