"""lowbit: quantize PyTorch models, run them on real low-bit kernels, and measure what it cost."""

from . import export, hf_quantizer, qat  # export: the runtimes' packages load only when one runs
from .checkpoint import CheckpointError, load, save
from .quantize import quantize, summary
from .recipes import RECIPES, LayerRecipe, QuantConfig, parse_recipe
from .report import format_layer_report, layer_report, worst_layers
from .search import search
from .sensitivity import sensitivity
from .version import __version__ as __version__  # the alias marks a re-export

# transformers' from_pretrained finds lowbit-saved folders' quantizer (registered without importing transformers)
hf_quantizer.install()

__all__ = ["RECIPES", "CheckpointError", "LayerRecipe", "QuantConfig", "export", "format_layer_report", "layer_report",
           "load", "parse_recipe", "qat", "quantize", "save", "search", "sensitivity", "summary", "worst_layers"]
