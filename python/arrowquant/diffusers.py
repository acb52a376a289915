"""Quantized diffusers pipelines in PyTorch, in one call (needs torch and
diffusers; ``import arrowquant`` never imports this module).

* ``load_pipeline(path)``: an ArrowQuant pipeline directory (what
  ``arrowquant quantize`` writes for a diffusers pipeline: model_index.json,
  one V2 directory per component with weights, tokenizer / scheduler
  folders copied) as a ready pipeline: ``pipe(prompt, num_inference_steps=...)``.
* ``load_component(path)``: one component (UNet, transformer, VAE, text
  encoder) with its Linear / Conv2d / Embedding weights packed.

Both build the architecture from the copied config on the meta device (no
float weights), then fill it from the file (arrowquant.runtime.loaders).
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without torch
    raise ImportError("arrowquant.diffusers needs PyTorch and diffusers: "
                      "pip install torch==2.13.0 diffusers") from exc

from .runtime.loaders import LoadReport, load_component, load_pipeline, populate

__all__ = ["load_pipeline", "load_component", "populate", "LoadReport"]
