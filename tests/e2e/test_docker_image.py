"""The router image builds from deploy/Dockerfile, offline, and its CNI installer works on a host.

Needs a Debian 12 base image with python3, made locally (no registry): debootstrap a minbase rootfs
with python3 and iproute2 and ``docker import`` it. debootstrap takes minutes and needs a Debian
mirror, so the rootfs tarball is cached (``WEFT_BASE_TAR``, default
``/var/cache/weft-test/bookworm-python3-nft.tar``) and the test only runs when that file exists or
``WEFT_E2E_IMAGE=1`` asks to make it. The wheels come from ``pip wheel`` (PyPI or pip's cache).

Shown: ``docker build`` succeeds with the network off; the image runs the router's CLI; its init
step (``python3 -m weft.k8s.install --host-root /host``) puts a plugin on this machine that answers
the kubelet's VERSION call with the image's Python, without any Python of the host.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integ.hosts import have_netns, run, wait_for

ROOT = Path(__file__).resolve().parents[2]
DOCKER = "/usr/bin/docker"
BASE_TAR = Path(os.environ.get("WEFT_BASE_TAR", "/var/cache/weft-test/bookworm-python3-nft.tar"))
WANTED = os.environ.get("WEFT_E2E_IMAGE") == "1"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (have_netns() and shutil.which("dockerd") and Path(DOCKER).exists()),
        reason="needs root and Debian's docker.io",
    ),
    pytest.mark.skipif(
        not (BASE_TAR.exists() or (WANTED and shutil.which("debootstrap"))),
        reason=f"no base rootfs at {BASE_TAR}; WEFT_E2E_IMAGE=1 makes one with debootstrap",
    ),
]


def make_base_tar() -> None:
    if BASE_TAR.exists():
        return
    BASE_TAR.parent.mkdir(parents=True, exist_ok=True)
    rootfs = BASE_TAR.with_suffix(".rootfs")
    shutil.rmtree(rootfs, ignore_errors=True)
    try:
        run(["debootstrap", "--variant=minbase", "--include=python3,iproute2,nftables", "bookworm",
             str(rootfs), "http://deb.debian.org/debian"], timeout=1500)
        tmp = BASE_TAR.with_suffix(".tmp")
        run(["tar", "-C", str(rootfs), "-cf", str(tmp), "."], timeout=600)
        tmp.replace(BASE_TAR)
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    make_base_tar()
    base = tmp_path_factory.mktemp("dockerd")
    sock = base / "docker.sock"
    log = open(base / "dockerd.log", "ab")  # noqa: SIM115 - owned by the child
    proc = subprocess.Popen(
        ["dockerd", "--data-root", str(base / "data"), "--exec-root", str(base / "exec"),
         "--pidfile", str(base / "docker.pid"), "-H", f"unix://{sock}", "--iptables=false",
         "--ip-masq=false", "--ip-forward=false", "--bridge=none",
         "--storage-driver=overlay2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    log.close()
    cli = [DOCKER, "-H", f"unix://{sock}"]
    try:
        wait_for(lambda: proc.poll() is not None
                 or run([*cli, "info"], check=False).returncode == 0,
                 timeout=90, what="dockerd")
        assert proc.poll() is None, (base / "dockerd.log").read_text()[-3000:]
        yield cli
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        with open("/proc/mounts", encoding="utf-8") as f:
            points = [ln.split()[1] for ln in f if ln.split()[1].startswith(str(base) + "/")]
        for point in sorted(points, key=len, reverse=True):
            run(["umount", "-l", point], check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_image_builds_offline_and_installs_a_working_plugin(
    docker: list[str], tmp_path: Path
) -> None:
    run([*docker, "import", str(BASE_TAR), "weft-test-base:bookworm"], timeout=600)
    context = tmp_path / "context"
    shutil.copytree(ROOT, context, ignore=shutil.ignore_patterns(
        ".git", "*cache*", "__pycache__", "artifacts", "node_modules", "*.egg-info", "wheels"))
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir",
         str(context / "deploy" / "wheels"), str(context)], timeout=900)
    host = tmp_path / "host"
    runtime = tmp_path / "opt-weft"  # as "the host" sees it (here: this machine, same path)
    # the compiled CNI shim for those host paths, carried by the image (deploy/shim/README)
    run([sys.executable, "-m", "weft.k8s.install", "--runtime-dir", str(runtime),
         "--build-shim", str(context / "deploy" / "shim" / "weft")], timeout=300)
    env = {**os.environ, "DOCKER_BUILDKIT": "0"}
    build = subprocess.run(
        [*docker, "build", "--network", "none", "--build-arg", "BASE=weft-test-base:bookworm",
         "-f", str(context / "deploy" / "Dockerfile"), "-t", "weft-test:img", str(context)],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]

    help_text = run([*docker, "run", "--rm", "--network", "none", "weft-test:img", "--help"]).stdout
    assert "router" in help_text and "launch" in help_text

    installed = run([*docker, "run", "--rm", "--network", "none", "-v", f"{host}:/host",
         "--entrypoint", "python3", "weft-test:img",
         "-m", "weft.k8s.install", "--host-root", "/host", "--runtime-dir", str(runtime),
         "--bin-dir", "/opt/cni/bin", "--conf-dir", "/etc/cni/net.d"], timeout=300)
    # the runtime went to /host<runtime>; put it where the launcher expects it on this "host"
    shutil.move(str(host / str(runtime).lstrip("/")), str(runtime))
    launcher = host / "opt" / "cni" / "bin" / "weft"
    assert "shim (prebuilt /opt/weft-shim/weft)" in installed.stdout, installed.stdout
    assert launcher.read_bytes()[:4] == b"\x7fELF"
    conf = json.loads((host / "etc" / "cni" / "net.d" / "10-weft.conflist").read_text())
    assert conf["plugins"][0]["type"] == "weft"
    proc = subprocess.run([str(launcher)], input=b"{}", capture_output=True, timeout=30,
                          env={"CNI_COMMAND": "VERSION", "PATH": "/nonexistent"})
    assert proc.returncode == 0, proc.stderr
    assert "1.0.0" in json.loads(proc.stdout)["supportedVersions"]
    run([*docker, "rmi", "weft-test:img", "weft-test-base:bookworm"], check=False)
