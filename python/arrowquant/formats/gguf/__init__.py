"""GGUF output: files llama.cpp-family runtimes load (export.py drives the
C++ streaming writer, cpp/src/gguf.cc)."""
