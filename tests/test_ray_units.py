"""The Ray backend's pure parts: placement rules, what the actors get from the driver, the flags.
(The actors, the fleet and `tandem up --ray` run on a real Ray cluster in tests/test_ray_cluster.py.)"""

from __future__ import annotations

import socket

import pytest

from cluster.ray_backend.launcher import check_reachable, forwarded_env
from cluster.ray_backend.placement import ActorPlacement, plan_placement
from cluster.up_process import REPO
from cluster.up_settings import UpSettings

BOTH_POOLS = {"CPU": 8.0, "prefill": 2.0, "decode": 2.0}


def test_resources_when_the_cluster_defines_them() -> None:
    placement = plan_placement("auto", BOTH_POOLS, ["router", "prefill", "decode"], 2.0, "node-a")
    assert placement.mode == "resources"
    assert placement.for_component("prefill") == ActorPlacement(2.0, resources={"prefill": 1.0})
    assert placement.for_component("decode") == ActorPlacement(2.0, resources={"decode": 1.0})
    assert placement.for_component("both") == ActorPlacement(2.0, resources={"decode": 1.0})
    assert placement.for_component("router") == ActorPlacement(near_node="node-a")  # no "router" resource


def test_with_gpus_each_worker_takes_one_besides_its_resource() -> None:
    placement = plan_placement("auto", {**BOTH_POOLS, "GPU": 8.0}, ["prefill", "decode"], 4.0, "n")
    assert placement.mode == "resources"
    assert placement.for_component("decode") == ActorPlacement(4.0, 1.0, {"decode": 1.0})
    assert plan_placement("any", {**BOTH_POOLS, "GPU": 8.0}, ["decode"], 1.0, "n").for_component(
        "decode") == ActorPlacement(1.0)  # any: the user's choice, no device reserved


def test_auto_falls_back_to_gpus_then_anywhere() -> None:
    gpus = plan_placement("auto", {"CPU": 8.0, "GPU": 4.0, "decode": 1.0}, ["prefill", "decode"], 1.0, "n")
    assert gpus.mode == "gpus" and gpus.for_component("prefill") == ActorPlacement(1.0, num_gpus=1.0)
    anywhere = plan_placement("auto", {"CPU": 8.0}, ["decode"], 1.0, "n")
    assert anywhere.mode == "any" and anywhere.for_component("decode") == ActorPlacement(1.0)
    # only the pools asked for need their resource
    assert plan_placement("auto", {"CPU": 2.0, "decode": 1.0}, ["router", "decode"], 1.0, "n").mode == "resources"


def test_a_router_resource_places_the_router() -> None:
    placement = plan_placement("any", {"CPU": 2.0, "router": 1.0}, ["decode"], 1.0, "n")
    assert placement.for_component("router") == ActorPlacement(resources={"router": 1.0})


def test_what_the_cluster_lacks_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="no 'prefill' resource"):
        plan_placement("resources", {"CPU": 8.0, "decode": 1.0}, ["prefill", "decode"], 1.0, "n")
    with pytest.raises(ValueError, match="no GPU"):
        plan_placement("gpus", {"CPU": 8.0}, ["decode"], 1.0, "n")


def test_ray_options_of_a_placement() -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    assert ActorPlacement(1.5, resources={"decode": 1.0}).options() == {
        "num_cpus": 1.5, "num_gpus": 0.0, "resources": {"decode": 1.0}}
    node = "ab" * 28  # a Ray node id: 28 bytes in hex
    strategy = ActorPlacement(near_node=node).options()["scheduling_strategy"]
    assert isinstance(strategy, NodeAffinitySchedulingStrategy)
    assert strategy.node_id == node and strategy.soft


def test_actors_get_transport_and_tandem_variables_but_no_secrets() -> None:
    environ = {"UCX_NET_DEVICES": "mlx5_0:1", "NCCL_DEBUG": "INFO", "NIXL_LOG_LEVEL": "INFO",
               "TANDEM_LOG_LEVEL": "DEBUG", "TANDEM_ETCD_PASSWORD": "p", "TANDEM_API_KEYS": "k", "HOME": "/root"}
    assert forwarded_env(environ) == {"UCX_NET_DEVICES": "mlx5_0:1", "NCCL_DEBUG": "INFO", "NIXL_LOG_LEVEL": "INFO",
                                      "TANDEM_LOG_LEVEL": "DEBUG"}


def test_worker_and_router_settings_are_what_their_processes_would_parse() -> None:
    up = UpSettings(ray="auto", prefill_timeout_s=7.0, max_num_seqs=9, etcd_password="pw", api_keys="k1,k2",
                    etcd="10.0.0.1:2379", etcd_user="u")
    worker = up.worker_settings("decode", "10.0.0.1:2379")
    assert (worker.role, worker.etcd, worker.prefill_timeout_s, worker.max_num_seqs) == (
        "decode", "10.0.0.1:2379", 7.0, 9)
    assert worker.etcd_access().password == "pw" and worker.etcd_user == "u"
    router = up.router_settings("10.0.0.1:2379")
    assert router.api_keys == "k1,k2" and router.etcd_password == "pw" and router.http_port == 8000


def test_ray_flags_are_validated() -> None:
    with pytest.raises(ValueError, match="ray_placement"):
        UpSettings(ray="auto", ray_placement="nowhere")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ray_max_restarts"):
        UpSettings(ray="auto", ray_max_restarts=-1)
    with pytest.raises(ValueError, match="ray_worker_cpus"):
        UpSettings(ray="auto", ray_worker_cpus=float("nan"))


def test_an_unreachable_ray_address_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(RuntimeError, match=f"no Ray cluster at 127.0.0.1:{port}"):
            check_reachable(f"127.0.0.1:{port}", timeout_s=2)
    check_reachable("auto")  # left to Ray


def test_the_ray_cluster_config_is_valid_and_gives_every_pool_its_resource() -> None:
    """deploy/ray/cluster.yaml against the cluster launcher's own schema (Ray's validate_config)."""
    import copy

    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((REPO / "deploy" / "ray" / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["resources"]
    assert head == {"router": 1, "CPU": 0}  # the router's node takes no worker
    pools = {name: t["resources"] for name, t in types.items() if name != config["head_node_type"]}
    totals = {r: sum(res.get(r, 0) * types[n]["min_workers"] for n, res in pools.items())
              for r in ("prefill", "decode")}
    placement = plan_placement("auto", {**totals, "router": 1, "GPU": 5}, ["router", "prefill", "decode"], 1.0, "n")
    assert placement.mode == "resources" and placement.router == ActorPlacement(resources={"router": 1.0})
