"""GGUF that llama.cpp loads and runs: the architecture and hyperparameters
llama.cpp expects for a Hugging Face model (arch.py), its tokenizer metadata
(tokenizer.py) and the per-tensor GGUF type rules (types.py). Names and keys
come from the PyPI `gguf` package (the llama.cpp project's gguf-py), so new
architectures and keys follow its updates."""
