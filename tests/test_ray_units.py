"""The Ray backend's pure parts: placement rules, what the actors get from the driver, the flags.
(The actors, the fleet and `tandem up --ray` run on a real Ray cluster in tests/test_ray_cluster.py.)"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from cluster import cli
from cluster.ray_backend.actor import ServerInfo, _runner
from cluster.ray_backend.fleet import ActorFleet, Member
from cluster.ray_backend.launcher import ActorFactory, check_reachable, forwarded_env, member_event
from cluster.ray_backend.placement import ActorPlacement, plan_placement
from cluster.up_events import KVStoreUp
from cluster.up_process import REPO
from cluster.up_settings import UpSettings
from common.settings import settings_from_args
from kv_store.settings import KVStoreSettings

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


def test_a_tensor_parallel_pool_reserves_a_device_and_cpus_per_rank() -> None:
    degrees = {"prefill": 4, "decode": 1}
    placement = plan_placement("auto", {**BOTH_POOLS, "GPU": 8.0}, ["prefill", "decode"], 2.0, "n", degrees)
    assert placement.for_component("prefill") == ActorPlacement(8.0, 4.0, {"prefill": 1.0})
    assert placement.for_component("decode") == ActorPlacement(2.0, 1.0, {"decode": 1.0})
    settings = UpSettings(prefill=1, decode=1, tensor_parallel_size=2, prefill_tensor_parallel_size=4)
    assert [settings.degree(role) for role in ("prefill", "decode", "both")] == [4, 2, 2]
    assert "--tensor-parallel-size 4" in " ".join(settings.worker_args("prefill", "127.0.0.1:2379"))


def test_tandem_up_tells_its_planner_each_pools_devices_per_worker() -> None:
    from cluster.cli import planner_for

    up = UpSettings(prefill=1, decode=1, planner=True, prefill_tensor_parallel_size=2)
    planner = planner_for(up, cli._parser().parse_args(["up", "--planner", "true", "--prefill", "1",
                                                        "--prefill-tensor-parallel-size", "2"]))
    assert planner is not None and (planner.prefill_worker_devices, planner.decode_worker_devices) == (2, 1)


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


def test_a_kv_store_goes_to_its_resource_else_anywhere_without_cpu_or_gpu() -> None:
    roles = ["router", "kvstore", "prefill", "decode"]
    placement = plan_placement("auto", {**BOTH_POOLS, "GPU": 4.0, "kvstore": 2.0}, roles, 2.0, "n")
    assert placement.mode == "resources"
    assert placement.for_component("kvstore") == ActorPlacement(resources={"kvstore": 1.0})
    # no "kvstore" resource: anywhere, in every mode; the stores' resource is never required
    for mode in ("auto", "resources", "any"):
        placement = plan_placement(mode, BOTH_POOLS, roles, 2.0, "n")  # type: ignore[arg-type]
        assert placement.for_component("kvstore") == ActorPlacement()
    assert plan_placement("auto", BOTH_POOLS, roles, 2.0, "n").mode == "resources"
    assert ActorPlacement().options() == {"num_cpus": 0.0, "num_gpus": 0.0, "resources": {}}


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


def test_kv_store_settings_are_what_tandem_kvstore_would_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    up = UpSettings(ray="auto", kv_store=2, kv_store_gib=0.5, kv_backends="tcp", lease_ttl_s=5, cluster="c1",
                    etcd="10.0.0.1:2379", etcd_user="u", etcd_password="pw")
    in_driver = up.kv_store_settings("10.0.0.1:2379")
    for name, value in up.security_env().items():  # as the local launcher hands them to `tandem kvstore`
        monkeypatch.setenv(name, value)
    parsed = settings_from_args(KVStoreSettings, cli._parser().parse_args(up.kv_store_args("10.0.0.1:2379")))
    assert in_driver == parsed
    assert (in_driver.kv_secret, in_driver.etcd_password) == (parsed.kv_secret, parsed.etcd_password)
    assert parsed.kv_secret == up.kv_secret and parsed.etcd_password == "pw"  # workers and stores: one secret
    assert (parsed.capacity_gib, parsed.backends, parsed.cluster) == (0.5, ("tcp",), "c1")


def test_the_kvstore_component_runs_a_store_and_is_announced_as_one() -> None:
    up = UpSettings(ray="auto", kv_store=1)
    factory = ActorFactory(up, "10.0.0.1:2379", plan_placement("any", {"CPU": 2.0}, ["kvstore"], 1.0, "n"))
    settings = factory.server_settings("kvstore")
    assert settings == up.kv_store_settings("10.0.0.1:2379")
    assert callable(_runner("kvstore", settings))
    with pytest.raises(AssertionError):
        _runner("kvstore", up.worker_settings("decode", "10.0.0.1:2379"))
    member = Member("kvstore", "kvstore-0", handle=None,
                    info=ServerInfo("kvstore", ("kvstore-10.0.0.2-4000", "10.0.0.2:4000", "9100"), 77, "ab12"))
    event = member_event(member)
    assert event == KVStoreUp("kvstore-10.0.0.2-4000", "10.0.0.2:4000", 77, 9100, "ab12", "kvstore-0")
    assert event.text() == "kvstore kvstore-10.0.0.2-4000 10.0.0.2:4000 pid=77 metrics=9100 node=ab12 actor=kvstore-0"
    assert KVStoreUp.from_ready(["s", "h:1", "2"], 3).text() == "kvstore s h:1 pid=3 metrics=2"  # local: no suffix


def test_stopping_drains_the_router_then_the_workers_then_the_stores(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each wave starts once the one before it finished: a worker never loses its store while it drains."""
    import ray

    seen: list[tuple[str, ...]] = []

    class Handle:
        def __init__(self, name: str) -> None:
            self.name = name
            self.drain = self

        def remote(self, timeout_s: float) -> str:
            seen.append(("drain", self.name))
            return self.name

    def wait(refs: list[Any], num_returns: int = 1, timeout: float | None = None) -> tuple[list[Any], list[Any]]:
        if timeout:  # a wave's wait, not the final look at each drain
            seen.append(("wait", *sorted(refs)))
        return refs, []

    monkeypatch.setattr(ray, "wait", wait)
    monkeypatch.setattr(ray, "kill", lambda handle, no_restart: seen.append(("kill", handle.name)))
    monkeypatch.setattr(ray, "get", lambda ref, timeout=None: True)
    fleet = ActorFleet(lambda component, name: Handle(name), lambda member: None, drain_timeout_s=1.0)
    fleet.start({"kvstore": 1, "router": 1, "prefill": 1, "decode": 1})
    fleet.stop()
    assert seen[:7] == [("drain", "router-1"), ("wait", "router-1"),
                        ("drain", "prefill-2"), ("drain", "decode-3"), ("wait", "decode-3", "prefill-2"),
                        ("drain", "kvstore-0"), ("wait", "kvstore-0")]
    assert sorted(seen[7:]) == [("kill", n) for n in ("decode-3", "kvstore-0", "prefill-2", "router-1")]
    assert not fleet.members()


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
              for r in ("prefill", "decode", "kvstore")}
    placement = plan_placement("auto", {**totals, "router": 1, "GPU": 5}, ["router", "kvstore", "prefill", "decode"],
                               1.0, "n")
    assert placement.mode == "resources" and placement.router == ActorPlacement(resources={"router": 1.0})
    assert placement.for_component("kvstore") == ActorPlacement(resources={"kvstore": 1.0})
    [store_node] = [res for res in pools.values() if "kvstore" in res]
    assert store_node.get("CPU") == 0 and not {"prefill", "decode"} & set(store_node)  # no worker lands there
