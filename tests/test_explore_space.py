"""The ``explore:`` section: validation with FILE:LINE, enumeration once per configuration, names."""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import pytest

from flexos import ConfigError
from flexos.config import parse
from flexos.explore.runner import Runner
from flexos.explore.space import Space, load_space

BASE = """\
name: demo
compartments:
  - name: app
    mechanism: {driver: fcalls}
    default: true
"""


def write_space(tmp_path: Path, explore: str, base: str = BASE) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(base + "explore:\n" + textwrap.indent(textwrap.dedent(explore), "  "))
    return path


def space_of(tmp_path: Path, explore: str, base: str = BASE) -> Space:
    space, _ = load_space(write_space(tmp_path, explore, base))
    return space


def problems(tmp_path: Path, explore: str, base: str = BASE) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_space(write_space(tmp_path, explore, base))
    return info.value.problems


BENCH = "benchmark: {command: 'echo 1'}\n"


def partitions(items: list[str]) -> list[list[list[str]]]:
    """Every set partition of ``items``, by brute force over labelings (a reference for the test)."""
    seen = set()
    found = []
    for labels in itertools.product(range(len(items)), repeat=len(items)):
        blocks = frozenset(frozenset(i for i, lab in zip(items, labels, strict=True) if lab == b) for b in set(labels))
        if blocks not in seen:
            seen.add(blocks)
            found.append([sorted(b) for b in blocks])
    return found


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5])
def test_each_partition_appears_once(tmp_path: Path, count: int) -> None:
    names = ["alpha", "beta", "gamma", "delta", "epsilon"][:count]
    components = "".join(f"  {n}: {{short: {n[0].upper() + n[1]}}}\n" for n in names)
    space = space_of(tmp_path, f"components:\n{components}compartments: {count}\ndrivers: [process]\n{BENCH}")
    configs = space.configurations()
    seen = {frozenset(frozenset(c.components) for c in config.compartments) for config in configs}
    assert len(seen) == len(configs)  # no two labelings of one partition
    expected = {frozenset(frozenset(b) for b in p) for p in partitions(names)}
    assert seen == expected  # Bell(count): 1, 2, 5, 15, 52
    assert len({c.name for c in configs}) == len(configs)


def test_at_most_n_compartments_and_constraints(tmp_path: Path) -> None:
    explore = """\
    components: {a: {short: A}, b: {short: B}, c: {short: C}, d: {short: D}}
    compartments: 2
    drivers: [process]
    constraints:
      together: [[a, b]]
      apart: [[c, d]]
    benchmark: {command: 'echo 1'}
    """
    configs = space_of(tmp_path, explore).configurations()
    layouts = sorted(sorted("".join(c.components) for c in config.compartments) for config in configs)
    # {ab, c, d} into at most 2 blocks with c and d apart: ab c | d and ab d | c.
    assert layouts == [["abc", "d"], ["abd", "c"]]


def test_drivers_per_compartment_and_one_fcalls_compartment(tmp_path: Path) -> None:
    explore = """\
    components: {a: {short: A}, b: {short: B}}
    compartments: 2
    drivers: [process, fcalls]
    benchmark: {command: 'echo 1'}
    """
    space = space_of(tmp_path, explore)
    assert space.drivers == ("fcalls", "process")  # weakest first
    names = sorted(c.name for c in space.configurations())
    # together: f or p; apart: fp, pf, pp (two fcalls compartments would be one: the app's process)
    assert names == ["A1B1_f", "A1B1_p", "A1B2_fp", "A1B2_pf", "A1B2_pp"]


def test_toggles_only_where_a_process_can_enforce_them(tmp_path: Path) -> None:
    explore = """\
    components: {lib: {short: L, modules: [lib, _lib]}}
    compartments: 1
    drivers: [fcalls, process]
    hardening:
      compartment:
        Env: {env: clean}
        Net: {network: none}
      library:
        H: {audit: {deny: [subprocess]}}
    benchmark: {command: 'echo 1'}
    """
    configs = space_of(tmp_path, explore).configurations()
    assert [c.name for c in configs if c.compartments[0].driver == "fcalls"] == ["L1_f"]
    assert len(configs) == 1 + 4 * 2
    assert "L1H_pEnvNet" in {c.name for c in configs}


def test_generated_configs_are_valid_flexos_yaml(tmp_path: Path) -> None:
    explore = """\
    components:
      parser: {short: P, modules: [json, _json]}
      db: {short: D, modules: [sqlite3, _sqlite3]}
    compartments: 2
    drivers: [fcalls, process]
    hardening:
      compartment:
        Env: {env: clean}
        Seccomp: {seccomp: compute-only}
        Limits: {limits: {open_files: 64}, audit: {deny: [ctypes]}}
      library:
        H: {audit: {deny: [subprocess]}}
    benchmark: {command: 'echo 1'}
    """
    base = BASE + "  - name: tools\n    mechanism: {driver: process}\nlibraries:\n  csv: {compartment: tools}\n"
    space = space_of(tmp_path, explore, base)
    configs = space.configurations()
    runner = Runner(space, configs, tmp_path / "out")
    for index, config in enumerate(configs):
        image, notes = parse(runner.config_path(index))
        assert notes == []
        assert image.libraries["csv"] == "tools"  # the base stays
        for number, compartment in enumerate(config.compartments, 1):
            spec = image.compartments[f"c{number}"]
            assert spec.driver == compartment.driver
            assert (spec.hardening.get("env") == "clean") == ("Env" in compartment.hardening)
            for component in compartment.components:
                for module in space.components[[c.name for c in space.components].index(component)].modules:
                    assert image.libraries[module] == f"c{number}"
                    assert (module in image.library_hardening) == ((component, "H") in config.library_hardening)
    everything = next(c for c in configs if c.name == "P1HD2H_pEnvSeccompLimitspEnvSeccompLimits")
    image, _ = parse(runner.config_path(configs.index(everything)))
    assert image.compartments["c1"].hardening["audit"]["deny"] == ["ctypes"]


def test_names_written_under_any_numbering_are_read_back(tmp_path: Path) -> None:
    explore = """\
    components: {redis: {short: R}, newlib: {short: N}, uksched: {short: S}, lwip: {short: L}}
    compartments: 3
    drivers: [process]
    hardening: {library: {H: {audit: {deny: [subprocess]}}}}
    constraints: {together: [[redis, newlib]]}
    benchmark: {command: 'echo 1'}
    """
    space = space_of(tmp_path, explore)
    configs = space.configurations()
    assert len(configs) == 80  # FlexOS's Redis space: 5 partitions x 2^4 hardening
    for config in configs:
        assert space.canonical_name(config.name) == config.name
    assert space.canonical_name("R2N2S1HL1H") == "R1N1S2HL2H"  # FlexOS numbers compartments freely
    assert space.canonical_name("R3HN3S1L2") == "R1HN1S2L3"
    with pytest.raises(ValueError, match=r"cannot read 'R1N1S1': expected names like R1N1S1L1 \(R=redis"):
        space.canonical_name("R1N1S1")


def test_problems_name_the_line_and_the_fix(tmp_path: Path) -> None:
    explore = """\
    components:
      sqlite3: {short: Q, modles: [sqlite3]}
      json: {short: Q}
      9bad: {short: B}
    compartments: 2
    drivers: [proces, process, process]
    constraints:
      together: [[sqlite3, jsn]]
    benchmark: {command: 'echo 1'}
    """
    found = problems(tmp_path, explore)
    assert found == [
        f"{tmp_path / 'space.yaml'}:8: unknown key 'modles' in explore.components.sqlite3; did you mean 'modules'? "
        "(allowed: short, modules)"
    ]
    explore = explore.replace("modles", "modules")
    found = problems(tmp_path, explore)
    path = tmp_path / "space.yaml"
    assert found[0].startswith(f"{path}:9: components 'sqlite3' (line 8) and 'json' are both written 'Q' in ")
    assert f"{path}:10: '9bad' is not a module that can move (dotted Python names, not flexos)" in found
    assert f"{path}:12: driver 'proces' cannot be explored; did you mean 'process'? " in found[2]
    assert f"{path}:12: driver 'process' is listed twice" in found
    assert any(p.startswith(f"{path}:14: together: 'jsn' is not a component; did you mean 'json'?") for p in found)


def test_only_drivers_flexos_implements_are_explored(tmp_path: Path) -> None:
    """intel-pku is a driver flexos.yaml may name (and is refused at boot), but not one to explore."""
    found = problems(tmp_path, "components: {json: {short: J}}\ncompartments: 1\ndrivers: [intel-pku]\n" + BENCH)
    assert found == [
        f"{tmp_path / 'space.yaml'}:9: driver 'intel-pku' cannot be explored; (drivers: fcalls, subinterp, process, vm)"
    ]


def test_missing_section_and_bad_types(tmp_path: Path) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text(BASE)
    with pytest.raises(ConfigError, match=r"plain.yaml:1: no 'explore:' section; add one"):
        load_space(path)
    found = problems(tmp_path, "components: {a: }\ncompartments: '2'\ndrivers: [process]\n")
    assert any(":8: explore.compartments: Input should be a valid integer (use a whole number)" in p for p in found)
    assert any(":6: explore is missing the required key 'benchmark'" in p for p in found)


def test_base_and_spec_must_agree(tmp_path: Path) -> None:
    base = BASE + "  - name: c1\n    mechanism: {driver: process}\nlibraries:\n  json: {compartment: c1}\n"
    explore = """\
    components: {json: {short: J}}
    compartments: 1
    drivers: [fcalls]
    hardening: {compartment: {Env: {env: clean}}, library: {j: {audit: {deny: [ctypes]}}}}
    benchmark: {command: 'echo 1'}
    """
    found = problems(tmp_path, explore, base)
    text = "\n".join(found)
    assert "'json' is placed by the base's libraries too; remove it from one of them" in text
    assert "the base declares c1, which exploring names its own compartments; rename them" in text
    assert "toggle name 'j': use a capital letter then lower-case letters" in text
    assert "hardening needs a compartment with its own process: add 'process' to explore.drivers" in text


def test_base_problems_keep_their_lines(tmp_path: Path) -> None:
    base = "compartments:\n  - name: app\n    mechanism: {driver: proces}\n    default: true\n"
    found = problems(tmp_path, "components: {a: }\ncompartments: 1\ndrivers: [process]\n" + BENCH, base)
    assert found == [
        f"{tmp_path / 'space.yaml'}:3: unknown driver 'proces'; did you mean 'process'? "
        "(known drivers: fcalls, process, subinterp, vm, intel-pku)"
    ]


def test_conflicting_toggles_and_contradicting_constraints(tmp_path: Path) -> None:
    explore = """\
    components: {a: {short: A}, b: {short: B}}
    compartments: 2
    drivers: [process]
    hardening:
      compartment: {Env: {env: clean}, Keep: {env: inherit}}
    constraints: {together: [[a, b]], apart: [[b, a]]}
    benchmark: {command: 'echo 1'}
    """
    text = "\n".join(problems(tmp_path, explore))
    assert "two compartment toggles set the same option differently (env: 'clean' and 'inherit')" in text
    assert "a and b must be both together and apart; drop one constraint" in text
