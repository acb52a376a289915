"""GGUF for the runtimes that read it: llama.cpp architectures and tokenizers,
diffusion models in stable-diffusion.cpp's and ComfyUI-GGUF's layouts."""
