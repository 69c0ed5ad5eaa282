"""Fuzz the config loader and the wire protocol (hypothesis), 10,000 cases per target by default.

Targets:
  config    random YAML documents shaped like flexos.yaml -> parse() raises only ConfigError
  protocol  random bytes and random msgpack structures (with flexos's extension types) ->
            decode_frame() raises only ProtocolError, or GateError for a well-formed value this
            side refuses (a module it does not have and will not import on a compartment's word)
  replies   a real ``process`` compartment answers calls with fuzzed bytes -> the caller gets a
            value or a flexos error, never a crash or a hang, and the compartment stays usable

    .venv/bin/python bench/fuzz.py [--examples 10000] [--targets config,protocol,replies]

Exits non-zero (with the failing example) if any property breaks.
"""

from __future__ import annotations

import argparse
import builtins
import signal
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexos
from flexos import CompartmentSpec, Image
from flexos.config import parse
from flexos.gates.link import Link
from flexos.transports.loopback import LoopbackTransport
from flexos.wire.codec import Ext
from flexos.wire.frames import Kind, decode_frame

_KEYS = ["name", "compartments", "libraries", "mechanism", "driver", "default", "restart", "timeout",
         "hardening", "env", "network", "filesystem", "read", "write", "seccomp", "profile", "deny",
         "allow", "limits", "memory", "cpu_seconds", "open_files", "audit", "compartment", "strict",
         "spin_us", "start_timeout"]  # fmt: skip
_WORDS = ["fcalls", "process", "subinterp", "vm", "intel-pku", "main", "db", "sqlite3", "clean", "none",
          "compute-only", "512MiB", "on-failure", "never", "true", "false", "~", "-1", "1e400", ".inf"]  # fmt: skip


def _yaml_values() -> st.SearchStrategy:
    scalars = st.one_of(st.sampled_from(_WORDS), st.integers(-5, 10**6), st.booleans(), st.none(), st.text(max_size=6))
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=4), children, max_size=4),
        ),
        max_leaves=12,
    )


def _render(value: object, indent: int = 0) -> str:
    """A YAML rendering that keeps odd scalars odd (flow style, unquoted where it parses)."""
    pad = " " * indent
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "\n" + "\n".join(f"{pad}{key!s}: {_render(item, indent + 2)}" for key, item in value.items())
    if isinstance(value, list):
        if not value:
            return "[]"
        return "\n" + "\n".join(f"{pad}- {_render(item, indent + 2)}" for item in value)
    return "~" if value is None else str(value)


def fuzz_config(examples: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="flexos-fuzz-"))
    path = directory / "flexos.yaml"

    @settings(max_examples=examples, deadline=None, database=None)
    @given(st.dictionaries(st.sampled_from(_KEYS), _yaml_values(), max_size=4))
    def never_a_traceback(document: dict) -> None:
        path.write_text(_render(document).lstrip("\n") + "\n")
        try:
            parse(path)
        except flexos.ConfigError:
            pass

    never_a_traceback()


def _frame_values() -> st.SearchStrategy:
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=8),
        st.binary(max_size=8),
    )

    def with_extensions(children: st.SearchStrategy) -> st.SearchStrategy:
        return st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.text(max_size=4), children, max_size=3),
            st.builds(lambda code, v: msgpack.ExtType(code, msgpack.packb(v)), st.integers(0, 12), children),
            st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=16)),
            st.builds(lambda n: msgpack.ExtType(Ext.BUILTIN, n.encode()), st.sampled_from(sorted(dir(builtins)))),
        )

    return st.recursive(leaves, with_extensions, max_leaves=16)


def fuzz_protocol(examples: int) -> None:
    # As in a booted image where nothing is placed: a module a peer names is never imported here.
    app, peer = Link("peer", replicated=lambda _module: True), Link("app")
    app.attach(LoopbackTransport(peer.dispatch))
    peer.attach(LoopbackTransport(app.dispatch))

    def decode(data: bytes) -> None:
        try:
            decode_frame(app.codec, data)
        except (flexos.ProtocolError, flexos.GateError):
            pass

    @settings(max_examples=examples, deadline=None, database=None)
    @given(st.binary(max_size=512))
    def random_bytes(data: bytes) -> None:
        decode(data)

    @settings(max_examples=examples, deadline=None, database=None)
    @given(st.sampled_from([Kind.CALL, Kind.REPLY, Kind.ERROR]), st.lists(_frame_values(), max_size=7))
    def random_frames(kind: int, fields: list) -> None:
        decode(msgpack.packb([kind, *fields]))

    random_bytes()
    random_frames()


_ARMED_LIBRARY = textwrap.dedent(
    '''
    """Placed in the fuzzed compartment: replaces its next reply with bytes chosen by the fuzzer."""
    from flexos.gates.link import Link

    _honest = Link.dispatch
    _next = []

    def _dispatch(self, data, *rest):
        planted = _next.pop() if _next else None  # taken before the call: arm() plants for the next one
        reply = _honest(self, data, *rest)
        return reply if planted is None else planted

    Link.dispatch = _dispatch

    def arm(payload):
        _next.append(payload)  # used for the reply to the *next* call
        return "armed"

    def echo(value):
        return value
    '''
)


def fuzz_replies(examples: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="flexos-fuzz-"))
    (directory / "fuzzed.py").write_text(_ARMED_LIBRARY)
    sys.path.insert(0, str(directory))
    image = Image(
        {
            "app": CompartmentSpec("app", "fcalls", default=True),
            "box": CompartmentSpec("box", "process", timeout=10.0),
        },
        {"fuzzed": "box"},
    )
    with flexos.boot(image):
        import fuzzed

        payloads = st.one_of(st.binary(max_size=256), _frame_values().map(lambda v: msgpack.packb([Kind.REPLY, v, []])))

        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(payloads)
        def caller_survives(payload: bytes) -> None:
            fuzzed.arm(payload)
            try:
                fuzzed.echo("honest question")
            except BaseException:  # any error is fine (a decoded SystemExit too) ...
                pass
            assert fuzzed.echo("still there?") == "still there?"  # ... as long as the app goes on

        signal.alarm(max(60, examples // 20))  # a hang fails the run instead of blocking it
        caller_survives()
        signal.alarm(0)


TARGETS = {"config": fuzz_config, "protocol": fuzz_protocol, "replies": fuzz_replies}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000, help="cases per property (default 10000)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of " + ", ".join(TARGETS))
    args = parser.parse_args(argv)
    for name in args.targets.split(","):
        started = time.monotonic()
        TARGETS[name](args.examples)
        print(f"{name:9s} {args.examples} cases per property: ok ({time.monotonic() - started:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
