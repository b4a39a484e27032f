"""The shared lower layer: metrics, post-processing and the model-file format, used by every method.

Imports point down only: cli -> benchmarks -> ensemble -> baseline -> seg -> synth -> core.
"""

__version__ = "0.5.0"  # the toolkit's version: pyproject.toml reads it, every model file records it
