"""``flexos.probe`` tells the truth about this machine: each probe agrees with an independent check.

The independent checks use the features for real (install a seccomp filter, enforce a Landlock
ruleset, unshare namespaces in a fresh interpreter, create a KVM VM, allocate a protection key),
so a probe that says "available" for something that does not work fails here. Nothing assumes
what this machine has: where a feature is missing, the test that needs it is skipped with the
probe's own reason.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flexos import _linux, hardening, probe
from flexos.drivers import unavailable
from flexos.errors import HardeningError

FLEXOS = Path(sys.executable).parent / "flexos"
X86_64 = os.uname().machine == "x86_64" and ctypes.sizeof(ctypes.c_void_p) == 8
PROBES: list[Callable[[], probe.Feature]] = [
    probe.seccomp,
    probe.landlock,
    probe.user_namespaces,
    probe.network_namespaces,
    probe.kvm,
    probe.pku,
]


def run_python(*code: str) -> subprocess.CompletedProcess[str]:
    """Run the ``code`` pieces in a fresh interpreter: what it does to itself (filters, namespaces) stays there."""
    source = "\n".join(textwrap.dedent(piece) for piece in code)
    return subprocess.run([sys.executable, "-I", "-c", source], capture_output=True, text=True, timeout=60)


def fresh_machine_report(*setup: str) -> dict[str, probe.Feature]:
    """``machine_report()`` as a fresh interpreter sees it, after running the ``setup`` code pieces."""
    done = run_python(
        *setup,
        """
        import dataclasses, json
        from flexos.probe import machine_report
        print(json.dumps([dataclasses.astuple(feature) for feature in machine_report()]))
        """,
    )
    assert done.returncode == 0, done.stderr
    return {name: probe.Feature(name, available, detail) for name, available, detail in json.loads(done.stdout)}


def skip_unless(feature: probe.Feature) -> None:
    if not feature.available:
        pytest.skip(f"{feature.name} unavailable here: {feature.detail}")


def syscall(number: int, *args: int) -> tuple[int, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(number), *(ctypes.c_long(arg) for arg in args))
    return result, (ctypes.get_errno() if result == -1 else 0)


# -- every probe -----------------------------------------------------------------------------------


@pytest.mark.parametrize("probe_function", PROBES, ids=lambda function: function.__name__)
def test_probe_is_quick_and_explains_itself(probe_function: Callable[[], probe.Feature]) -> None:
    started = time.perf_counter()
    feature = probe_function()
    elapsed = time.perf_counter() - started
    assert elapsed < 0.5, f"{probe_function.__name__} took {elapsed:.3f} s"
    assert isinstance(feature, probe.Feature)
    assert isinstance(feature.available, bool)
    assert len(feature.detail) > 10 and feature.detail == feature.detail.strip()
    with pytest.raises(dataclasses.FrozenInstanceError):
        feature.available = not feature.available  # type: ignore[misc]


def test_machine_report_has_every_probe_once() -> None:
    names = [feature.name for feature in probe.machine_report()]
    assert names == [probe_function().name for probe_function in PROBES]
    assert len(set(names)) == len(names)


def test_probes_leave_no_child_behind() -> None:
    done = run_python(
        """
        import os
        from flexos.probe import machine_report
        machine_report()
        try:
            os.waitpid(-1, os.WNOHANG)
            print("a child is left")
        except ChildProcessError:
            print("no child")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no child"


def test_off_linux_every_probe_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    report = probe.machine_report()
    assert [feature.name for feature in report] == [probe_function().name for probe_function in PROBES]
    for feature in report:
        assert feature == probe.Feature(feature.name, False, "not Linux (darwin): flexos runs on Linux only")


# -- system call numbers: one table, for the probe and the hardening ------------------------------


@pytest.mark.parametrize("arch", sorted({_linux.arch(), "aarch64"}))
def test_hardening_uses_landlock_exactly_when_the_probe_says_it_is_available(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: on aarch64 the probe knew Landlock's system call number and the hardening did not,
    so ``flexos check`` said available and the compartment refused to start. (Landlock's numbers
    are the same on x86_64 and aarch64, so either machine can stand in for the other here.)"""
    if _linux.syscall_number("landlock_create_ruleset") != _linux.syscall_number("landlock_create_ruleset", arch):
        pytest.skip(f"{arch}'s Landlock numbers differ from this machine's: its kernel cannot answer for it")
    real = os.uname()
    monkeypatch.setattr(os, "uname", lambda: os.uname_result((*real[:4], arch)))  # the machine says arch
    feature = probe.landlock()
    abi = hardening.landlock_abi()
    assert (abi >= 1) == feature.available, (abi, feature)
    if feature.available:
        assert feature.detail == f"Landlock ABI {abi} enabled"


def test_the_system_call_table_knows_both_architectures() -> None:
    for name in ("landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "pkey_alloc", "pkey_free"):
        assert _linux.syscall_number(name, "x86_64") is not None, name
        assert _linux.syscall_number(name, "aarch64") is not None, name
    assert _linux.syscall_number("pkey_alloc", "aarch64") == 289  # the generic table, not x86_64's 330
    assert _linux.syscall_number("landlock_create_ruleset", "x86_64 (32-bit userland)") is None


def test_an_unknown_architecture_is_said_by_the_probe_and_refused_by_the_hardening(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_linux, "arch", lambda: "riscv64")
    assert probe.landlock() == probe.Feature("landlock", False, "not probed: unknown syscall number on riscv64")
    assert "pkey_alloc not probed: unknown syscall number on riscv64" in probe.pku().detail
    assert hardening.landlock_abi() == 0
    with pytest.raises(HardeningError, match="Landlock's system call numbers on riscv64 are unknown"):
        hardening.restrict_filesystem([], [])


# -- seccomp ---------------------------------------------------------------------------------------

# A raw BPF program, not libseccomp: uname(2) (x86_64 number 63) fails with EPERM, the rest is allowed.
RAW_SECCOMP_FILTER = """
    import ctypes, os
    class Instruction(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]
    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Instruction))]
    instructions = (Instruction * 4)(
        Instruction(0x20, 0, 0, 0),             # load the syscall number
        Instruction(0x15, 0, 1, 63),            # uname?
        Instruction(0x06, 0, 0, 0x00050000 | 1),  # return ERRNO(EPERM)
        Instruction(0x06, 0, 0, 0x7FFF0000),    # return ALLOW
    )
    program = Program(4, instructions)
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(38, 1, 0, 0, 0) == 0      # PR_SET_NO_NEW_PRIVS
    if libc.prctl(22, 2, ctypes.byref(program), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        print("refused", ctypes.get_errno())
    else:
        try:
            os.uname()
            print("not filtered")
        except PermissionError:
            print("filtered")
"""


def test_seccomp_kernel_part_agrees_with_installing_a_filter() -> None:
    if not X86_64:
        pytest.skip(f"the raw filter uses x86_64 syscall numbers; this is {os.uname().machine}")
    done = run_python(RAW_SECCOMP_FILTER)
    assert done.returncode == 0, done.stderr
    filters_work = done.stdout.strip() == "filtered"
    assert ("the kernel accepts seccomp filters" in probe.seccomp().detail) == filters_work, done.stdout


def test_seccomp_library_part_agrees_with_find_library() -> None:
    feature = probe.seccomp()
    if ctypes.util.find_library("seccomp") is None:
        assert not feature.available
        assert "libseccomp is not installed" in feature.detail
    else:
        assert re.search(r"libseccomp [\d.?]+ loads|does not load", feature.detail), feature.detail


def test_seccomp_available_means_libseccomp_filters_work() -> None:
    feature = probe.seccomp()
    skip_unless(feature)
    done = run_python(
        LIBSECCOMP_DENY.format(rules=[("uname", errno.EPERM)]),
        """
        try:
            os.uname()
            print("not filtered")
        except PermissionError:
            print("filtered")
        """,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "filtered"


# -- landlock --------------------------------------------------------------------------------------

# (first ABI, handled_access_fs, handled_access_net, scoped): a ruleset only a kernel with that ABI accepts.
LANDLOCK_RIGHTS = [
    (1, 1 << 2, None, None),  # LANDLOCK_ACCESS_FS_READ_FILE
    (2, 1 << 2 | 1 << 13, None, None),  # + LANDLOCK_ACCESS_FS_REFER
    (3, 1 << 2 | 1 << 14, None, None),  # + LANDLOCK_ACCESS_FS_TRUNCATE
    (4, 1 << 2, 1 << 0, None),  # + LANDLOCK_ACCESS_NET_BIND_TCP
    (5, 1 << 2 | 1 << 15, None, None),  # + LANDLOCK_ACCESS_FS_IOCTL_DEV
    (6, 1 << 2, 0, 1 << 0),  # + LANDLOCK_SCOPE_ABSTRACT_UNIX_SOCKET
]


def landlock_abi() -> int | None:
    feature = probe.landlock()
    match = re.fullmatch(r"Landlock ABI (\d+) enabled", feature.detail)
    assert bool(match) == feature.available, feature
    return int(match.group(1)) if match else None


@pytest.mark.parametrize(("first_abi", "fs", "net", "scoped"), LANDLOCK_RIGHTS, ids=lambda v: str(v))
def test_landlock_abi_agrees_with_the_rights_the_kernel_accepts(
    first_abi: int, fs: int, net: int | None, scoped: int | None
) -> None:
    if not X86_64:
        pytest.skip(f"uses the x86_64 syscall number of landlock_create_ruleset; this is {os.uname().machine}")
    fields = [fs] + [value for value in (net, scoped) if value is not None]
    attributes = (ctypes.c_uint64 * len(fields))(*fields)
    ruleset, error = syscall(444, ctypes.addressof(attributes), ctypes.sizeof(attributes), 0)
    if ruleset >= 0:
        os.close(ruleset)
    abi = landlock_abi()
    if abi is None:
        assert error in (errno.ENOSYS, errno.EOPNOTSUPP), errno.errorcode.get(error)
        assert ("disabled" in probe.landlock().detail) == (error == errno.EOPNOTSUPP)
    else:
        assert (error == 0) == (abi >= first_abi), (abi, errno.errorcode.get(error))


def test_landlock_abi_7_agrees_with_the_logging_flags_the_kernel_accepts() -> None:
    """ABI 7 added no access right, only flags of landlock_restrict_self; try one in a fresh process."""
    abi = landlock_abi()
    if abi is None:
        pytest.skip(f"landlock unavailable here: {probe.landlock().detail}")
    if not X86_64:
        pytest.skip(f"uses x86_64 syscall numbers; this is {os.uname().machine}")
    done = run_python(
        """
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
        # landlock_restrict_self(-1, LANDLOCK_RESTRICT_SELF_LOG_SUBDOMAINS_OFF): no ruleset, just the flag
        result = libc.syscall(ctypes.c_long(446), ctypes.c_long(-1), ctypes.c_long(1 << 2))
        print("accepted" if result == 0 else f"refused {ctypes.get_errno()}")
        """
    )
    assert done.returncode == 0, done.stderr
    assert (done.stdout.strip() == "accepted") == (abi >= 7), (abi, done.stdout)


def test_landlock_available_means_it_enforces() -> None:
    skip_unless(probe.landlock())
    if not X86_64:
        pytest.skip(f"uses x86_64 syscall numbers; this is {os.uname().machine}")
    done = run_python(
        """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        handled = ctypes.c_uint64(1 << 2)       # LANDLOCK_ACCESS_FS_READ_FILE, and no rule allowing it
        ruleset = libc.syscall(ctypes.c_long(444), ctypes.byref(handled), ctypes.c_long(8), ctypes.c_long(0))
        assert ruleset >= 0, ctypes.get_errno()
        assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
        assert libc.syscall(ctypes.c_long(446), ctypes.c_long(ruleset), ctypes.c_long(0)) == 0, ctypes.get_errno()
        try:
            open("/proc/self/status").close()
            print("not enforced")
        except PermissionError:
            print("enforced")
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "enforced"


# -- namespaces ------------------------------------------------------------------------------------

UNSHARE_IN_FRESH_PROCESS = """
    import json, os
    def attempt(flags, map_ids):
        uid, gid = os.getuid(), os.getgid()  # after unshare they read as the overflow id
        try:
            os.unshare(flags)
            if map_ids:
                for name, line in (("setgroups", "deny"), ("uid_map", f"0 {{uid}} 1"), ("gid_map", f"0 {{gid}} 1")):
                    with open(f"/proc/self/{{name}}", "w") as file:
                        file.write(line)
            if flags & os.CLONE_NEWNET:
                with open("/proc/self/net/dev") as file:
                    return [line.split(":")[0].strip() for line in file.read().splitlines()[2:]]
            return []
        except OSError as exc:
            return exc.errno
    print(json.dumps(attempt({flags}, {map_ids})))
"""


def unshare_in_fresh_process(flags: int, map_ids: bool) -> list[str] | int:
    """The interfaces the new namespaces show (a list), or the errno that refused them."""
    if not hasattr(os, "unshare"):
        pytest.skip("os.unshare needs Python 3.12+")
    done = run_python(UNSHARE_IN_FRESH_PROCESS.format(flags=flags, map_ids=map_ids))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_userns_agrees_with_unsharing_in_a_fresh_process() -> None:
    result = unshare_in_fresh_process(os.CLONE_NEWUSER, map_ids=True)
    feature = probe.user_namespaces()
    assert feature.available == isinstance(result, list), (feature, result)
    if isinstance(result, int):
        assert errno.errorcode[result] in feature.detail


def test_netns_agrees_with_unsharing_in_a_fresh_process() -> None:
    with_userns = unshare_in_fresh_process(os.CLONE_NEWUSER | os.CLONE_NEWNET, map_ids=False)
    result = with_userns if isinstance(with_userns, list) else unshare_in_fresh_process(os.CLONE_NEWNET, False)
    feature = probe.network_namespaces()
    assert feature.available == isinstance(result, list), (feature, result)
    if isinstance(result, list):
        assert ("with a new user namespace" in feature.detail) == isinstance(with_userns, list)
        assert ("it has only lo" in feature.detail) == (result == ["lo"]), (feature, result)


def test_netns_agrees_with_the_unshare_command() -> None:
    command = shutil.which("unshare")
    if command is None:
        pytest.skip("util-linux's unshare is not installed")
    done = subprocess.run([command, "-Urn", "cat", "/proc/self/net/dev"], capture_output=True, text=True, timeout=30)
    feature = probe.network_namespaces()
    if done.returncode == 0:
        assert feature.available, feature
        assert "with a new user namespace" in feature.detail
        interfaces = [line.split(":")[0].strip() for line in done.stdout.splitlines()[2:]]
        assert ("it has only lo" in feature.detail) == (interfaces == ["lo"])
    else:
        assert "with a new user namespace" not in feature.detail, (feature, done.stderr)


def test_a_hanging_probe_child_is_killed_and_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    def hang(*_: object) -> None:
        time.sleep(30)
        os._exit(0)

    monkeypatch.setattr(probe, "_child_unshare", hang)
    started = time.perf_counter()
    feature = probe.user_namespaces()
    assert time.perf_counter() - started < 10  # killed at the probe's timeout, not waited for (30 s)
    assert not feature.available
    assert feature.detail.endswith(f"the probe child did not finish within {probe._CHILD_TIMEOUT_S} s")


def test_a_probe_child_that_dies_silently_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe, "_child_unshare", lambda *_: os._exit(3))
    feature = probe.network_namespaces()
    assert feature == probe.Feature(
        "netns", False, "no network namespace: the probe child ended without a report (exit status 3)"
    )


# -- what the probes say when the kernel refuses ---------------------------------------------------

# Makes each named syscall fail with its errno in this process and its children (libseccomp).
# Makes each named syscall fail with its errno in this process and its children (libseccomp); a rule
# (name, errno, first_argument) only denies calls whose first argument is that value.
LIBSECCOMP_DENY = """
    import ctypes, ctypes.util, json, os
    class Comparison(ctypes.Structure):  # struct scmp_arg_cmp
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
    seccomp = ctypes.CDLL(ctypes.util.find_library("seccomp"))
    seccomp.seccomp_init.restype = ctypes.c_void_p
    context = ctypes.c_void_p(seccomp.seccomp_init(ctypes.c_uint32(0x7FFF0000)))  # SCMP_ACT_ALLOW
    for name, error, *first_argument in {rules}:
        number = seccomp.seccomp_syscall_resolve_name(name.encode())
        action = ctypes.c_uint32(0x00050000 | error)                                 # SCMP_ACT_ERRNO
        comparisons = (Comparison * 1)(Comparison(0, 4, *first_argument, 0)) if first_argument else None  # EQ
        count = ctypes.c_uint(1 if first_argument else 0)
        assert seccomp.seccomp_rule_add_array(context, action, ctypes.c_int(number), count, comparisons) == 0
    assert seccomp.seccomp_load(context) == 0
"""


def probes_under_filter(rules: list[tuple]) -> dict[str, probe.Feature]:
    """Every probe's verdict, run in a fresh process where ``rules`` (see LIBSECCOMP_DENY) are denied."""
    skip_unless(probe.seccomp())
    return fresh_machine_report(LIBSECCOMP_DENY.format(rules=rules))


def test_probes_report_refused_namespaces_and_missing_landlock() -> None:
    report = probes_under_filter([("unshare", errno.EPERM), ("landlock_create_ruleset", errno.ENOSYS)])
    assert report["userns"] == probe.Feature(
        "userns", False, f"no user namespace as uid {os.getuid()}: unshare failed: EPERM"
    )
    assert not report["netns"].available
    assert report["netns"].detail.count("unshare failed: EPERM") == 2
    assert report["landlock"] == probe.Feature(
        "landlock", False, "Landlock is not compiled into this kernel (CONFIG_SECURITY_LANDLOCK)"
    )


def test_probes_report_disabled_landlock_and_refused_kvm() -> None:
    report = probes_under_filter([("landlock_create_ruleset", errno.EOPNOTSUPP), ("ioctl", errno.ENOTTY)])
    assert report["landlock"] == probe.Feature(
        "landlock", False, "Landlock compiled in but disabled (add landlock to the lsm= boot parameter)"
    )
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert report["kvm"] == probe.Feature("kvm", False, "/dev/kvm opened but KVM_GET_API_VERSION failed: ENOTTY")


def test_probes_report_a_kernel_without_seccomp_filters() -> None:
    report = probes_under_filter([("prctl", errno.EINVAL, 22)])  # PR_SET_SECCOMP
    assert not report["seccomp"].available
    assert report["seccomp"].detail.startswith(
        "the kernel has seccomp but no filter mode (PR_SET_SECCOMP with a NULL filter gave EINVAL)"
    )
    report = probes_under_filter([("prctl", errno.EINVAL, 21)])  # PR_GET_SECCOMP
    assert not report["seccomp"].available
    assert report["seccomp"].detail.startswith("the kernel has no seccomp (prctl(PR_GET_SECCOMP) failed: EINVAL)")


# -- kvm -------------------------------------------------------------------------------------------


def test_kvm_agrees_with_creating_a_vm() -> None:
    feature = probe.kvm()
    try:
        device = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        assert not feature.available
        assert ("no /dev/kvm" in feature.detail) == (exc.errno == errno.ENOENT)
        pytest.skip(f"no usable /dev/kvm: {feature.detail}")
    try:
        version = fcntl.ioctl(device, 0xAE00)  # KVM_GET_API_VERSION
        vm = fcntl.ioctl(device, 0xAE01, 0)  # KVM_CREATE_VM
        os.close(vm)
    finally:
        os.close(device)
    assert feature.available
    assert f"/dev/kvm present (API version {version})" in feature.detail
    assert ("kvm_pvm" in feature.detail) == Path("/sys/module/kvm_pvm").exists()


# -- pku -------------------------------------------------------------------------------------------


def test_pku_available_exactly_when_the_cpu_flag_and_pkey_alloc_both_work() -> None:
    """The raw pkey_alloc runs in a fresh process: after a failed one, the next one in the same
    process fails with ENOSPC instead of EINVAL, and the probe reports the first call's errno."""
    if not X86_64:
        pytest.skip(f"pkey_alloc is probed with x86_64 syscall numbers; this is {os.uname().machine}")
    flags_line = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    has_flag = bool(flags_line) and "pku" in flags_line.group(1).split()
    done = run_python(
        """
        import ctypes, json
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        key = libc.syscall(ctypes.c_long(330), ctypes.c_long(0), ctypes.c_long(0))  # pkey_alloc
        error = ctypes.get_errno() if key == -1 else 0
        if key >= 0:
            libc.syscall(ctypes.c_long(331), ctypes.c_long(key))  # pkey_free
        print(json.dumps(error))
        """
    )
    assert done.returncode == 0, done.stderr
    error = json.loads(done.stdout)
    feature = probe.pku()
    assert feature.available == (has_flag and error == 0), (feature, has_flag, error)
    assert ("no 'pku' flag in /proc/cpuinfo" in feature.detail) == (not has_flag)
    assert ("pkey_alloc failed" in feature.detail) == (error != 0)
    if error:
        assert f"pkey_alloc failed with {errno.errorcode[error]}" in feature.detail


def test_pku_says_the_same_on_every_call() -> None:
    """Regression: pkey_alloc ran in the calling process, so the second probe said ENOSPC, not EINVAL."""
    assert len({probe.pku() for _ in range(3)}) == 1


def test_intel_pku_driver_is_refused_with_the_probes_reason() -> None:
    feature = probe.pku()
    reason = unavailable("intel-pku")
    assert reason is not None
    if feature.available:
        assert "cannot separate Python objects" in reason
    else:
        assert reason.startswith("intel-pku needs a CPU with memory protection keys (PKU); this CPU has none")
        assert feature.detail in reason
        assert reason.endswith("Use driver 'process' instead.")


# -- flexos check ----------------------------------------------------------------------------------

IMAGE = """\
compartments:
  - name: app
    mechanism: {{driver: fcalls}}
    default: true
  - name: box
    mechanism: {{driver: {driver}}}
libraries:
  colorsys: {{compartment: box}}
"""


def flexos_check(tmp_path: Path, driver: str) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "flexos.yaml"
    config.write_text(IMAGE.format(driver=driver))
    return subprocess.run([str(FLEXOS), "check", "-c", str(config)], capture_output=True, text=True, timeout=60)


def machine_section(stdout: str) -> dict[str, tuple[str, str]]:
    lines = stdout.splitlines()
    assert "this machine:" in lines, stdout
    assert lines.index("this machine:") > lines.index("libraries:")
    section = {}
    for line in lines[lines.index("this machine:") + 1 :]:
        name, status, detail = line.split(maxsplit=2)
        section[name] = (status, detail)
    return section


def test_check_prints_every_feature_and_exits_0(tmp_path: Path) -> None:
    done = flexos_check(tmp_path, "process")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    section = machine_section(done.stdout)
    expected = {feature.name: feature for feature in probe.machine_report()}
    assert list(section) == list(expected)
    for name, (status, detail) in section.items():
        assert status == ("available" if expected[name].available else "unavailable")
        assert detail == expected[name].detail


def test_check_with_an_unavailable_driver_still_reports_the_machine_and_exits_2(tmp_path: Path) -> None:
    done = flexos_check(tmp_path, "intel-pku")
    assert done.returncode == 2
    assert "compartment 'box': intel-pku" in done.stderr
    assert list(machine_section(done.stdout)) == [feature.name for feature in probe.machine_report()]
