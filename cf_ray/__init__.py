"""cf_ray: ClusterFit on Ray."""

__version__ = "0.1.0"
