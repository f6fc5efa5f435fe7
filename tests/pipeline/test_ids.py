"""The duplicate-id check: 64-bit hashes in Ray tasks, exact counts only for colliding hashes."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import StorageConfig, config_from_dict, inputs
from pipeline.ids import Chunk, _collide_task, _confirm_task, chunks, duplicate_ids, hash64

M64 = (1 << 64) - 1


def reference_hash(value: str) -> int:
    """hash64 of one string, written plainly (Python integers, mod 2**64)."""
    data = value.encode()
    h = len(data) * 0x94D049BB133111EB
    for i, byte in enumerate(data):
        h += (byte + 1) * pow(0x100000001B3, len(data) - 1 - i, 1 << 64)
    x = h & M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def test_hash64_equals_the_plain_definition_on_slices_and_chunks():
    rng = random.Random(0)
    values = ["", "a", "b", "ab", "ba", "héllo wörld", "x" * 300] + [
        "".join(rng.choice("ab€z0") for _ in range(rng.randrange(0, 40))) for _ in range(500)]
    expected = np.array([reference_hash(v) for v in values], np.uint64)
    np.testing.assert_array_equal(hash64(pa.array(values)), expected)
    np.testing.assert_array_equal(hash64(pa.array(values).slice(5, 100)), expected[5:105])
    chunked = pa.chunked_array([pa.array(values[:200]), pa.array(values[200:])])
    np.testing.assert_array_equal(hash64(chunked), expected)
    assert len(set(hash64(pa.array([f"row-{i}" for i in range(100_000)])).tolist())) == 100_000


def test_chunks_cover_every_row_group_once_and_pack_small_files():
    files = [inputs.InputFile(f"/in/{i}.parquet", f"{i}.parquet", sum(g), g, "string")
             for i, g in enumerate([(1,), (1,), (5, 5, 5), (1,), (20,)])]
    work = chunks(files, rows=8)
    seen = [(uri, g) for c in work for uri, groups in c.parts for g in groups]
    assert sorted(seen) == sorted((f.uri, g) for f in files for g in range(len(f.row_groups)))
    assert [c.rows for c in work] == [7, 5, 6, 20]  # 1+1+5 | 5 | 5+1 | 20 (a row group is never split)
    assert len(work[0].parts) == 3


def test_a_colliding_hash_of_distinct_ids_is_not_a_duplicate(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b", "c", "b"]}), tmp_path / "x.parquet")
    chunk = Chunk(((str(tmp_path / "x.parquet"), (0,)),), 4)
    h = hash64(pa.array(["a", "b", "c"]))
    # "a" and "c" made to collide: the collide task reports their hash; the exact look counts one each
    count, repeated = _collide_task(np.sort(np.array([h[0], h[0], h[1], h[1]], np.uint64)))
    assert count == 2
    counted = _confirm_task(chunk, "id", StorageConfig(), 0, 10, repeated).to_pydict()
    assert dict(zip(counted["id"], counted["id_count"])) == {"a": 1, "b": 2}


@pytest.mark.parametrize("ids", ["int", "string"])
def test_duplicates_across_small_files_chunks_and_buckets(ray_runtime, tmp_path, ids):
    (tmp_path / "in").mkdir()
    values = list(range(3000))
    values[2999], values[1500] = 17, 640  # two ids twice, in different files
    for i in range(30):
        part = values[i * 100:(i + 1) * 100]
        column = pa.array(part) if ids == "int" else pa.array([f"id-{v}" for v in part])
        pq.write_table(pa.table({"prompt": ["p"] * 100, "k": column}), tmp_path / "in" / f"{i:02d}.parquet",
                       row_group_size=40)
    config = config_from_dict({"model": {"path": "m"}, "adapters": {"path": "a"}, "output": {"uri": "o"},
                               "input": {"uri": str(tmp_path / "in"), "id_column": "k"}})
    files = inputs.discover(config.input, config.storage)
    want = ["17", "640"] if ids == "int" else ["id-17", "id-640"]
    assert duplicate_ids(config, files, chunk_rows=250, bucket_rows=700) == want  # 12 chunks, 5 buckets
    assert duplicate_ids(config, files, limit=1) == want[:1]
    unique = [f for f in files if f.name not in ("29.parquet", "15.parquet")]
    assert duplicate_ids(config, unique, chunk_rows=250, bucket_rows=700) == []
