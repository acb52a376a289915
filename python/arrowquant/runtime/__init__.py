"""The PyTorch runtime for ArrowQuant Parquet V2 models: torch operators over
the C++ quantized matmul (ops), layers that keep weights packed (layers),
and one-call loaders for transformers models and diffusers pipelines
(loaders). Public names live in arrowquant.torch and arrowquant.diffusers;
importing this package needs torch (``import arrowquant`` never imports it).
"""
