"""Actors that cannot be placed are refused before any work, naming the setting; restarts are finite."""

from __future__ import annotations

import os
import time

import pytest

from pipeline import ConfigError
from pipeline.resources import ACTOR_OPTIONS, MAX_ACTOR_RESTARTS, check_cluster


def test_plans_the_local_cluster_cannot_run_are_refused(ray_runtime):
    # the session's Ray: one node, 2 CPUs, no GPU
    nodes = ray_runtime.nodes()
    with pytest.raises(ConfigError, match=r"resources\.gpus_per_actor: each actor asks for 1 GPU, but the Ray "
                                          r"cluster has 1 node\(s\): 2 CPU, 0 GPU; .* Set resources\.gpus_per_actor: 0"):
        check_cluster(actors=1, cpus=1.0, gpus=1.0, io_cpus=0.25, nodes=nodes)
    with pytest.raises(ConfigError, match=r"resources\.cpus_per_actor: one actor asks for 3 CPU and 0 GPU, more than "
                                          r"any node holds"):
        check_cluster(actors=1, cpus=3.0, gpus=0.0, io_cpus=0.25, nodes=nodes)
    with pytest.raises(ConfigError, match=r"resources\.cpus_per_actor: 2 actors x 1 CPU leave 0 of the cluster's 2 "
                                          r"CPUs for reading and writing, which need 0\.25"):
        check_cluster(actors=2, cpus=1.0, gpus=0.0, io_cpus=0.25, nodes=nodes)
    with pytest.raises(ConfigError, match=r"resources\.actors: 3 actors .* room for 2\).* Set resources\.actors: 2"):
        check_cluster(actors=3, cpus=1.0, gpus=0.0, io_cpus=0.0, nodes=nodes)
    check_cluster(actors=2, cpus=0.85, gpus=0.0, io_cpus=0.25, nodes=nodes)  # the default share on 2 CPUs fits


def test_actors_must_fit_node_by_node():
    nodes = [{"Resources": {"CPU": 8.0, "GPU": 1.0}, "Alive": True}, {"Resources": {"CPU": 8.0}, "Alive": True},
             {"Resources": {"CPU": 64.0, "GPU": 8.0}, "Alive": False}]
    check_cluster(actors=1, cpus=1.0, gpus=1.0, io_cpus=0.25, nodes=nodes)
    with pytest.raises(ConfigError, match=r"resources\.actors: 2 actors of 1 CPU and 1 GPU each do not fit at once "
                                          r"\(the Ray cluster has 2 node\(s\): 8 CPU, 1 GPU; 8 CPU, 0 GPU: room for 1\)"):
        check_cluster(actors=2, cpus=1.0, gpus=1.0, io_cpus=0.25, nodes=nodes)
    with pytest.raises(ConfigError, match=r"resources\.gpus_per_actor: one actor asks for 1 CPU and 2 GPU"):
        check_cluster(actors=1, cpus=1.0, gpus=2.0, io_cpus=0.25, nodes=nodes)


class _DiesOnEveryBatch:
    def __init__(self, marker: str):
        with open(marker, "a") as f:
            f.write("start\n")

    def __call__(self, batch):
        os._exit(1)


@pytest.mark.slow  # each restart starts a worker process (about 30 s here)
def test_a_dying_actor_is_restarted_a_bounded_number_of_times(ray_runtime, tmp_path):
    import ray.data

    marker = tmp_path / "starts"
    ds = ray.data.range(4, override_num_blocks=1).map_batches(
        _DiesOnEveryBatch, fn_constructor_kwargs={"marker": str(marker)}, batch_size=4,
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.5, **ACTOR_OPTIONS)
    started = time.time()
    with pytest.raises(Exception) as failure:
        ds.take_all()
    starts = marker.read_text().count("start")
    print(f"{starts} actor starts in {time.time() - started:.1f} s: {type(failure.value).__name__}")
    assert 1 <= starts <= 1 + MAX_ACTOR_RESTARTS, (starts, failure.value)
