"""The guest a ``vm`` compartment boots: Debian's kernel and a small busybox initramfs built by flexos.

Everything comes from installed packages (``scripts/setup`` installs them); nothing is downloaded at
run time. The kernel is either one extracted into the cache by ``python -m flexos.vm.image
install-kernel DEB`` (no package hooks, nothing in /boot) or an installed Debian kernel (/boot and
/lib/modules). The image is built once per kernel, busybox and init script, and cached under
``$XDG_CACHE_HOME/flexos/vm`` (default ``~/.cache/flexos/vm``):

- ``vmlinux``: the kernel decompressed once here, booted through its PVH entry point, which saves
  the seconds an emulated CPU spends decompressing it on every boot (a bzImage is used when the
  kernel has no PVH entry or an unknown compression);
- ``initramfs.cpio``: a static busybox, the virtio, 9p and virtio-net modules (loaded in the order
  their ``depends=`` fields give) and ``/init``. It is not compressed, for the same reason.

Each boot appends a second, tiny cpio archive holding ``/flexos/boot.conf``: which host directories
to mount where, whether to bring the network up, and how to start Python. The kernel unpacks both.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

# Modules the guest needs (their dependencies are added from the modules' own depends= fields).
WANTED_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "virtio_net")
QEMU = "qemu-system-x86_64"
_FORMAT = 1  # bump when the layout of a built image changes

INIT_SCRIPT = r"""#!/flexos/busybox sh
# flexos guest init: mount the host directories this compartment may see, then start Python.
B=/flexos/busybox
fail() { echo "flexos-init: FAILED: $*"; exit 1; }
$B mkdir -p /proc /sys /dev /tmp /etc /root
$B mount -t proc proc /proc || fail "mounting /proc"
$B mount -t sysfs sysfs /sys || fail "mounting /sys"
$B mount -t devtmpfs devtmpfs /dev || fail "mounting /dev"
echo "flexos-init: kernel up"
for module in $($B cat /flexos/modules); do
  $B insmod "/flexos/modules.d/$module.ko" || fail "loading module $module"
done
echo "flexos-init: modules loaded"
$B ip link set lo up
python=""
while read -r kind a b c; do
  case "$kind" in
    mount)
      $B mkdir -p "$c" || fail "creating $c"
      $B mount -t 9p -o "trans=virtio,version=9p2000.L,msize=131072,$b" "$a" "$c" || fail "mounting $c";;
    link) $B mkdir -p "$($B dirname "$b")" && $B ln -sfn "$a" "$b" || fail "linking $b";;
    net)
      $B ip link set eth0 up && $B ip addr add 10.0.2.15/24 dev eth0 || fail "bringing eth0 up"
      $B ip route add default via 10.0.2.2 || fail "adding the default route"
      echo "nameserver 10.0.2.3" > /etc/resolv.conf;;
    python) python="$a"; pythonpath="$b";;
  esac
done < /flexos/boot.conf
echo "flexos-init: host files mounted"
[ -n "$python" ] || fail "no python in /flexos/boot.conf"
cd /
exec $B env -i PATH=/usr/local/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 \
  PYTHONPATH="$pythonpath" "$python" -m flexos.vm.guest
"""


@dataclass(frozen=True)
class Kernel:
    version: str
    vmlinuz: Path
    modules: Path  # .../lib/modules/VERSION
    config: Path | None


@dataclass(frozen=True)
class GuestImage:
    kernel: Path  # vmlinux (PVH) or vmlinuz
    initramfs: Path
    version: str


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flexos" / "vm"


def _kernels_in(root: Path, boot: str, modules: str) -> list[Kernel]:
    found = []
    for vmlinuz in sorted((root / boot).glob("vmlinuz-*"), reverse=True):
        version = vmlinuz.name.removeprefix("vmlinuz-")
        module_dir = root / modules / version
        if (module_dir / "kernel").is_dir():
            config = root / boot / f"config-{version}"
            found.append(Kernel(version, vmlinuz, module_dir, config if config.exists() else None))
    return found


def find_kernel() -> Kernel | None:
    """The kernel scripts/setup extracted into the cache, else an installed Debian kernel."""
    kernels = cache_dir() / "kernels"
    extracted = []
    if kernels.is_dir():
        for root in sorted(kernels.iterdir(), reverse=True):
            extracted += _kernels_in(root, "boot", "lib/modules")
    installed = _kernels_in(Path("/"), "boot", "lib/modules")
    candidates = extracted + installed
    return candidates[0] if candidates else None


def _is_static_elf(path: Path) -> bool:
    """An ELF executable without a program interpreter (PT_INTERP) needs no shared libraries."""
    with open(path, "rb") as elf:
        head = elf.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
            return False
        phoff = struct.unpack_from("<Q", head, 0x20)[0]
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        elf.seek(phoff)
        table = elf.read(phentsize * phnum)
    return all(struct.unpack_from("<I", table, i * phentsize)[0] != 3 for i in range(phnum))


def find_busybox() -> Path | None:
    """A statically linked busybox (Debian's busybox-static): the guest has no shared libraries of its own."""
    for candidate in ("/bin/busybox", "/usr/bin/busybox", shutil.which("busybox")):
        if candidate and os.path.isfile(candidate) and _is_static_elf(Path(candidate)):
            return Path(candidate)
    return None


def unavailable() -> str | None:
    """What is missing to boot a guest on this machine, with the fix; None if nothing is."""
    missing = []
    if shutil.which(QEMU) is None:
        missing.append(f"{QEMU} (apt-get install qemu-system-x86)")
    if find_kernel() is None:
        missing.append(
            "a Debian kernel (scripts/setup extracts one into the cache, or apt-get install linux-image-amd64)"
        )
    if find_busybox() is None:
        missing.append("a static busybox (apt-get install busybox-static)")
    if not missing:
        return None
    return "the vm driver needs " + "; ".join(missing) + ". Run scripts/setup, or use driver 'process'."


# -- cpio (newc) ----------------------------------------------------------------------------------
def cpio_archive(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A newc cpio archive of (path, mode, data) entries; a symlink's data is its target."""
    out = bytearray()
    for inode, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode()
        fields = (inode, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded) + 1, 0)
        out += b"070701" + "".join(f"{value:08X}" for value in fields).encode() + encoded + b"\0"
        out += b"\0" * (-len(out) % 4)
        out += data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def boot_archive(config_lines: list[str]) -> bytes:
    """The per-boot archive appended to the initramfs: ``/flexos/boot.conf``."""
    text = "".join(line + "\n" for line in config_lines).encode()
    return cpio_archive([("flexos/boot.conf", stat.S_IFREG | 0o644, text)])


# -- kernel modules --------------------------------------------------------------------------------
def _modinfo(path: Path) -> dict[str, str]:
    """The key=value strings of a module's .modinfo section (found by its NUL-separated records)."""
    data = path.read_bytes()
    info = {}
    for key in (b"name", b"depends"):
        at = data.find(b"\0" + key + b"=")
        if at >= 0:
            end = data.index(b"\0", at + 1)
            info[key.decode()] = data[at + len(key) + 2 : end].decode()
    return info


def module_order(modules: Path, wanted: tuple[str, ...] = WANTED_MODULES) -> list[Path]:
    """The .ko files for ``wanted`` and their dependencies, each after the modules it depends on."""
    by_name = {ko.name.removesuffix(".ko").replace("-", "_"): ko for ko in (modules / "kernel").rglob("*.ko")}
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        path = by_name.get(name)
        if path is None:
            raise FileNotFoundError(f"kernel module {name} not found under {modules}")
        for dependency in filter(None, _modinfo(path).get("depends", "").split(",")):
            visit(dependency)
        order.append(path)

    for name in wanted:
        visit(name)
    return order


# -- the kernel --------------------------------------------------------------------------------
def _has_pvh(kernel: Kernel) -> bool:
    if kernel.config is None:
        return False
    return "CONFIG_PVH=y" in kernel.config.read_text().splitlines()


def extract_vmlinux(bzimage: bytes) -> bytes | None:
    """The ELF kernel inside a bzImage (xz or gzip payload), or None if it cannot be taken out here."""
    if bzimage[0x202:0x206] != b"HdrS":
        return None
    setup_sectors = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sectors + 1) * 512 + offset
    payload = bzimage[start : start + length]
    if payload.startswith(b"\xfd7zXZ\x00"):
        data = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
    elif payload.startswith(b"\x1f\x8b"):
        data = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
    else:
        return None
    return data if data.startswith(b"\x7fELF") else None


def build(kernel: Kernel | None = None, busybox: Path | None = None) -> GuestImage:
    """The cached guest image for this kernel and busybox, built now if it is not cached yet."""
    kernel = kernel or find_kernel()
    busybox = busybox or find_busybox()
    if kernel is None or busybox is None:
        raise FileNotFoundError(unavailable() or "no kernel or busybox")
    modules = module_order(kernel.modules)
    key = hashlib.sha256(
        repr(
            (
                _FORMAT,
                INIT_SCRIPT,
                kernel.version,
                [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in (kernel.vmlinuz, busybox, *modules)],
            )
        ).encode()
    ).hexdigest()[:16]
    target = cache_dir() / "images" / f"{kernel.version}-{key}"
    names = ("vmlinux", "vmlinuz")
    for name in names:
        if (target / name).exists() and (target / "initramfs.cpio").exists():
            return GuestImage(target / name, target / "initramfs.cpio", kernel.version)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        vmlinux = extract_vmlinux(kernel.vmlinuz.read_bytes()) if _has_pvh(kernel) else None
        kernel_name = "vmlinux" if vmlinux is not None else "vmlinuz"
        if vmlinux is not None:
            (work / kernel_name).write_bytes(vmlinux)
        else:
            shutil.copyfile(kernel.vmlinuz, work / kernel_name)
        entries: list[tuple[str, int, bytes]] = [
            (directory, stat.S_IFDIR | 0o755, b"") for directory in ("flexos", "flexos/modules.d", "etc", "tmp")
        ]
        entries.append(("flexos/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()))
        for module in modules:
            entries.append((f"flexos/modules.d/{module.stem}.ko", stat.S_IFREG | 0o644, module.read_bytes()))
        listing = "".join(module.stem + "\n" for module in modules).encode()
        entries.append(("flexos/modules", stat.S_IFREG | 0o644, listing))
        entries.append(("init", stat.S_IFREG | 0o755, INIT_SCRIPT.encode()))
        (work / "initramfs.cpio").write_bytes(cpio_archive(entries))
        try:
            work.rename(target)
        except OSError:  # another process built it first
            pass
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return GuestImage(target / kernel_name, target / "initramfs.cpio", kernel.version)


def install_kernel(deb: Path) -> Kernel:
    """Extract a Debian linux-image package into the cache: the kernel and only the modules flexos loads."""
    root = cache_dir() / "kernels"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as scratch:
        unpacked = Path(scratch)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)
        found = _kernels_in(unpacked, "boot", "lib/modules") or _kernels_in(unpacked, "boot", "usr/lib/modules")
        if not found:
            raise FileNotFoundError(f"{deb} holds no boot/vmlinuz-* with its modules")
        kernel = found[0]
        final = root / kernel.version
        shutil.rmtree(final, ignore_errors=True)
        (final / "boot").mkdir(parents=True)
        shutil.copyfile(kernel.vmlinuz, final / "boot" / kernel.vmlinuz.name)
        if kernel.config is not None:
            shutil.copyfile(kernel.config, final / "boot" / kernel.config.name)
        for module in module_order(kernel.modules):
            destination = final / "lib" / "modules" / kernel.version / module.relative_to(kernel.modules)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(module, destination)
    return _kernels_in(final, "boot", "lib/modules")[0]


def main(argv: list[str] | None = None) -> None:
    """``install-kernel DEB`` (used by scripts/setup), then build the image; ``build`` alone rebuilds it."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 2 and args[0] == "install-kernel":
        kernel = install_kernel(Path(args[1]))
        print(f"flexos: kernel {kernel.version} extracted into {kernel.vmlinuz.parent.parent}")
    elif args != ["build"]:
        sys.exit("usage: python -m flexos.vm.image install-kernel DEB | build")
    image = build()
    print(f"flexos: guest image {image.kernel} + {image.initramfs}")


if __name__ == "__main__":
    main()
