"""diffperf: a pytest-benchmark-driven performance regression suite for diffusion inference."""

__version__ = "0.1.0"
