"""Pure tensor functions: affine/ternary/binary integer quantization, bit packing, float formats, codebooks."""

from .affine import (
    SCALE_EPS,
    affine_qparams_from_range,
    block_reduce,
    blocked_shape,
    blocks_shape,
    broadcast_param,
    check_input,
    choose_qparams_affine,
    choose_qparams_ternary,
    dequantize_affine,
    fake_quantize_affine,
    param_view,
    quantize_affine,
    quantize_binary,
    quantize_ternary,
    storage_nbytes,
    symmetric_qparams,
    ternary_stats,
)
from .codebook import kmeans_dequantize, kmeans_quantize
from .floatfmt import FLOAT_DTYPES, dequantize_float, quantize_float
from .pack import pack_bits, packed_nbytes, unpack_bits

__all__ = [
    "FLOAT_DTYPES",
    "SCALE_EPS",
    "affine_qparams_from_range",
    "block_reduce",
    "blocked_shape",
    "blocks_shape",
    "broadcast_param",
    "check_input",
    "choose_qparams_affine",
    "choose_qparams_ternary",
    "dequantize_affine",
    "dequantize_float",
    "fake_quantize_affine",
    "kmeans_dequantize",
    "kmeans_quantize",
    "pack_bits",
    "packed_nbytes",
    "param_view",
    "quantize_affine",
    "quantize_binary",
    "quantize_float",
    "quantize_ternary",
    "storage_nbytes",
    "symmetric_qparams",
    "ternary_stats",
    "unpack_bits",
]
