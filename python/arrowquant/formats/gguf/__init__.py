"""GGUF output: files llama.cpp-family runtimes load. export.py drives the C++
streaming writer (cpp/src/gguf.cc); for a Hugging Face model the file carries
the architecture and hyperparameters llama.cpp expects (arch.py), its
tokenizer metadata (tokenizer.py) and the per-tensor GGUF type rules
(types.py), planned together by plan.py; validate.py compares a file with its
source. Names and keys come from the PyPI `gguf` package (the llama.cpp
project's gguf-py), so new architectures and keys follow its updates."""
