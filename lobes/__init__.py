"""lobes: SpeechBrain-compatible HyperMixing / HyperConformer and BEATs modules, with recipes.

Submodules are imported on demand (``import lobes.hypermixing``), so importing the package is cheap.
"""

__version__ = "0.1.0"
