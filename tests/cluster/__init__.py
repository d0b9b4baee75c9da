"""Multi-host cluster harness: network namespaces, one dockerd per host, a registry, houndd."""

from tests.cluster.harness import Cluster, ClusterError, Host, ImageSpec, sweep_stale

__all__ = ["Cluster", "ClusterError", "Host", "ImageSpec", "sweep_stale"]
