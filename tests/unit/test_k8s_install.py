"""The DaemonSet's init step: the plugin, its Python and the conflist land on the host and run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from weft.k8s.install import install_on_host, main


def test_install_on_host_runs_the_plugin_with_the_copied_python(tmp_path: Path) -> None:
    runtime_dir = str(tmp_path / "hostopt" / "weft")  # as the host sees it (here: the same)
    paths = install_on_host(Path("/"), runtime_dir=runtime_dir,
                            bin_dir=str(tmp_path / "cni" / "bin"),
                            conf_dir=str(tmp_path / "cni" / "net.d"))
    launcher = tmp_path / "cni" / "bin" / "weft"
    assert launcher in paths and os.access(launcher, os.X_OK)
    first = launcher.read_text().splitlines()[0]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    assert first == f"#!{runtime_dir}/python/bin/{version} -IS"
    stdlib = Path(runtime_dir) / "python" / "lib" / version
    assert (stdlib / "json" / "__init__.py").exists()
    assert not (stdlib / "site-packages").exists() and not (stdlib / "test").exists()
    assert (Path(runtime_dir) / "lib" / "weft" / "cni" / "plugin.py").exists()
    conf = json.loads((tmp_path / "cni" / "net.d" / "10-weft.conflist").read_text())
    assert [p["type"] for p in conf["plugins"]] == ["weft", "portmap"]

    # the kubelet's VERSION call, through the copied interpreter (never this one's site-packages)
    env = {"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([str(launcher)], input=b'{"cniVersion": "1.0.0"}', env=env,
                          capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "1.1.0" in json.loads(proc.stdout)["supportedVersions"]

    # a second run (pod restart) keeps the runtime, rewrites launcher and conflist
    stamp = Path(runtime_dir) / "python" / "STAMP"
    before = stamp.stat().st_mtime_ns
    assert main(["--host-root", "/", "--runtime-dir", runtime_dir,
                 "--bin-dir", str(tmp_path / "cni" / "bin"),
                 "--conf-dir", str(tmp_path / "cni" / "net.d"), "--no-portmap"]) == 0
    assert stamp.stat().st_mtime_ns == before
    conf = json.loads((tmp_path / "cni" / "net.d" / "10-weft.conflist").read_text())
    assert [p["type"] for p in conf["plugins"]] == ["weft"]
