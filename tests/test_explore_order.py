"""The safety order: the documented product order, and explicit orders read from Graphviz files."""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import pytest

from flexos import ConfigError
from flexos.explore.order import documented_order, members, read_order
from flexos.explore.space import STRENGTH, Configuration, Space, load_space

SPACE = """\
compartments:
  - name: app
    mechanism: {driver: fcalls}
    default: true
explore:
  components: {a: {short: A}, b: {short: B}, c: {short: C}}
  compartments: 3
  drivers: [fcalls, subinterp, process, vm]
  hardening:
    compartment: {Env: {env: clean}}
    library: {H: {audit: {deny: [subprocess]}}}
  benchmark: {command: 'echo 1'}
"""


@pytest.fixture(scope="module")
def space(tmp_path_factory: pytest.TempPathFactory) -> Space:
    path = tmp_path_factory.mktemp("order") / "space.yaml"
    path.write_text(SPACE)
    return load_space(path)[0]


def separation(config: Configuration, a: str, b: str) -> int:
    """The boundary between two components as docs/explore.md states it (the app is in no compartment)."""
    strength = {n: STRENGTH[c.driver] for c in config.compartments for n in c.components}
    home = {n: i for i, c in enumerate(config.compartments) for n in c.components}
    if "app" in (a, b):
        return strength[b if a == "app" else a]
    return 0 if home[a] == home[b] else max(strength[a], strength[b])


def hardening(config: Configuration) -> set[tuple[str, str]]:
    owned = {(n, t) for c in config.compartments for n in c.components for t in c.hardening}
    return owned | set(config.library_hardening)


def at_least_as_safe(x: Configuration, y: Configuration) -> bool:
    """The documented definition, checked literally: refinement, pairwise separation, hardening superset."""
    refines = all(any(set(bx.components) <= set(by.components) for by in y.compartments) for bx in x.compartments)
    pairs = itertools.combinations(["app", "a", "b", "c"], 2)
    separated = all(separation(x, p, q) >= separation(y, p, q) for p, q in pairs)
    return refines and separated and hardening(x) >= hardening(y)


def test_documented_order_is_the_definition(space: Space) -> None:
    configs = space.configurations()
    order = documented_order(configs)
    assert len(configs) > 500
    for index in range(0, len(configs), 7):
        x = configs[index]
        for j, y in enumerate(configs):
            if j != index:
                assert bool(order.above[index] >> j & 1) == at_least_as_safe(y, x), (x.name, y.name)
                assert bool(order.below[index] >> j & 1) == at_least_as_safe(x, y), (x.name, y.name)


def test_stronger_drivers_are_safer_and_hardening_adds(space: Space) -> None:
    configs = space.configurations()
    order = documented_order(configs)
    index = {c.name: i for i, c in enumerate(configs)}
    # all three together, one compartment: fcalls < subinterp < process < process+Env < process+Env+H on a < vm
    chain = ["A1B1C1_f", "A1B1C1_s", "A1B1C1_p", "A1B1C1_pEnv", "A1HB1C1_pEnv"]
    for lower, upper in itertools.pairwise(chain):
        assert index[upper] in order.covers(index[lower]), (lower, upper)
    assert index["A1B1C1_v"] in order.covers(index["A1B1C1_p"])
    # vm is not "at least as safe" as hardened process: the hardening is not a superset
    assert index["A1B1C1_v"] not in members(order.above[index["A1B1C1_pEnv"]])
    # splitting a process compartment in two processes is safer; with fcalls beside process it is not comparable
    assert index["A1B2C2_pp"] in order.covers(index["A1B1C1_p"])
    assert index["A1B2C2_fp"] not in members(order.above[index["A1B1C1_p"]])


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "order.dot"
    path.write_text(textwrap.dedent(text))
    return path


def test_explicit_order(space: Space, tmp_path: Path) -> None:
    configs = space.configurations()
    index = {c.name: i for i, c in enumerate(configs)}
    # A user who ranks vm above every process configuration, and numbers compartments their own way.
    path = write(
        tmp_path,
        """\
        digraph mine {
            A1B1C1_p -> A1B1C1_pEnv -> A1B1C1_v
            "A2B1C1_pp" -> A1B1C1_v
        }
        """,
    )
    order = read_order(path, space, configs)
    assert order.source == str(path)
    assert members(order.above[index["A1B1C1_p"]]) == sorted([index["A1B1C1_pEnv"], index["A1B1C1_v"]])
    assert members(order.below[index["A1B1C1_v"]]) == sorted(
        [index["A1B1C1_p"], index["A1B1C1_pEnv"], index["A1B2C2_pp"]]
    )
    assert order.covers(index["A1B1C1_p"]) == (index["A1B1C1_pEnv"],)
    assert order.above[index["A1B1C1_f"]] == 0
    assert (
        order.notes
        and f"{len(configs) - 4} of the space's {len(configs)} configurations are not in" in (order.notes[0])
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("digraph { A1B1C1_p -> Z9 }", r"order.dot:1: cannot read 'Z9': expected names like A1B1C1_f"),
        (
            "digraph {\n  A1B1C1_p -> A1B1C1_pEnv\n  A1B1C1_pEnv -> A1B1C1_p\n}",
            r"the order has a cycle \(A1B1C1_p -> A1B1C1_pEnv -> A1B1C1_p\)",
        ),
        ("graph { A1B1C1_p -- A1B1C1_v }", r"order.dot:1: use a digraph, with arrows"),
        ("this is not dot {", r"order.dot: not a Graphviz file"),
        ("digraph {\n\n  A1B1C1_pHx -> A1B1C1_v }", r"order.dot:3: cannot read the compartments part 'pHx'"),
        (
            "digraph { A1B2C2_p -> A1B1C1_v }",
            r"order.dot:1: 'A1B2C2_p' numbers its compartments \[1, 2\] but describes 1",
        ),
    ],
)
def test_explicit_order_problems(space: Space, tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_order(write(tmp_path, text), space, space.configurations())


def test_a_configuration_outside_the_space(tmp_path: Path) -> None:
    path = tmp_path / "space.yaml"
    text = SPACE.replace("drivers: [fcalls, subinterp, process, vm]", "drivers: [process]")
    path.write_text(text.replace("  benchmark:", "  constraints: {apart: [[a, b]]}\n  benchmark:"))
    space = load_space(path)[0]
    order = write(tmp_path, "digraph {\n  A1B2C2_pp -> A1B2C2_ppEnv\n  A1B1C2_pp -> A1B2C3_ppp\n}")
    with pytest.raises(ConfigError) as info:
        read_order(order, space, space.configurations())
    assert info.value.problems == [
        f"{order}:3: 'A1B1C2_pp' is not a configuration of {path} (its constraints, drivers or toggles exclude it)"
    ]
