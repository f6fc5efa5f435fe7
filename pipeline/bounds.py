"""`adapters.max_resident` as bytes, checked against the pool on the driver before any work.

An actor refuses a bytes bound that holds fewer than k adapter slots (`actors.residency.check_bound`)
once it has loaded the model and read the pool: the run would start its actors only to fail. The
driver makes the same check first, with the same function, on the slot size it computes without
reading a weight: every factor's shape from the adapters' safetensors headers
(`actors.adapters.read_header`), each module at the pool's largest rank there, times the bytes per
element of the dtype the actors hold factors in (`model.dtype`, resolved by `pipeline.placement`). `logo-batch validate` and `logo-batch run` both call `check_residency`.
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


def slot_size(config: JobConfig) -> tuple[int, int]:
    """(bytes of one adapter slot in the actors' dtype, adapters in the pool), from the safetensors
    headers alone (`actors.residency.slot_nbytes`, as the pool computes it). torch loads here (the
    adapter reader's module), so only a bytes bound asks for it."""
    from actors.adapters import KEY_RE, WEIGHTS_FILE, read_header, resolve_sources
    from actors.residency import slot_nbytes

    pool = resolve_sources(fetch.local_copy(config.adapters.path, config.storage))
    modules: dict[str, tuple[int, int, int]] = {}
    for name, path in sorted(pool.items()):
        shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        for key, shape in read_header(name, path / WEIGHTS_FILE).items():
            if (match := KEY_RE.match(key)) is not None and len(shape) == 2:
                shapes.setdefault(match["module"], {})[match["factor"]] = shape
        for module, f in shapes.items():
            if "A" in f and "B" in f:
                (rank, d_in), (d_out, _) = f["A"], f["B"]
                modules[module] = (max(rank, modules.get(module, (0,))[0]), d_in, d_out)
    return slot_nbytes(modules, ITEMSIZE[config.model.dtype]), len(pool)


def check_residency(config: JobConfig) -> None:
    """Raise ConfigError when `adapters.max_resident`, a size, holds fewer than k adapter slots. A
    pool that cannot be read is left to the adapter checks, which name the file."""
    from actors.residency import check_bound, parse_max_resident

    bound = parse_max_resident(config.adapters.max_resident)
    if bound.nbytes is None:  # a count: `JobConfig` compares it with routing.k already
        return
    from actors.adapters import AdapterError

    try:
        slot, adapters = slot_size(config)
    except (AdapterError, OSError):
        return
    try:
        check_bound(bound, config.routing.max_k, slot, adapters)
    except ValueError as err:
        raise ConfigError(f"adapters.{err}") from None
