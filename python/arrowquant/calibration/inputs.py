"""Calibration inputs: the default sentences for text models and the first
version's record files (JSONL / Parquet / Arrow: {data, timestep, shape})."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..engine.finite import nonfinite_message
from ..text import decode_text
from ..errors import FormatError, ModelNotFoundError

#: Calibration sentences for text encoders (used when no inputs are given).
DEFAULT_SENTENCES: Tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "She finished the marathon in just under four hours.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The museum will be closed for renovations until next spring.",
    "Can you recommend a good book about the history of mathematics?",
    "The train to Berlin departs from platform seven at noon.",
    "Researchers discovered a new species of frog in the rainforest.",
    "My laptop battery drains much faster than it used to.",
    "The children built a sandcastle near the water's edge.",
    "Quantum computers exploit superposition and entanglement.",
    "He apologized for arriving late to the meeting.",
    "The orchestra performed Beethoven's ninth symphony last night.",
    "Heavy rain caused flooding in several coastal towns.",
    "Please remember to water the plants while I am away.",
    "The new smartphone features a faster processor and a better camera.",
    "A group of tourists is taking photos in front of the cathedral.",
    "Vaccines train the immune system to recognize pathogens.",
    "The software update fixed a bug that crashed the application.",
    "Two dogs are chasing a ball across the park.",
    "The committee approved the budget after a long debate.",
    "Mount Everest is the highest mountain above sea level.",
    "I prefer tea to coffee in the morning.",
    "The detective examined the footprints outside the window.",
    "Electric cars are becoming more affordable every year.",
    "The chef sliced the onions and tossed them into the pan.",
    "Ancient Rome was connected by an extensive network of roads.",
    "The baby laughed when the puppy licked her hand.",
    "Our flight was delayed because of a snowstorm in Chicago.",
    "Machine learning models need large amounts of training data.",
    "The farmer harvested the wheat before the storm arrived.",
    "A woman is reading a newspaper on a park bench.",
    "The volcano erupted, sending ash high into the atmosphere.",
    "He repaired the bicycle's flat tire in ten minutes.",
    "The library offers free language classes on weekends.",
    "Solar panels convert sunlight directly into electricity.",
    "The students argued about the meaning of the poem.",
    "A cat is sleeping on a sunny windowsill.",
    "The company reported record profits in the third quarter.",
    "Regular exercise improves both physical and mental health.",
    "The bridge was designed to withstand strong earthquakes.",
    "She painted the fence white over the weekend.",
    "The astronauts returned safely after six months in orbit.",
    "How do I reset my password if I forgot my email address?",
    "The river winds through the valley toward the sea.",
    "The jury reached a unanimous verdict after three days.",
    "A young boy is flying a red kite on the beach.",
    "Inflation has made groceries noticeably more expensive.",
    "The hikers followed the trail up to the glacier.",
    "This restaurant serves the best pizza in town.",
    "The spacecraft captured detailed images of Jupiter's moons.",
    "He plays chess online with friends from around the world.",
    "The hospital opened a new wing for pediatric care.",
    "Bees play a crucial role in pollinating crops.",
    "The concert tickets sold out within minutes.",
    "A chef is preparing sushi in a busy kitchen.",
    "The old castle stands on a hill overlooking the village.",
    "Learning a second language can be challenging but rewarding.",
    "The storm knocked down power lines across the region.",
    "Two men are loading boxes into a delivery truck.",
    "The scientist calibrated the instrument before the experiment.",
    "We watched the sunset from the top of the lighthouse.",
)


# --------------------------------------------------------------------------
# calibration input files of the first version


@dataclass
class CalibrationInput:
    """One model input: data reshaped to `shape`, at diffusion `timestep`."""

    data: np.ndarray
    timestep: int


def read_calibration_inputs(path: Union[str, Path]) -> List[CalibrationInput]:
    """Reads JSONL ({"data": [...], "timestep": t, "shape": [...]} per line),
    Parquet or Arrow IPC (file or stream) with columns data list<float32>,
    timestep int64, shape list<int64>."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"calibration inputs {str(p)!r} do not exist")
    suffix = p.suffix.lower()
    records: List[CalibrationInput] = []
    if suffix in (".jsonl", ".json", ".ndjson"):
        with open(p, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = decode_text(raw, f"{p}:{lineno}", "the line")
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                    records.append(_record(doc["data"], doc.get("timestep", 0), doc.get("shape"),
                                           f"{p.name}:{lineno}"))
                except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
                    raise FormatError(f"{p.name}:{lineno}: not a calibration record ({exc})") from None
        return records
    import pyarrow as pa

    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
    elif suffix in (".arrow", ".ipc", ".feather", ".arrows"):
        try:
            with pa.memory_map(str(p), "r") as src:
                table = pa.ipc.open_file(src).read_all()
        except pa.ArrowInvalid:
            with pa.memory_map(str(p), "r") as src:
                table = pa.ipc.open_stream(src).read_all()
    else:
        raise FormatError(
            f"calibration inputs {p.name!r}: expected .jsonl, .parquet or .arrow/.ipc, or a .txt "
            "file of sentences")
    if "data" not in table.column_names:
        raise FormatError(f"{p.name}: no 'data' column (columns: {table.column_names})")
    data = table.column("data").to_pylist()
    ts = table.column("timestep").to_pylist() if "timestep" in table.column_names else [0] * len(data)
    shapes = table.column("shape").to_pylist() if "shape" in table.column_names else [None] * len(data)
    for i, (d, t, s) in enumerate(zip(data, ts, shapes)):
        records.append(_record(d, t, s, f"{p.name} row {i}"))
    return records


def _record(data: Sequence[float], timestep: Any, shape: Optional[Sequence[int]], where: str
            ) -> CalibrationInput:
    arr = np.asarray(data, dtype=np.float32)
    if shape is not None:
        shape = [int(v) for v in shape]
        if int(np.prod(shape)) != arr.size:
            raise FormatError(f"{where}: shape {shape} needs {int(np.prod(shape))} values, "
                              f"data has {arr.size}")
        arr = arr.reshape(shape)
    bad = ~np.isfinite(arr.reshape(-1))
    if bad.any():  # the one wording of a non-finite value (engine/finite.py)
        i = int(np.argmax(bad))
        cols = arr.shape[-1] if arr.ndim >= 2 else arr.size
        raise FormatError(f"{where}: calibration data: "
                          f"{nonfinite_message(float(arr.reshape(-1)[i]), i, cols)}")
    return CalibrationInput(data=arr, timestep=int(timestep if timestep is not None else 0))
