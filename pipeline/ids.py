"""The duplicate-id check: 64-bit hashes in Ray tasks, an exact second look only at colliding ones.

    hash     one task per chunk of row groups (several small files share a chunk): it reads the
             id column as strings, hashes every id to 64 bits (`hash64`) and returns them split
             into `buckets` sorted arrays by hash value (one object per bucket)
    collide  one task per bucket: the hashes of every chunk in that bucket, sorted and merged;
             returns the hashes seen more than once (a duplicate id, or two ids that collide)
    confirm  only when some hash collides: the hash tasks' chunks read again, keeping the ids
             whose hash is among (a window of) the colliding ones, counted exactly per chunk

The ids stay in the cluster: the driver holds object references, a count per bucket and, when
a hash collides, at most a window of colliding hashes and the few ids counted for them. Ids are
compared as strings, as the rows' ids are written. Memory per hash task: 8 bytes per id of its
chunk plus its id column; per collide task: 8 bytes per id of its bucket.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import JobConfig, StorageConfig
from pipeline.inputs import InputFile

CHUNK_ROWS = 1_000_000
"""Rows per hash task (whole row groups; a chunk holds several files when they are small)."""
BUCKET_ROWS = 4_000_000
"""Ids per collide task, about (the buckets split the 64-bit hash range evenly)."""
WINDOW = 1024
"""Colliding hashes looked at exactly per confirm round."""
TASK_CPUS = 1.0
"""CPUs each task asks for: one, as Ray's default (no actor holds CPUs yet; fewer worker processes start than
with fractions, and starting them is most of the cost)."""

_BASE = np.uint64(0x100000001B3)
_MIX = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB))


def hash64(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of every string (uint64): a polynomial of its UTF-8 bytes mod 2**64 plus its
    length, finished by splitmix64's mixer. Vectorised over the Arrow buffers (no Python per id).
    Nulls hash as the empty string (a null id is refused before this check).

    Semantics:
        h(s) = mix(sum_i (s[i] + 1) * B**(len(s) - 1 - i) + len(s) * C)   (mod 2**64)
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], pa.large_string())
    column = pc.cast(column, pa.large_string())
    n = len(column)
    offsets = np.frombuffer(column.buffers()[1], np.int64)[column.offset:column.offset + n + 1]
    data = column.buffers()[2]
    data = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    starts, lengths = offsets[:-1], np.diff(offsets)  # (n,) (n,)
    if column.null_count:
        lengths = np.where(column.is_null().to_numpy(zero_copy_only=False), 0, lengths)
    sums = lengths.astype(np.uint64) * _MIX[1]  # (n,)
    total = int(lengths.sum())
    if total:
        firsts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # (n,) each id's first term
        at = np.arange(total) + np.repeat(starts - firsts, lengths)  # (total,) byte positions in `data`
        power = np.repeat(starts + lengths - 1, lengths) - at  # (total,) distance from the id's last byte
        powers = np.empty(int(lengths.max()), np.uint64)
        powers[0] = 1
        with np.errstate(over="ignore"):
            powers[1:] = np.cumprod(np.full(len(powers) - 1, _BASE, np.uint64))
            terms = (data[at].astype(np.uint64) + np.uint64(1)) * powers[power]  # (total,)
            nonempty = lengths > 0
            sums[nonempty] += np.add.reduceat(terms, firsts[nonempty])
    return _mix(sums)


def _mix(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _MIX[0]
        x = x ^ (x >> np.uint64(27))
        x = x * _MIX[1]
        return x ^ (x >> np.uint64(31))


@dataclass(frozen=True)
class Chunk:
    """The row groups one hash task reads: (file URI, row groups) of one or more files."""

    parts: tuple[tuple[str, tuple[int, ...]], ...]
    rows: int


def chunks(files: list[InputFile], rows: int = CHUNK_ROWS) -> list[Chunk]:
    """Whole row groups in order, about `rows` rows per chunk; small files share one."""
    out: list[Chunk] = []
    parts: dict[str, list[int]] = {}
    n = 0
    for f in files:
        for group, count in enumerate(f.row_groups):
            if n and n + count > rows:
                out.append(Chunk(tuple((u, tuple(g)) for u, g in parts.items()), n))
                parts, n = {}, 0
            parts.setdefault(f.uri, []).append(group)
            n += count
    if n or parts:
        out.append(Chunk(tuple((u, tuple(g)) for u, g in parts.items()), n))
    return out


BATCH = 16384
"""Ids hashed at once (small temporaries: large ones cost more to allocate than to compute)."""


def _id_batches(chunk: Chunk, column: str, config: StorageConfig):
    for uri, groups in chunk.parts:
        fs, path = storage.filesystem(uri, config)
        with fs.open_input_file(path) as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=BATCH, row_groups=list(groups),
                                                             columns=[column]):
                yield pc.cast(batch.column(0), pa.string())


def _hashes(chunk: Chunk, column: str, config: StorageConfig) -> np.ndarray:
    out, at = np.empty(chunk.rows, np.uint64), 0
    for ids in _id_batches(chunk, column, config):
        out[at:at + len(ids)] = hash64(ids)
        at += len(ids)
    return out[:at]


def _bucket_of(hashes: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket of each hash: its top bits scaled to `buckets` (monotonic in the hash)."""
    return ((hashes >> np.uint64(40)) * np.uint64(buckets)) >> np.uint64(24)


def _hash_task(chunk: Chunk, column: str, config: StorageConfig, buckets: int):
    hashes = np.sort(_hashes(chunk, column, config))
    cuts = np.searchsorted(_bucket_of(hashes, buckets), np.arange(1, buckets, dtype=np.uint64))
    parts = np.split(hashes, cuts)
    return parts if buckets > 1 else parts[0]


def _collide_task(*parts: np.ndarray) -> tuple[int, np.ndarray]:
    hashes = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.uint64)
    same = hashes[1:][hashes[1:] == hashes[:-1]]
    repeated = np.unique(same)
    return len(repeated), repeated


def _confirm_task(chunk: Chunk, column: str, config: StorageConfig, start: int, stop: int,
                  *repeated: np.ndarray) -> pa.Table:
    window = np.concatenate(repeated)[start:stop]
    kept = []
    for ids in _id_batches(chunk, column, config):
        mask = np.isin(hash64(ids), window)
        if mask.any():
            kept.append(ids.filter(pa.array(mask)))
    table = pa.table({"id": pa.chunked_array(kept, pa.string())})
    return table.group_by("id").aggregate([("id", "count")])


def duplicate_ids(config: JobConfig, files: list[InputFile], limit: int = 3, *, chunk_rows: int = CHUNK_ROWS,
                  bucket_rows: int = BUCKET_ROWS) -> list[str]:
    """Up to `limit` id values that occur more than once across the input (sorted; from the first
    window of colliding hashes that has any), [] when every id is unique. See the module's docstring."""
    from pipeline import dataflow  # the Ray API's one place

    dataflow.ensure_ray(config)
    column, storage_config = config.input.id_column, config.storage
    work = chunks(files, chunk_rows)
    total = sum(c.rows for c in work)
    buckets = max(1, -(-total // bucket_rows))
    hash_task = dataflow.remote(_hash_task, num_cpus=TASK_CPUS, num_returns=buckets)
    by_chunk = [hash_task.remote(c, column, storage_config, buckets) for c in work]
    by_chunk = [refs if buckets > 1 else [refs] for refs in by_chunk]
    collide = dataflow.remote(_collide_task, num_cpus=TASK_CPUS, num_returns=2)
    results = [collide.remote(*[refs[b] for refs in by_chunk]) for b in range(buckets)]
    del by_chunk
    counts = dataflow.get([count for count, _ in results])
    repeated = [r for (_, r), n in zip(results, counts) if n]
    colliding = sum(counts)
    confirm = dataflow.remote(_confirm_task, num_cpus=TASK_CPUS)
    found: list[str] = []
    for start in range(0, colliding, WINDOW):  # usually one round: 64-bit hashes of distinct ids rarely meet
        tables = dataflow.get([confirm.remote(c, column, storage_config, start, start + WINDOW, *repeated)
                          for c in work])
        counted = pa.concat_tables(tables).group_by("id").aggregate([("id_count", "sum")])
        found += counted.filter(pc.greater(counted.column("id_count_sum"), 1)).column("id").to_pylist()
        if len(found) >= limit:
            break
    return sorted(found)[:limit]
