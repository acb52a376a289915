"""What a run reports: one TensorRecord per tensor (the entries of
quantization_report.json) and the QuantizeSummary of the run."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..engine.metrics import MarkovMetrics
from ..jsonfile import Opt, read_json
from ..formats.v2_schema import FORMAT_NAME, PIPELINE_FORMAT  # noqa: F401 (PIPELINE_FORMAT re-exported)


@dataclass
class TensorRecord:
    """What happened to one tensor: the report entry."""

    name: str
    shape: Tuple[int, ...]
    dtype: str
    quant_type: str
    bits: Optional[int]
    reason: str
    group_size: Optional[int]
    scheme: Optional[str]
    method: Optional[str]
    param_dtype: Optional[str]
    chunks: int
    input_bytes: int
    output_bytes: int
    seconds: float
    cosine: Optional[float] = None
    rel_mse: Optional[float] = None
    sqnr_db: Optional[float] = None
    max_abs_error: Optional[float] = None
    decisions: List[str] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def num_params(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def as_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["num_params"] = self.num_params
        d["bits_per_weight"] = 8.0 * self.output_bytes / self.num_params if self.num_params else 0.0
        for k in ("sqnr_db", "rel_mse"):  # JSON has no Infinity
            if d[k] is not None and not np.isfinite(d[k]):
                d[k] = None if np.isnan(d[k]) else ("inf" if d[k] > 0 else "-inf")
        return d



def merge_markov(acc: Optional[MarkovMetrics], new: MarkovMetrics) -> MarkovMetrics:
    if acc is None:
        return new
    acc.merge(new)
    return acc


@dataclass
class QuantizeSummary:
    """The outcome of one quantize run (also the `summary` of metadata.json)."""

    output: str
    source: str
    source_format: str
    output_format: str
    modality: str
    bits: int
    tensors: int
    quantized_tensors: int
    params: int
    input_bytes: int
    output_bytes: int
    compression_ratio: float
    mean_cosine: Optional[float]
    min_cosine: Optional[float]
    worst_tensor: Optional[str]
    bits_per_weight: float
    seconds: float
    files: List[str] = field(default_factory=list)
    records: List[TensorRecord] = field(default_factory=list, repr=False)
    # The writer's own report where it has one (GGUF: export_gguf's dict).
    details: Dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def report_path(self) -> Path:
        return Path(self.output) / "quantization_report.json"

    def as_dict(self, with_records: bool = False) -> Dict[str, Any]:
        # Not dataclasses.asdict(self): it would deep-copy every record and the
        # details (a Ray run's per-unit stats) only to drop them.
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)
             if f.name not in ("records", "details")}
        if with_records:
            d["tensors_detail"] = [r.as_dict() for r in self.records]
        return d


def summarize(records: List[TensorRecord], *, output: Path, source: str, source_format: str,
              modality: str, bits: int, seconds: float, files: List[str],
              output_format: str = FORMAT_NAME) -> QuantizeSummary:
    """The summary of one model's records."""
    quantized = [r for r in records if r.bits is not None]
    cosines = [r.cosine for r in quantized if r.cosine is not None]
    worst = min(quantized, key=lambda r: r.cosine if r.cosine is not None else 1.0) \
        if quantized else None
    params = sum(r.num_params for r in records)
    in_bytes = sum(r.input_bytes for r in records)
    out_bytes = sum(r.output_bytes for r in records)
    return QuantizeSummary(
        output=str(output), source=source, source_format=source_format,
        output_format=output_format, modality=modality, bits=bits,
        tensors=len(records), quantized_tensors=len(quantized), params=params,
        input_bytes=in_bytes, output_bytes=out_bytes,
        compression_ratio=in_bytes / out_bytes if out_bytes else 0.0,
        mean_cosine=float(np.mean(cosines)) if cosines else None,
        min_cosine=float(min(cosines)) if cosines else None,
        worst_tensor=worst.name if worst else None,
        bits_per_weight=8.0 * out_bytes / params if params else 0.0,
        seconds=seconds, files=files, records=records,
    )


def combine(parts: List[QuantizeSummary], src: Path, out: Path, seconds: float) -> QuantizeSummary:
    records = [r for s in parts for r in s.records]
    cos = [r.cosine for r in records if r.cosine is not None]
    in_b = sum(s.input_bytes for s in parts)
    out_b = sum(s.output_bytes for s in parts)
    params = sum(s.params for s in parts)
    worst = min((r for r in records if r.cosine is not None), key=lambda r: r.cosine, default=None)
    modalities = {s.modality for s in parts} - {"unknown"}
    return QuantizeSummary(
        output=str(out), source=str(src), source_format="diffusers-pipeline",
        output_format=PIPELINE_FORMAT,
        modality="image" if "image" in modalities else (modalities.pop() if modalities else "unknown"),
        bits=parts[0].bits, tensors=len(records),
        quantized_tensors=sum(s.quantized_tensors for s in parts), params=params,
        input_bytes=in_b, output_bytes=out_b, compression_ratio=in_b / out_b if out_b else 0.0,
        mean_cosine=float(np.mean(cos)) if cos else None, min_cosine=min(cos) if cos else None,
        worst_tensor=worst.name if worst else None,
        bits_per_weight=8.0 * out_b / params if params else 0.0, seconds=seconds,
        files=[f"{p.output}/{f}" for p in parts for f in p.files], records=records)


_METRIC = Opt((float, str))  # sqnr_db / rel_mse: "inf" / "-inf" where JSON has no Infinity
RECORD_SCHEMA = {
    "name": str, "shape": [int], "dtype": str, "quant_type": str, "bits": Opt(int),
    "reason": str, "group_size": Opt(int), "scheme": Opt(str), "method": Opt(str),
    "param_dtype": Opt(str), "chunks": int, "input_bytes": int, "output_bytes": int,
    "seconds": float, "cosine": Opt(float), "rel_mse": _METRIC, "sqnr_db": _METRIC,
    "max_abs_error": Opt(float), "decisions": Opt([str]), "extra": Opt(dict)}
# What `inspect` reads of a report (other tools may write fewer fields).
REPORT_SCHEMA = {"tensors": Opt([{"name": str, "output_bytes": Opt(int)}])}
SUMMARY_SCHEMA = {
    "output": str, "source": str, "source_format": str, "output_format": str, "modality": str,
    "bits": int, "tensors": int, "quantized_tensors": int, "params": int, "input_bytes": int,
    "output_bytes": int, "compression_ratio": float, "mean_cosine": Opt(float),
    "min_cosine": Opt(float), "worst_tensor": Opt(str), "bits_per_weight": float,
    "seconds": float, "files": Opt([str])}


def finished_summary(out: Path) -> QuantizeSummary:
    """The summary of a finished output directory, from its metadata.json and
    quantization_report.json (both checked: a wrong type is a MetadataError
    naming the file and the key)."""
    meta = read_json(out / "metadata.json", {"summary": SUMMARY_SCHEMA})
    fields = {f.name for f in dataclasses.fields(QuantizeSummary)} - {"records"}
    summary = QuantizeSummary(**{k: v for k, v in meta["summary"].items() if k in fields})
    report = read_json(out / "quantization_report.json", {"tensors": [RECORD_SCHEMA]})
    record_fields = {f.name for f in dataclasses.fields(TensorRecord)}
    summary.records = [TensorRecord(**{k: v for k, v in r.items() if k in record_fields})
                       for r in report["tensors"]]
    return summary
