"""What flexos.yaml says is what runs (issue 14): a placement that would silently not isolate is
gated or refused, never accepted."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import flexos
import flexos.config
from flexos import CompartmentSpec, ConfigError, Image
from flexos.config import app_path, parse

FLEXOS = Path(sys.executable).parent / "flexos"

# Loaded by flexos's own start-up (CLI, config stack, runtime) before any gate exists.
PRE_IMPORTED = (
    "json re zlib zipfile email struct base64 binascii decimal datetime fractions socket subprocess uuid "
    "hashlib lzma bz2 ast difflib ctypes msgpack ruamel.yaml pydantic click"
).split()


def box_yaml(modules: list[str], extra: str = "") -> str:
    placed = "".join(f"  {module}: {{compartment: box}}\n" for module in modules)
    return textwrap.dedent(
        """\
        compartments:
          - name: app
            mechanism: {driver: fcalls}
            default: true
          - name: box
            mechanism: {driver: process}
        """
    ) + (extra + "libraries:\n" + placed)


def test_modules_flexos_loaded_first_are_gates_under_run(tmp_path: Path) -> None:
    """Each of these was the app's local module under ``flexos run``: flexos had imported it."""
    (tmp_path / "flexos.yaml").write_text(box_yaml(PRE_IMPORTED))
    (tmp_path / "app.py").write_text(
        textwrap.dedent(
            """\
            import importlib, os, sys
            local = [n for n in sys.argv[1:] if type(importlib.import_module(n)).__name__ != "ModuleProxy"]
            print("local:", local)
            import json, zlib
            print(json.dumps({"pid": os.getpid()}) != json.dumps({"pid": json.loads("0")}), zlib.crc32(b"x"))
            """
        )
    )
    done = subprocess.run(
        [str(FLEXOS), "run", "app.py", *PRE_IMPORTED], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["local: []", "True 2363233923"]


def test_run_starts_the_app_in_a_lean_interpreter(tmp_path: Path) -> None:
    """The CLI's own stack (click, the config stack) is not in the app's module table."""
    (tmp_path / "flexos.yaml").write_text(box_yaml(["sqlite3"]))
    (tmp_path / "app.py").write_text(
        "import sys\nprint([m for m in ('click', 'pydantic', 'ruamel', 'json', 'email') if m in sys.modules])\n"
    )
    done = subprocess.run([str(FLEXOS), "run", "app.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "[]\n", "")


def test_boot_gates_a_module_the_app_imported_first() -> None:
    """``flexos.boot`` after ``import json``: the next import is the gate; stop() gives json back."""
    import json

    image = Image(
        {"app": CompartmentSpec("app", "fcalls", default=True), "box": CompartmentSpec("box", "process")},
        {"json": "box"},
    )
    with flexos.boot(image) as runtime:
        import json as gated

        assert type(gated).__name__ == "ModuleProxy"
        assert gated.loads("[1, 2]") == [1, 2]
        assert runtime.compartments["box"].pid is not None
    assert sys.modules["json"] is json


def test_boot_warns_of_a_name_bound_before_it(tmp_path: Path) -> None:
    (tmp_path / "flexos.yaml").write_text(box_yaml(["json"]))
    script = "import json, flexos\nfrom json import loads\nwith flexos.boot('flexos.yaml'):\n    pass\n"
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (
        "'loads' in __main__ is json.loads of the local module 'json', imported before flexos.boot(); "
        "flexos.yaml places it in compartment 'box'"
    ) in done.stderr
    assert (
        "'json' in __main__ is the local module 'json', imported before flexos.boot(); flexos.yaml places it in "
        "compartment 'box': import it after boot to reach it there"
    ) in done.stderr


@pytest.mark.parametrize("driver", ["subinterp", "vm"])
def test_isolating_default_compartment_refused_by_run(tmp_path: Path, driver: str) -> None:
    """The user-facing side of item 4: ``flexos run`` refuses it with FILE:LINE and exit 2."""
    (tmp_path / "flexos.yaml").write_text(box_yaml(["sqlite3"]).replace("{driver: fcalls}", f"{{driver: {driver}}}", 1))
    (tmp_path / "app.py").write_text("print('ran')\n")
    done = subprocess.run([str(FLEXOS), "run", "app.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "flexos.yaml:3: compartment 'app' is the default one, which is the app's own process; "
        "give it driver 'fcalls' and isolate the other compartments\n"
    )


# -- item 2: placement is verified ------------------------------------------------------------------
def placement_problems(tmp_path: Path, *modules: str) -> list[str]:
    path = tmp_path / "flexos.yaml"
    path.write_text(box_yaml(list(modules)))
    with pytest.raises(ConfigError) as info:
        parse(path, app_path(path))
    return info.value.problems


@pytest.mark.parametrize(
    ("written", "import_name", "distribution"),
    [("pillow", "PIL", "pillow"), ("PyYAML", "yaml", "PyYAML"), ("ruamel_yaml", "ruamel", "ruamel.yaml")],
)
def test_a_distribution_name_is_not_a_module(tmp_path: Path, written: str, import_name: str, distribution: str) -> None:
    (problem,) = placement_problems(tmp_path, written)
    assert problem.startswith(f"{tmp_path / 'flexos.yaml'}:8: library {written!r} is not a module found in ")
    assert problem.endswith(
        f"; did you mean {import_name!r} (the import name of the distribution {distribution!r})?"
        "; libraries: keys are import names"
    )


def test_a_module_that_does_not_exist(tmp_path: Path) -> None:
    first, second = placement_problems(tmp_path, "jsonn", "xml.etree.ElementTre")
    assert "library 'jsonn' is not a module found in the app's path" in first
    assert first.endswith("did you mean 'json'?; libraries: keys are import names")
    assert "library 'xml.etree.ElementTre' is not a module found in package 'xml.etree'" in second
    assert "did you mean 'xml.etree.ElementTree'?" in second


def test_a_module_beside_the_app_is_found(tmp_path: Path) -> None:
    (tmp_path / "myparsers.py").write_text("")
    path = tmp_path / "flexos.yaml"
    path.write_text(box_yaml(["myparsers", "sqlite3"]))
    assert parse(path, app_path(path))[0].libraries == {"myparsers": "box", "sqlite3": "box"}


@pytest.mark.parametrize("module", ["os", "sys", "builtins", "os.path", "importlib.util", "threading"])
def test_what_every_compartment_runs_on_cannot_be_placed(tmp_path: Path, module: str) -> None:
    (problem,) = placement_problems(tmp_path, module)
    top = module.partition(".")[0]
    assert problem == (
        f"{tmp_path / 'flexos.yaml'}:8: library {module!r} cannot be placed: every compartment's interpreter "
        f"(and flexos in it) runs on its own {top!r}; remove this entry"
    )


def test_main_cannot_be_placed(tmp_path: Path) -> None:
    (problem,) = placement_problems(tmp_path, "__main__")
    assert problem.endswith(
        "'__main__' cannot be placed: it is the app's own script, which runs in the default compartment; "
        "move the code to box into a module of its own and place that"
    )


def test_run_refuses_a_misplaced_name(tmp_path: Path) -> None:
    (tmp_path / "flexos.yaml").write_text(box_yaml(["pillow"]))
    (tmp_path / "app.py").write_text("print('ran')\n")
    done = subprocess.run([str(FLEXOS), "run", "app.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert "did you mean 'PIL' (the import name of the distribution 'pillow')?" in done.stderr


# -- item 3: a typo in a security list is refused at check ------------------------------------------
def hardened_problems(tmp_path: Path, hardening: str, mechanism: str = "{driver: process}") -> list[str]:
    path = tmp_path / "flexos.yaml"
    path.write_text(box_yaml(["json"]).replace("{driver: process}\n", f"{mechanism}\n    hardening: {hardening}\n"))
    with pytest.raises(ConfigError) as info:
        parse(path, app_path(path))
    return [problem.removeprefix(f"{path}:") for problem in info.value.problems]


def test_audit_event_typo(tmp_path: Path) -> None:
    assert hardened_problems(tmp_path, "{audit: {deny: [subproces]}}") == [
        "7: compartments[1].hardening.audit.deny: Value error, 'subproces' is not an audit event CPython raises, "
        "a prefix of some (socket: socket.*), nor one of flexos's names (subprocess); did you mean 'subprocess'?"
    ]
    assert hardened_problems(tmp_path, "{audit: {deny: [socket.conect]}}")[0].endswith("did you mean 'socket.connect'?")


def test_audit_events_events_prefixes_and_aliases_pass(tmp_path: Path) -> None:
    path = tmp_path / "flexos.yaml"
    hardening = "{audit: {deny: [subprocess, socket, socket.connect, ctypes, os.system, builtins.input/result]}}"
    path.write_text(
        box_yaml(["json"]).replace("{driver: process}\n", "{driver: process}\n    hardening: " + hardening + "\n")
    )
    assert parse(path)[0].compartments["box"].hardening["audit"]["deny"][-1] == "builtins.input/result"


@pytest.mark.parametrize("which", ["allow", "deny"])
def test_system_call_typo(tmp_path: Path, which: str) -> None:
    pytest.importorskip("pyseccomp", reason="libseccomp is not installed")
    assert hardened_problems(tmp_path, f"{{seccomp: {{{which}: [sokcet]}}}}") == [
        f"7: compartments[1].hardening.seccomp.{which}: Value error, 'sokcet' is not a system call on this machine "
        "(libseccomp); did you mean 'socket'?"
    ]


@pytest.mark.parametrize(
    "mechanism", ["{driver: process}", "{driver: vm, filesystem: {read: [./nodata]}}"], ids=["process", "vm"]
)
def test_a_missing_path_is_refused_for_every_driver(tmp_path: Path, mechanism: str) -> None:
    hardening = "{filesystem: {read: [./nodata]}}" if mechanism == "{driver: process}" else "{}"
    found = hardened_problems(tmp_path, hardening, mechanism)
    assert len(found) == 1
    assert (
        f"'./nodata' does not exist ({tmp_path / 'nodata'}, relative to {tmp_path}): only paths that exist" in found[0]
    )


def test_paths_are_resolved_against_the_yaml_and_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir("/")
    path = tmp_path / "flexos.yaml"
    hardening = "{filesystem: {read: [./data, ~/data], write: [data/]}}"
    path.write_text(
        box_yaml(["json"]).replace("{driver: process}\n", "{driver: process}\n    hardening: " + hardening + "\n")
    )
    filesystem = parse(path, app_path(path))[0].compartments["box"].hardening["filesystem"]
    assert parse(path)[0].compartments["box"].hardening["filesystem"]["read"] == ["./data", "~/data"]  # not to run
    assert filesystem == {"read": [str(tmp_path / "data")] * 2, "write": [str(tmp_path / "data")]}


@pytest.mark.parametrize(("written", "fix"), [("512MB", "512MiB"), ("1G", "1GiB"), ("64kb", "64KiB")])
def test_an_ambiguous_size_is_refused(tmp_path: Path, written: str, fix: str) -> None:
    assert hardened_problems(tmp_path, f"{{limits: {{memory: {written}}}}}") == [
        f"7: compartments[1].hardening.limits.memory: Value error, {written!r} is ambiguous: write {fix} "
        "(binary units) or a number of bytes"
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("restart: onfailure", "Input should be 'on-failure' or 'never'; did you mean 'on-failure'?"),
        (
            "hardening: {filesystem: {reed: []}}",
            "unknown key 'reed' in compartments[1].hardening.filesystem; did you mean 'read'? (allowed: read, write)",
        ),
        (
            "hardening: {seccomp: compute_only}",
            "Input should be 'compute-only'; did you mean 'compute-only'?",
        ),
    ],
)
def test_option_typos_get_did_you_mean(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "flexos.yaml"
    path.write_text(box_yaml(["json"]).replace("{driver: process}\n", "{driver: process}\n    " + text + "\n"))
    with pytest.raises(ConfigError) as info:
        parse(path)
    assert [p.partition(": ")[2].endswith(problem) for p in info.value.problems] == [True], info.value.problems


def test_driver_typo_by_case(tmp_path: Path) -> None:
    path = tmp_path / "flexos.yaml"
    path.write_text(box_yaml(["json"]).replace("{driver: process}", "{driver: VM}"))
    with pytest.raises(ConfigError) as info:
        parse(path)
    assert info.value.problems == [
        f"{path}:6: unknown driver 'VM'; did you mean 'vm'? (known drivers: fcalls, process, subinterp, vm, intel-pku)"
    ]


# -- item 5: the app's directory is not readable from a hardened compartment ------------------------
BOXPKG = {
    "boxpkg/__init__.py": "from boxdep import DEPENDENCY\n"
    "from boxpkg.helper import env, inet_pair, listing, pid, read, read_or_raise, run_async\n",
    "boxdep.py": "DEPENDENCY = 'beside the app, imported by boxpkg'\n",
    "boxpkg/helper.py": textwrap.dedent(
        """\
        import os

        def read(path):
            try:
                with open(path) as f:
                    return f.read()
            except OSError as exc:
                return type(exc).__name__

        def read_or_raise(path):
            with open(path) as f:
                return f.read()

        def run_async():
            import asyncio

            async def nap():
                await asyncio.sleep(0.01)
                return "slept"

            return asyncio.run(nap())

        def inet_pair():
            import socket

            socket.socketpair(socket.AF_INET)

        def env(name):
            return os.environ.get(name)

        def pid():
            return os.getpid()

        def listing(path):
            try:
                return sorted(os.listdir(path))
            except OSError as exc:
                return type(exc).__name__
        """
    ),
}


def test_a_secret_beside_the_app_is_unreadable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flexos.hardening import landlock_abi

    if landlock_abi() < 1:
        pytest.skip("this kernel does not enforce Landlock")
    for name, text in BOXPKG.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / ".env").write_text("TOKEN=secret\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "in.txt").write_text("input")
    (tmp_path / "flexos.yaml").write_text(
        box_yaml(["boxpkg"]).replace(
            "{driver: process}\n", "{driver: process}\n    hardening: {filesystem: {read: [./data]}}\n"
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # the app's directory, as sys.path[0] is under flexos run
    sys.modules.pop("boxpkg", None)
    with flexos.boot(str(tmp_path / "flexos.yaml")):
        import boxpkg

        assert boxpkg.read(str(tmp_path / "data" / "in.txt")) == "input"
        assert boxpkg.read(str(tmp_path / ".env")) == "PermissionError"
        assert boxpkg.listing(str(tmp_path)) == "PermissionError"
        assert "helper.py" in boxpkg.listing(str(tmp_path / "boxpkg"))  # the placed package, whole
        assert boxpkg.DEPENDENCY == "beside the app, imported by boxpkg"  # and what it imports
        assert boxpkg.read(str(tmp_path / "flexos.yaml")) == "PermissionError"


# -- flexos check shows the effective policy ---------------------------------------------------------
HARDENED = """\
  - name: parsers
    mechanism: {driver: process}
    timeout: 30
    hardening:
      env: clean
      network: none
      filesystem: {read: [./data]}
      seccomp: compute-only
      limits: {memory: 512MiB}
      audit: {deny: [subprocess]}
"""


def check(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    (tmp_path / "data").mkdir(exist_ok=True)
    yaml = box_yaml(["json"]).replace("libraries:\n", HARDENED + "libraries:\n  boxpkg: {compartment: parsers}\n")
    (tmp_path / "app").mkdir(exist_ok=True)
    (tmp_path / "app" / "flexos.yaml").write_text(yaml.replace("./data", "../data"))
    (tmp_path / "app" / "boxpkg").mkdir(exist_ok=True)
    (tmp_path / "app" / "boxpkg" / "__init__.py").write_text("")
    return subprocess.run(
        [str(FLEXOS), "check", "app/flexos.yaml", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )


def test_check_prints_the_effective_policy(tmp_path: Path) -> None:
    done = check(tmp_path)
    assert done.returncode in (0, 2), done.stderr  # 2: this machine lacks a feature (said in stderr)
    out = done.stdout.splitlines()
    first = out.index("effective policy (what each compartment is held to once started, flexos's additions included):")
    policy = [line.split(None, 1) for line in out[first + 1 : out.index("this machine:")]]
    assert policy[0] == ["app", "the app itself: unconfined, reaches every compartment"]
    assert policy[1] == ["box", "restart on-failure; call timeout none; replies up to 64MiB"]
    start = next(i for i, line in enumerate(out) if i > first and line.startswith("  parsers "))
    text = "\n".join(out[start : out.index("this machine:")])
    assert "call timeout 30s" in out[start]
    assert f"{tmp_path / 'data'}  (hardening.filesystem.read)" in text
    assert f"{tmp_path / 'app' / 'boxpkg'}  (where the modules placed here and their imports live)" in text
    assert str(tmp_path / "app") + "," not in text and str(tmp_path / "app") + " " not in text
    assert "EPERM for accept, accept4" in text
    assert "denies os.exec, os.fork" in text and "subprocess.Popen" in text
    assert "network  none" in text and "env      clean: only LANG, PATH" in text
    assert "limits   memory 512MiB" in text
    summary = next(line.strip() for line in out if line.strip().startswith("hardening: "))
    assert f"filesystem read {tmp_path / 'data'} write -" in summary and "limits memory=512MiB" in summary


def test_check_json_is_the_same_report(tmp_path: Path) -> None:
    import json

    done = check(tmp_path, "--json")
    report = json.loads(done.stdout)
    parsers = next(entry for entry in report["compartments"] if entry["name"] == "parsers")
    assert {"path": str(tmp_path / "data"), "why": "hardening.filesystem.read"} in parsers["effective"]["read"]
    assert "socket" in parsers["effective"]["seccomp_deny"]
    assert parsers["effective"]["limits"] == {"memory": 512 << 20}
    assert (parsers["timeout"], parsers["reaches"]) == (30, [])
    assert report["libraries"] == {"boxpkg": "parsers", "json": "box"}
    assert {feature["name"] for feature in report["machine"]} >= {"seccomp", "landlock"}


def test_run_finds_the_flexos_yaml_beside_the_script(tmp_path: Path) -> None:
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "flexos.yaml").write_text(box_yaml(["json"]))
    (tmp_path / "app" / "x.py").write_text("import json\nprint(type(json).__name__)\n")
    done = subprocess.run([str(FLEXOS), "run", "app/x.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "ModuleProxy\n", "")


def test_run_a_missing_script_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = subprocess.run([str(FLEXOS), "run", "missing.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        f"flexos run: can't open file '{tmp_path / 'missing.py'}': [Errno 2] No such file or directory\n"
    )


def write_boxpkg(root: Path, hardening: str) -> None:
    for name, text in BOXPKG.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text(text)
    (root / ".env").write_text("TOKEN=secret\n")
    (root / "data").mkdir(exist_ok=True)
    (root / "flexos.yaml").write_text(
        box_yaml(["boxpkg"]).replace("{driver: process}\n", "{driver: process}\n    hardening: " + hardening + "\n")
    )


def test_run_verbose_logs_gated_imports_starts_restarts_and_denials(tmp_path: Path) -> None:
    from flexos.hardening import landlock_abi

    write_boxpkg(tmp_path, "{filesystem: {read: [./data]}}" if landlock_abi() >= 1 else "{}")
    (tmp_path / "app.py").write_text(
        textwrap.dedent(
            """            import os, signal, boxpkg
            try:
                print(boxpkg.read_or_raise(".env"))
            except OSError as exc:
                print(type(exc).__name__)
            os.kill(boxpkg.pid(), signal.SIGKILL)
            try:
                boxpkg.pid()
            except Exception as exc:
                print(type(exc).__name__)
            import boxpkg.helper
            print(boxpkg.helper.pid() > 0)
            """
        )
    )
    done = subprocess.run(
        [str(FLEXOS), "run", "-v", "app.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    log = done.stderr
    assert re.search(r"flexos\[\d+\]: started compartment 'box' \(process, pid \d+\)", log), log
    assert re.search(r"import 'boxpkg': a gate to compartment 'box' \(pid \d+\)", log), log
    assert "restarting compartment 'box': compartment 'box' killed by signal 9 (SIGKILL)" in log
    assert done.stdout.splitlines()[1:] == ["CompartmentCrashed", "True"]
    if landlock_abi() >= 1:
        assert done.stdout.splitlines()[0] == "PermissionError"
        assert "denied: PermissionError: [Errno 13] Permission denied: '.env'; compartment 'box' is sandboxed: " in log


def test_flexos_verbose_logs_for_an_app_started_by_python(tmp_path: Path) -> None:
    """FLEXOS_VERBOSE=1 does for flexos.boot in a plain ``python app.py`` what ``flexos run -v`` does."""
    write_boxpkg(tmp_path, "{}")
    (tmp_path / "app.py").write_text(
        "import flexos\nwith flexos.boot('flexos.yaml'):\n    import boxpkg\n    boxpkg.pid()\n"
    )
    env = {**os.environ, "FLEXOS_VERBOSE": "1"}
    done = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert re.search(r"flexos\[\d+\]: started compartment 'box' \(process, pid \d+\)", done.stderr), done.stderr
    assert re.search(r"import 'boxpkg': a gate to compartment 'box' \(pid \d+\)", done.stderr), done.stderr
    quiet = subprocess.run([sys.executable, "app.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (quiet.returncode, quiet.stderr) == (0, "")


def test_env_keeps_the_named_variables_and_drops_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_boxpkg(tmp_path, "{env: {keep: [TZ]}}")
    monkeypatch.setenv("TZ", "Europe/Paris")
    monkeypatch.setenv("APP_SECRET", "hunter2")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("boxpkg", None)
    with flexos.boot(str(tmp_path / "flexos.yaml")):
        import boxpkg

        assert (boxpkg.env("TZ"), boxpkg.env("APP_SECRET"), boxpkg.env("PATH")) == (
            "Europe/Paris",
            None,
            "/usr/bin:/bin",
        )


# -- flexos.boot({...}): the same shape, the same messages -----------------------------------------
def image_data(**box: object) -> dict:
    return {
        "compartments": [
            {"name": "app", "mechanism": {"driver": "fcalls"}, "default": True},
            {"name": "box", "mechanism": {"driver": "process"}, **box},
        ],
        "libraries": {"json": {"compartment": "box"}},
    }


def test_boot_takes_a_dict_validated_as_a_file_is() -> None:
    with pytest.raises(ConfigError) as info:
        flexos.boot(image_data(restart="onfailure", hardening={"audit": {"deny": ["subproces"]}}))
    assert info.value.problems == [
        "flexos.boot({...}): compartments[1].restart: Input should be 'on-failure' or 'never'; "
        "did you mean 'on-failure'?",
        "flexos.boot({...}): compartments[1].hardening.audit.deny: Value error, 'subproces' is not an audit event "
        "CPython raises, a prefix of some (socket: socket.*), nor one of flexos's names (subprocess); "
        "did you mean 'subprocess'?",
    ]
    data = image_data()
    data["libraries"] = {"pillow": {"compartment": "box"}}
    with pytest.raises(ConfigError, match=r"^flexos.boot\(\{...\}\): libraries.pillow: library 'pillow' is not a"):
        flexos.boot(data)
    with flexos.boot(image_data()) as runtime:
        import json

        assert type(json).__name__ == "ModuleProxy"
        assert runtime.image.compartments["box"].driver == "process"


def test_compute_only_lets_asyncio_run_but_no_other_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("pyseccomp", reason="libseccomp is not installed")
    write_boxpkg(tmp_path, "{seccomp: compute-only}")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("boxpkg", None)
    with flexos.boot(str(tmp_path / "flexos.yaml")):
        import boxpkg

        assert boxpkg.run_async() == "slept"  # its event loop wakes itself over an AF_UNIX socketpair
        with pytest.raises(PermissionError) as info:
            boxpkg.inet_pair()
        if sys.version_info >= (3, 12):  # the note comes through sys.monitoring
            assert "hardening.seccomp (profile compute-only; " in "\n".join(info.value.__notes__)


# -- cosmetics ---------------------------------------------------------------------------------------
def test_the_apps_traceback_starts_at_the_apps_frame(tmp_path: Path) -> None:
    (tmp_path / "flexos.yaml").write_text(box_yaml(["json"]))
    (tmp_path / "boom.py").write_text('def f():\n    raise ValueError("boom")\n\n\nf()\n')
    done = subprocess.run([str(FLEXOS), "run", "boom.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[:2] == ["Traceback (most recent call last):", '  File "boom.py", line 5, in <module>']
    assert lines[-1] == "ValueError: boom"
    assert "flexos" not in done.stderr


def test_a_warning_names_the_yaml_line(tmp_path: Path) -> None:
    path = tmp_path / "flexos.yaml"
    path.write_text(
        box_yaml(["json"]).replace("libraries:\n", "  - name: spare\n    mechanism: {driver: process}\nlibraries:\n")
    )
    with pytest.warns(flexos.config.ConfigWarning) as caught:
        flexos.load(str(path))
    assert [(warning.filename, warning.lineno) for warning in caught] == [(str(path), 7)]


def json_module_file() -> str:
    import json

    return str(json.__file__)


def test_a_remote_error_prints_the_apps_frames_then_the_compartments_once(tmp_path: Path) -> None:
    (tmp_path / "flexos.yaml").write_text(box_yaml(["json"]))
    (tmp_path / "remote.py").write_text('import json\n\njson.loads("{bad")\n')
    done = subprocess.run([str(FLEXOS), "run", "remote.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    lines = done.stderr.splitlines()
    # As concurrent.futures shows a worker's exception: the compartment's traceback, then the app's.
    assert lines[0] == "flexos.errors.RemoteTraceback: raised in compartment 'box':"
    joined = lines.index("The above exception was the direct cause of the following exception:")
    remote, app = lines[:joined], lines[joined + 1 :]
    assert "Traceback (most recent call last):" in remote and any("json/decoder.py" in line for line in remote)
    assert not any("flexos" in line for line in remote[1:])  # the frames that served the call are not shown
    assert app[1:3] == ["Traceback (most recent call last):", '  File "remote.py", line 3, in <module>']
    assert app[-1].startswith("json.decoder.JSONDecodeError: Expecting property name")
    assert done.stderr.count("raised in compartment") == 1
    assert remote[1:4] == [  # it starts at the library's frame, not the gate's dispatcher
        "",
        "Traceback (most recent call last):",
        f'  File "{Path(json_module_file()).parent / "__init__.py"}", line {remote[3].rsplit("line ", 1)[1]}',
    ]


@pytest.mark.skipif(sys.version_info < (3, 13), reason="the subinterp driver needs CPython 3.13+")
def test_check_predicts_an_extension_a_subinterpreter_will_not_load(tmp_path: Path) -> None:
    pytest.importorskip("PIL", reason="pillow is not installed")
    (tmp_path / "flexos.yaml").write_text(
        box_yaml(["PIL", "sqlite3", "_sqlite3"]).replace("{driver: process}", "{driver: subinterp}")
    )
    done = subprocess.run([str(FLEXOS), "check"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    (warning,) = done.stderr.splitlines()
    assert warning.startswith("flexos.yaml: warning: compartment 'box' (subinterp) cannot load the C extension")
    assert "'PIL._imaging'" in warning and "sqlite3" not in warning  # _sqlite3 loads in a subinterpreter
    assert warning.endswith(
        "does not support loading in subinterpreters); place 'PIL' in a compartment with a process of its own"
    )


# -- every denial names its setting and the line it is written on ------------------------------------
DENIED_YAML = """\
compartments:
  - name: app
    mechanism: {driver: fcalls}
    default: true
  - name: files
    mechanism: {driver: process}
    hardening:
      filesystem: {read: [./data]}
      seccomp: compute-only
      limits: {memory: 256MiB}
  - name: offline
    mechanism: {driver: process}
    hardening:
      network: none
      audit: {deny: [subprocess]}
libraries:
  denied: {compartment: files}
  offline: {compartment: offline}
"""

DENIED_APP = """\
import socket, sys
import denied, offline

server = socket.socket()
server.bind(("127.0.0.1", 0))
attempts = [
    (denied.read, (".env",)),
    (denied.spawn, ()),
    (denied.allocate, (2 << 30,)),
    (offline.run, ()),
    (offline.connect, (server.getsockname()[1],)),
]
for function, args in attempts:
    try:
        function(*args)
    except (OSError, MemoryError) as exc:
        notes = [note for note in getattr(exc, "__notes__", []) if "sandboxed" in note]
        print(type(exc).__name__, getattr(exc, "errno", None), "|", exc, "|", " / ".join(notes))
denied.segfault()
"""

DENIED_MODULES = {
    "denied.py": textwrap.dedent(
        """\
        import ctypes, os

        def read(path):
            with open(path) as f:
                return f.read()

        def spawn():
            os.posix_spawn("/bin/true", ["/bin/true"], {})

        def allocate(size):
            return bytearray(size)

        def segfault():
            ctypes.string_at(0)
        """
    ),
    "offline.py": textwrap.dedent(
        """\
        import socket, subprocess

        def run():
            subprocess.run(["/bin/true"])

        def connect(port):
            with socket.socket() as s:
                s.connect(("127.0.0.1", port))
        """
    ),
}


def line_of(text: str, needle: str) -> int:
    return next(number for number, line in enumerate(text.splitlines(), 1) if needle in line)


def test_each_denial_names_its_setting_and_its_line_under_run(tmp_path: Path) -> None:
    """As a user sees them: a Landlock EACCES, a seccomp EPERM, a MemoryError under limits.memory,
    an audit denial and a netns ENETUNREACH each name the setting and its flexos.yaml line; a crash
    names the call that was running and carries the compartment's own stack."""
    from flexos.hardening import landlock_abi
    from flexos.probe import machine_report

    missing = [f.name for f in machine_report() if f.name in ("landlock", "seccomp", "netns") and not f.available]
    if missing or landlock_abi() < 1:
        pytest.skip(f"this machine lacks {', '.join(missing) or 'landlock'}")
    for name, text in DENIED_MODULES.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "data").mkdir()
    (tmp_path / ".env").write_text("TOKEN=secret\n")
    (tmp_path / "flexos.yaml").write_text(DENIED_YAML)
    (tmp_path / "app.py").write_text(DENIED_APP)
    done = subprocess.run([str(FLEXOS), "run", "app.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    at = {
        key: f"flexos.yaml:{line_of(DENIED_YAML, key)}"
        for key in ("filesystem", "seccomp", "memory", "audit", "network")
    }
    sandboxed = "compartment 'files' is sandboxed: "
    assert done.stdout.splitlines() == [
        f"PermissionError 13 | [Errno 13] Permission denied: '.env' | {sandboxed}.env is not under "
        f"hardening.filesystem.read (or .write, to write it) ({at['filesystem']})",
        f"PermissionError 1 | [Errno 1] Operation not permitted: '/bin/true' | {sandboxed}hardening.seccomp "
        f"(profile compute-only; {at['seccomp']}) answers EPERM to the system calls execve, fork, socket, connect "
        "and 34 more (flexos check lists them all)",
        f"MemoryError None |  | {sandboxed}hardening.limits.memory holds it to 256MiB of data ({at['memory']})",
        "PermissionError None | 'subprocess.Popen' is denied in compartment 'offline' "
        f"(hardening.audit, {at['audit']}) | ",
        f"OSError 101 | [Errno 101] Network is unreachable | compartment 'offline' is sandboxed: hardening.network "
        f"is none ({at['network']}): it has a network namespace of its own, only lo",
    ], done.stderr
    assert done.returncode == 1
    lines = done.stderr.splitlines()
    assert lines[:4] == [
        "Traceback (most recent call last):",
        '  File "app.py", line 19, in <module>',
        "    denied.segfault()",
        "    ~~~~~~~~~~~~~~~^^",
    ], done.stderr
    assert (
        lines[4] == "flexos.errors.CompartmentCrashed: compartment 'files' killed by signal 11 (SIGSEGV): "
        "its own stack as it died:"
    )
    assert re.search(r'File ".*denied\.py", line \d+ in segfault', done.stderr), done.stderr
    assert re.fullmatch(
        r"the call it was serving: denied\.segfault\(\) \(CALL of object \d+ \(a function\)\)", lines[-1]
    )
    assert done.stderr.count("killed by signal 11") == 1  # printed once, as the app's own error


# -- the Python API with an Image: the same refusals as flexos.yaml -------------------------------------
@pytest.mark.parametrize("driver", ["subinterp", "vm", "process"])
def test_boot_refuses_an_image_whose_default_cannot_hold_the_app(driver: str) -> None:
    image = Image(
        {"app": CompartmentSpec("app", driver, default=True), "box": CompartmentSpec("box", "process")}, {"json": "box"}
    )
    with pytest.raises(ConfigError) as info:
        flexos.boot(image)
    assert info.value.problems == [
        "<flexos.yaml>: compartment 'app' is the default one, which is the app's own process; "
        "give it driver 'fcalls' and isolate the other compartments"
    ]


@pytest.mark.parametrize("module", ["os", "sys.monitoring", "__main__", "flexos.config"])
def test_boot_refuses_an_image_placing_what_can_never_be_placed(module: str) -> None:
    image = Image(
        {"app": CompartmentSpec("app", "fcalls", default=True), "box": CompartmentSpec("box", "process")},
        {module: "box"},
    )
    with pytest.raises(ConfigError, match="cannot be placed"):
        flexos.boot(image)


def test_env_has_one_message_per_mistake(tmp_path: Path) -> None:
    assert hardened_problems(tmp_path, "{env: clear}") == [
        "7: compartments[1].hardening.env: Value error, env is 'inherit', 'clean' or {keep: [NAME, ...]}, "
        "not 'clear'; did you mean 'clean'?"
    ]
    assert hardened_problems(tmp_path, "{env: {kep: [TZ]}}") == [
        "7: compartments[1].hardening.env: Value error, unknown key 'kep' in env; did you mean 'keep'? (allowed: keep)"
    ]
    assert hardened_problems(tmp_path, "{env: {keep: [TZ, 3x]}}") == [
        "7: compartments[1].hardening.env: Value error, '3x' is not an environment variable name"
    ]


def test_every_missing_path_is_named(tmp_path: Path) -> None:
    (problem,) = hardened_problems(tmp_path, "{filesystem: {read: [./nodata, ~/nothere, /etc]}}")
    assert "'./nodata' does not exist" in problem and "'~/nothere' does not exist" in problem
    assert problem.endswith("create them first")


def test_check_searches_the_apps_path_not_the_commands(tmp_path: Path) -> None:
    """The directory of the ``flexos`` command (a venv's bin) is not where the app imports from."""
    (tmp_path / "flexos.yaml").write_text(box_yaml(["nosuchmodule"]))
    done = subprocess.run([str(FLEXOS), "check"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"library 'nosuchmodule' is not a module found in the app's path ({tmp_path}, " in done.stderr
    assert str(FLEXOS.parent) not in done.stderr


def test_a_library_written_as_a_name_says_how_to_write_it(tmp_path: Path) -> None:
    path = tmp_path / "flexos.yaml"
    path.write_text(box_yaml([]) + "  json: box\n")
    with pytest.raises(ConfigError) as info:
        parse(path)
    assert info.value.problems == [
        f"{path}:8: libraries.json: Input should be a valid dictionary (write json: {{compartment: box}})"
    ]


def test_a_library_audit_denial_names_its_yaml_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "spawner.py").write_text("import subprocess\n\ndef run():\n    subprocess.run(['/bin/true'])\n")
    path = tmp_path / "flexos.yaml"
    path.write_text(box_yaml([]) + "  spawner:\n    compartment: box\n    hardening: {audit: {deny: [subprocess]}}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("spawner", None)
    with flexos.boot(str(path)):
        import spawner

        with pytest.raises(PermissionError) as info:
            spawner.run()
    assert str(info.value) == (
        f"'subprocess.Popen' is denied for library 'spawner' (libraries.spawner.hardening.audit, {path}:10)"
    )
