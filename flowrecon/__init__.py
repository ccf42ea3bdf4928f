"""flowrecon: conditional generative models for inverse problems in physics."""

__version__ = "0.1.0"
