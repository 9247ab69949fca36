"""The synthetic world's entry point, kept under :mod:`softmask.data` for discoverability; the code lives
in the :mod:`softmask.world` package."""

from softmask.world import generate_world

__all__ = ["generate_world"]
