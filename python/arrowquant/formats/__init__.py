"""Output formats other than ArrowQuant's own Parquet V2: writers and the
rules they need (formats/gguf/ for llama.cpp's GGUF)."""
