"""`adapters.max_resident` as bytes, checked against the pool on the driver before any work.

An actor refuses a bytes bound smaller than its k largest adapters (`actors.residency.check_bound`)
once it has loaded the model and read the pool: the run would start its actors only to fail. The
driver makes the same check first, with the same function, on sizes it computes without reading a
weight: every tensor's shape from the adapter's safetensors header (`actors.adapters.read_header`),
times the bytes per element of the dtype the actors hold factors in (`model.dtype`, resolved by
`pipeline.placement`). `logo-batch validate` and `logo-batch run` both call `check_residency`.
Only a bytes bound reads the headers; an s3:// pool is then fetched into the driver's cache first
(`fetch.local_copy`, as validate's adapter checks do).
"""

from __future__ import annotations

import math

from pipeline import fetch
from pipeline.config import ConfigError, JobConfig

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
"""Bytes per element of the pool's factors by `model.dtype`. `auto` not yet resolved counts as the
smallest it can become, so the check never refuses a bound the actors would accept."""


def adapter_sizes(config: JobConfig) -> list[int]:
    """Bytes of every adapter's full factors in the actors' dtype, in pool (name) order, from the
    safetensors headers alone. torch loads here (the adapter reader's module), so only a bytes bound
    asks for it."""
    from actors.adapters import WEIGHTS_FILE, read_header, resolve_sources

    pool = resolve_sources(fetch.local_copy(config.adapters.path, config.storage))
    itemsize = ITEMSIZE[config.model.dtype]
    return [sum(math.prod(shape) for shape in read_header(name, path / WEIGHTS_FILE).values()) * itemsize
            for name, path in sorted(pool.items())]


def check_residency(config: JobConfig) -> None:
    """Raise ConfigError when `adapters.max_resident`, a size, cannot hold the k largest adapters of
    the pool at once. A pool that cannot be read is left to the adapter checks, which name the file."""
    from actors.residency import check_bound, parse_max_resident

    bound = parse_max_resident(config.adapters.max_resident)
    if bound.nbytes is None:  # a count: `JobConfig` compares it with routing.k already
        return
    from actors.adapters import AdapterError

    try:
        sizes = adapter_sizes(config)
    except (AdapterError, OSError):
        return
    try:
        check_bound(bound, config.routing.k, sizes)
    except ValueError as err:
        raise ConfigError(f"adapters.{err}") from None
