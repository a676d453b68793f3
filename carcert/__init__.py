"""carcert front package: the `carcert` command line and the Python client of the service."""

from core import __version__

__all__ = ["__version__"]
