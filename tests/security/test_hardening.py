"""Per-compartment hardening with real kernel features: each attack, with and without the option.

The attacking library (tests/fixtures/attacker.py) knows nothing of flexos. Each test boots an
image placing it in a ``process`` compartment, once hardened and once not, so that every test
shows both that the option blocks the attack and that the attack works without it.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import flexos
from flexos import CompartmentSpec, Image
from flexos.config import parse


def _namespaces_work() -> str | None:
    """None if this kernel lets a process make user+network namespaces, else why."""
    probe = "import os; os.unshare(os.CLONE_NEWUSER | os.CLONE_NEWNET)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    return None if done.returncode == 0 else f"this kernel refuses new user+network namespaces: {done.stderr[-200:]}"


@pytest.fixture
def loopback_server() -> Iterator[int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    yield server.getsockname()[1]
    server.close()


# -- configuration --------------------------------------------------------------------------------


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flexos.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_hardening_is_parsed_into_the_image(tmp_path: Path) -> None:
    image, _ = parse(
        _write(
            tmp_path,
            """\
            compartments:
              - name: app
                mechanism: {driver: fcalls}
                default: true
              - name: box
                mechanism: {driver: process}
                hardening:
                  env: clean
                  network: none
                  limits: {memory: 512MiB, cpu_seconds: 30, open_files: 64}
                  audit: {deny: [subprocess, socket.connect]}
            libraries:
              json: {compartment: box}
            """,
        )
    )
    assert image.compartments["box"].hardening == {
        "env": "clean",
        "network": "none",
        "filesystem": None,
        "seccomp": None,
        "limits": {"memory": 512 << 20, "cpu_seconds": 30, "open_files": 64, "processes": None},
        "audit": {"deny": ["subprocess", "socket.connect"]},
    }
    assert image.compartments["app"].hardening == {}


@pytest.mark.parametrize(
    ("mechanism", "hardening", "message"),
    [
        (
            "{driver: process}",
            "{limits: {memory: lots}}",
            "compartments[1].hardening.limits.memory: Value error, "
            "'lots' is not a size (write e.g. 512MiB, 2GiB or a number of bytes)",
        ),
        (
            "{driver: process}",
            "{limits: {open_files: 3}}",
            "compartments[1].hardening.limits.open_files: Input should be greater than or equal to 16",
        ),
        ("{driver: process}", "{network: off}", "compartments[1].hardening.network: Input should be 'allow' or 'none'"),
        (
            "{driver: process}",
            "{audit: {deny: ['rm -rf']}}",
            "compartments[1].hardening.audit.deny: Value error, "
            "'rm -rf' is not an audit event name (e.g. subprocess, socket.connect, ctypes)",
        ),
        (
            "{driver: fcalls}",
            "{env: clean}",
            "compartment 'box': hardening needs its own process (driver "
            "'process'); a 'fcalls' compartment shares the app's",
        ),
    ],
)
def test_bad_hardening_is_reported_with_its_line(tmp_path: Path, mechanism: str, hardening: str, message: str) -> None:
    path = _write(
        tmp_path,
        f"""\
        compartments:
          - name: app
            mechanism: {{driver: fcalls}}
            default: true
          - name: box
            mechanism: {mechanism}
            hardening: {hardening}
        libraries:
          json: {{compartment: box}}
        """,
    )
    with pytest.raises(flexos.ConfigError) as info:
        parse(path)
    assert info.value.problems == [f"{path}:7: {message}"]


# -- attacks, each with and without the option ------------------------------------------------------


def test_env_clean_hides_the_apps_secrets(boot_attacker, monkeypatch) -> None:
    monkeypatch.setenv("APP_SECRET", "hunter2")
    assert boot_attacker({}).read_env("APP_SECRET") == "hunter2"  # inherited without the option
    assert boot_attacker({"env": "clean"}).read_env("APP_SECRET") is None


def test_network_none_blocks_connecting_to_the_apps_loopback_server(boot_attacker, loopback_server) -> None:
    reason = _namespaces_work()
    if reason:
        pytest.skip(reason)
    assert boot_attacker({}).connect("127.0.0.1", loopback_server) == "connected"
    with pytest.raises(OSError) as info:
        boot_attacker({"network": "none"}).connect("127.0.0.1", loopback_server)
    assert info.value.errno in (errno.ENETUNREACH, errno.ECONNREFUSED)


def test_audit_deny_refuses_spawning_a_process(boot_attacker) -> None:
    assert boot_attacker({}).spawn(["/bin/true"]) == 0
    with pytest.raises(PermissionError, match=re.escape("'subprocess.Popen' is denied in compartment 'box'")):
        boot_attacker({"audit": {"deny": ["subprocess"]}}).spawn(["/bin/true"])


def test_audit_deny_refuses_os_system_and_ctypes(boot_attacker) -> None:
    unhardened = boot_attacker({})
    assert unhardened.shell("true") == 0
    assert unhardened.load_libc() == unhardened.pid()
    attacker = boot_attacker({"audit": {"deny": ["subprocess", "ctypes"]}})
    with pytest.raises(PermissionError, match=re.escape("'os.system'")):
        attacker.shell("true")
    with pytest.raises(PermissionError, match=re.escape("'ctypes.dlopen'")):
        attacker.load_libc()
    assert attacker.pid() != os.getpid()  # the compartment itself is fine and still serves calls


def test_audit_policy_does_not_reach_the_app(boot_attacker) -> None:
    """The hook lives in the compartment's interpreter: the app may still spawn processes."""
    boot_attacker({"audit": {"deny": ["subprocess"]}}).pid()
    assert os.system("true") == 0


def test_memory_limit_turns_a_memory_bomb_into_an_error_and_the_compartment_goes_on(boot_attacker) -> None:
    attacker = boot_attacker({"limits": {"memory": 256 << 20}})
    with pytest.raises((MemoryError, flexos.CompartmentCrashed)):
        attacker.allocate(2 << 30)
    assert attacker.pid() > 0


def test_memory_is_not_limited_without_the_option(boot_attacker) -> None:
    assert boot_attacker({}).allocate(512 << 20) == 512 << 20


def test_cpu_limit_ends_a_busy_loop_with_sigxcpu(boot_attacker) -> None:
    attacker = boot_attacker({"limits": {"cpu_seconds": 1}})
    with pytest.raises(flexos.CompartmentCrashed) as info:
        attacker.spin_forever()
    assert info.value.signal == signal.SIGXCPU
    assert attacker.pid() > 0  # restarted on next use


def test_open_files_limit(boot_attacker) -> None:
    assert boot_attacker({}).open_many(200) == 200
    with pytest.raises(OSError) as info:
        boot_attacker({"limits": {"open_files": 64}}).open_many(200)
    assert info.value.errno == errno.EMFILE


# -- filesystem (Landlock) ------------------------------------------------------------------------


def _landlock_abi_or_skip(minimum: int = 1) -> int:
    from flexos.hardening import landlock_abi

    abi = landlock_abi()
    if abi < minimum:
        pytest.skip(f"this kernel enforces Landlock ABI {abi}; the test needs ABI >= {minimum}")
    return abi


@pytest.fixture
def places(tmp_path: Path) -> dict[str, Path]:
    """A secret outside every allowlist, a readable directory and a writable one."""
    (tmp_path / "secret.txt").write_text("hunter2")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "public.txt").write_text("public")
    (tmp_path / "out").mkdir()
    return {"secret": tmp_path / "secret.txt", "data": tmp_path / "data", "out": tmp_path / "out", "root": tmp_path}


def _filesystem(places: dict[str, Path]) -> dict:
    return {"filesystem": {"read": [str(places["data"])], "write": [str(places["out"])]}}


def test_filesystem_blocks_reading_a_secret_outside_the_allowlist(boot_attacker, places) -> None:
    _landlock_abi_or_skip()
    assert boot_attacker({}).read_file(str(places["secret"])) == "hunter2"
    attacker = boot_attacker(_filesystem(places))
    with pytest.raises(PermissionError):
        attacker.read_file(str(places["secret"]))
    assert attacker.read_file(str(places["data"] / "public.txt")) == "public"


def test_filesystem_blocks_writing_outside_the_allowlist(boot_attacker, places) -> None:
    _landlock_abi_or_skip()
    assert boot_attacker({}).write_file(str(places["root"] / "dropped.txt"), "x") == "written"
    (places["root"] / "dropped.txt").unlink()
    attacker = boot_attacker(_filesystem(places))
    with pytest.raises(PermissionError):
        attacker.write_file(str(places["root"] / "dropped.txt"), "x")
    assert not (places["root"] / "dropped.txt").exists()
    assert attacker.write_file(str(places["out"] / "allowed.txt"), "y") == "written"
    assert (places["out"] / "allowed.txt").read_text() == "y"


def test_filesystem_path_that_does_not_exist_stops_the_compartment_with_the_reason(boot_attacker, places) -> None:
    """A missing allowlisted path is a mistake in the config: said at start, not at first use."""
    _landlock_abi_or_skip()
    missing = places["root"] / "not-created-yet"
    with pytest.raises(flexos.CompartmentStartError, match=r"filesystem\.write: .*not-created-yet does not exist"):
        boot_attacker({"filesystem": {"read": [], "write": [str(missing)]}})


def test_filesystem_scope_blocks_signalling_the_app(boot_attacker, places) -> None:
    _landlock_abi_or_skip(6)
    assert boot_attacker({}).signal_process(os.getpid()) == "signalled"
    with pytest.raises(PermissionError):
        boot_attacker(_filesystem(places)).signal_process(os.getpid())


def test_a_c_extension_still_works_inside_the_filesystem_allowlist(boot_attacker, places) -> None:
    _landlock_abi_or_skip()
    assert boot_attacker(_filesystem(places)).sqlite_roundtrip(str(places["out"])) == 42


def test_filesystem_blocks_reading_the_apps_environment_through_proc(boot_attacker, places) -> None:
    """/proc/<pid>/environ holds the environment the app was started with (secrets included)."""
    _landlock_abi_or_skip()
    environ = f"/proc/{os.getpid()}/environ"
    with open(environ) as own:
        started_with = own.read()
    assert started_with and boot_attacker({}).read_file(environ) == started_with
    with pytest.raises(PermissionError):
        boot_attacker(_filesystem(places)).read_file(environ)


def test_descriptors_of_the_app_are_not_inherited(boot_attacker, places) -> None:
    """Even a descriptor the app made inheritable stays in the app: compartments get only theirs."""
    with open(places["secret"]) as secret:
        os.set_inheritable(secret.fileno(), True)
        with pytest.raises(OSError) as info:
            boot_attacker({}).read_fd(secret.fileno())
        assert info.value.errno == errno.EBADF


def test_audit_deny_refuses_fork(boot_attacker) -> None:
    assert boot_attacker({}).fork() == "forked"
    with pytest.raises(PermissionError, match=re.escape("'os.fork'")):
        boot_attacker({"audit": {"deny": ["subprocess"]}}).fork()


# -- seccomp --------------------------------------------------------------------------------------


def test_seccomp_compute_only_blocks_processes_sockets_and_native_exec(boot_attacker) -> None:
    unhardened = boot_attacker({})
    assert unhardened.spawn(["/bin/true"]) == 0
    assert unhardened.make_socket() == "socket"
    attacker = boot_attacker({"seccomp": {"profile": "compute-only", "deny": [], "allow": []}})
    with pytest.raises(PermissionError):
        attacker.spawn(["/bin/true"])
    with pytest.raises(PermissionError):
        attacker.make_socket()
    assert attacker.native_execve() == errno.EPERM  # what an audit hook cannot see, the kernel refuses
    with pytest.raises(PermissionError):
        attacker.fork()
    assert attacker.run_threads(4) == [0, 1, 2, 3]  # threads are not processes


def test_seccomp_allow_and_deny_lists_adjust_the_profile(boot_attacker) -> None:
    attacker = boot_attacker({"seccomp": {"profile": "compute-only", "deny": ["getcwd"], "allow": ["socket"]}})
    assert attacker.make_socket() == "socket"
    with pytest.raises(PermissionError):
        attacker.spawn(["/bin/true"])
    with pytest.raises(PermissionError):
        attacker.cwd()


def test_an_unknown_system_call_stops_the_compartment_from_starting(boot_attacker) -> None:
    with pytest.raises(flexos.CompartmentStartError, match="'no_such_call' is not a system call"):
        boot_attacker({"seccomp": {"profile": None, "deny": ["no_such_call"], "allow": []}})


def test_seccomp_is_written_as_a_profile_name_or_a_mapping(tmp_path: Path) -> None:
    for text, expected in (
        ("seccomp: compute-only", {"profile": "compute-only", "deny": [], "allow": []}),
        ("seccomp: {deny: [ptrace]}", {"profile": None, "deny": ["ptrace"], "allow": []}),
    ):
        image, _ = parse(
            _write(
                tmp_path,
                f"""\
                compartments:
                  - name: app
                    mechanism: {{driver: fcalls}}
                    default: true
                  - name: box
                    mechanism: {{driver: process}}
                    hardening:
                      {text}
                libraries:
                  json: {{compartment: box}}
                """,
            )
        )
        assert image.compartments["box"].hardening["seccomp"] == expected


def test_every_option_together(boot_attacker, places, loopback_server) -> None:
    """The full profile boots (the order of application matters) and each part still holds."""
    _landlock_abi_or_skip()
    reason = _namespaces_work()
    if reason:
        pytest.skip(reason)
    attacker = boot_attacker(
        {
            "env": "clean",
            "network": "none",
            "filesystem": {"read": [str(places["data"])], "write": [str(places["out"])]},
            "seccomp": {"profile": "compute-only", "deny": [], "allow": []},
            "limits": {"memory": 512 << 20, "cpu_seconds": 30, "open_files": 64, "processes": None},
            "audit": {"deny": ["subprocess", "ctypes"]},
        }
    )
    assert attacker.read_file(str(places["data"] / "public.txt")) == "public"
    assert attacker.sqlite_roundtrip(str(places["out"])) == 42
    assert attacker.run_threads(3) == [0, 1, 2]
    for attempt in (
        lambda: attacker.read_file(str(places["secret"])),
        lambda: attacker.spawn(["/bin/true"]),
        lambda: attacker.connect("127.0.0.1", loopback_server),
        lambda: attacker.load_libc(),
    ):
        with pytest.raises(OSError):  # PermissionError and ENETUNREACH are both OSErrors
            attempt()


def test_check_refuses_hardening_this_machine_cannot_provide(tmp_path: Path) -> None:
    """Run `flexos check` where namespaces are refused (a seccomp filter denies unshare)."""
    path = _write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: box
            mechanism: {driver: process}
            hardening: {network: none}
        libraries:
          json: {compartment: box}
        """,
    )
    without_namespaces = textwrap.dedent(
        f"""\
        import errno, sys
        import pyseccomp
        rules = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
        rules.add_rule(pyseccomp.ERRNO(errno.EPERM), "unshare")
        rules.load()
        from flexos.cli import main
        sys.argv = ["flexos", "check", "-c", {str(path)!r}]
        main()
        """
    )
    done = subprocess.run([sys.executable, "-c", without_namespaces], capture_output=True, text=True, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"{path}: compartment 'box': hardening network: none needs userns, which this machine lacks" in done.stderr
    assert "hardening: no network" in done.stdout
    # The same file on this machine as it is:
    plain = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; from flexos.cli import main; sys.argv = ['flexos', 'check', '-c', {str(path)!r}]; main()",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if _namespaces_work() is None:
        assert plain.returncode == 0, plain.stderr


# -- the app's memory -----------------------------------------------------------------------------


def _secret_in_memory() -> tuple[bytes, int]:
    """A secret and the address of its bytes in this process (CPython lays them after the header)."""
    import ctypes

    secret = b"the-apps-secret-" + os.urandom(8).hex().encode()
    address = id(secret) + bytes.__basicsize__ - 1
    assert ctypes.string_at(address, len(secret)) == secret
    return secret, address


def test_filesystem_blocks_reading_the_apps_memory_through_proc(boot_attacker, places) -> None:
    _landlock_abi_or_skip()
    secret, address = _secret_in_memory()
    assert boot_attacker({}).read_memory(os.getpid(), address, len(secret)) == secret
    # seccomp alone does not help here: /proc/<pid>/mem is a file, not the ptrace system call.
    compute_only = {"seccomp": {"profile": "compute-only", "deny": [], "allow": []}}
    assert boot_attacker(compute_only).read_memory(os.getpid(), address, len(secret)) == secret
    with pytest.raises(PermissionError):
        boot_attacker(_filesystem(places)).read_memory(os.getpid(), address, len(secret))


def test_ptrace_outside_the_compartment_is_blocked_by_seccomp_and_by_landlock(boot_attacker, places) -> None:
    """The target is a throwaway process: PTRACE_ATTACH on the app itself would stop it for good."""
    _landlock_abi_or_skip()
    compute_only = {"seccomp": {"profile": "compute-only", "deny": [], "allow": []}}
    for hardening, expected in (({}, 0), (compute_only, errno.EPERM), (_filesystem(places), errno.EPERM)):
        # Not our child: a traced child could not be reaped here until its tracer let go of it.
        spawned = subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
        target = int(spawned.stdout)
        try:
            assert boot_attacker(hardening).ptrace_seize(target) == expected, hardening
        finally:
            os.kill(target, signal.SIGKILL)


def test_processes_zero_forbids_new_processes_but_not_threads(boot_attacker) -> None:
    attacker = boot_attacker({"limits": {"processes": 0}})
    with pytest.raises(PermissionError):
        attacker.fork()
    with pytest.raises(PermissionError):
        attacker.spawn(["/bin/true"])
    assert attacker.run_threads(3) == [0, 1, 2]
    assert attacker.make_socket() == "socket"  # only processes are forbidden, not the rest of compute-only


def test_only_zero_processes_can_be_enforced(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: box
            mechanism: {driver: process}
            hardening: {limits: {processes: 4}}
        libraries:
          json: {compartment: box}
        """,
    )
    with pytest.raises(flexos.ConfigError) as info:
        parse(path)
    assert "only 0 can be enforced for one compartment (Linux counts processes per user)" in info.value.problems[0]


# -- per-library hardening ----------------------------------------------------------------------


@pytest.fixture
def shared_compartment() -> Iterator[Callable[[dict], tuple]]:
    """attacker and bystander in one process compartment; per-library rules as given."""
    runtimes: list[flexos.Runtime] = []

    def _boot(library_hardening: dict) -> tuple:
        for name in ("attacker", "bystander"):
            sys.modules.pop(name, None)
        image = Image(
            {"app": CompartmentSpec("app", "fcalls", default=True), "box": CompartmentSpec("box", "process")},
            {"attacker": "box", "bystander": "box"},
            library_hardening=library_hardening,
        )
        runtimes.append(flexos.boot(image))
        import attacker
        import bystander

        return attacker, bystander

    yield _boot
    for runtime in runtimes:
        runtime.stop()
    for name in ("attacker", "bystander"):
        sys.modules.pop(name, None)


def test_a_library_policy_applies_to_that_librarys_own_frames(shared_compartment) -> None:
    attacker, bystander = shared_compartment({"attacker": {"audit": {"deny": ["subprocess"]}}})
    with pytest.raises(PermissionError, match=re.escape("denied for library 'attacker'")):
        attacker.spawn(["/bin/true"])
    assert bystander.spawn(["/bin/true"]) == 0  # same process, no policy of its own


def test_library_hardening_is_configured_under_libraries(tmp_path: Path) -> None:
    good = _write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: box
            mechanism: {driver: process}
        libraries:
          json: {compartment: box, hardening: {audit: {deny: [subprocess]}}}
        """,
    )
    image, _ = parse(good)
    assert image.library_hardening == {"json": {"audit": {"deny": ["subprocess"]}}}
    bad = _write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
        libraries:
          json: {compartment: app, hardening: {audit: {deny: [subprocess]}}}
        """,
    )
    with pytest.raises(flexos.ConfigError) as info:
        parse(bad)
    assert info.value.problems == [
        f"{bad}:6: library 'json': hardening needs a 'process' compartment; 'app' shares the app's process"
    ]


# -- every denial says which setting caused it (issue 14) ------------------------------------------


def _notes(info: pytest.ExceptionInfo) -> str:
    return "\n".join(getattr(info.value, "__notes__", []))


@pytest.mark.skipif(sys.version_info < (3, 12), reason="explained through sys.monitoring (3.12+)")
def test_denials_name_the_setting_that_caused_them(boot_attacker, places, loopback_server) -> None:
    _landlock_abi_or_skip()
    attacker = boot_attacker(
        {
            **_filesystem(places),
            "seccomp": {"profile": "compute-only", "deny": [], "allow": ["socket", "connect"]},
            "limits": {"memory": 256 << 20},
            **({"network": "none"} if not _namespaces_work() else {}),
        }
    )
    sandboxed = "compartment 'box' is sandboxed: "
    with pytest.raises(PermissionError) as info:
        attacker.read_file(str(places["secret"]))
    assert f"{sandboxed}{places['secret']} is not under hardening.filesystem.read" in _notes(info)
    with pytest.raises(PermissionError) as info:
        attacker.spawn(["/bin/true"])
    assert f"{sandboxed}hardening.seccomp (profile compute-only; allow: socket, connect; <tests/security>) " in _notes(
        info
    )
    with pytest.raises(MemoryError) as info:
        attacker.allocate(2 << 30)
    assert f"{sandboxed}hardening.limits.memory holds it to 256MiB of data (<tests/security>)" in _notes(info)
    assert attacker.read_file(str(places["data"] / "public.txt")) == "public"  # nothing noted on success


def test_network_none_denial_names_the_setting(boot_attacker, loopback_server) -> None:
    reason = _namespaces_work()
    if reason or sys.version_info < (3, 12):
        pytest.skip(reason or "explained through sys.monitoring (3.12+)")
    with pytest.raises(OSError) as info:
        boot_attacker({"network": "none"}).connect("127.0.0.1", loopback_server)
    assert info.value.errno == errno.ENETUNREACH  # its loopback is down
    assert "compartment 'box' is sandboxed: hardening.network is none (<tests/security>)" in _notes(info)


def test_a_crash_carries_the_compartments_own_stack(boot_attacker) -> None:
    with pytest.raises(flexos.CompartmentCrashed) as info:
        boot_attacker({}).segfault()
    message = str(info.value)
    assert message.startswith("compartment 'box' killed by signal 11 (SIGSEGV): its own stack as it died:\n")
    assert "Fatal Python error: Segmentation fault" in message
    assert re.search(r'File ".*attacker\.py", line \d+ in segfault', message), message
