"""The shared lower layer: metrics, post-processing and the model-file format, used by every method.

Imports point down only: cli -> benchmarks -> ensemble -> baseline -> seg -> synth -> core.
"""
