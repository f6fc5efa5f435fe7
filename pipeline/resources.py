"""Whether the LoGo actors fit the Ray cluster, checked before any work, and how often they restart.

Ray queues an actor that asks for more than any node has (a GPU on a cluster without GPUs, more
CPUs than a node holds) and waits for it forever without a word, and Ray Data restarts a dying
actor without limit by default (each restart loads the model again). `check_cluster` turns the
first into an error that names the setting to change; `ACTOR_OPTIONS` bounds the second.

A cluster with an autoscaler (`Growth`) is checked against what it can grow to: the nodes it has
plus the nodes of each kind it can add (as its autoscaler reports them: Ray's autoscaler v2, as
KubeRay runs it). Actors that fit only once nodes are added are waited for, with a message
saying so; a plan that does not fit even then is refused. An autoscaler that does not say what it
can add (Ray's autoscaler v1) is waited for, with a message saying the plan could not be checked.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pipeline.config import ConfigError

MAX_ACTOR_RESTARTS = 0
"""Times one LoGo actor is started again after it died (a crash, an out-of-memory kill): none. Ray
cannot restart an actor whose constructor arguments live in the object store (it logs an error-level
line on every run saying so, ray-project/ray#57733); a failed run is rerun instead, and resumes."""
ACTOR_OPTIONS = {"max_restarts": MAX_ACTOR_RESTARTS}
"""Ray actor options for the LoGo stage (`map_batches(..., **ACTOR_OPTIONS)`): finite restarts."""


def _describe(node: Mapping[str, float]) -> str:
    return f"{node.get('CPU', 0):g} CPU, {node.get('GPU', 0):g} GPU"


@dataclass(frozen=True)
class NodeGroup:
    """A kind of node the cluster's autoscaler can add."""

    name: str
    """The node type (a KubeRay worker group)."""
    resources: Mapping[str, float]
    """Resources of one such node (CPU, GPU, ...)."""
    max_count: int
    """Nodes of this kind the cluster may hold at most (-1: no limit)."""


@dataclass(frozen=True)
class Growth:
    """What the cluster's autoscaler can add (`dataflow.cluster_growth` asks Ray)."""

    groups: tuple[NodeGroup, ...] = ()
    """The node kinds it can add."""
    known: bool = True
    """False when an autoscaler runs but does not report its node kinds (Ray's autoscaler v1)."""

    def describe(self) -> str:
        if not self.known:
            return "an autoscaler that does not report which nodes it can add"
        kinds = [f"{g.name} ({_describe(g.resources)}; up to {'any number' if g.max_count < 0 else g.max_count})"
                 for g in self.groups]
        return "an autoscaler that can add nodes " + ", ".join(kinds) if kinds else "an autoscaler with no node kinds"


def _grown(alive: list[Mapping], growth: Growth, actors: int) -> list[Mapping]:
    """The nodes the cluster can have: those alive plus as many of each kind as it may add (at most
    one per actor: more would not change the check)."""
    added = []
    for g in growth.groups:
        running = sum(1 for n in alive if all(float(n.get(k, 0)) == float(v) for k, v in g.resources.items()))
        more = actors if g.max_count < 0 else max(0, min(actors, g.max_count - running))
        added += [dict(g.resources)] * more
    return alive + added


def check_cluster(actors: int, cpus: float, gpus: float, io_cpus: float, nodes: Sequence[Mapping],
                  growth: Growth | None = None) -> str | None:
    """Refuse a plan whose actors cannot all start, or that leaves no CPU for reading and writing.

    `actors` LoGo actors of `cpus` CPUs and `gpus` GPUs each, plus tasks of `io_cpus` CPUs that read
    and write blocks; `nodes` as `ray.nodes()` reports them (the caller, `dataflow`, asks Ray);
    `growth`: what the cluster's autoscaler can add (None: it has none). Raises ConfigError naming
    the `resources.*` setting to change. Returns None when the actors fit now, else (they fit once
    the autoscaler adds nodes) a message saying what the job waits for.
    """
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive", True)]
    now = f"the Ray cluster has {len(alive)} node(s): " + "; ".join(_describe(n) for n in alive)
    try:
        _check(actors, cpus, gpus, io_cpus, alive, now)
        return None
    except ConfigError:
        if growth is None:
            raise
    wait = (f"waiting for the cluster's autoscaler to add nodes: {actors} actor(s) of {cpus:g} CPU and {gpus:g} GPU "
            f"each do not fit on the nodes it has now ({now})")
    if not growth.known:
        return (f"{wait}; it does not report which nodes it can add, so the plan could not be checked against them: "
                "if no node comes, stop the job and lower resources.actors or the per-actor resources")
    _check(actors, cpus, gpus, io_cpus, _grown(alive, growth, actors), f"{now}, and {growth.describe()}")
    return f"{wait}; it can add them ({growth.describe()})"


def _check(actors: int, cpus: float, gpus: float, io_cpus: float, alive: list[Mapping], summary: str) -> None:
    total = {key: sum(float(n.get(key, 0)) for n in alive) for key in ("CPU", "GPU")}
    if gpus > 0 and total["GPU"] == 0:
        raise ConfigError(f"resources.gpus_per_actor: each actor asks for {gpus:g} GPU, but {summary}; Ray would "
                          "wait for a GPU forever. Set resources.gpus_per_actor: 0 (or leave it out) to run on "
                          "CPUs, or join a cluster with GPUs (resources.ray_address)")
    fits = []  # actors each node can hold
    for n in alive:
        per = [float(n.get("CPU", 0)) / cpus if cpus > 0 else math.inf,
               float(n.get("GPU", 0)) / gpus if gpus > 0 else math.inf]
        fits.append(int(min(per) + 1e-9) if min(per) != math.inf else actors)
    if sum(fits) == 0:
        key = "gpus_per_actor" if gpus > 0 and all(float(n.get("GPU", 0)) < gpus for n in alive) else "cpus_per_actor"
        raise ConfigError(f"resources.{key}: one actor asks for {cpus:g} CPU and {gpus:g} GPU, more than any node "
                          f"holds ({summary}); Ray would wait for it forever. Lower resources.{key}")
    if sum(fits) < actors:
        raise ConfigError(f"resources.actors: {actors} actors of {cpus:g} CPU and {gpus:g} GPU each do not fit at "
                          f"once ({summary}: room for {sum(fits)}); Ray would wait forever for the others. Set "
                          f"resources.actors: {sum(fits)} or lower the per-actor resources")
    spare = total["CPU"] - actors * cpus
    if spare < io_cpus - 1e-9:
        raise ConfigError(f"resources.cpus_per_actor: {actors} actors x {cpus:g} CPU leave {max(spare, 0):g} of the "
                          f"cluster's {total['CPU']:g} CPUs for reading and writing, which need {io_cpus:g}; the "
                          "reads would wait forever. Lower resources.cpus_per_actor or resources.actors")
