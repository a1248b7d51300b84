"""deploy/: the Kubernetes manifests validate offline against the API's OpenAPI schemas
(kubernetes-validate, strict: unknown fields are errors) and agree with the code they run; the
Dockerfile names what exists."""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from weft.cni.plugin import DEFAULT_SOCKET
from weft.router.config import DEFAULT_DATA_DIR, DEFAULT_PORT

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "deploy" / "kubernetes" / "weft.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
VERSIONS = ["1.28.0", "1.31.0", "1.37.0"]  # oldest supported .. newest schema shipped


def docs() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def by_kind(kind: str) -> dict[str, Any]:
    (found,) = [d for d in docs() if d["kind"] == kind]
    return found


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_strictly(version: str) -> None:
    kinds = []
    for doc in docs():
        kubernetes_validate.validate(doc, version, strict=True)
        kinds.append(doc["kind"])
    assert kinds == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet"]


def test_the_validator_catches_mistakes() -> None:
    ds = by_kind("DaemonSet")
    wrong_type = copy.deepcopy(ds)
    wrong_type["spec"]["template"]["spec"]["hostNetwork"] = "yes"
    typo = copy.deepcopy(ds)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    for bad in (wrong_type, typo):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, VERSIONS[-1], strict=True)


def test_rbac_only_reads_nodes_and_what_network_policy_needs() -> None:
    role = by_kind("ClusterRole")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
         "verbs": ["list", "watch"]},
    ]
    # what weft.k8s.netpol follows is exactly what the role grants
    from weft.k8s.netpol import _LISTS

    assert set(_LISTS) == {"namespaces", "pods", "networkpolicies"}
    binding = by_kind("ClusterRoleBinding")
    sa = by_kind("ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}]
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]


def test_daemonset_matches_the_code() -> None:
    ds = by_kind("DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    assert ds["spec"]["selector"]["matchLabels"].items() <= ds["spec"]["template"]["metadata"][
        "labels"].items()
    (init,) = pod["initContainers"]
    assert init["command"][:3] == ["python3", "-m", "weft.k8s.install"]
    assert importlib.util.find_spec("weft.k8s.install") is not None
    mounts = {m["mountPath"] for m in init["volumeMounts"]}
    assert mounts == {"/host/opt/cni/bin", "/host/etc/cni/net.d", "/host/opt/weft"}

    (router,) = pod["containers"]
    assert router["securityContext"]["privileged"] is True
    args = router["args"]
    assert args[0] == "router" and "--k8s" in args
    flags = dict(a.split("=", 1) for a in args if "=" in a)
    assert flags["--data-dir"] == DEFAULT_DATA_DIR
    assert flags["--api-socket"] == DEFAULT_SOCKET  # where the installed plugin looks
    status_port = int(flags["--status-addr"].rsplit(":", 1)[1])
    env = {e["name"]: e for e in router["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["WEFT_PASSWORD"]["valueFrom"]["secretKeyRef"]["optional"] is True
    ports = {(p["containerPort"], p["protocol"]): p["name"] for p in router["ports"]}
    assert ports[(DEFAULT_PORT, "TCP")] == "control" and ports[(DEFAULT_PORT, "UDP")] == "sleeve"
    assert ports[(status_port, "TCP")] == "metrics"
    probe = router["readinessProbe"]["httpGet"]
    assert (probe["port"], probe["path"]) == (status_port, "/status")
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(status_port)

    volumes = {v["name"]: v for v in pod["volumes"]}
    mount_paths = {m["mountPath"]: m["name"] for m in router["volumeMounts"]}
    socket_dir = str(Path(DEFAULT_SOCKET).parent)
    assert volumes[mount_paths[socket_dir]]["hostPath"]["path"] == socket_dir
    assert volumes[mount_paths[DEFAULT_DATA_DIR]]["hostPath"]["path"] == DEFAULT_DATA_DIR
    for m in init["volumeMounts"]:
        assert "/host" + volumes[m["name"]]["hostPath"]["path"] == m["mountPath"]


def test_dockerfile_names_what_exists() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM \$\{BASE\}$", text, re.M)
    entry = re.search(r'^ENTRYPOINT \["python3", "-m", "([\w.]+)"\]$', text, re.M)
    assert entry and importlib.util.find_spec(entry.group(1)) is not None
    exposed = set(re.findall(r"(\d+)/(tcp|udp)", text.split("EXPOSE", 1)[1].splitlines()[0]))
    assert {(str(DEFAULT_PORT), "tcp"), (str(DEFAULT_PORT), "udp"), ("6782", "tcp")} <= exposed
    # the image the manifest runs is the one this Dockerfile documents
    assert "weft:0.1.0" in text
    images = {c["image"] for c in by_kind("DaemonSet")["spec"]["template"]["spec"]["containers"]}
    assert images == {"weft:0.1.0"}
