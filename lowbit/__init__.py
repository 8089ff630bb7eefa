"""lowbit: quantize PyTorch models, run them on real low-bit kernels, and measure what it cost."""

from .checkpoint import CheckpointError, load, save
from .quantize import quantize, summary
from .recipes import RECIPES, QuantConfig, parse_recipe

__version__ = "0.1.0"
__all__ = ["RECIPES", "CheckpointError", "QuantConfig", "load", "parse_recipe", "quantize", "save", "summary"]
