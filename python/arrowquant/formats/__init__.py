"""Output formats and the byte layouts their readers share: ArrowQuant Parquet
V2 (v2_schema, v2_writer, v2_reader), SafeTensors (safetensors_writer) and
GGUF (gguf/). Readers of source models are in arrowquant.sources."""
