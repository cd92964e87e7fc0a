"""deploy/, checked offline: the kustomize overlays and components render; built-in kinds validate
strictly against Kubernetes 1.31's schemas and the custom resources against the schemas in
deploy/schemas/; every container runs a real `tandem` command line with real TANDEM_* variables;
probes, ports, drain times and etcd membership agree with the flags; the Dockerfiles lint clean
and run CLI commands; the Prometheus rules load and their unit tests cover every alert."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

from cluster.cli import _parser
from cluster.planner.settings import PlannerServiceSettings
from cluster.router_settings import RouterSettings
from cluster.up_settings import UpSettings
from common.settings import settings_from_args
from kv_store.settings import KVStoreSettings
from tests.support.deploy import (
    BUILDS,
    DEPLOY,
    REPO,
    WORKLOADS,
    Container,
    command_line,
    dockerfile_instructions,
    environment,
    exec_form,
    find,
    is_tandem_image,
    kubectl,
    render,
    tandem_containers,
)
from worker_runtime.settings import WorkerSettings

pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl (for `kubectl kustomize`) is not installed")
BIN = Path(sys.executable).parent
SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.monitoring.coreos.com.v1.json",
           ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject.keda.sh.v1alpha1.json"}
BUILTIN_GROUPS = {"", "apps", "policy", "autoscaling", "rbac.authorization.k8s.io", "batch", "networking.k8s.io"}
SETTINGS = {"up": UpSettings, "worker": WorkerSettings, "router": RouterSettings, "planner": PlannerServiceSettings,
            "kvstore": KVStoreSettings}
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI parser reads TANDEM_* at construction: only the container's own may be set."""
    for name in [n for n in os.environ if n.startswith("TANDEM_")]:
        monkeypatch.delenv(name)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def direct_env_names() -> set[str]:
    """TANDEM_* variables read straight from the environment (not flags): log level, cache dir, ..."""
    pattern = re.compile(r"environ(?:\.get\(|\.setdefault\(|\[)\s*\"(TANDEM_[A-Z0-9_]+)\"")
    return {m for package in ("common", "engine", "kv_transfer", "worker_runtime", "prefill_worker", "decode_worker",
                              "cluster")
            for path in (REPO / package).rglob("*.py") for m in pattern.findall(path.read_text())}


@pytest.mark.parametrize("build", BUILDS)
def test_renders(build: str) -> None:
    """Every overlay, the base with each component, and production with every option render."""
    docs = render(build)
    assert find(docs, "Deployment", "router") and find(docs, "StatefulSet", "etcd")


def test_builtin_kinds_validate_strictly(tmp_path: Path) -> None:
    """kubernetes-validate --strict against 1.31 (each distinct object once); nothing rendered
    escapes validation."""
    builtin: dict[str, dict] = {}
    for build in BUILDS:
        for doc in render(build):
            if (doc["apiVersion"], doc["kind"]) in SCHEMAS:
                continue
            group = doc["apiVersion"].rpartition("/")[0]
            assert group in BUILTIN_GROUPS, f"{build}: {doc['kind']} ({doc['apiVersion']}) has no schema to check"
            builtin[json.dumps(doc, sort_keys=True)] = doc
    manifest = tmp_path / "builtin.yaml"
    manifest.write_text(yaml.safe_dump_all(list(builtin.values())))
    out = subprocess.run([str(BIN / "kubernetes-validate"), "--strict", "--quiet", "-k", "1.31.0", str(manifest)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ERROR" not in out.stdout + out.stderr, out.stdout + out.stderr


def test_custom_resources_match_schemas(tmp_path: Path) -> None:
    """check-jsonschema with deploy/schemas/; the schemas are valid and reject what the CRDs reject."""
    for (api, kind), schema_name in SCHEMAS.items():
        schema_path = DEPLOY / "schemas" / schema_name
        jsonschema.Draft7Validator.check_schema(json.loads(schema_path.read_text()))
        instances = [d for build in BUILDS for d in render(build) if (d["apiVersion"], d["kind"]) == (api, kind)]
        assert instances, f"no {kind} rendered anywhere"
        files = []
        for i, doc in enumerate(instances):
            files.append(tmp_path / f"{kind}-{i}.yaml")
            files[-1].write_text(yaml.safe_dump(doc))
        out = subprocess.run([str(BIN / "check-jsonschema"), "--schemafile", str(schema_path), *map(str, files)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        validator = jsonschema.Draft7Validator(json.loads(schema_path.read_text()))
        broken = json.loads(json.dumps(instances[0]))
        broken["spec"]["unknownField"] = 1
        assert not validator.is_valid(broken)
        del broken["spec"]["unknownField"], broken["spec"]["scaleTargetRef" if kind == "ScaledObject" else "selector"]
        assert not validator.is_valid(broken)


def _stand_in_secret_files(container: Container, env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """Paths into Secret volumes (TLS files, API keys) point at stand-in files here."""
    secret_volumes = {v["name"] for v in container.pod.get("volumes", []) if "secret" in v}
    mounts = [m["mountPath"] for m in container.spec.get("volumeMounts", []) if m["name"] in secret_volumes]
    for name, value in env.items():
        if any(value.startswith(m + "/") for m in mounts):
            env[name] = str(tmp_path / name)
            Path(env[name]).write_text("stand-in-api-key\n")
    return env


@pytest.mark.parametrize("build", BUILDS)
def test_containers_run_real_command_lines(build: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each Tandem container: the image's ENTRYPOINT (no command), a `tandem` subcommand, flags of
    that subcommand, TANDEM_* variables it knows, and the whole parses into valid settings."""
    commands, direct = subcommands(), direct_env_names()
    containers = list(tandem_containers(build))
    assert {c.workload["metadata"]["name"] for c in containers} >= {"router", "prefill", "decode", "planner"}
    for container in containers:
        assert "command" not in container.spec, f"{container.name}: leave the image's ENTRYPOINT (tandem)"
        argv = command_line(container)
        assert argv and argv[0] in commands, f"{container.name}: {argv[:1]} is no tandem subcommand"
        sub = commands[argv[0]]
        known = {s for a in sub._actions for s in a.option_strings}
        unknown = [a for a in argv if a.startswith("--") and a.split("=")[0] not in known]
        assert not unknown, f"{container.name}: `tandem {argv[0]}` has no {unknown}"
        env = _stand_in_secret_files(container, environment(container), tmp_path)
        flag_env = {f"TANDEM_{a.dest.upper()}" for a in sub._actions if a.option_strings and a.dest != "help"}
        tandem_env = {k: v for k, v in env.items() if k.startswith("TANDEM_")}
        stray = sorted(set(tandem_env) - flag_env - direct)
        assert not stray, f"{container.name}: `tandem {argv[0]}` reads no {stray}"
        for name, value in tandem_env.items():
            monkeypatch.setenv(name, value)
        settings = settings_from_args(SETTINGS[argv[0]], _parser().parse_args(argv))  # their own validation
        if isinstance(settings, WorkerSettings):
            settings.engine_config()  # and the engine's
        for name in tandem_env:
            monkeypatch.delenv(name)


@pytest.mark.parametrize("build", BUILDS)
def test_ports_probes_and_pod_ip(build: str) -> None:
    """Ports named grpc/http/metrics are the flags' ports; probes ask gRPC health on the gRPC port
    (TCP where TLS is on: the kubelet's gRPC probe has no TLS), the planner's (no gRPC) GET its
    /metrics; workers and KV stores bind and advertise their pod IP under their pod name; Prometheus
    annotations name the metrics port."""
    tls = "tls" in build
    for c in tandem_containers(build):
        env, role = environment(c), c.flag("--role")
        annotations = c.workload["spec"]["template"]["metadata"]["annotations"]
        if c.spec["args"][0] == "planner":
            port = c.port("metrics")
            assert port == int(c.flag("--planner-metrics-port") or 0) == int(annotations["prometheus.io/port"])
            assert c.flag("--planner-metrics-host") == "0.0.0.0" and annotations["prometheus.io/scrape"] == "true"
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert c.spec[kind]["httpGet"] == {"path": "/metrics", "port": "metrics"}, f"{c.name}: {kind}"
            continue
        assert c.port("grpc") == int(c.flag("--grpc-port") or 0), c.name
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.spec[kind]
            if tls:
                assert probe.get("tcpSocket") == {"port": "grpc"} and "grpc" not in probe, f"{c.name}: {kind}"
            else:
                assert probe["grpc"] == {"port": c.port("grpc")}, f"{c.name}: {kind} {probe}"
        assert annotations["prometheus.io/scrape"] == "true"
        if c.spec["args"][0] in ("worker", "kvstore"):  # found through etcd at the address they advertise
            if c.spec["args"][0] == "worker":
                assert role in ("prefill", "decode", "both") and c.workload["metadata"]["name"] == role
            assert c.port("metrics") == int(c.flag("--metrics-port") or 0) == int(annotations["prometheus.io/port"])
            host = next(v for v in c.spec["env"] if v["name"] == "TANDEM_HOST")
            assert host["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", f"{c.name}: advertise the pod IP"
            identity = "TANDEM_WORKER_ID" if c.spec["args"][0] == "worker" else "TANDEM_STORE_ID"
            assert env[identity] == "pod-0", c.name  # metadata.name: unique per pod
        else:
            assert c.flag("--host") == "0.0.0.0" and c.port("http") == int(c.flag("--http-port") or 0)
            assert int(annotations["prometheus.io/port"]) == c.port("http")


@pytest.mark.parametrize("build", [b for b in BUILDS if "kv-store" in b.split("+")])
def test_kv_store_component(build: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """components/kv-store: a `tandem kvstore` Deployment (the workers' image and hardening, the cluster's etcd
    and cluster name, a capacity its memory limit covers, gRPC health probes on the port it serves) and the
    prefill and decode workers on it, each with the second tier it needs as the staging area."""
    docs = render(build)
    [store] = [c for c in tandem_containers(build) if c.workload["metadata"]["name"] == "kvstore"]
    assert store.workload["kind"] == "Deployment" and store.spec["args"][0] == "kvstore", store.name
    env = environment(store)
    for name, value in _stand_in_secret_files(store, dict(env), tmp_path).items():
        monkeypatch.setenv(name, value)
    settings = settings_from_args(KVStoreSettings, _parser().parse_args(command_line(store)))
    [config] = find(docs, "ConfigMap")
    assert (settings.etcd, settings.cluster) == (config["data"]["TANDEM_ETCD"], config["data"]["TANDEM_CLUSTER"])
    assert settings.capacity_gib > 0
    memory = {k: store.spec["resources"][k]["memory"] for k in ("requests", "limits")}
    assert all(v.endswith("Gi") and float(v[:-2]) > settings.capacity_gib for v in memory.values()), memory
    tls = settings.tls_files() is not None
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):  # kubelet gRPC probes speak plaintext only
        probe = {"tcpSocket": {"port": "grpc"}} if tls else {"grpc": {"port": settings.grpc_port}}
        assert {k: v for k, v in store.spec[kind].items() if k in ("grpc", "tcpSocket")} == probe, kind
        assert store.port("grpc") == settings.grpc_port
    workers = {c.flag("--role"): c for c in tandem_containers(build) if c.spec["args"][0] == "worker"}
    for worker in workers.values():  # the same TLS files and KV-link secret as the workers: their links reach it
        worker_env = environment(worker)
        assert all(worker_env.get(k) == env.get(k) for k in ("TANDEM_TLS_CA", "TANDEM_TLS_CERT", "TANDEM_TLS_KEY",
                                                             "TANDEM_KV_SECRET")), worker.name
    assert set(workers) == {"prefill", "decode"}
    for worker in workers.values():  # the workers' image and hardening
        assert is_tandem_image(store.spec["image"]) and worker.spec["image"] == store.spec["image"], worker.name
        assert worker.pod["securityContext"] == store.pod["securityContext"], worker.name
        assert worker.spec["securityContext"] == store.spec["securityContext"], worker.name
    for role, worker in workers.items():
        worker_env = environment(worker)
        assert worker_env.get("TANDEM_USE_KV_STORE") == "true", f"{role}: not on the KV store"
        assert float(worker_env.get("TANDEM_KV_OFFLOAD_GIB", "0")) > 0, f"{role}: no second tier to stage in"


@pytest.mark.parametrize("build", BUILDS)
def test_drain_fits_the_grace_period(build: str) -> None:
    """terminationGracePeriodSeconds covers preStop + --grace-s + 5 s to shut down; a PDB guards
    every workload."""
    docs = render(build)
    for c in tandem_containers(build):
        pre_stop = c.spec.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        default = "0" if c.spec["args"][0] == "planner" else "30"  # the planner has no --grace-s: no drain
        grace = float(c.flag("--grace-s") or environment(c).get("TANDEM_GRACE_S", default))
        assert c.pod["terminationGracePeriodSeconds"] >= pre_stop + grace + 5, c.name
    for workload in (d for d in docs if d["kind"] in WORKLOADS):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert any(all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())
                   for pdb in find(docs, "PodDisruptionBudget")), f"{build}: no PDB for {workload['metadata']['name']}"


@pytest.mark.parametrize("build", BUILDS)
def test_etcd_initial_cluster_names_every_member(build: str) -> None:
    [etcd] = find(render(build), "StatefulSet", "etcd")
    env = {v["name"]: v.get("value") for v in etcd["spec"]["template"]["spec"]["containers"][0]["env"]}
    service, replicas = etcd["spec"]["serviceName"], etcd["spec"]["replicas"]
    assert env["ETCD_INITIAL_CLUSTER"] == ",".join(
        f"etcd-{i}=http://etcd-{i}.{service}:2380" for i in range(replicas))
    assert env["ETCD_INITIAL_ADVERTISE_PEER_URLS"] == f"http://$(POD_NAME).{service}:2380"
    assert find(render(build), "Service", service)[0]["spec"]["clusterIP"] == "None"
    assert replicas == {"overlays/dev": 1, "overlays/gpu": 3}.get(build, replicas)


def test_gpu_overlay_places_pools_on_gpus() -> None:
    """Production: one GPU per worker, prefill and decode on their own node pools; dev needs none."""
    pools = {}
    for c in tandem_containers("overlays/gpu"):
        assert c.spec["image"].endswith(f":{VERSION}-cuda"), c.name
        if c.spec["args"][0] == "worker":
            resources = c.spec["resources"]
            assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "1"
            pools[c.workload["metadata"]["name"]] = c.pod["nodeSelector"]["tandem/node-pool"]
    assert pools == {"prefill": "prefill", "decode": "decode"}
    for c in tandem_containers("overlays/dev"):
        assert c.spec["image"].endswith(f":{VERSION}-cpu") and "nvidia.com/gpu" not in str(c.spec["resources"])


def test_tensor_parallel_component_gives_each_rank_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """components/tensor-parallel: prefill workers of 2 ranks with 2 GPUs each, decode workers of 1 rank with 1, and
    a planner that counts them so."""
    degrees = {}
    for c in tandem_containers("overlays/gpu+tensor-parallel"):
        if c.spec["args"][0] != "worker":
            continue
        for name, value in environment(c).items():
            monkeypatch.setenv(name, value)
        settings = settings_from_args(WorkerSettings, _parser().parse_args(command_line(c)))
        for name in environment(c):
            monkeypatch.delenv(name)
        gpus = c.spec["resources"]
        assert gpus["requests"]["nvidia.com/gpu"] == gpus["limits"]["nvidia.com/gpu"] == str(
            settings.tensor_parallel_size), c.name
        degrees[settings.role] = settings.tensor_parallel_size
    assert degrees == {"prefill": 2, "decode": 1}
    [planner] = [c for c in tandem_containers("overlays/gpu+tensor-parallel") if c.spec["args"][0] == "planner"]
    env = environment(planner)  # the planner counts a prefill worker as its 2 devices
    assert (env.get("TANDEM_PREFILL_WORKER_DEVICES"), env.get("TANDEM_DECODE_WORKER_DEVICES", "1")) == ("2", "1")


def test_planner_rbac() -> None:
    docs = render("overlays/gpu")
    [role] = find(docs, "Role", "tandem-planner")
    allowed = {(r, v) for rule in role["rules"] for r in rule["resources"] for v in rule["verbs"]}
    assert {("deployments", "get"), ("deployments/scale", "get"), ("deployments/scale", "patch")} <= allowed
    [binding] = find(docs, "RoleBinding", "tandem-planner")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "tandem-planner", "namespace": "tandem"}]
    assert binding["roleRef"]["name"] == "tandem-planner" and find(docs, "ServiceAccount", "tandem-planner")


@pytest.mark.parametrize("build", BUILDS)
def test_planner_deployment(build: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One planner, as the RoleBinding's ServiceAccount (with its token: in-cluster config, its own
    namespace), scaling Deployments that exist and that its Role names, from the router Service's
    /metrics or from Prometheus; keda and hpa replace it (0 replicas); no other pod has its identity."""
    docs = render(build)
    [deployment] = find(docs, "Deployment", "planner")
    pod = deployment["spec"]["template"]["spec"]
    [binding] = find(docs, "RoleBinding", "tandem-planner")
    [role] = find(docs, "Role", "tandem-planner")
    assert [{"kind": "ServiceAccount", "name": pod["serviceAccountName"]}] == [
        {k: s[k] for k in ("kind", "name")} for s in binding["subjects"]]
    assert pod["automountServiceAccountToken"] is True and deployment["spec"]["strategy"]["type"] == "Recreate"
    others = [d for d in docs if d["kind"] in WORKLOADS and d is not deployment]
    assert all(d["spec"]["template"]["spec"].get("serviceAccountName") in (None, "default") for d in others)
    scaler = {"keda", "hpa"} & set(build.replace("+", "/").split("/"))
    assert deployment["spec"]["replicas"] == (0 if scaler else 1), build
    [container] = [c for c in tandem_containers(build) if c.workload is deployment]
    for name, value in environment(container).items():
        monkeypatch.setenv(name, value)
    settings = settings_from_args(PlannerServiceSettings, _parser().parse_args(command_line(container)))
    assert settings.kube_api_server == "" and settings.kube_namespace == ""
    scaled = {settings.prefill_deployment, settings.decode_deployment}
    assert scaled == {"prefill", "decode"} and all(find(docs, "Deployment", n) for n in scaled)
    assert scaled <= {n for rule in role["rules"] for n in rule.get("resourceNames", [])}
    if settings.prometheus_url:
        assert "namespace=" in settings.prometheus_selector, "one Tandem cluster per namespace"
    else:  # the router Service's HTTP port; a single router: a Service over several would mix counters
        match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)/metrics", settings.router_metrics_url)
        assert match, settings.router_metrics_url
        [service] = find(docs, "Service", match.group(1))
        assert any(p["port"] == int(match.group(2)) and p["name"] == "http" for p in service["spec"]["ports"])
        assert find(docs, "Deployment", "router")[0]["spec"].get("replicas", 1) == 1, build
    if "tls" in build:  # the router serves HTTPS; `tandem planner` scrapes it over plain HTTP only
        assert settings.prometheus_url, build
    for monitor in find(docs, "ServiceMonitor"):
        if monitor["spec"]["selector"].get("matchLabels", {}).get("app.kubernetes.io/component") == "planner":
            break
    else:
        assert not find(docs, "ServiceMonitor"), f"{build}: ServiceMonitors, but none for the planner"


def test_scrapers_and_scalers_point_at_real_objects() -> None:
    """ServiceMonitors select Services that have the port they name; HPAs and ScaledObjects scale
    existing Deployments; the recording rules their queries use exist."""
    recorded = {r["record"] for f in (DEPLOY / "prometheus" / "rules").glob("*.yml")
                for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"] if "record" in r}
    for build in ("overlays/gpu+rdma+tls+keda", "overlays/gpu+hpa+kv-offload"):
        docs = render(build)
        for monitor in find(docs, "ServiceMonitor"):
            selected = [s for s in find(docs, "Service") if all(
                s["metadata"].get("labels", {}).get(k) == v for k, v in monitor["spec"]["selector"].get(
                    "matchLabels", {}).items())]
            for endpoint in monitor["spec"]["endpoints"]:
                assert any(p["name"] == endpoint["port"] for s in selected for p in s["spec"]["ports"]), monitor
        for scaler in find(docs, "ScaledObject") + find(docs, "HorizontalPodAutoscaler"):
            assert find(docs, "Deployment", scaler["spec"]["scaleTargetRef"]["name"])
        queries = json.dumps([d["spec"] for d in find(docs, "ScaledObject")])
        assert set(re.findall(r"tandem:[a-z0-9_:]+", queries)) <= recorded


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile(dockerfile: Path) -> None:
    """hadolint clean; multi-stage from pinned bases; non-root; a HEALTHCHECK; ENTRYPOINT is the
    `tandem` console script and CMD a command line its parser accepts."""
    out = subprocess.run([str(BIN / "hadolint"), "--no-color", "-t", "style", str(dockerfile)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    steps = dockerfile_instructions(dockerfile)
    args = dict(a.split("=", 1) for k, a in steps if k == "ARG" and "=" in a)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0]) for k, rest in steps if k == "FROM"]
    assert len(bases) >= 2 and all(re.fullmatch(r"[\w./-]+:\d[\w.-]*", b) for b in bases), bases
    final = [k_rest for k_rest in steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM"):]]
    user = [rest for k, rest in final if k == "USER"]
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert any(k == "HEALTHCHECK" for k, _ in final)
    [entrypoint] = [exec_form(rest) for k, rest in final if k == "ENTRYPOINT"]
    [cmd] = [exec_form(rest) for k, rest in final if k == "CMD"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert entrypoint == ["tandem"] and project["project"]["scripts"]["tandem"] == "cluster.cli:main"
    settings_from_args(SETTINGS[cmd[0]], _parser().parse_args(cmd))
    # every package the wheel installs is in the image's build context
    packages = {p.removesuffix("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {rest.split()[0] for k, rest in steps if k == "COPY" and not rest.startswith("--")}
    assert packages <= copied, f"{dockerfile.name} does not COPY {sorted(packages - copied)}"


def test_healthcheck_finds_the_grpc_port() -> None:
    spec = importlib.util.spec_from_file_location("healthcheck", DEPLOY / "docker" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    healthcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(healthcheck)
    assert healthcheck._target(["up", "--host", "0.0.0.0"]) == ("127.0.0.1", 50051, False)
    assert healthcheck._target(["worker", "--etcd", "e:2379", "--host", "10.1.2.3", "--grpc-port", "50061"]) == (
        "10.1.2.3", 50061, False)
    assert healthcheck._target(["worker", "--etcd", "e:2379"]) is None  # a free port, chosen at start


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (scripts/setup.sh installs "
                                    "Debian's prometheus package where it runs as root or with sudo)")
RULES = sorted((DEPLOY / "prometheus" / "rules").glob("*.yml"))
RULE_TESTS = sorted((DEPLOY / "prometheus" / "tests").glob("*.yaml"))


@needs_promtool
def test_promtool_check_and_test_rules() -> None:
    for command in (["check", "rules", *map(str, RULES)], ["test", "rules", *map(str, RULE_TESTS)]):
        out = subprocess.run([PROMTOOL or "promtool", *command], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr


def test_rule_tests_cover_every_alert_firing_and_not() -> None:
    alerts = {r["alert"] for f in RULES for g in yaml.safe_load(f.read_text())["groups"] for r in g["rules"]
              if "alert" in r}
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert alerts and fired == alerts and quiet == alerts, (alerts - fired, alerts - quiet)
