"""flexos.yaml validation: every rule names the file and line and says what to change."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexos
from flexos import ConfigError, Image
from flexos.config import ConfigWarning, parse
from flexos.probe import pku

FLEXOS = Path(sys.executable).parent / "flexos"


def write(tmp_path: Path, text: str, name: str = "flexos.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(path)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def only_problem(path: Path) -> str:
    found = problems(path)
    assert len(found) == 1, found
    return found[0]


def flexos_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(FLEXOS), *args], capture_output=True, text=True, cwd=cwd, timeout=60)


GOOD = """\
name: demo
compartments:
  - name: app
    mechanism:
      driver: fcalls
    default: true
  - name: db
    mechanism:
      driver: process
      spin_us: 50
      start_timeout: 5
    restart: never
  - name: checked
    mechanism:
      driver: fcalls
      strict: true
libraries:
  sqlite3:
    compartment: db
  json:
    compartment: checked
"""


# -- a good file ----------------------------------------------------------------------------------


def test_good_file_gives_the_image(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    image, notes = parse(path)
    assert notes == []
    assert image.source == str(path)
    assert image.default == "app"
    assert list(image.compartments) == ["app", "db", "checked"]
    app, db, checked = image.compartments.values()
    assert (app.driver, app.options, app.default, app.restart) == ("fcalls", {"strict": False}, True, "on-failure")
    assert (db.driver, db.options, db.default, db.restart) == (
        "process",
        {"spin_us": 50, "start_timeout": 5.0},
        False,
        "never",
    )
    assert (checked.driver, checked.options) == ("fcalls", {"strict": True})
    assert image.libraries == {"sqlite3": "db", "json": "checked"}
    assert image.compartment_of("sqlite3") == "db"


def test_mechanism_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: db
            mechanism: {driver: process}
        libraries:
          sqlite3: {compartment: db}
        """,
    )
    image, _ = parse(path)
    assert image.compartments["app"].options == {"strict": False}
    assert image.compartments["db"].options == {"spin_us": 200, "start_timeout": 30.0}
    assert image.compartments["db"].restart == "on-failure"


def test_image_round_trips_through_a_plain_dict(tmp_path: Path) -> None:
    image, _ = parse(write(tmp_path, GOOD))
    assert Image.from_dict(json.loads(json.dumps(image.to_dict()))) == image


def test_load_returns_the_image(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = flexos.load(str(path))
    assert image == parse(path)[0]


# -- each validation rule -------------------------------------------------------------------------


def test_unknown_driver_with_did_you_mean(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism:
              driver: fcals
            default: true
        """,
    )
    assert only_problem(path) == (
        f"{path}:4: unknown driver 'fcals'; did you mean 'fcalls'? "
        "(known drivers: fcalls, process, subinterp, vm, intel-pku)"
    )


def test_unknown_driver_without_a_close_match(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: box
            mechanism: {driver: docker}
        """,
    )
    message = only_problem(path)
    assert message.startswith(f"{path}:6: unknown driver 'docker' (known drivers: fcalls, process")
    assert "did you mean" not in message


def test_mechanism_without_driver(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {}
            default: true
        """,
    )
    assert only_problem(path) == (
        f"{path}:3: compartment 'app': mechanism needs a 'driver' (one of: fcalls, process, subinterp, vm, intel-pku)"
    )


def test_undeclared_compartment_in_libraries(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: db
            mechanism: {driver: process}
        libraries:
          sqlite3:
            compartment: dbb
        """,
    )
    assert only_problem(path) == (
        f"{path}:9: library 'sqlite3' is placed in compartment 'dbb', which is not declared; "
        "did you mean 'db'? declared: app, db"
    )


def test_undeclared_compartment_without_a_close_match(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
        libraries:
          sqlite3: {compartment: zzz}
        """,
    )
    assert only_problem(path) == (
        f"{path}:6: library 'sqlite3' is placed in compartment 'zzz', which is not declared; declared: app"
    )


def test_no_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        # a comment first, so the line is not trivially 1
        compartments:
          - name: app
            mechanism: {driver: fcalls}
          - name: db
            mechanism: {driver: process}
        libraries:
          sqlite3: {compartment: db}
        """,
    )
    assert only_problem(path) == (
        f"{path}:2: no compartment has 'default: true'; mark exactly one (the app's own code runs there)"
    )


def test_several_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: db
            mechanism: {driver: process}
            default: true
          - name: other
            mechanism: {driver: process}
            default: true
        """,
    )
    assert only_problem(path) == f"{path}:7: 3 compartments have 'default: true' (lines 4, 7, 10); keep exactly one"


def test_default_false_is_not_a_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: db
            mechanism: {driver: process}
            default: false
        libraries:
          sqlite3: {compartment: db}
        """,
    )
    assert parse(path)[0].default == "app"


def test_default_compartment_cannot_be_a_process(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism:
              driver: process
            default: true
        """,
    )
    assert only_problem(path) == (
        f"{path}:4: compartment 'app' is the default one, which is the app's own process; "
        "give it driver 'fcalls' and isolate the other compartments"
    )


@pytest.mark.parametrize("driver", ["subinterp", "vm"])
def test_default_compartment_cannot_be_isolated(tmp_path: Path, driver: str) -> None:
    """Regression: only ``process`` was refused here; a subinterp or vm default compartment was
    accepted and the app's own code ran unisolated in the app's process."""
    path = write(
        tmp_path,
        f"""\
        compartments:
          - name: box
            mechanism: {{driver: process}}
          - name: app
            default: true
            mechanism: {{driver: {driver}}}
        libraries:
          sqlite3: {{compartment: box}}
        """,
    )
    assert only_problem(path) == (
        f"{path}:6: compartment 'app' is the default one, which is the app's own process; "
        "give it driver 'fcalls' and isolate the other compartments"
    )
    with pytest.raises(ConfigError):
        flexos.boot(str(path))


def test_duplicate_compartment_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: db
            mechanism: {driver: process}
          - name: db
            mechanism: {driver: fcalls}
        libraries:
          sqlite3: {compartment: db}
        """,
    )
    assert only_problem(path) == (
        f"{path}:7: compartment 'db' is declared twice (first on line 5); give each compartment its own name"
    )


def test_bad_compartment_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: my app
            mechanism: {driver: fcalls}
            default: true
        """,
    )
    message = only_problem(path)
    assert message.startswith(f"{path}:2: compartments[0].name: String should match pattern")
    assert "names use letters, digits, '_' and '-', and start with a letter or '_'" in message


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        ('strict: "yes"', "compartments[1].mechanism.strict: Input should be a valid boolean (use true or false)"),
        ("strict: 1", "compartments[1].mechanism.strict: Input should be a valid boolean (use true or false)"),
        ("spin_us: -1", "compartments[1].mechanism.spin_us: Input should be greater than or equal to 0"),
        ("spin_us: 1.5", "compartments[1].mechanism.spin_us: Input should be a valid integer (use a whole number)"),
        ("spin_us: 2000000", "compartments[1].mechanism.spin_us: Input should be less than or equal to 1000000"),
        ('spin_us: "200"', "compartments[1].mechanism.spin_us: Input should be a valid integer (use a whole number)"),
        ("start_timeout: 0", "compartments[1].mechanism.start_timeout: Input should be greater than 0"),
        ("start_timeout: 3601", "compartments[1].mechanism.start_timeout: Input should be less than or equal to 3600"),
        ("start_timeout: .inf", "compartments[1].mechanism.start_timeout: Input should be a finite number"),
        ("start_timeout: .nan", "compartments[1].mechanism.start_timeout: Input should be a finite number"),
        (
            'start_timeout: "5"',
            "compartments[1].mechanism.start_timeout: Input should be a valid number (use a number)",
        ),
    ],
)
def test_bad_option_types(tmp_path: Path, option: str, expected: str) -> None:
    driver = "fcalls" if option.startswith("strict") else "process"
    path = write(
        tmp_path,
        f"""\
        compartments:
          - name: app
            mechanism: {{driver: fcalls}}
            default: true
          - name: box
            mechanism: {{driver: {driver}, {option}}}
        libraries:
          sqlite3: {{compartment: box}}
        """,
    )
    assert only_problem(path) == f"{path}:6: {expected}"


def test_option_of_another_driver_is_unknown(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism:
              driver: fcalls
              spin_us: 10
            default: true
        """,
    )
    assert only_problem(path) == (
        f"{path}:5: unknown key 'spin_us' in compartments[0].mechanism (allowed: driver, strict)"
    )


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ('default: "yes"', "compartments[0].default: Input should be a valid boolean (use true or false)"),
        ("restart: always", "compartments[0].restart: Input should be 'on-failure' or 'never'"),
        ("mechanism: fcalls", "compartments[0].mechanism: Input should be a valid dictionary (use a YAML mapping"),
    ],
)
def test_bad_compartment_field_types(tmp_path: Path, field: str, expected: str) -> None:
    base = {"mechanism": "mechanism: {driver: fcalls}", "default": "default: true", "restart": "restart: never"}
    base[field.split(":")[0]] = field
    path = write(tmp_path, "compartments:\n  - name: app\n    " + "\n    ".join(base.values()) + "\n")
    line = 3 + list(base).index(field.split(":")[0])
    assert only_problem(path).startswith(f"{path}:{line}: {expected}")


def test_bad_section_types(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          name: app
        libraries:
          - sqlite3
        """,
    )
    assert problems(path) == [
        f"{path}:1: compartments: Input should be a valid list (use a YAML list (lines starting with '- '))",
        f"{path}:3: libraries: Input should be a valid dictionary (use a YAML mapping (key: value))",
    ]


def test_empty_compartment_list(tmp_path: Path) -> None:
    path = write(tmp_path, "compartments: []\n")
    assert only_problem(path).startswith(f"{path}:1: compartments: List should have at least 1 item")


def test_missing_compartments(tmp_path: Path) -> None:
    path = write(tmp_path, "name: demo\n")
    assert only_problem(path) == f"{path}:1: the top level is missing the required key 'compartments'"


def test_missing_compartment_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - default: true
        """,
    )
    assert problems(path) == [
        f"{path}:2: compartments[0] is missing the required key 'name'",
        f"{path}:2: compartments[0] is missing the required key 'mechanism'",
    ]


# -- unknown keys at every level ------------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
        library:
          sqlite3: {compartment: app}
        """,
    )
    assert only_problem(path) == (
        f"{path}:5: unknown key 'library' in the top level; did you mean 'libraries'? "
        "(allowed: name, compartments, libraries)"
    )


def test_unknown_compartment_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
            restrat: never
        """,
    )
    assert only_problem(path) == (
        f"{path}:5: unknown key 'restrat' in compartments[0]; did you mean 'restart'? "
        "(allowed: name, mechanism, default, restart, timeout, hardening, max_reply, reaches)"
    )


def test_unknown_mechanism_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: db
            mechanism:
              driver: process
              spin_usec: 10
        libraries:
          sqlite3: {compartment: db}
        """,
    )
    assert only_problem(path) == (
        f"{path}:8: unknown key 'spin_usec' in compartments[1].mechanism; did you mean 'spin_us'? "
        "(allowed: driver, spin_us, start_timeout)"
    )


def test_flexos_kraft_mechanism_option_is_unknown(tmp_path: Path) -> None:
    """A kraft.yaml option (noisolstack) copied over is reported, not silently ignored."""
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism:
              driver: fcalls
              noisolstack: false
            default: true
        """,
    )
    assert only_problem(path).startswith(f"{path}:5: unknown key 'noisolstack' in compartments[0].mechanism")


def test_unknown_library_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: db
            mechanism: {driver: process}
        libraries:
          sqlite3:
            version: staging
            compartment: db
        """,
    )
    assert (
        only_problem(path)
        == f"{path}:9: unknown key 'version' in libraries.sqlite3 (allowed: compartment, hardening, sharing)"
    )


def test_misspelled_library_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
        libraries:
          sqlite3:
            compartmnt: app
        """,
    )
    assert problems(path) == [
        f"{path}:6: libraries.sqlite3 is missing the required key 'compartment'",
        f"{path}:7: unknown key 'compartmnt' in libraries.sqlite3; did you mean 'compartment'? "
        "(allowed: compartment, hardening, sharing)",
    ]


# -- module names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("module", ["9lives", "a..b", "my-lib", "pkg.", ".pkg", "os/path", "a b", '""'])
def test_bad_module_names(tmp_path: Path, module: str) -> None:
    path = write(
        tmp_path,
        f"""\
        compartments:
          - name: app
            mechanism: {{driver: fcalls}}
            default: true
        libraries:
          {module if module.startswith('"') else repr(module)}:
            compartment: app
        """,
    )
    shown = "" if module == '""' else module
    assert only_problem(path) == (
        f"{path}:6: library {shown!r} is not an importable module name "
        "(dotted Python identifiers, e.g. 'sqlite3' or 'myapp.parsers')"
    )


def test_good_module_names(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
        libraries:
          _sqlite3: {compartment: app}
          xml.etree.ElementTree: {compartment: app}
          Cython9: {compartment: app}
        """,
    )
    assert set(parse(path)[0].libraries) == {"_sqlite3", "xml.etree.ElementTree", "Cython9"}


def test_non_string_module_name(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
        libraries:
          42: {compartment: app}
        """,
    )
    assert only_problem(path).startswith(f"{path}:6: libraries[42]")


# -- files that are not configs -------------------------------------------------------------------


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls
            default: true
        libraries: {}
        """,
    )
    message = only_problem(path)
    assert message.startswith(f"{path}:4: not valid YAML: ")
    assert "expected ',' or '}'" in message


def test_yaml_bad_indentation(tmp_path: Path) -> None:
    path = write(tmp_path, "compartments:\n  - name: app\n   mechanism: x\n")
    assert only_problem(path).startswith(f"{path}:3: not valid YAML: ")


def test_yaml_duplicate_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
        libraries:
          json: {compartment: app}
          json: {compartment: app}
        """,
    )
    message = only_problem(path)
    assert message.startswith(f"{path}:7: not valid YAML: ")
    assert 'duplicate key "json"' in message


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert only_problem(path) == f"{path}:1: the file is empty; it needs a 'compartments:' list (see docs/config.md)"


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "42\n"])
def test_top_level_not_a_mapping(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert only_problem(path) == f"{path}:1: the top level must be a mapping with 'compartments:' and 'libraries:'"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert only_problem(path) == f"{path}: no such file (create a flexos.yaml, or pass -c FILE)"
    with pytest.raises(ConfigError, match="no such file"):
        flexos.load(str(path))


def test_directory_instead_of_file(tmp_path: Path) -> None:
    assert only_problem(tmp_path).startswith(f"{tmp_path}: cannot read: ")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: db
            mechanism: {driver: process, spin_us: -1}
          - name: app
            mechanism: {driver: fcalls}
          - name: box
            mechanism: {driver: fcals}
        libraries:
          sqlite3: {compartment: dbb}
          9x: {compartment: db}
        """,
    )
    found = problems(path)
    assert [p.split(":")[1] for p in found] == ["6", "7", "10", "12", "13"]


def test_duplicate_of_a_compartment_with_a_bad_mechanism(tmp_path: Path) -> None:
    """Regression: the duplicate-name check looked only at compartments that validated, so a name
    used twice was reported only once the first one's mechanism was fixed."""
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: db
            mechanism: {driver: process, spin_us: -1}
          - name: db
            mechanism: {driver: fcalls}
        libraries:
          sqlite3: {compartment: db}
        """,
    )
    assert problems(path) == [
        f"{path}:6: compartments[1].mechanism.spin_us: Input should be greater than or equal to 0",
        f"{path}:7: compartment 'db' is declared twice (first on line 5); give each compartment its own name",
    ]


# -- warnings -------------------------------------------------------------------------------------

UNUSED = """\
compartments:
  - name: app
    mechanism: {driver: fcalls}
    default: true
  - name: spare
    mechanism: {driver: process}
"""


def test_unused_compartment_is_a_warning_from_parse(tmp_path: Path) -> None:
    path = write(tmp_path, UNUSED)
    image, notes = parse(path)
    assert set(image.compartments) == {"app", "spare"}
    assert notes == [
        f"{path}:5: warning: compartment 'spare' is declared but no library is placed in it; "
        "place a library in it or remove it"
    ]


def test_unused_compartment_is_a_config_warning_from_load(tmp_path: Path) -> None:
    path = write(tmp_path, UNUSED)
    with pytest.warns(ConfigWarning, match=r":5: warning: compartment 'spare' is declared but no library") as caught:
        image = flexos.load(str(path))
    assert len(caught) == 1
    assert set(image.compartments) == {"app", "spare"}


def test_default_compartment_needs_no_library(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
        """,
    )
    assert parse(path)[1] == []


# -- placement ------------------------------------------------------------------------------------


def test_package_entry_covers_submodules(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: parsers
            mechanism: {driver: process}
          - name: etree
            mechanism: {driver: process}
        libraries:
          xml: {compartment: parsers}
          xml.etree: {compartment: etree}
        """,
    )
    image, _ = parse(path)
    assert image.compartment_of("xml") == "parsers"
    assert image.compartment_of("xml.dom") == "parsers"
    assert image.compartment_of("xml.dom.minidom") == "parsers"
    assert image.compartment_of("xml.etree") == "etree"  # its own entry wins
    assert image.compartment_of("xml.etree.ElementTree") == "etree"  # longest listed prefix wins
    assert image.compartment_of("xmlrpc") is None  # a prefix counts only at a dot
    assert image.compartment_of("xmlrpc.client") is None
    assert image.compartment_of("json") is None  # unlisted: imported locally where used
    assert image.compartment_of("app") is None  # compartment names are not module names


def test_compartment_of_without_libraries() -> None:
    image = Image({}, {})
    assert image.compartment_of("sqlite3") is None


# -- YAML features a hand-written config may use --------------------------------------------------


def test_anchor_and_alias_for_a_mechanism(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: db
            mechanism: &isolated {driver: process, spin_us: 10}
          - name: net
            mechanism: *isolated
        libraries:
          sqlite3: {compartment: db}
          socket: {compartment: net}
        """,
    )
    image, _ = parse(path)
    assert image.compartments["net"].options == {"spin_us": 10, "start_timeout": 30.0}


def test_anchored_scalars_are_accepted(tmp_path: Path) -> None:
    """Regression: ruamel's round-trip loader returns an anchored ``true`` as ScalarBoolean (an int
    subclass), which the strict bool field rejected: a valid boolean was reported as not one."""
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls, strict: &on true}
            default: *on
        """,
    )
    image, _ = parse(path)
    assert image.compartments["app"].default is True
    assert image.compartments["app"].options == {"strict": True}


def test_merge_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        base: &base
          mechanism: {driver: process}
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - <<: *base
            name: db
        libraries:
          sqlite3: {compartment: db}
        """,
    )
    # 'base' is not a top-level key flexos knows: a ConfigError naming it is the right answer
    assert only_problem(path).startswith(f"{path}:1: unknown key 'base' in the top level")
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - &db
            name: db
            mechanism: {driver: process}
          - <<: *db
            name: net
        libraries:
          sqlite3: {compartment: db}
          socket: {compartment: net}
        """,
    )
    image, _ = parse(path)
    assert image.compartments["net"].driver == "process"


def test_problem_in_a_merged_key(tmp_path: Path) -> None:
    """Regression: keys that come from a merge (``<<: *base``) have no line record in ruamel, and
    ``_Source.line`` raised KeyError for them instead of returning a line."""
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - &db
            name: db
            mechanism: {driver: proces}
          - <<: *db
            name: net
        libraries:
          sqlite3: {compartment: db}
          socket: {compartment: net}
        """,
    )
    found = problems(path)
    assert found[0] == (
        f"{path}:7: unknown driver 'proces'; did you mean 'process'? "
        "(known drivers: fcalls, process, subinterp, vm, intel-pku)"
    )
    assert len(found) == 2 and "unknown driver 'proces'" in found[1]


@pytest.mark.parametrize(
    "text",
    [
        "compartments: !seq [1]\n",  # regression: a tagged sequence has no line records (TypeError)
        "compartments:\n  - !seq [1]\n",
        "compartments:\n  - {<<: {name: app, default: true}, mechanism: {driver: fcalls}}\n",  # regression: KeyError
        "compartments:\n  - {<<: {name: 1}, mechanism: {driver: fcalls}}\n",
        "compartments:\n  - !map {name: app, mechanism: {driver: fcalls}, default: true}\n",
        "compartments:\n  - name: !str app\n    mechanism: {driver: fcalls}\n    default: true\n",
        "compartments:\n  - name: app\n    mechanism: {driver: !!binary aGVsbG8=}\n    default: true\n",
        "compartments:\n  - name: app\n    mechanism: {driver: 2001-01-01}\n    default: true\n",
        "compartments:\n  - name: app\n    mechanism: {driver: .nan}\n    default: true\n",
        "compartments: &a [*a]\n",
        "? [a, b]\n: 1\n",
        "!!python/object:os.system {}\n",
        "--- a\n--- b\n",
        "\x00",
        "\t- a\n",
    ],
)
def test_odd_yaml_is_a_config_error_or_valid(tmp_path: Path, text: str) -> None:
    path = tmp_path / "flexos.yaml"
    path.write_text(text)
    try:
        parse(path)
    except ConfigError as exc:
        assert all(p.startswith(str(path)) for p in exc.problems)


@pytest.mark.parametrize("timeout", [".inf", "1e10"])
def test_accepted_start_timeout_can_boot(tmp_path: Path, timeout: str) -> None:
    """Regression: start_timeout had no upper bound, but socket.settimeout() overflows on huge
    values (OverflowError: timestamp out of range), so a file parse() accepted could not boot."""
    path = write(
        tmp_path,
        f"""\
        compartments:
          - name: app
            mechanism: {{driver: fcalls}}
            default: true
          - name: box
            mechanism: {{driver: process, start_timeout: {timeout}}}
        libraries:
          colorsys: {{compartment: box}}
        """,
    )
    try:
        image, _ = parse(path)
    except ConfigError as exc:  # refusing it at validation time is fine too
        assert exc.problems[0].startswith(f"{path}:6: ")
        return
    with flexos.boot(image):
        import colorsys

        assert colorsys.rgb_to_hsv(1, 0, 0) == (0.0, 1.0, 1)


# -- reach ----------------------------------------------------------------------------------------

REACH = """\
compartments:
  - name: app
    mechanism: {driver: fcalls}
    default: true
  - name: box
    mechanism: {driver: process}
    hardening: {env: clean}
  - name: parser
    mechanism: {driver: process}
    hardening: {env: clean}
    reaches: [db, app]
  - name: db
    mechanism: {driver: process}
libraries:
  json: {compartment: box}
  csv: {compartment: parser}
  sqlite3: {compartment: db}
"""


def test_reaches_is_read_into_the_image_and_decides_who_reaches_whom(tmp_path: Path) -> None:
    image, _ = parse(write(tmp_path, REACH))
    assert [spec.reaches for spec in image.compartments.values()] == [None, None, ("db", "app"), None]
    assert Image.from_dict(json.loads(json.dumps(image.to_dict()))) == image
    reached = {
        source: [t for t in image.compartments if t != source and image.may_reach(source, t)]
        for source in image.compartments
    }
    assert reached == {
        "app": ["box", "parser", "db"],  # the app reaches all
        "box": [],  # hardened, reaches: not declared
        "parser": ["app", "db"],  # as declared
        "db": ["app", "box", "parser"],  # unhardened, reaches: not declared
    }


@pytest.mark.parametrize(
    ("reaches", "line", "message"),
    [
        (
            "[dbb]",
            8,
            "compartment 'box' reaches 'dbb', which is not declared; did you mean 'db'? declared: app, box, db",
        ),
        (
            "\n              - db\n              - elsewhere",
            10,
            "compartment 'box' reaches 'elsewhere', which is not declared; declared: app, box, db",
        ),
        ("[box]", 8, "compartment 'box' always reaches itself; remove 'box'"),
        ("db", 8, "compartments[1].reaches: Input should be a valid list (use a YAML list (lines starting with '- '))"),
    ],
)
def test_bad_reaches_are_reported_with_their_line(tmp_path: Path, reaches: str, line: int, message: str) -> None:
    path = write(
        tmp_path,
        f"""\
        compartments:
          - name: app
            mechanism: {{driver: fcalls}}
            default: true
          - name: box
            mechanism: {{driver: process}}
            hardening: {{env: clean}}
            reaches: {reaches}
          - name: db
            mechanism: {{driver: process}}
        libraries:
          json: {{compartment: box}}
          sqlite3: {{compartment: db}}
        """,
    )
    assert only_problem(path) == f"{path}:{line}: {message}"


def test_the_default_compartment_declares_no_reach(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
            reaches: []
        """,
    )
    assert only_problem(path) == (
        f"{path}:5: compartment 'app' is the default one (the app), which reaches every compartment; "
        "remove its reaches:"
    )


def test_check_prints_each_compartments_reach(tmp_path: Path) -> None:
    result = flexos_cli("check", "-c", str(write(tmp_path, REACH)))
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    first = out.index("reach (whose modules each compartment may import; the default one reaches all):")
    assert [line.split(None, 2) for line in out[first + 1 : first + 4]] == [
        ["box", "->", "nothing  (reaches: not declared; hardened, so only what reaches: lists)"],
        ["parser", "->", "app, db"],
        ["db", "->", "app, box, parser  (reaches: not declared; unhardened, so every compartment)"],
    ]
    assert out[first + 4] == "libraries:"


# -- sharing --------------------------------------------------------------------------------------
SHARING = """\
compartments:
  - name: app
    mechanism: {driver: fcalls}
    default: true
  - name: box
    mechanism: {driver: %s}
libraries:
  json:
    compartment: box
    sharing: {buffers: %s}
"""


def test_buffers_view_in_a_process_compartment_reaches_the_image(tmp_path: Path) -> None:
    image, notes = parse(write(tmp_path, SHARING % ("process", "view")))
    assert notes == []
    assert image.library_sharing == {"json": {"buffers": "view"}}
    assert image.buffer_sharing("box") == "view" and image.buffer_sharing("app") == "copy"
    assert Image.from_dict(json.loads(json.dumps(image.to_dict()))) == image


def test_buffers_copy_is_the_default_and_may_be_written(tmp_path: Path) -> None:
    image, _ = parse(write(tmp_path, SHARING % ("subinterp", "copy")))
    assert image.library_sharing == {"json": {"buffers": "copy"}} and image.buffer_sharing("box") == "copy"
    image, _ = parse(write(tmp_path, GOOD))
    assert image.library_sharing == {} and image.buffer_sharing("db") == "copy"


@pytest.mark.parametrize(
    ("driver", "does"),
    [
        ("subinterp", "lend the app's own memory, unsealed"),
        ("fcalls", "pass the app's own objects"),
        ("vm", "copy them through its ivshmem window"),
    ],
)
def test_buffers_view_outside_a_process_compartment_is_refused(tmp_path: Path, driver: str, does: str) -> None:
    path = write(tmp_path, SHARING % (driver, "view"))
    problem = only_problem(path)
    assert problem.startswith(
        f"{path}:10: library 'json': buffers: view needs a 'process' compartment (its gates lend large buffers "
        f"as read-only views, not copies); 'box' is a {driver!r} compartment, whose gates {does}"
    )
    assert problem.endswith(
        "remove the key (buffers: copy is the default) or move the library to a 'process' compartment"
    )


def test_buffers_view_in_the_default_compartment_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, (SHARING % ("process", "view")).replace("compartment: box", "compartment: app"))
    assert f"{path}:10: library 'json': buffers: view needs a 'process' compartment" in only_problem(path)


def test_buffers_view_is_asked_of_the_drivers_capability(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule reads the driver's ``buffer_views``, not its name: a driver that gains the port passes."""
    from flexos.drivers.subinterp import SubinterpDriver

    monkeypatch.setattr(SubinterpDriver, "buffer_views", True)
    image, _ = parse(write(tmp_path, SHARING % ("subinterp", "view")))
    assert image.buffer_sharing("box") == "view"


def test_an_unknown_strategy_gets_did_you_mean(tmp_path: Path) -> None:
    path = write(tmp_path, SHARING % ("process", "veiw"))
    assert only_problem(path) == (
        f"{path}:10: libraries.json.sharing.buffers: Input should be 'copy' or 'view'; did you mean 'view'?"
    )


def test_an_unknown_sharing_key_lists_the_allowed_ones(tmp_path: Path) -> None:
    path = write(tmp_path, (SHARING % ("process", "view")).replace("{buffers: view}", "{buffer: view}"))
    assert only_problem(path) == (
        f"{path}:10: unknown key 'buffer' in libraries.json.sharing; did you mean 'buffers'? (allowed: buffers)"
    )


def test_conflicting_strategies_in_one_compartment_name_both_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path, SHARING % ("process", "view") + "  csv:\n    compartment: box\n    sharing: {buffers: copy}\n"
    )
    assert only_problem(path) == (
        f"{path}:13: library 'csv' declares buffers: copy, but library 'json' (line 10), in the same compartment "
        "'box', declares buffers: view; a compartment's gates have one strategy for all its libraries: make the "
        "two agree, or place one in a compartment of its own"
    )


def test_conflicting_strategies_given_as_a_dict_name_the_key_paths() -> None:
    entries = {"json": {"compartment": "box", "sharing": {"buffers": "view"}}}
    entries["csv"] = {"compartment": "box", "sharing": {"buffers": "copy"}}
    data = {
        "compartments": [
            {"name": "app", "mechanism": {"driver": "fcalls"}, "default": True},
            {"name": "box", "mechanism": {"driver": "process"}},
        ],
        "libraries": entries,
    }
    with pytest.raises(ConfigError) as info:
        flexos.config.load_mapping(data)
    assert info.value.problems == [
        "flexos.boot({...}): libraries.csv.sharing.buffers: library 'csv' declares buffers: copy, but library "
        "'json' (libraries.json.sharing.buffers), in the same compartment 'box', declares buffers: view; a "
        "compartment's gates have one strategy for all its libraries: make the two agree, or place one in a "
        "compartment of its own"
    ]


def test_agreeing_strategies_and_other_compartments_pass(tmp_path: Path) -> None:
    extra = "  csv:\n    compartment: box\n    sharing: {buffers: view}\n  zlib: {compartment: app}\n"
    image, notes = parse(write(tmp_path, SHARING % ("process", "view") + extra))
    assert notes == []
    assert image.library_sharing == {"json": {"buffers": "view"}, "csv": {"buffers": "view"}}


def test_a_silent_library_beside_a_view_one_is_warned_of(tmp_path: Path) -> None:
    path = write(tmp_path, SHARING % ("process", "view") + "  csv: {compartment: box}\n")
    image, notes = parse(path)
    assert notes == [
        f"{path}:11: warning: library 'csv' declares no sharing, but library 'json' in the same compartment 'box' "
        "declares buffers: view, so 'csv' gets read-only memoryviews for large buffers too; add sharing: "
        "{buffers: view} to 'csv' to say so, or place it in another compartment"
    ]
    assert image.buffer_sharing("box") == "view"


def test_check_says_which_compartments_share_buffers_as_views(tmp_path: Path) -> None:
    write(tmp_path, SHARING % ("process", "view") + "  csv: {compartment: box, sharing: {buffers: view}}\n")
    done = flexos_cli("check", "--json", cwd=tmp_path)
    report = json.loads(done.stdout)
    assert {entry["name"]: entry["buffers"] for entry in report["compartments"]} == {"app": None, "box": "view"}
    done = flexos_cli("check", cwd=tmp_path)
    line = next(line for line in done.stdout.splitlines() if line.startswith("  box ") and "call timeout" in line)
    assert line.endswith("; large buffers cross as read-only views (sharing: buffers: view)")


# -- the flexos check command ---------------------------------------------------------------------


def test_check_prints_the_image(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = flexos_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out = result.stdout.splitlines()
    assert out[0] == f"image {path}"
    assert out[1] == "compartments:"
    assert out[2].split() == ["app", "fcalls", "ok", "default", "(the", "app's", "own", "code)", "[strict=False]"]
    assert out[3].split()[:5] == ["db", "process", "ok", "restart:", "never"]
    assert "[spin_us=50, start_timeout=5.0]" in out[3]
    assert out[4].split()[:3] == ["checked", "fcalls", "ok"]
    assert "libraries:" in out
    assert out[out.index("libraries:") + 1].split() == ["json", "->", "checked"]
    assert out[out.index("libraries:") + 2].split() == ["sqlite3", "->", "db"]
    assert "modules not listed are imported locally" in result.stdout


def test_check_reads_flexos_yaml_by_default(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    result = flexos_cli("check", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("image flexos.yaml\n")


def test_check_missing_default_file(tmp_path: Path) -> None:
    result = flexos_cli("check", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == "flexos.yaml: no such file (create a flexos.yaml, or pass -c FILE)"


def test_check_bad_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcals}
            default: true
        libraries:
          sqlite3: {compartment: dbb}
        """,
    )
    result = flexos_cli("check", "-c", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == problems(path)
    assert len(result.stderr.splitlines()) == 2
    assert "did you mean 'fcalls'?" in result.stderr


def test_check_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "compartments: [\n")
    result = flexos_cli("check", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"{path}:2: not valid YAML: ")


def test_check_shows_warnings_and_succeeds(tmp_path: Path) -> None:
    path = write(tmp_path, UNUSED)
    result = flexos_cli("check", "-c", str(path))
    assert result.returncode == 0
    assert f"{path}:5: warning: compartment 'spare' is declared but no library is placed in it" in result.stderr
    assert "spare" in result.stdout


def test_check_refuses_intel_pku(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: secure
            mechanism: {driver: intel-pku}
        libraries:
          hashlib: {compartment: secure}
        """,
    )
    result = flexos_cli("check", "-c", str(path))
    assert result.returncode == 2
    line = next(line for line in result.stdout.splitlines() if line.split()[:1] == ["secure"])
    assert line.split()[:3] == ["secure", "intel-pku", "UNAVAILABLE"]
    assert result.stderr.startswith(f"{path}: compartment 'secure': intel-pku ")
    if not pku().available:
        assert "needs a CPU with memory protection keys (PKU); this CPU has none" in result.stderr
    assert "Use driver 'process' instead." in result.stderr or "use driver 'process' instead." in result.stderr


@pytest.mark.skipif(pku().available, reason="this CPU has PKU")
def test_boot_refuses_intel_pku(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: secure
            mechanism: {driver: intel-pku}
        libraries:
          hashlib: {compartment: secure}
        """,
    )
    with pytest.raises(flexos.DriverUnavailable, match=r"compartment 'secure': intel-pku needs a CPU with"):
        flexos.boot(str(path))


@pytest.mark.skipif(pku().available, reason="this CPU has PKU")
def test_boot_refuses_intel_pku_for_the_default_compartment(tmp_path: Path) -> None:
    """Regression: ``flexos check`` refused an unavailable driver on the default compartment, but
    ``flexos.boot``/``flexos run`` did not look at the default compartment's driver and ran anyway.
    Now both refuse it, boot with the fix (the default compartment is the app's own process, so
    only a driver that can hold the app fits it, whether or not this CPU has PKU)."""
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: intel-pku}
            default: true
        """,
    )
    assert flexos_cli("check", "-c", str(path)).returncode == 2
    with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: compartment 'app' is the default one.*'fcalls'"):
        runtime = flexos.boot(str(path))
        runtime.stop()


# -- fuzzing: parse() never fails with anything but ConfigError -----------------------------------

KEYS = [
    "name",
    "compartments",
    "libraries",
    "mechanism",
    "driver",
    "default",
    "restart",
    "compartment",
    "strict",
    "spin_us",
    "start_timeout",
    "version",
]
WORDS = [
    "app",
    "db",
    "fcalls",
    "process",
    "subinterp",
    "vm",
    "intel-pku",
    "on-failure",
    "never",
    "sqlite3",
    "xml.etree",
    "9x",
    "a..b",
    "",
    "-",
    "yes",
    "null",
    "~",
    "1e3",
]
_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs", "Cc"]), max_size=8)
_words = st.sampled_from(WORDS) | _text
_keys = st.sampled_from(KEYS) | _words | st.integers(-2, 2) | st.booleans() | st.none()
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | _words
)
_values = st.recursive(
    _scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_keys, kids, max_size=3), max_leaves=12
)


def _mapping(fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    extra = st.dictionaries(_keys, _values, max_size=2)
    return st.builds(lambda known, more: {**more, **known}, st.fixed_dictionaries({}, optional=fields), extra)


_mechanism = _mapping(
    {
        "driver": st.sampled_from(WORDS[2:7]) | _values,
        "strict": st.booleans() | _values,
        "spin_us": st.integers(-5, 2_000_000) | _values,
        "start_timeout": st.floats(-1, 100) | _values,
    }
)
_compartment = _mapping(
    {
        "name": st.sampled_from(WORDS[:3]) | _values,
        "mechanism": _mechanism | _values,
        "default": st.booleans() | _values,
        "restart": st.sampled_from(["on-failure", "never"]) | _values,
    }
)
_library = _mapping({"compartment": st.sampled_from(WORDS[:3]) | _values}) | _values
DOCUMENTS = (
    _mapping(
        {
            "name": _values,
            "compartments": st.lists(_compartment | _values, max_size=4) | _values,
            "libraries": st.dictionaries(_words | _keys, _library, max_size=4) | _values,
        }
    )
    | _values
)


def _scalar_yaml(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ".nan"
        if math.isinf(value):
            return ".inf" if value > 0 else "-.inf"
        return repr(value)
    return json.dumps(value)  # a JSON string is a YAML double-quoted scalar


def _block_yaml(value: object, indent: int = 0) -> str:
    """Block-style YAML (what people write), flow style for empty collections and as keys."""
    pad = " " * indent
    if isinstance(value, dict) and value:
        return "".join(f"{pad}{_scalar_yaml(k)}:{_block_child(v, indent + 2)}" for k, v in value.items())
    if isinstance(value, list) and value:
        return "".join(f"{pad}-{_block_child(v, indent + 2)}" for v in value)
    return f"{pad}{_flow_yaml(value)}\n"


def _block_child(value: object, indent: int) -> str:
    if isinstance(value, (dict, list)) and value:
        return "\n" + _block_yaml(value, indent)
    return " " + _flow_yaml(value) + "\n"


def _flow_yaml(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_scalar_yaml(k)}: {_flow_yaml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_flow_yaml(v) for v in value) + "]"
    return _scalar_yaml(value)


@st.composite
def yaml_documents(draw: st.DrawFn, features: bool) -> str:
    value = draw(DOCUMENTS)
    if not features:
        return _block_yaml(value) if draw(st.booleans()) else _flow_yaml(value) + "\n"
    anchors: list[str] = []

    def emit(node: object) -> str:
        if anchors and draw(st.integers(0, 11)) == 0:
            return "*" + draw(st.sampled_from(anchors))
        tag = ""
        if draw(st.integers(0, 5)) == 0:  # an unknown local tag, or the standard one for the node's kind
            standard = "!!map " if isinstance(node, dict) else "!!seq " if isinstance(node, list) else "!!str "
            tag = "!t " if draw(st.booleans()) or not isinstance(node, (dict, list, str)) else standard
        if isinstance(node, dict):
            items = [f"{_scalar_yaml(k)}: {emit(v)}" for k, v in node.items()]
            if anchors and draw(st.integers(0, 5)) == 0:
                items.insert(0, "<<: *" + draw(st.sampled_from(anchors)))
            text = "{" + ", ".join(items) + "}"
        elif isinstance(node, list):
            text = "[" + ", ".join(emit(v) for v in node) + "]"
        else:
            text = _scalar_yaml(node)
        if draw(st.integers(0, 5)) == 0:
            anchors.append(f"a{len(anchors)}")
            return f"&{anchors[-1]} {tag}{text}"
        return tag + text

    return emit(value) + "\n"


def _assert_parse_is_total(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text)
    try:
        parse(path)
    except ConfigError as exc:
        assert exc.problems
        assert all(isinstance(p, str) and p.startswith(str(path)) for p in exc.problems)


@settings(max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(text=yaml_documents(features=False))
def test_parse_never_crashes(tmp_path: Path, text: str) -> None:
    _assert_parse_is_total(tmp_path, text)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # ruamel's own generators
@settings(max_examples=2000, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(text=yaml_documents(features=True))
def test_parse_never_crashes_with_anchors_tags_and_merges(tmp_path: Path, text: str) -> None:
    _assert_parse_is_total(tmp_path, text)


def test_flexos_itself_cannot_be_placed(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: box
            mechanism: {driver: process}
        libraries:
          flexos.gates: {compartment: box}
        """,
    )
    assert only_problem(path) == (
        f"{path}:8: library 'flexos.gates' cannot be placed: flexos itself runs in every compartment; remove this entry"
    )


def test_a_crash_inside_the_yaml_library_is_a_config_error(tmp_path: Path) -> None:
    """Found by bench/fuzz.py: ruamel.yaml raises IndexError resolving the key ``-_`` as an int."""
    path = tmp_path / "flexos.yaml"
    path.write_text("name:\n  -_: ~\n")
    with pytest.raises(flexos.ConfigError) as info:
        parse(path)
    assert info.value.problems[0].startswith(f"{path}: cannot be read as YAML (IndexError")
