"""The run's buffer pools: read units and chunk outputs reused from chunk to
chunk (no fresh pages per chunk), with the same bytes as fresh buffers."""

from __future__ import annotations

import numpy as np

import arrowquant as aq
from arrowquant import engine
from arrowquant.run import buffers
from arrowquant.run.buffers import BufferPool, Leases, arena_bytes, carve
from arrowquant.sources import open_model
from conftest import write_v1


def test_pool_reuses_the_smallest_buffer_that_fits():
    pool = BufferPool(keep=3)
    a, b = pool.take(100), pool.take(1000)
    assert pool.allocated == 2
    pool.give(b)
    pool.give(a)
    assert pool.take(50) is a          # best fit, not the first free one
    assert pool.take(800) is b
    assert pool.allocated == 2


def test_pool_drops_free_buffers_too_small_and_keeps_at_most_keep():
    pool = BufferPool(keep=2)
    small = pool.take(10)
    pool.give(small)
    big = pool.take(10_000)            # nothing fits: the small one is dropped
    assert pool.allocated == 2
    pool.give(big)
    assert pool.take(5) is big
    for _ in range(5):
        pool.give(np.empty(4, np.uint8))
    assert len(pool._free) == 2


def test_carve_gives_aligned_views_of_one_arena():
    parts = [(13, np.uint8), (7, np.float32), (0, np.float32), (3, np.float32)]
    arena = np.empty(arena_bytes(parts), np.uint8)
    views = carve(arena, parts)
    assert [v.size for v in views] == [13, 7, 0, 3]
    for v in views:
        assert (v.ctypes.data - arena.ctypes.data) % buffers.ALIGN == 0
        assert v.size == 0 or np.shares_memory(v, arena)
    views[1][...] = 1.5
    views[3][...] = 2.5
    assert views[1].tolist() == [1.5] * 7 and views[0].dtype == np.uint8


def test_leases_give_back_only_what_was_lent():
    leases = Leases(BufferPool())
    base = leases.pool.take(64)
    view = leases.lend(base[:10], base)
    leases.give_back(np.empty(10, np.uint8))   # not lent: ignored
    assert leases.pool._free == []
    leases.give_back(view)
    assert leases.pool.take(64) is base


def _counting(monkeypatch):
    """(buffers taken, buffers the pools had to allocate)."""
    taken, made = [], []
    take = BufferPool.take

    def counted(self, nbytes):
        before = self.allocated
        out = take(self, nbytes)
        taken.append(nbytes)
        if self.allocated > before:
            made.append(nbytes)
        return out

    monkeypatch.setattr(BufferPool, "take", counted)
    return taken, made


def test_many_chunks_reuse_a_few_buffers_and_write_fresh_buffer_bytes(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    tensors = {f"layer{i}.weight": (rng.standard_normal((384, 64)) * 0.02).astype(np.float16)
               for i in range(6)}
    tensors["norm.weight"] = np.ones(64, np.float16)
    src = write_v1(tmp_path / "in", tensors)
    taken, made = _counting(monkeypatch)
    # 4 KiB chunks: 12 chunks per tensor, 72 chunks in all; rtn (no floor
    # redo) and the mse default with its single-chunk floors below.
    aq.quantize(src, tmp_path / "out", bits=4, group_size=32, chunk_size="4KiB",
                method="rtn", param_dtype="float16", max_memory="64KiB", progress=False)
    chunks = sum(len(aq.load(tmp_path / "out").info(n).chunks) for n in tensors)
    assert chunks > 60
    # A read unit and the output buffers of every quantized chunk come from
    # the pools; they allocate what is in flight (the reader runs 16 KiB ahead).
    assert len(taken) >= 2 * (chunks - 1)
    reads = [n for n in made if n == 4096]
    outputs = [n for n in made if n != 4096]
    assert len(outputs) <= 6, f"{len(outputs)} output buffers for {chunks} chunks: {made}"
    # How many reads are in flight when the engine gives a unit back depends on
    # thread timing; a fresh buffer per read (the code before the pool) would
    # make one per chunk.
    assert len(reads) <= chunks // 4, f"{len(reads)} read buffers for {chunks} chunks"
    model = aq.load(tmp_path / "out")
    for name, a in tensors.items():
        if a.ndim < 2:
            continue
        want = engine.quantize_array(a, bits=4, group_size=32, method="rtn",
                                     param_dtype="float16")
        raw = model.raw(name)
        assert raw.data.tobytes() == want.data.tobytes()
        assert raw.scales.tobytes() == want.scales.tobytes()
        assert raw.zero_points.tobytes() == want.zero_points.tobytes()


def test_single_chunk_floor_tensors_read_into_the_pool(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    tensors = {f"layer{i}.weight": (rng.standard_normal((64, 128)) * 0.02).astype(np.float16)
               for i in range(8)}
    src = write_v1(tmp_path / "in", tensors)
    taken, made = _counting(monkeypatch)
    aq.quantize(src, tmp_path / "out", bits=4, group_size=32, progress=False, max_memory="1MiB")
    assert len(taken) >= 16
    assert len(made) <= 12, f"{len(made)} buffers for 8 tensors"
    with open_model(tmp_path / "out") as out:
        assert len(out.tensors) == 8


def test_a_floored_tensor_of_a_few_chunks_is_quantized_once(tmp_path, monkeypatch):
    from arrowquant.engine.chunk import ChunkQuantizer

    rng = np.random.default_rng(5)
    a = (rng.standard_normal((96, 64)) * 0.02).astype(np.float16)   # 12 KiB: 3 chunks of 4 KiB
    src = write_v1(tmp_path / "in", {"w.weight": a})
    calls = []
    orig = ChunkQuantizer.quantize_rows
    monkeypatch.setattr(ChunkQuantizer, "quantize_rows",
                        lambda self, *args, **kw: calls.append(1) or orig(self, *args, **kw))
    aq.quantize(src, tmp_path / "out", bits=4, group_size=32, chunk_size="4KiB", method="mse",
                param_dtype="float16", progress=False)
    assert len(aq.load(tmp_path / "out").info("w.weight").chunks) == 3
    assert len(calls) == 3  # held, not probed first (which quantized it twice)
    want = engine.quantize_array(a, bits=4, group_size=32, method="mse", param_dtype="float16")
    assert aq.load(tmp_path / "out").raw("w.weight").data.tobytes() == want.data.tobytes()
