"""lowbit's version, in a module of its own so that any module can read it without importing the package."""

__version__ = "0.1.0"

# Of lowbit checkpoints (lowbit.checkpoint's manifest) and of the quantization_config lowbit records on
# Hugging Face models (lowbit.hf_quantizer): both describe layers by the same entries.
FORMAT_VERSION = 1
