"""The safety order on configurations: the documented one, or one the user writes as a Graphviz file.

Documented order: a configuration is at least as safe as another when each pair of components
(the app's own code counts as one) is separated by an equal or stronger boundary, and its
hardening is a superset. Equal-or-stronger separation of every pair implies that its partition
refines the other's. Both are set inclusion of *safety facts*: ("separated", a, b, k) for each
level k up to the pair's boundary, and ("hardened", component, toggle) for each toggle that
covers the component. The same facts are the features the search's performance model uses.

Sets of configurations are Python ints used as bitsets (bit i = configuration i).
"""

from __future__ import annotations

import itertools
import re
import warnings
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import pydot

from flexos.errors import ConfigError
from flexos.explore.space import APP, STRENGTH, Configuration, Space

Fact = tuple[Hashable, ...]


def safety_facts(config: Configuration) -> frozenset[Fact]:
    """What makes ``config`` safe, as facts; more facts = at least as safe."""
    facts: set[Fact] = set()
    placed = {APP: (-1, 0)}  # the app's code: its own (default) compartment, the app's process
    for index, compartment in enumerate(config.compartments):
        for component in compartment.components:
            placed[component] = (index, STRENGTH[compartment.driver])
            facts.update(("hardened", component, "compartment", toggle) for toggle in compartment.hardening)
    facts.update(("hardened", component, "library", toggle) for component, toggle in config.library_hardening)
    for a, b in itertools.combinations(sorted(placed), 2):
        (where_a, strength_a), (where_b, strength_b) = placed[a], placed[b]
        boundary = 0 if where_a == where_b else max(strength_a, strength_b)
        facts.update(("separated", a, b, level) for level in range(1, boundary + 1))
    return frozenset(facts)


@dataclass(frozen=True, eq=False)
class SafetyOrder:
    """A partial order on configurations 0..n-1 by index; ``above[i]`` = the strictly safer ones."""

    source: str  # "documented" or the file it came from
    above: tuple[int, ...]
    below: tuple[int, ...]
    notes: tuple[str, ...] = field(default=())
    _covers: dict[int, tuple[int, ...]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.above)

    def covers(self, index: int) -> tuple[int, ...]:
        """The configurations immediately safer than ``index`` (nothing strictly between)."""
        if index not in self._covers:
            above = self.above[index]
            indirect = 0
            for j in members(above):
                indirect |= self.above[j]
            self._covers[index] = tuple(members(above & ~indirect))
        return self._covers[index]

    def graph(self) -> nx.DiGraph:
        """The Hasse diagram: an edge from each configuration to each one immediately safer."""
        graph: nx.DiGraph[int] = nx.DiGraph()
        graph.add_nodes_from(range(len(self)))
        graph.add_edges_from((i, j) for i in range(len(self)) for j in self.covers(i))
        return graph

    def levels(self) -> list[int]:
        """Each configuration's height: the longest chain of less safe configurations below it."""
        height = [0] * len(self)
        for i in sorted(range(len(self)), key=lambda i: self.below[i].bit_count()):
            for j in members(self.below[i]):
                height[i] = max(height[i], height[j] + 1)
        return height


def members(bits: int) -> list[int]:
    """The indices set in ``bits``."""
    found = []
    while bits:
        low = bits & -bits
        found.append(low.bit_length() - 1)
        bits ^= low
    return found


def documented_order(configs: Sequence[Configuration]) -> SafetyOrder:
    """The product order of docs/explore.md: inclusion of safety facts."""
    facts = [safety_facts(c) for c in configs]
    every = sorted(set().union(*facts), key=repr)
    having = {fact: 0 for fact in every}
    for i, owned in enumerate(facts):
        for fact in owned:
            having[fact] |= 1 << i
    everyone = (1 << len(configs)) - 1
    above, below = [], []
    for i, owned in enumerate(facts):
        at_least = everyone  # configurations with every fact i has
        at_most = everyone  # configurations with no fact i lacks
        for fact in every:
            if fact in owned:
                at_least &= having[fact]
            else:
                at_most &= ~having[fact]
        above.append(at_least & ~(1 << i))
        below.append(at_most & ~(1 << i))
    return SafetyOrder("documented", tuple(above), tuple(below))


def read_order(path: str | Path, space: Space, configs: Sequence[Configuration]) -> SafetyOrder:
    """An explicit order from a Graphviz digraph whose edges point from a configuration to a safer one."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from None
    with warnings.catch_warnings():  # pydot's parser uses pyparsing names pyparsing now deprecates
        warnings.simplefilter("ignore", DeprecationWarning)
        graphs = pydot.graph_from_dot_data(text)
    if not graphs:
        raise ConfigError([f"{path}: not a Graphviz file (write e.g. 'digraph {{ R1N1S1L1 -> R1N1S1L2 }}')"])
    graph = graphs[0]
    if graph.get_type() != "digraph":
        raise ConfigError([f"{path}:1: use a digraph, with arrows from each configuration to a safer one"])
    index = {c.name: i for i, c in enumerate(configs)}
    problems: list[str] = []

    def config_of(name: str) -> int | None:
        name = name.strip('"')
        try:
            canonical = space.canonical_name(name)
        except ValueError as exc:
            problems.append(f"{path}:{_line(text, name)}: {exc}")
            return None
        if canonical not in index:
            problems.append(
                f"{path}:{_line(text, name)}: {name!r} is not a configuration of {space.source} "
                "(its constraints, drivers or toggles exclude it)"
            )
            return None
        return index[canonical]

    order: nx.DiGraph[int] = nx.DiGraph()
    order.add_nodes_from(range(len(configs)))
    mentioned = set()
    for node in graph.get_nodes():
        if node.get_name() not in ("node", "edge", "graph"):
            found = config_of(node.get_name())
            if found is not None:
                mentioned.add(found)
    for edge in graph.get_edges():
        lower, upper = config_of(str(edge.get_source())), config_of(str(edge.get_destination()))
        if lower is not None and upper is not None:
            order.add_edge(lower, upper)
            mentioned.update((lower, upper))
    if problems:
        raise ConfigError(problems)
    if not nx.is_directed_acyclic_graph(order):
        edges = nx.find_cycle(order)
        cycle = " -> ".join(configs[u].name for u in [*(u for u, _ in edges), edges[0][0]])
        raise ConfigError([f"{path}: the order has a cycle ({cycle}); a configuration cannot be safer than itself"])
    above = tuple(sum(1 << j for j in nx.descendants(order, i)) for i in range(len(configs)))
    below = tuple(sum(1 << j for j in nx.ancestors(order, i)) for i in range(len(configs)))
    notes: tuple[str, ...] = ()
    if len(mentioned) < len(configs):
        notes = (
            f"{path}: {len(configs) - len(mentioned)} of the space's {len(configs)} configurations are not in "
            "the order; nothing can be inferred about them, so each is measured",
        )
    return SafetyOrder(str(path), above, below, notes)


def _line(text: str, name: str) -> int:
    """The line where ``name`` first appears as a whole word (1 if nowhere)."""
    match = re.search(rf"(?<![\w\"]){re.escape(name)}(?![\w\"])|\"{re.escape(name)}\"", text)
    return text.count("\n", 0, match.start()) + 1 if match else 1
