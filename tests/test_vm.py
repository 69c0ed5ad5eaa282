"""The vm driver: a compartment in its own QEMU guest, what it can see of the host, how it dies.

Real QEMU, a real Debian kernel, real 9p and ivshmem. A guest boots once and is reused by later
tests (the driver's warm pool), so only the tests that kill or panic a guest pay for a boot. The
gate semantics themselves run with the vm driver in tests/test_gates.py.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import flexos
from flexos import CompartmentSpec, Image
from flexos.drivers import unavailable
from flexos.drivers.vm import VmOptions
from flexos.vm.machine import choose_accelerator, guest_paths

REASON = unavailable("vm")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=f"driver 'vm' unavailable: {REASON}")]

FIXTURES = Path(__file__).parent / "fixtures"
GUEST_MODULES = ("complib", "guestlib")


def vm_image(
    libraries: dict[str, str],
    restart: str = "on-failure",
    timeout: float | None = None,
    **options: object,
) -> Image:
    """The app in ``app``; each compartment named in ``libraries`` a vm with ``options``."""
    compartments = {"app": CompartmentSpec("app", "fcalls", default=True)}
    for name in sorted(set(libraries.values())):
        compartments[name] = CompartmentSpec(name, "vm", dict(options), restart=restart, timeout=timeout)
    return Image(compartments=compartments, libraries=libraries, source="<test image: vm>")


def _forget_modules() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in GUEST_MODULES:
            del sys.modules[name]


@pytest.fixture
def boot_vm() -> Iterator[Callable[..., flexos.Runtime]]:
    runtimes: list[flexos.Runtime] = []

    def _boot(libraries: dict[str, str] | None = None, **kwargs: object) -> flexos.Runtime:
        _forget_modules()
        runtime = flexos.boot(vm_image(libraries or {"guestlib": "box", "complib": "box"}, **kwargs))
        runtimes.append(runtime)
        return runtime

    yield _boot
    for runtime in reversed(runtimes):
        runtime.stop()
    _forget_modules()


@pytest.fixture
def guestlib(boot_vm):
    boot_vm()
    return importlib.import_module("guestlib")


def _driver(runtime: flexos.Runtime, name: str = "box"):
    return runtime.compartments[name].driver


# -- where the library runs ---------------------------------------------------------------------


def test_the_library_runs_in_a_guest_with_its_own_kernel(boot_vm) -> None:
    runtime = boot_vm()
    import guestlib

    assert guestlib.uname_release() != os.uname().release  # Debian's kernel, not the host's
    assert guestlib.getpid() == _driver(runtime).guest_pid
    qemu = runtime.compartments["box"].pid
    assert Path(f"/proc/{qemu}/exe").resolve().name.startswith("qemu-system")


def test_a_stopped_runtime_leaves_its_guest_for_the_next_one(boot_vm) -> None:
    first = boot_vm()
    import guestlib

    guestlib.getpid()
    qemu = first.compartments["box"].pid
    first.stop()
    second = boot_vm()
    import guestlib as again

    assert again.getpid() == _driver(second).guest_pid
    assert second.compartments["box"].pid == qemu  # the same QEMU: no second boot


def test_two_vm_compartments_each_get_a_guest(boot_vm) -> None:
    runtime = boot_vm({"guestlib": "left", "complib": "right"})
    import complib
    import guestlib

    assert guestlib.getpid() == _driver(runtime, "left").guest_pid
    assert complib.getpid() == _driver(runtime, "right").guest_pid
    assert runtime.compartments["left"].pid != runtime.compartments["right"].pid
    # A value made in one guest travels through the app to the other, and a callback back again.
    assert complib.call(guestlib.uname_release) == guestlib.uname_release()


# -- what the guest can see of the host ----------------------------------------------------------


def test_the_guest_sees_only_its_own_memory_and_processes(boot_vm, monkeypatch) -> None:
    marker = "FLEXOS_SECRET_4711"
    monkeypatch.setenv("FLEXOS_TEST_SECRET", marker)  # a process compartment would inherit it
    holder = subprocess.Popen(["sleep", "60"], env={"FLEXOS_TEST_SECRET": marker})
    try:
        boot_vm()
        import guestlib

        assert guestlib.getenv("FLEXOS_TEST_SECRET") is None
        assert guestlib.processes_mentioning(marker) == []
        # The same probe run here finds the host process, so it would find it from the guest if it could.
        spec = importlib.util.spec_from_file_location("guestlib_here", FIXTURES / "guestlib.py")
        here = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(here)
        assert holder.pid in here.processes_mentioning(marker)
    finally:
        holder.kill()
        holder.wait()
    assert guestlib.memory_total_kib() <= VmOptions().memory >> 10
    assert guestlib.shared_memory_sizes() == [16 << 20]  # the gate window, and nothing else


def test_host_files_outside_the_code_are_invisible(boot_vm, tmp_path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("the app's secret")
    boot_vm()
    import guestlib

    with pytest.raises(FileNotFoundError):
        guestlib.read_file(str(secret))
    with pytest.raises(FileNotFoundError):
        guestlib.read_file("/etc/shadow")
    assert guestlib.read_file(str(FIXTURES / "guestlib.py")) == (FIXTURES / "guestlib.py").read_bytes()


def test_exported_read_directory_is_read_only(boot_vm, tmp_path) -> None:
    (tmp_path / "data.txt").write_text("shared data")
    boot_vm(filesystem={"read": [str(tmp_path)], "write": []})
    import guestlib

    assert guestlib.read_file(str(tmp_path / "data.txt")) == b"shared data"
    with pytest.raises(OSError) as info:
        guestlib.write_file(str(tmp_path / "new.txt"), b"x")
    assert info.value.errno == errno.EROFS
    assert not (tmp_path / "new.txt").exists()


def test_exported_write_directory_is_writable(boot_vm, tmp_path) -> None:
    boot_vm(filesystem={"read": [], "write": [str(tmp_path)]})
    import guestlib

    assert guestlib.write_file(str(tmp_path / "out.txt"), b"from the guest") == 14
    assert (tmp_path / "out.txt").read_bytes() == b"from the guest"


def _listener() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer() -> None:
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.sendall(b"hello from the host")

    threading.Thread(target=answer, daemon=True).start()
    return server, server.getsockname()[1]


def test_no_network_by_default(boot_vm) -> None:
    boot_vm()
    import guestlib

    server, port = _listener()
    with server:
        assert guestlib.network_interfaces() == ["lo"]
        with pytest.raises(OSError):
            guestlib.fetch("10.0.2.2", port, 3.0)  # where user networking would reach the host
        with pytest.raises(ConnectionRefusedError):
            guestlib.fetch("127.0.0.1", port, 3.0)  # the guest's own loopback, not the host's


def test_network_user_reaches_the_host_when_asked(boot_vm) -> None:
    boot_vm(network="user")
    import guestlib

    server, port = _listener()
    with server:
        assert "eth0" in guestlib.network_interfaces()
        assert guestlib.fetch("10.0.2.2", port) == b"hello from the host"


# -- death and restarts -------------------------------------------------------------------------


def test_a_killed_compartment_restarts_in_the_same_guest(boot_vm) -> None:
    runtime = boot_vm()
    import complib

    first = complib.getpid()
    qemu = runtime.compartments["box"].pid
    with pytest.raises(flexos.CompartmentCrashed) as info:
        complib.crash()
    assert info.value.signal == signal.SIGKILL
    assert "inside its virtual machine" in str(info.value)
    assert complib.getpid() != first
    assert runtime.compartments["box"].pid == qemu


def test_exit_code_inside_the_guest_is_reported(boot_vm) -> None:
    boot_vm()
    import complib

    with pytest.raises(flexos.CompartmentCrashed) as info:
        complib.exit_with(7)
    assert info.value.exitcode == 7
    assert complib.add(1, 2) == 3


def test_restart_never_keeps_raising(boot_vm) -> None:
    boot_vm(restart="never")
    import complib

    with pytest.raises(flexos.CompartmentCrashed):
        complib.exit_with(1)
    with pytest.raises(flexos.CompartmentCrashed):
        complib.add(1, 2)


def test_a_hung_call_ends_the_compartment_after_its_timeout(boot_vm) -> None:
    runtime = boot_vm(timeout=3.0)
    import complib

    qemu = runtime.compartments["box"].pid
    with pytest.raises(flexos.CompartmentCrashed) as info:
        complib.sleep(600)
    assert "timeout of 3.0 s" in str(info.value)
    assert complib.add(2, 2) == 4
    assert runtime.compartments["box"].pid == qemu  # the agent ended the compartment, not the guest


def test_killing_qemu_is_a_crash_and_the_next_call_boots_a_new_guest(boot_vm, caplog) -> None:
    caplog.set_level(logging.INFO, logger="flexos.vm")
    runtime = boot_vm()
    import complib

    qemu = runtime.compartments["box"].pid
    complib.getpid()
    os.kill(qemu, signal.SIGKILL)
    with pytest.raises(flexos.CompartmentCrashed) as info:
        complib.add(1, 1)
    assert info.value.signal == signal.SIGKILL
    assert "virtual machine stopped" in str(info.value)
    caplog.clear()
    assert complib.add(1, 1) == 2
    assert runtime.compartments["box"].pid != qemu
    stages = [record.getMessage() for record in caplog.records if record.name == "flexos.vm"]
    assert any("kernel up" in stage for stage in stages), stages  # the boot showed its progress
    assert any("ready" in stage for stage in stages), stages


def test_a_guest_kernel_panic_is_a_crash(boot_vm) -> None:
    runtime = boot_vm()
    import guestlib

    qemu = runtime.compartments["box"].pid
    with pytest.raises(flexos.CompartmentCrashed) as info:
        guestlib.kernel_panic()
    assert "Kernel panic" in str(info.value)
    assert guestlib.getpid() == _driver(runtime).guest_pid
    assert runtime.compartments["box"].pid != qemu


def test_a_boot_that_takes_too_long_is_a_start_error(boot_vm) -> None:
    boot_vm(boot_timeout=0.2, memory=160 << 20)  # a machine the pool has none of
    with pytest.raises(flexos.CompartmentStartError, match="boot_timeout"):
        import guestlib  # noqa: F401


def test_qemu_ends_with_the_app(tmp_path) -> None:
    """However the app ends (here SIGKILL, so no atexit runs), its guests end with it."""
    image = vm_image({"guestlib": "box"}).to_dict()
    script = tmp_path / "app.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys, time
            sys.path.insert(0, {str(FIXTURES)!r})
            import flexos
            with flexos.boot(flexos.Image.from_dict({image!r})) as runtime:
                import guestlib
                guestlib.getpid()
                print(runtime.compartments["box"].pid, flush=True)
                time.sleep(600)
            """
        )
    )
    app = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        qemu = int(app.stdout.readline())
        os.kill(qemu, 0)
    finally:
        app.kill()
        app.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{qemu}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{qemu}").exists() or "zombie" in Path(f"/proc/{qemu}/status").read_text()


# -- sibling compartments -----------------------------------------------------------------------


def test_a_vm_compartment_reaches_a_sibling_through_the_app(boot_vm, tmp_path) -> None:
    """No socket crosses into a VM: the app hands the guest its own gate (every pair: test_routing.py)."""
    (tmp_path / "vmside.py").write_text("def reach():\n    import procside\n    return procside.where()\n")
    (tmp_path / "procside.py").write_text("import os\n\ndef where():\n    return os.getpid()\n")
    sys.path.insert(0, str(tmp_path))
    try:
        _forget_modules()
        image = Image(
            compartments={
                "app": CompartmentSpec("app", "fcalls", default=True),
                "box": CompartmentSpec("box", "vm"),
                "proc": CompartmentSpec("proc", "process"),
            },
            libraries={"vmside": "box", "procside": "proc"},
            source="<test image: vm + process>",
        )
        with flexos.boot(image) as runtime:
            import vmside

            assert vmside.reach() == runtime.compartments["proc"].pid
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("vmside", "procside"):
            sys.modules.pop(name, None)


# -- configuration and machine facts --------------------------------------------------------------


def test_auto_accelerator_says_why() -> None:
    accelerator, why = choose_accelerator("auto")
    assert accelerator in ("kvm", "tcg")
    assert why
    assert choose_accelerator("tcg")[0] == "tcg"


def test_explicit_kvm_is_refused_where_it_cannot_boot(boot_vm) -> None:
    accelerator, _why = choose_accelerator("kvm")
    if accelerator == "kvm":
        pytest.skip("KVM boots stock kernels on this machine")
    with pytest.raises(flexos.DriverUnavailable, match="accelerator kvm cannot be used here"):
        boot_vm(accelerator="kvm")


def test_default_exports_are_the_code_and_the_interpreter(tmp_path) -> None:
    mounts, _links = guest_paths()
    paths = dict(mounts)
    assert all(writable is False for writable in paths.values())
    assert any(sys.base_prefix == path or sys.base_prefix.startswith(path + "/") for path in paths)
    assert not any(str(tmp_path).startswith(path + "/") or str(tmp_path) == path for path in paths)
    assert "/" not in paths and "/etc" not in paths and "/root" not in paths
    mounts, _ = guest_paths(write=[str(tmp_path)])
    assert (os.path.realpath(tmp_path), True) in mounts


VM_YAML = """\
compartments:
  - name: app
    mechanism: {{driver: fcalls}}
    default: true
  - name: box
    mechanism: {{driver: vm, {options}}}
    timeout: 5
libraries:
  colorsys: {{compartment: box}}
"""


def test_vm_options_are_validated_with_their_line(tmp_path) -> None:
    from flexos.config import parse

    config = tmp_path / "flexos.yaml"
    config.write_text(VM_YAML.format(options="memory: 64MiB, accelerator: fast, netwrk: user"))
    with pytest.raises(flexos.ConfigError) as info:
        parse(config)
    problems = "\n".join(info.value.problems)
    assert f"{config}:6:" in problems
    assert "at least 128MiB" in problems
    assert "'auto', 'kvm' or 'tcg'" in problems
    assert "did you mean 'network'?" in problems


def test_vm_options_get_their_defaults(tmp_path) -> None:
    from flexos.config import parse

    config = tmp_path / "flexos.yaml"
    config.write_text(VM_YAML.format(options="memory: 512MiB, filesystem: {read: [./data]}"))
    image, _ = parse(config)
    spec = image.compartments["box"]
    assert spec.timeout == 5.0
    assert spec.options == {
        **dataclasses.asdict(VmOptions()),
        "memory": 512 << 20,
        "filesystem": {"read": ["./data"], "write": []},
    }


def test_check_says_which_accelerator_and_why(tmp_path) -> None:
    flexos_cli = Path(sys.executable).parent / "flexos"
    config = tmp_path / "flexos.yaml"
    config.write_text(VM_YAML.format(options="accelerator: auto"))
    done = subprocess.run([str(flexos_cli), "check", "-c", str(config)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    accelerator, why = choose_accelerator("auto")
    assert f"vm: accelerator {accelerator}: {why}" in done.stdout
    config.write_text(VM_YAML.format(options="accelerator: kvm"))
    done = subprocess.run([str(flexos_cli), "check", "-c", str(config)], capture_output=True, text=True, timeout=60)
    if choose_accelerator("kvm")[0] is None:
        assert done.returncode == 2
        assert "compartment 'box': accelerator kvm cannot be used here" in done.stderr
    else:
        assert done.returncode == 0, done.stderr


def test_the_vm_benchmark_runs(tmp_path) -> None:
    bench = Path(__file__).parent.parent / "bench" / "vm_gate.py"
    out = tmp_path / "vm.json"
    done = subprocess.run(
        [sys.executable, str(bench), "--quick", "--json", str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert "vm gate median" in done.stdout and "boot to first call" in done.stdout
    results = json.loads(out.read_text())
    assert results["vm_median_us"] > results["direct_median_us"] > 0
    assert results["vm_rss_mib"] > 0 and results["vm_boot_s"] > 0
