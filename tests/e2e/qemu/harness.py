"""Boot Debian's own kernel in qemu (TCG) on the host's root filesystem and run one command.

Why: this machine's kernel has no openvswitch and no ESP, but Debian's ``linux-image-amd64``
ships both as modules. The VM gets:

* the kernel as an uncompressed ``vmlinux`` (extracted once from ``/boot/vmlinuz-*``; qemu boots
  it through its PVH entry, the fastest start), software emulation (``-accel tcg``);
* a tiny initramfs: busybox-static plus the virtio/9p/overlay modules, whose ``/init`` mounts
  the host root read-only over 9p, puts a tmpfs overlay on top (the VM may write anywhere, the
  host sees nothing), mounts a second, writable 9p share (the job directory), ``chroot``s into
  the overlay and runs ``/job/run.sh`` with output to ``/job/output``, then powers off;
* modules (openvswitch, vxlan, esp4, ...) are loaded inside by the host's own ``modprobe``
  from ``/lib/modules/<version>``, which the installed package put on the host filesystem.

One boot is a few seconds; Python imports are slow under TCG (``import pyroute2`` 4-6 s), so
test modules run all their checks in one boot. Needs: qemu-system-x86, linux-image-amd64,
busybox-static (apt).
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = ["VmResult", "find_kernel", "missing", "run_check", "run_in_vm", "vm_marks"]

REPO = Path(__file__).resolve().parents[3]

QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/usr/bin/busybox")
CACHE = Path(os.environ.get("WEFT_QEMU_CACHE", "/var/tmp/weft-qemu"))
# Modules the initramfs loads itself, to reach the 9p root (dependencies are added).
INITRD_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
DEFAULT_MODULES = ("openvswitch", "vxlan", "esp4", "xfrm_user", "bridge", "veth")


@dataclass(frozen=True)
class VmResult:
    returncode: int  # of the command inside; -1 when it never reported one
    output: str  # its stdout+stderr
    console: str  # the serial console (kernel and init messages)
    seconds: float

    def check(self) -> VmResult:
        if self.returncode != 0:
            raise AssertionError(
                f"command in VM failed ({self.returncode}) after {self.seconds:.1f}s\n"
                f"--- output ---\n{self.output}\n--- console (tail) ---\n{self.console[-3000:]}"
            )
        return self


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    modules: Path


def find_kernel() -> Kernel | None:
    """The newest Debian kernel on this host whose modules are installed too."""
    found = []
    for vmlinuz in Path("/boot").glob("vmlinuz-*"):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        modules = Path("/lib/modules") / version
        if (modules / "modules.dep").exists():
            found.append(Kernel(version, vmlinuz, modules))
    return max(found, key=lambda k: k.vmlinuz.stat().st_mtime) if found else None


def missing() -> str | None:
    """Why the VM cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (9p passthrough of /)"
    if shutil.which(QEMU) is None:
        return f"{QEMU} not installed (apt: qemu-system-x86)"
    if not BUSYBOX.exists():
        return "busybox not installed (apt: busybox-static)"
    if find_kernel() is None:
        return "no /boot/vmlinuz-* with /lib/modules (apt: linux-image-amd64)"
    return None


def _extract_vmlinux(kernel: Kernel, dest: Path) -> Path:
    """Uncompressed ELF vmlinux from a bzImage (xz payload); falls back to the bzImage."""
    if dest.exists():
        return dest
    data = kernel.vmlinuz.read_bytes()
    start = data.find(b"\xfd7zXZ\x00")
    while start >= 0:
        try:
            out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
        except lzma.LZMAError:
            out = b""
        if out.startswith(b"\x7fELF"):
            tmp = dest.with_suffix(".tmp")
            tmp.write_bytes(out)
            tmp.rename(dest)
            return dest
        start = data.find(b"\xfd7zXZ\x00", start + 1)
    return kernel.vmlinuz


def _module_closure(kernel: Kernel, names: Sequence[str]) -> list[Path]:
    """Module files for ``names`` and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        base = Path(path).name.split(".ko")[0]
        by_name[base] = path
        by_name[base.replace("-", "_")] = path
    order: list[str] = []

    def visit(path: str) -> None:
        if path in order:
            return
        for dep in reversed(deps.get(path, [])):
            visit(dep)
        order.append(path)

    for name in names:
        if name in by_name:  # built-in (not in modules.dep) needs nothing
            visit(by_name[name])
    return [kernel.modules / p for p in order]


def _cpio(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of ``(path, mode, data)``; symlinks carry their target as data."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out += b"070701" + b"".join(f"{f:08x}".encode() for f in fields) + encoded
        out += bytes(-len(out) % 4)
        out += data
        out += bytes(-len(out) % 4)
    return bytes(out)


INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /mods/$m || echo "insmod $m failed"; done
mkdir -p /lower /upper /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144,cache=loose hostroot /lower \
  || echo "mount hostroot failed"
mount -t tmpfs -o size=1g tmpfs /upper && mkdir -p /upper/u /upper/w
mount -t overlay overlay -o lowerdir=/lower,upperdir=/upper/u,workdir=/upper/w /newroot \
  || echo "mount overlay failed"
for d in proc sys dev tmp run job; do mkdir -p /newroot/$d; done
mount -t proc proc /newroot/proc || echo "mount proc failed"
mount -t sysfs sys /newroot/sys || echo "mount sysfs failed"
mount -t devtmpfs dev /newroot/dev || echo "mount dev failed"
mkdir -p /newroot/dev/pts && mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/run  # /tmp stays the host's (overlaid): CI may run from there
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 job /newroot/job \
  || echo "mount job failed"
cp /bin/busybox /newroot/run/busybox
echo "weft-vm: running job"
# switch_root (not chroot) so the kernel's module autoloader finds the host's /sbin/modprobe.
exec switch_root /newroot /run/busybox sh -c \
  'cd /job && /bin/sh /job/run.sh > /job/output 2>&1; echo $? > /job/rc; sync;
   echo "weft-vm: done"; /run/busybox poweroff -f'
"""


def _initramfs(kernel: Kernel, dest: Path) -> Path:
    if dest.exists():
        return dest
    mods = _module_closure(kernel, INITRD_MODULES)
    entries: list[tuple[str, int, bytes]] = [
        (d, 0o40755, b"") for d in ("bin", "proc", "sys", "dev", "mods")
    ]
    entries.append(("bin/busybox", 0o100755, BUSYBOX.read_bytes()))
    entries.append(("bin/sh", 0o120777, b"busybox"))
    entries.append(("init", 0o100755, INIT.encode()))
    entries += [(f"mods/{m.name}", 0o100644, m.read_bytes()) for m in mods]
    entries.append(("modules.order", 0o100644, "\n".join(m.name for m in mods).encode()))
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(_cpio(entries))
    tmp.rename(dest)
    return dest


def _artifacts(kernel: Kernel) -> tuple[Path, Path]:
    tag = hashlib.sha256(
        f"{kernel.version}:{kernel.vmlinuz.stat().st_mtime}:{BUSYBOX.stat().st_size}".encode()
        + INIT.encode()
        + repr(INITRD_MODULES).encode()
    ).hexdigest()[:12]
    base = CACHE / f"{kernel.version}-{tag}"
    base.mkdir(parents=True, exist_ok=True)
    return _extract_vmlinux(kernel, base / "vmlinux"), _initramfs(kernel, base / "initramfs.cpio")


def run_in_vm(
    script: str,
    *,
    modules: Sequence[str] = DEFAULT_MODULES,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    memory_mb: int = 1024,
    timeout: float = 600,
) -> VmResult:
    """Boot, load ``modules``, run the shell ``script`` (as root, in ``cwd``), power off."""
    reason = missing()
    if reason:
        raise RuntimeError(f"cannot boot the test VM: {reason}")
    kernel = find_kernel()
    assert kernel is not None
    vmlinux, initrd = _artifacts(kernel)
    with tempfile.TemporaryDirectory(prefix="weft-vm-") as job_dir:
        job = Path(job_dir)
        exports = "".join(f"export {k}='{v}'\n" for k, v in (env or {}).items())
        (job / "run.sh").write_text(
            "set -e\n"
            f"export PATH='{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}'\n"
            "export HOME=/root\n"
            + exports
            + "".join(f"modprobe {m}\n" for m in modules)
            + f"cd '{cwd or Path.cwd()}'\n"
            + "set +e\n"
            + script
            + "\n"
        )
        cmd = [
            QEMU,
            "-accel", "tcg",
            "-cpu", "max",
            "-m", str(memory_mb),
            "-smp", "1",
            "-nodefaults", "-no-user-config", "-no-reboot",
            "-display", "none",
            "-serial", "stdio",
            "-kernel", str(vmlinux),
            "-initrd", str(initrd),
            "-append", "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init",
            "-fsdev", "local,id=root,path=/,security_model=passthrough,readonly=on,multidevs=remap",
            "-device", "virtio-9p-pci,fsdev=root,mount_tag=hostroot",
            "-fsdev", f"local,id=job,path={job},security_model=passthrough",
            "-device", "virtio-9p-pci,fsdev=job,mount_tag=job",
        ]  # fmt: skip
        start = time.monotonic()
        try:
            proc = subprocess.run(
                cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL
            )
            console = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
        except subprocess.TimeoutExpired as err:
            out = err.stdout if isinstance(err.stdout, bytes) else b""
            console = out.decode(errors="replace") + "\n[harness: VM timed out]"
        seconds = time.monotonic() - start
        rc_file = job / "rc"
        rc = int(rc_file.read_text().strip() or -1) if rc_file.exists() else -1
        out_file = job / "output"
        output = out_file.read_text(errors="replace") if out_file.exists() else ""
        return VmResult(rc, output, console, seconds)


def run_check(
    script: str,
    *,
    modules: Sequence[str] = DEFAULT_MODULES,
    env: dict[str, str] | None = None,
    memory_mb: int = 1024,
    timeout: float = 900,
) -> tuple[dict[str, Any], VmResult]:
    """Run the in-VM check ``tests/e2e/qemu/<script>`` with this Python, in the repository and
    with it on ``PYTHONPATH`` (plus ``env``); return the JSON report it printed on its last line
    of output, and the run. AssertionError when the command failed or printed nothing."""
    result = run_in_vm(
        f"'{sys.executable}' tests/e2e/qemu/{script}",
        modules=modules,
        env={"PYTHONPATH": str(REPO), **(env or {})},
        cwd=REPO,
        memory_mb=memory_mb,
        timeout=timeout,
    ).check()
    lines = result.output.strip().splitlines()
    assert lines, f"no output from the VM\n{result.console[-3000:]}"
    report: dict[str, Any] = json.loads(lines[-1])
    return report, result


def vm_marks() -> list[pytest.MarkDecorator]:
    """A VM test module's ``pytestmark``: e2e, skipped where the VM cannot boot (why)."""
    reason = missing()
    return [
        pytest.mark.e2e,
        pytest.mark.skipif(reason is not None, reason=f"test VM unavailable: {reason}"),
    ]
