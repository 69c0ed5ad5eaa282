"""What is particular to the ``subinterp`` driver: a compartment is an interpreter of this process.

The gate semantics it shares with the other drivers are in test_gates.py (parametrized over
drivers); here: separate interpreters and module state, threads entering from either side,
zero-copy buffers and their lifetime, interpreters ended on stop, extensions that cannot live
in a subinterpreter, and the driver refused where the Python cannot run it.
"""

from __future__ import annotations

import hashlib
import importlib
import struct
import sys
import threading
import time

import pytest

import flexos
from flexos.drivers import unavailable
from flexos.errors import ProtocolError

pytestmark = pytest.mark.skipif(
    unavailable("subinterp") is not None, reason=f"subinterp unavailable here: {unavailable('subinterp')}"
)

_interpreters = pytest.importorskip("_interpreters")


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture
def runtime_of_interplib(boot):
    return boot("subinterp", {"interplib": "box", "complib": "other"})


@pytest.fixture
def interplib(runtime_of_interplib):
    return importlib.import_module("interplib")


def test_compartment_is_another_interpreter_with_its_own_modules(interplib):
    assert interplib.interpreter_id() != _interpreters.get_current()[0]
    # Module state is per interpreter: the app holds a gate, never the library's module.
    assert interplib.keep(b"x") == 1
    assert isinstance(sys.modules["interplib"], flexos.gates.proxies.ModuleProxy)


def test_two_compartments_are_two_interpreters(boot):
    runtime = boot("subinterp", {"interplib": "box", "complib": "other"})
    interplib = importlib.import_module("interplib")
    complib = importlib.import_module("complib")
    complib.add(1, 2)
    ids = {interplib.interpreter_id(), _interpreters.get_current()[0]}
    assert len(ids) == 2
    assert {"box", "other"} <= set(runtime.compartments)
    assert len(_interpreters.list_all()) >= 3


def test_threads_from_both_sides(interplib):
    """App threads enter concurrently; a thread the library starts can call back into the app."""
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(300):
                assert interplib.spin(n + i) == sum(range(n + i))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    app_thread_ids: list[int] = []

    def callback(value: int) -> int:
        app_thread_ids.append(threading.get_ident())
        return value * 2

    assert interplib.call_from_new_thread(callback, 21) == 42
    assert app_thread_ids and app_thread_ids[0] != threading.get_ident()


def test_each_compartment_has_its_own_gil(boot, tmp_path):
    """A compartment that never releases its GIL does not stop another compartment.

    Compartment box spins holding its GIL (switch interval 60 s) until compartment other sets a
    flag in shared memory. Under one GIL the setter could not run before the interval ran out.
    """
    boot("subinterp", {"interplib": "box", "interpflag": "other"})
    interplib = importlib.import_module("interplib")
    interpflag = importlib.import_module("interpflag")
    flag = tmp_path / "flag"
    flag.write_bytes(b"\0")
    result: list[bool] = []
    spinner = threading.Thread(target=lambda: result.append(interplib.hold_gil_until_flag(str(flag), 60.0)))
    spinner.start()
    time.sleep(0.2)  # let it take its GIL and start spinning
    assert interpflag.set_flag(str(flag)) is True
    spinner.join(70)
    assert result == [True]


def test_large_buffer_crosses_without_a_copy(interplib):
    big = bytes(range(256)) * (100 * 4096)  # 100 MiB
    expected = hashlib.sha256(big).hexdigest()
    interplib.digest(b"warm up")
    before = _rss_bytes()
    kind, length, digest = interplib.digest(big)
    grown = _rss_bytes() - before
    assert (kind, length, digest) == ("memoryview", len(big), expected)
    assert grown < 20 << 20, f"RSS grew by {grown >> 20} MiB: the 100 MiB argument was copied"


def test_small_buffers_are_copied_as_bytes(interplib):
    assert interplib.digest(b"abc")[:2] == ("bytes", 3)
    assert interplib.digest(bytearray(b"abc"))[:2] == ("bytearray", 3)


def test_lent_buffer_outlives_the_callers_reference(interplib):
    """The compartment may keep a lent buffer: the memory stays pinned until it lets go."""
    from flexos import _subinterp

    baseline = _subinterp.pending_loans()
    data = b"kept" * (1 << 16)
    expected = hashlib.sha256(data).hexdigest()
    interplib.keep(data)
    del data
    assert interplib.digest_kept() == [expected]
    assert _subinterp.pending_loans() == baseline + 1
    interplib.forget_kept()
    interplib.digest(b"next call")  # pins are dropped at our next call
    assert _subinterp.pending_loans() == baseline


def test_forged_loan_is_refused(runtime_of_interplib):
    """The app never borrows (loans go from the app to a compartment): a loan description sent to
    it, genuine or forged, is refused. The compartment's side of these checks:
    tests/security/test_subinterp_escape.py."""
    from flexos import _subinterp
    from flexos.transports.interp import InterpreterTransport

    gate = runtime_of_interplib.compartments["box"].link()._transport._endpoint
    payload = struct.pack("<qQq", *_subinterp.lend(b"z" * 100_000, gate))
    loan, address, length = struct.unpack("<qQq", payload)
    with pytest.raises(ProtocolError):
        InterpreterTransport.borrow(payload)
    with pytest.raises(ProtocolError):
        InterpreterTransport.borrow(struct.pack("<qQq", loan, address + 4096, length))
    with pytest.raises(ProtocolError):
        InterpreterTransport.borrow(struct.pack("<qQq", loan, address, length + 1))
    with pytest.raises(ProtocolError):
        InterpreterTransport.borrow(b"short")
    assert _subinterp.pending_loans() >= 1


def test_loans_are_refused_over_a_process_link():
    """Only a same-process transport can carry a loan: elsewhere it is a protocol violation."""
    import msgpack

    from flexos.gates.link import Link
    from flexos.transports.loopback import LoopbackTransport
    from flexos.wire.codec import Ext
    from flexos.wire.frames import Kind

    link = Link("peer")
    link.attach(LoopbackTransport(lambda frame: frame))
    reply = msgpack.packb([Kind.REPLY, msgpack.ExtType(Ext.LOAN, b"\0" * 24), []], use_bin_type=True)
    with pytest.raises(ProtocolError, match="loan"):
        link.codec.unpack(reply)


def test_stop_ends_the_interpreters(boot):
    before = len(_interpreters.list_all())
    for _ in range(5):
        runtime = boot("subinterp", {"interplib": "box"})
        interplib = importlib.import_module("interplib")
        assert interplib.spin(10) == 45
        assert len(_interpreters.list_all()) == before + 1
        runtime.stop()
        assert len(_interpreters.list_all()) == before


def test_single_phase_extension_is_refused_with_advice(interplib):
    """An extension without subinterpreter support fails at import, naming it and the fix."""
    with pytest.raises(ImportError) as info:
        interplib.import_module("readline")
    message = str(info.value)
    assert "readline" in message and "subinterpreters" in message


def test_placing_a_single_phase_extension_names_the_process_driver(boot):
    sys.modules.pop("_curses", None)
    boot("subinterp", {"_curses": "box"})
    with pytest.raises(ImportError) as info:
        importlib.import_module("_curses")
    message = str(info.value)
    assert "_curses" in message and "driver 'process'" in message


def test_a_subinterp_compartment_reaches_a_process_compartment(boot):
    """Through the app, which hands it the app's own gate (it has no way to a sibling of its own).
    Every other pair of drivers: test_routing.py."""
    from flexos import CompartmentSpec, Image

    image = Image(
        compartments={
            "app": CompartmentSpec("app", "fcalls", default=True),
            "box": CompartmentSpec("box", "subinterp"),
            "other": CompartmentSpec("other", "process"),
        },
        libraries={"interplib": "box", "complib": "other"},
    )
    with flexos.boot(image) as runtime:
        interplib = importlib.import_module("interplib")
        assert interplib.import_module("complib") == "complib"  # imported inside box
        assert runtime.compartments["other"].pid is not None  # ... which booted compartment other


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() of a multi-threaded process
def test_fork_with_a_running_compartment_warns_and_the_parent_keeps_working(interplib):
    """CPython 3.13 aborts a fork child while subinterpreters exist; flexos says so beforehand."""
    import os

    box = interplib.interpreter_id()
    with pytest.warns(RuntimeWarning, match="subinterp compartment 'box' is running"):
        child = os.fork()
        if child == 0:  # pragma: no cover - only where CPython lets the child live
            os._exit(0)
    os.waitpid(child, 0)
    assert interplib.interpreter_id() == box
    assert interplib.spin(10) == 45


def test_refused_before_313(monkeypatch):
    from flexos.drivers.subinterp import SubinterpDriver

    monkeypatch.setattr(sys, "version_info", (3, 12, 7, "final", 0))
    reason = SubinterpDriver.unavailable()
    assert reason is not None and "3.13" in reason and "process" in reason
