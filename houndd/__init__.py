"""houndd: masterless parallel container-image warm-up for fleets of Docker hosts."""

__version__ = "0.1.0"
