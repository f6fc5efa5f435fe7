"""Where the actors' model runs: `model.dtype` and `model.device` `auto` made concrete on the driver.

`auto` means cuda and bfloat16 when the actors get a GPU, else cpu and float32. Whether they get
one is `resources.gpus_per_actor`; unset, its default is 1 when the Ray cluster has GPUs, else 0
(`ResourcesConfig`). A run resolves both once, before anything is hashed or started, so that

- the configuration hash sees the dtype and device the rows are computed with (`auto` and the
  `float32`/`cpu` it resolves to are the same job, and a resume across them is allowed), and
- the actors are given those concrete values, so what was hashed is what runs.

With `gpus_per_actor` set, nothing but the configuration is needed (no Ray cluster): it is the
only thing the actors' placement depends on. Unset, the run asks the cluster it joins anyway
(`dataflow.cluster_gpus`: the joined cluster, or for a local Ray yet to start, the GPUs Ray will
detect on this machine); `config_hash` of a configuration not resolved that way keeps the `auto`
it cannot decide. The actor's own `auto` (actors.base) picks the same values
on the devices it is given.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from pipeline.config import JobConfig

AUTO = "auto"


def resolve_placement(config: JobConfig, cluster_gpus: Callable[[], float] | None = None) -> JobConfig:
    """`config` with `model.dtype`/`model.device` `auto` replaced by what the actors will use, and
    `resources.gpus_per_actor` filled in when that needed it. `cluster_gpus()` gives the cluster's
    GPUs, asked only when `gpus_per_actor` is unset; None leaves `auto` as it is then."""
    model, resources = config.model, config.resources
    if AUTO not in (model.dtype, model.device):
        return config
    gpus = resources.gpus_per_actor
    if gpus is None and model.device == AUTO:
        if cluster_gpus is None:
            return config
        gpus = 1.0 if cluster_gpus() >= 1 else 0.0  # ResourcesConfig.gpus_per_actor's default
    device = model.device if model.device != AUTO else ("cuda" if gpus > 0 else "cpu")
    dtype = model.dtype if model.dtype != AUTO else ("bfloat16" if device == "cuda" else "float32")
    return dataclasses.replace(config, model=dataclasses.replace(model, dtype=dtype, device=device),
                               resources=dataclasses.replace(resources, gpus_per_actor=gpus))


def placed(config: JobConfig) -> JobConfig:
    """`resolve_placement` for a run: the cluster is asked only when `auto` depends on it."""
    def cluster_gpus() -> float:
        from pipeline.dataflow import cluster_gpus as ask  # imports Ray

        return ask(config)

    return resolve_placement(config, cluster_gpus)
