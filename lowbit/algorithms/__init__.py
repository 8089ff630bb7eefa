"""Error-correcting quantization algorithms: they choose integer codes better than round-to-nearest."""
