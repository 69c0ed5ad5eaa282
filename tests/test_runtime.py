"""The process driver as a runtime: real isolation, crashes, restarts, concurrency, lifetimes."""

from __future__ import annotations

import asyncio
import gc
import os
import re
import signal
import threading
import time
import types

import pytest

import flexos
from flexos.gates.proxies import ModuleProxy, RemoteObject

CRASH_DETECTED_WITHIN_S = 10


@pytest.fixture
def driver() -> str:
    """Every test here runs compartment box in its own process."""
    return "process"


def _sigkill_during_sleep(complib, runtime, tmp_path) -> tuple[pytest.ExceptionInfo, float]:
    """SIGKILL the compartment from another thread while the app waits in a remote sleep(30)."""
    pid = runtime.compartments["box"].pid
    sleeping = tmp_path / "sleeping"

    def kill_once_asleep():
        deadline = time.monotonic() + 30
        while not sleeping.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_once_asleep)
    killer.start()
    start = time.monotonic()
    with pytest.raises(flexos.CompartmentCrashed) as info:
        complib.sleep(30, str(sleeping))
    waited = time.monotonic() - start
    killer.join()
    return info, waited


# -- isolation ----------------------------------------------------------------------------------


def test_library_runs_in_another_process(runtime, complib):
    library_pid = complib.getpid()
    assert library_pid != os.getpid()
    assert library_pid == runtime.compartments["box"].pid


def test_compartment_is_a_live_child_process(runtime, complib):
    complib.getpid()
    pid = runtime.compartments["box"].pid
    os.kill(pid, 0)  # raises if there is no such process
    with open(f"/proc/{pid}/status") as status:
        ppid = next(int(line.split()[1]) for line in status if line.startswith("PPid:"))
    assert ppid == os.getpid()


def test_library_state_lives_in_the_compartment(runtime, complib):
    """The app never imported the real module: its state exists only in the compartment."""
    complib.bump_counter(3)
    assert isinstance(complib, ModuleProxy)
    assert complib.counter == 3


# -- crashes and restarts -----------------------------------------------------------------------


def test_sigkill_is_reported_promptly_with_the_signal(runtime, complib, tmp_path):
    complib.getpid()
    info, waited = _sigkill_during_sleep(complib, runtime, tmp_path)
    assert info.value.signal == signal.SIGKILL
    assert info.value.exitcode is None
    assert info.value.compartment == "box"
    assert waited < CRASH_DETECTED_WITHIN_S


def test_next_call_after_crash_restarts_the_compartment(runtime, complib, tmp_path):
    """The app goes on: the next call through the module boots a fresh compartment."""
    old_pid = complib.getpid()  # also binds complib.getpid before the crash
    _sigkill_during_sleep(complib, runtime, tmp_path)
    new_pid = complib.getpid()
    assert new_pid != old_pid
    assert new_pid == runtime.compartments["box"].pid
    assert complib.add(2, 2) == 4
    assert complib.Point(3, 4).norm2() == 25


def test_name_first_used_after_crash_works(runtime, complib, tmp_path):
    old_pid = complib.getpid()
    _sigkill_during_sleep(complib, runtime, tmp_path)
    assert complib.greet("again") == "Hello, again!"
    assert runtime.compartments["box"].pid != old_pid


def test_old_proxy_from_dead_instance_raises(runtime, complib, tmp_path):
    point = complib.Point(1, 2)
    _sigkill_during_sleep(complib, runtime, tmp_path)
    complib.getpid()  # the compartment is back
    with pytest.raises(flexos.CompartmentCrashed) as info:
        point.norm2()
    assert info.value.signal == signal.SIGKILL
    with pytest.raises(flexos.CompartmentCrashed):
        point.x  # noqa: B018


def test_library_exception_class_still_matches_after_restart(runtime, complib, tmp_path):
    lib_error = complib.LibError
    _sigkill_during_sleep(complib, runtime, tmp_path)
    with pytest.raises(lib_error):
        complib.raise_lib_error("after restart", 1)


def test_crash_inside_the_call_reports_the_signal(runtime, complib):
    with pytest.raises(flexos.CompartmentCrashed) as info:
        complib.crash()
    assert info.value.signal == signal.SIGKILL
    (note,) = info.value.__notes__
    assert re.fullmatch(r"the call it was serving: complib\.crash\(\) \(CALL of object \d+ \(a function\)\)", note), (
        note
    )
    assert complib.add(1, 1) == 2


def test_exit_code_is_reported(runtime, complib):
    with pytest.raises(flexos.CompartmentCrashed) as info:
        complib.exit_with(7)
    assert info.value.exitcode == 7
    assert info.value.signal is None
    assert complib.add(1, 1) == 2


def test_restart_never_keeps_raising(boot):
    runtime = boot("process", restart="never")
    import complib

    pid = complib.getpid()
    with pytest.raises(flexos.CompartmentCrashed):
        complib.exit_with(3)
    # Names not used before the crash: each use goes back to the compartment, which stays down.
    for _ in range(2):
        with pytest.raises(flexos.CompartmentCrashed) as info:
            complib.add(1, 2)
        assert info.value.exitcode == 3
    with pytest.raises(flexos.CompartmentCrashed):
        complib.greet("never")
    with pytest.raises(flexos.CompartmentCrashed):
        import complib.objects
    assert runtime.compartments["box"].pid in (pid, None)  # no new process was started


def test_crash_while_other_threads_are_calling(runtime, complib, tmp_path):
    """Every thread blocked in the dead compartment gets CompartmentCrashed, none hangs."""
    complib.getpid()
    outcomes: list[str] = []
    sleeping = [tmp_path / f"sleeping-{i}" for i in range(4)]

    def sleeper(marker):
        try:
            complib.sleep(30, str(marker))
            outcomes.append("returned")
        except flexos.CompartmentCrashed:
            outcomes.append("crashed")

    threads = [threading.Thread(target=sleeper, args=(marker,)) for marker in sleeping]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 30
    while not all(marker.exists() for marker in sleeping) and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(runtime.compartments["box"].pid, signal.SIGKILL)
    for thread in threads:
        thread.join(CRASH_DETECTED_WITHIN_S)
    assert not any(thread.is_alive() for thread in threads)
    assert outcomes == ["crashed"] * 4
    assert complib.add(1, 1) == 2


# -- concurrency --------------------------------------------------------------------------------


def test_many_threads_each_get_their_own_replies(runtime, complib):
    """8 threads x 10,000 calls into one compartment: every reply reaches its own caller."""
    threads_n, calls_n = 8, 10_000
    echo, add = complib.echo, complib.add
    mismatches: list[tuple] = []
    completed = [0] * threads_n
    errors: list[BaseException] = []

    def work(index):
        token = f"thread-{index}"
        try:
            for i in range(calls_n):
                sent = (token, i)
                got = echo(sent) if i % 2 else add(index * 1_000_000, i)
                expected = sent if i % 2 else index * 1_000_000 + i
                if got != expected:
                    mismatches.append((index, i, got))
                completed[index] += 1
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(index,)) for index in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert mismatches == []
    assert completed == [calls_n] * threads_n


def test_blocked_call_does_not_block_other_threads(runtime, complib, tmp_path):
    """While one thread waits inside the compartment, others are served (no global lock)."""
    release = tmp_path / "release"
    result: list = []
    waiter = threading.Thread(target=lambda: result.append(complib.wait_for(str(release))))
    waiter.start()
    for i in range(100):
        assert complib.add(i, 1) == i + 1
    assert waiter.is_alive()  # still blocked: it can only return once the file exists
    release.touch()
    waiter.join(30)
    assert result == [True]


def test_asyncio_app(runtime, complib, tmp_path):
    """Coroutines may call through a gate directly or via loop.run_in_executor."""
    release = tmp_path / "release"

    async def main():
        loop = asyncio.get_running_loop()
        direct = complib.add(1, 2)
        blocked = loop.run_in_executor(None, complib.wait_for, str(release))
        in_executor = await asyncio.gather(*(loop.run_in_executor(None, complib.add, i, i) for i in range(20)))
        still_waiting = not blocked.done()
        release.touch()
        return direct, in_executor, still_waiting, await blocked

    direct, in_executor, still_waiting, released = asyncio.run(main())
    assert direct == 3
    assert in_executor == [2 * i for i in range(20)]
    assert still_waiting
    assert released is True


def test_asyncio_callback_into_the_app(runtime, complib):
    """A library calling back into an executor thread of an async app runs the callback there."""

    async def main():
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, complib.call_and_report, threading.get_ident)

    report = asyncio.run(main())
    assert report["library_pid"] == runtime.compartments["box"].pid
    assert report["callback_result"] != threading.main_thread().ident


# -- object lifetimes ---------------------------------------------------------------------------


def _app_export_count(runtime) -> int:
    return len(runtime.compartments["box"].link().exports)


def _assert_exports_bounded(runtime, complib, calls: int) -> None:
    new_opaque = complib.new_opaque
    call = complib.call
    new_opaque()
    call(int)
    baseline, app_baseline = complib.export_count(), _app_export_count(runtime)
    for i in range(calls):
        new_opaque(i)  # a new library object, dropped at once by the app
        if i % 10 == 0:
            call(lambda: None)  # a new app object, dropped at once by the library
    gc.collect()
    after = complib.export_count()
    app_after = _app_export_count(runtime)
    assert after <= baseline + 16, f"compartment exports grew from {baseline} to {after} over {calls} calls"
    assert app_after <= app_baseline + 16, f"app exports grew from {app_baseline} to {app_after}"


def test_dropped_objects_are_released(runtime, complib):
    _assert_exports_bounded(runtime, complib, 20_000)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_dropped_objects_are_released_over_a_quarter_million_calls(runtime, complib):
    _assert_exports_bounded(runtime, complib, 250_000)


def test_held_objects_are_not_released(runtime, complib):
    """The other half of lifetime: objects the app still holds stay alive in the compartment."""
    held = [complib.new_opaque(f"kept {i}") for i in range(50)]
    for _ in range(200):
        complib.new_opaque()  # churn, so releases are flushed
    gc.collect()
    assert [obj.label for obj in held] == [f"kept {i}" for i in range(50)]


# -- fcalls without strict ----------------------------------------------------------------------


def test_fcalls_non_strict_imports_the_real_module(boot):
    boot("fcalls")
    import complib

    assert type(complib) is types.ModuleType
    assert not isinstance(complib, ModuleProxy)
    assert complib.getpid() == os.getpid()
    point = complib.Point(1, 2)
    assert not isinstance(point, RemoteObject)
    assert type(point).__module__ == "complib.objects"
    assert complib.kept_list() is complib.kept_list()  # no copy: there is no gate
