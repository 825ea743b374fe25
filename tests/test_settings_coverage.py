"""Every setting has a test that changes it.

The settings are every field of Settings, ModelConfig and HeadConfig (server/settings.py) and
every name in the settings tables of README.md and docs/OPERATIONS.md (which must be such
fields). A test "changes" one when the test sources (tests/*.py, tests/reliability/*.py) set it
in one of the ways the server takes settings, read from their syntax tree, not their prose:

- a keyword argument of Settings(...), ModelConfig(...) or HeadConfig(...), of
  dataclasses.replace(...), or of a helper in the same file that passes **kwargs on to one of
  those classes (with the string keys of the dicts inside such a helper);
- a string key of a dict literal given to parse_model(...) / parse_head(...);
- a TOML line `name = ...` inside a string, attributed to the [server] / [[models]] /
  [[heads]] table it follows (no table in that string: only a name of a single class counts);
- a command-line flag `--name-with-dashes` or an environment variable `LAYERTAP_NAME` in a
  string (server settings only).

So `interpolation=` given to torchvision or `mean=` to numpy does not count, nor does a per-model
`max_wait_ms` count for the server's `max_wait_ms` or the other way round. A new setting needs
a test that sets it and observes its effect before this passes; ALLOWED lists the settings no
test can change, with the reason.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Iterable
from pathlib import Path

from layertap.server.settings import HeadConfig, ModelConfig, Settings

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CLASSES: dict[str, type] = {
    "Settings": Settings,
    "ModelConfig": ModelConfig,
    "HeadConfig": HeadConfig,
}
PARSERS = {"parse_model": "ModelConfig", "parse_head": "HeadConfig"}
TABLES = {"[server]": "Settings", "[[models]]": "ModelConfig", "[[heads]]": "HeadConfig"}
DOCS = (ROOT / "README.md", ROOT / "docs/OPERATIONS.md")

# (class, field) -> why no test can change it. Empty: every setting can be, and is, tested.
ALLOWED: dict[tuple[str, str], str] = {}

Setting = tuple[str, str]  # (class name, field name)


def fields() -> dict[str, set[str]]:
    return {name: {f.name for f in dataclasses.fields(cls)} for name, cls in CLASSES.items()}


def source_files() -> list[Path]:
    found = sorted(TESTS.glob("*.py")) + sorted((TESTS / "reliability").glob("*.py"))
    return [p for p in found if p.resolve() != Path(__file__).resolve()]


def _called(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _string_keys(node: ast.AST) -> Iterable[str]:
    for inner in ast.walk(node):
        if isinstance(inner, ast.Dict):
            for key in inner.keys:
                if isinstance(key, ast.Constant) and isinstance(key.value, str):
                    yield key.value


def settings_set_in(source: str, known: dict[str, set[str]]) -> set[Setting]:
    """The settings one test source sets (module docstring), as (class, field) pairs."""
    tree = ast.parse(source)
    found: set[Setting] = set()

    def add(owners: Iterable[str], name: str) -> None:
        found.update((owner, name) for owner in owners if name in known[owner])

    # helpers that pass **kwargs on to a settings class, and which classes
    builders: dict[str, set[str]] = {}
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for call in ast.walk(fn):
            if isinstance(call, ast.Call) and _called(call) in CLASSES:
                if any(k.arg is None for k in call.keywords):
                    builders.setdefault(fn.name, set()).add(str(_called(call)))
        for key in _string_keys(fn) if fn.name in builders else ():
            add(builders[fn.name], key)

    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            called = _called(node)
            if called in CLASSES:
                owners: Iterable[str] = {called}
            elif called == "replace":  # dataclasses.replace: any class with that field
                owners = CLASSES
            else:
                owners = builders.get(called or "", set())
            for keyword in node.keywords:
                if keyword.arg is not None:
                    add(owners, keyword.arg)
            if called in PARSERS:
                for arg in node.args:
                    for key in _string_keys(arg):
                        add({PARSERS[called]}, key)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            table: str | None = None
            for line in text.splitlines():
                if line.strip() in TABLES:
                    table = TABLES[line.strip()]
                    continue
                match = re.match(r"\s*([a-z][a-z0-9_]*)\s*=", line)
                if match is None:
                    continue
                name = match.group(1)
                if table is not None:
                    add({table}, name)
                elif sum(name in names for names in known.values()) == 1:
                    add(CLASSES, name)
            for match in re.finditer(r"(?<![\w-])--([a-z][a-z0-9-]*)(?![\w-])", text):
                add({"Settings"}, match.group(1).replace("-", "_"))
            for match in re.finditer(r"\bLAYERTAP_([A-Z][A-Z0-9_]*)\b", text):
                add({"Settings"}, match.group(1).lower())
    return found


def settings_set_by_tests(known: dict[str, set[str]]) -> set[Setting]:
    found: set[Setting] = set()
    for path in source_files():
        found |= settings_set_in(path.read_text(), known)
    return found


def documented(path: Path) -> list[tuple[str, str]]:
    """(table header, name) for each name in the first column of the settings tables
    ("| Setting |" and "| Key |") of one Markdown file; `a_s` (+`_grace_s`) is a_grace_s."""
    names: list[tuple[str, str]] = []
    header = ""
    for line in path.read_text().splitlines():
        if not line.startswith("|"):
            header = ""
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if not header:
            header = cells[0]
            continue
        if header not in ("Setting", "Key") or set(cells[0]) <= {"-", ":"}:
            continue
        previous = ""
        for token in re.findall(r"`([a-z_][a-z0-9_]*)`", cells[0]):
            if token.startswith("_") and previous:  # a suffix of the name before it
                token = previous.rsplit("_", 1)[0] + token
            names.append((header, token))
            previous = token
    return names


def documented_settings(known: dict[str, set[str]]) -> tuple[set[Setting], list[str]]:
    """The documented settings as (class, field) pairs, and the names that are no field."""
    owners = {"Setting": ["Settings"], "Key": ["ModelConfig", "HeadConfig"]}
    found: set[Setting] = set()
    unknown: list[str] = []
    for path in DOCS:
        for header, name in documented(path):
            matches = {(c, name) for c in owners[header] if name in known[c]}
            if not matches:
                unknown.append(f"{path.name}: {name!r} ({header} table)")
            found |= matches
    return found, unknown


def untested(known: dict[str, set[str]]) -> list[str]:
    required = {(c, f) for c, names in known.items() for f in names}
    required |= documented_settings(known)[0]
    missing = required - settings_set_by_tests(known) - set(ALLOWED)
    return sorted(f"{c}.{f}" for c, f in missing)


# --- the checks -------------------------------------------------------------------------
def test_every_setting_is_changed_by_some_test() -> None:
    missing = untested(fields())
    assert not missing, (
        f"no test changes these settings: {missing}. Add a test that sets each one (keyword, "
        "TOML line, --flag or LAYERTAP_ env var; see this file's docstring) and observes its "
        "effect, or list it in ALLOWED with the reason no test can"
    )


def test_the_documented_settings_exist_and_are_found() -> None:
    known = fields()
    docs, unknown = documented_settings(known)
    assert not unknown, f"documented but not a field of Settings/ModelConfig/HeadConfig: {unknown}"
    # the tables were read at all: the server table, per-model keys, heads, the suffix form
    for setting in [
        ("Settings", "companion_wait_ms"),
        ("Settings", "max_connection_age_grace_s"),
        ("ModelConfig", "interpolation"),
        ("ModelConfig", "max_wait_ms"),
        ("HeadConfig", "file"),
    ]:
        assert setting in docs, setting


def test_allow_list_names_real_settings_with_a_reason() -> None:
    known = fields()
    for (cls, name), why in ALLOWED.items():
        assert name in known.get(cls, set()), f"ALLOWED names {cls}.{name}, which does not exist"
        assert why.strip(), f"ALLOWED {cls}.{name} gives no reason"


def test_an_unused_setting_is_reported() -> None:
    """The scan is not vacuous: a field no test mentions is reported, and each way of setting
    one is recognised for its own class only."""
    known = fields()
    known["Settings"] = known["Settings"] | {"dummy_never_set"}
    known["ModelConfig"] = known["ModelConfig"] | {"dummy_model_key"}
    assert untested(known) == ["ModelConfig.dummy_model_key", "Settings.dummy_never_set"]
    cases = {
        "Settings(dummy_never_set=1)": {("Settings", "dummy_never_set")},
        "ModelConfig(name='m', dummy_model_key=1)": {
            ("ModelConfig", "name"),
            ("ModelConfig", "dummy_model_key"),
        },
        "dataclasses.replace(s, dummy_never_set=1)": {("Settings", "dummy_never_set")},
        "load_settings(['--dummy-never-set', '1'])": {("Settings", "dummy_never_set")},
        "env = {'LAYERTAP_DUMMY_NEVER_SET': '1'}": {("Settings", "dummy_never_set")},
        "text = '[server]\\ndummy_never_set = 1\\n'": {("Settings", "dummy_never_set")},
        "text = '[[models]]\\nname = \"m\"\\ndummy_model_key = 1\\n'": {
            ("ModelConfig", "name"),
            ("ModelConfig", "dummy_model_key"),
        },
        "parse_model({'name': 'm', 'dummy_model_key': 1})": {
            ("ModelConfig", "name"),
            ("ModelConfig", "dummy_model_key"),
        },
        "def make(**kw):\n    return ModelConfig(name='m', **kw)\nmake(dummy_model_key=1)": {
            ("ModelConfig", "name"),
            ("ModelConfig", "dummy_model_key"),
        },
        # not settings: other calls' keywords, a per-model key given to Settings, prose
        "F.resize(x, interpolation=mode)": set(),
        "Settings(dummy_model_key=1)": set(),
        "# dummy_never_set = 1\nx = 'dummy_never_set'": set(),
        "text = 'max_wait_ms = 3\\n'": set(),  # no table: server or per-model, unknown
    }
    for source, expected in cases.items():
        assert settings_set_in(source, known) == expected, source
