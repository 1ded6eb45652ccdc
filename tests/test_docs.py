"""The documentation stays true to the code and to itself.

- docs/configuration.md has one row per run-config key of pyproject.toml, with its default as
  pyproject.toml writes it, and no row for a key that does not exist;
- its node-config table lists exactly the keys of `clients.state.NODE_CONFIG_KEYS`, each with its
  environment variable, and every read of a node config in src/ names one of those keys;
- every COLLAFUSE_* variable of src/ has a row in its environment-variable tables;
- every relative link of README.md, docs/*.md and results/**/README.md reaches an existing file
  or directory, and an #anchor into a markdown file names one of its headings;
- every console script's `--help` is mentioned, every test file is in docs/tests.md and every
  module in docs/code-layout.md.

Reads files only: no network, no run.
"""

from __future__ import annotations

import ast
import importlib
import re
import tomllib
from pathlib import Path
from urllib.parse import unquote

import pytest

from collafuse_flwr.clients.state import NODE_CONFIG_KEYS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
PACKAGE = ROOT / "src" / "collafuse_flwr"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

RUN_CONFIG_HEADER = ["key", "default", "range", "meaning"]
NODE_CONFIG_HEADER = ["key", "environment variable", "default", "meaning"]
VARIABLE_HEADERS = (["variable", "read by", "meaning"], ["variable", "set or read by", "meaning"])
KEY_CELL = re.compile(r"`([a-z0-9-]+)`")
VARIABLE = re.compile(r"COLLAFUSE_[A-Z_]+")
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _without_code(text: str) -> str:
    """`text` without fenced code blocks (their lines blanked, so line numbers stay) and with
    each inline code span replaced by a placeholder (a link inside one is no link)."""
    lines, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            lines.append("")
        else:
            lines.append("" if fenced else re.sub(r"`[^`]*`", "code", line))
    return "\n".join(lines)


def _cells(line: str) -> list[str]:
    """The cells of a markdown table row (`\\|` is a pipe inside a cell)."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip().strip("|"))]


def tables(text: str, header: list[str]) -> list[list[str]]:
    """The rows (as lists of cells) of every markdown table in `text` whose header is `header`."""
    rows, current = [], None
    for line in text.splitlines():
        if not line.lstrip().startswith("|"):
            current = None
            continue
        cells = _cells(line)
        if current is None:
            current = [cells == header, True]  # [this table counts, the next line is the separator]
        elif current[1]:
            current[1] = False
        elif current[0]:
            rows.append(cells)
    return rows


def _configuration() -> str:
    if not CONFIGURATION.is_file():
        pytest.fail(f"{CONFIGURATION.relative_to(ROOT)} is missing")
    return CONFIGURATION.read_text()


def _section(text: str, heading: str) -> str:
    """The part of `text` from the `## heading` line to the next `## ` heading."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/configuration.md has no '## {heading}' section"
    return match.group(1)


def _key_of(row: list[str], where: str) -> str:
    match = KEY_CELL.fullmatch(row[0])
    assert match, f"{where}: the first cell {row[0]!r} must be exactly one key in backticks"
    return match.group(1)


# --- 1. run config -------------------------------------------------------------------------


def _run_config_rows() -> dict[str, list[str]]:
    rows: dict[str, list[str]] = {}
    for row in tables(_configuration(), RUN_CONFIG_HEADER):
        key = _key_of(row, "docs/configuration.md run-config table")
        assert key not in rows, f"docs/configuration.md documents run-config key {key!r} twice"
        rows[key] = row
    return rows


def test_every_run_config_key_has_a_row_with_its_pyproject_default():
    defaults = PYPROJECT["tool"]["flwr"]["app"]["config"]
    rows = _run_config_rows()
    missing = sorted(set(defaults) - set(rows))
    assert not missing, f"docs/configuration.md has no row for run-config key(s) {missing}"
    wrong = []
    for key, value in defaults.items():
        cell = rows[key][1]
        literal = re.fullmatch(r"`([^`]*)`", cell)
        try:
            documented = tomllib.loads(f"v = {literal.group(1)}")["v"] if literal else None
        except tomllib.TOMLDecodeError:
            documented = None
        if literal is None or type(documented) is not type(value) or documented != value:
            wrong.append(f"{key}: documented {cell!r}, pyproject.toml has {value!r}")
    assert not wrong, "docs/configuration.md defaults differ from pyproject.toml:\n" + "\n".join(wrong)


def test_no_run_config_row_names_a_key_that_does_not_exist():
    unknown = sorted(set(_run_config_rows()) - set(PYPROJECT["tool"]["flwr"]["app"]["config"]))
    assert not unknown, f"docs/configuration.md documents run-config key(s) {unknown} that pyproject.toml lacks"


# --- 2. node config and environment variables ----------------------------------------------


def test_the_node_config_table_lists_exactly_the_registered_keys_with_their_variables():
    rows = tables(_section(_configuration(), "Node config"), NODE_CONFIG_HEADER)
    documented = {_key_of(row, "docs/configuration.md node-config table"): row for row in rows}
    assert len(documented) == len(rows), "docs/configuration.md lists a node-config key twice"
    assert set(documented) == set(NODE_CONFIG_KEYS), (
        f"node-config keys read by the code (clients/state.py NODE_CONFIG_KEYS) but not documented: "
        f"{sorted(set(NODE_CONFIG_KEYS) - set(documented))}; documented but never read: "
        f"{sorted(set(documented) - set(NODE_CONFIG_KEYS))}")
    for key, variable in NODE_CONFIG_KEYS.items():
        expected = f"`{variable}`" if variable else "none"
        assert documented[key][1] == expected, (
            f"docs/configuration.md: node config {key!r} has environment variable {documented[key][1]!r}, "
            f"the code {expected!r}")


def _node_config_expr(node: ast.AST) -> bool:
    """Whether `node` is a node config: `node_config` or `<anything>.node_config`."""
    return (isinstance(node, ast.Name) and node.id == "node_config") or \
        (isinstance(node, ast.Attribute) and node.attr == "node_config")


def _string_constants(tree: ast.Module) -> dict[str, object]:
    """Module-level names of `tree` that hold a string constant, and the names it imports
    (module, name): resolved by `_resolve` only when a read uses them."""
    names: dict[str, object] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant):
            for target in stmt.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = stmt.value.value
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) \
                and isinstance(stmt.value, ast.Constant):
            names[stmt.target.id] = stmt.value.value
        elif isinstance(stmt, ast.ImportFrom) and stmt.module and not stmt.level:
            for alias in stmt.names:
                names[alias.asname or alias.name] = (stmt.module, alias.name)
    return names


def _resolve(value: object) -> str | None:
    """A string constant, or the string an imported (module, name) holds; None otherwise."""
    if isinstance(value, tuple):
        value = getattr(importlib.import_module(value[0]), value[1], None)
    return value if isinstance(value, str) else None


def node_config_reads() -> list[tuple[str, int, str | None]]:
    """Every `<...>node_config[key]` and `<...>node_config.get(key, ...)` in src/: (module,
    line, the key when it is a string literal or a module-level or imported string constant,
    else None)."""
    reads = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        constants = _string_constants(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and _node_config_expr(node.value):
                argument = node.slice
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" \
                    and _node_config_expr(node.func.value) and node.args:
                argument = node.args[0]
            else:
                continue
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                key = argument.value
            elif isinstance(argument, ast.Name):
                key = _resolve(constants.get(argument.id))
            else:
                key = None
            reads.append((str(path.relative_to(PACKAGE)), node.lineno, key))
    return reads


def _registry_reader_lines() -> range:
    """The lines of `clients/state.py`'s `node_value`, the one reader that takes any key (and
    refuses those `NODE_CONFIG_KEYS` lacks)."""
    tree = ast.parse((PACKAGE / "clients" / "state.py").read_text())
    reader = next(f for f in tree.body if isinstance(f, ast.FunctionDef) and f.name == "node_value")
    return range(reader.lineno, reader.end_lineno + 1)


def test_every_node_config_read_in_src_names_a_registered_key():
    reader = _registry_reader_lines()
    reads = node_config_reads()
    assert reads, "no node-config read found in src/: has the scan gone stale?"
    unregistered = [f"{module}:{line} reads {key!r}" for module, line, key in reads
                    if key is not None and key not in NODE_CONFIG_KEYS]
    unknown = [f"{module}:{line}" for module, line, key in reads
               if key is None and not (module == "clients/state.py" and line in reader)]
    assert not unregistered, ("node-config keys missing from clients/state.py NODE_CONFIG_KEYS (and so from "
                              "docs/configuration.md): " + ", ".join(unregistered))
    assert not unknown, ("node-config reads whose key the scan cannot tell (use a string constant, or "
                         "clients/state.py node_value): " + ", ".join(unknown))


def test_the_registered_readers_refuse_an_unregistered_key():
    from collafuse_flwr.clients.state import node_flag, node_setting, node_value

    for reader in (node_value, node_setting, node_flag):
        with pytest.raises(LookupError, match="NODE_CONFIG_KEYS"):
            reader({"no-such-key": "1"}, "no-such-key")


def test_every_collafuse_variable_in_src_has_a_row():
    text = _section(_configuration(), "Environment variables")
    documented = {match.group(1) for header in VARIABLE_HEADERS for row in tables(text, header)
                  for match in [re.fullmatch(r"`([A-Z_]+)`", row[0])] if match}
    used = {name for path in PACKAGE.rglob("*.py") for name in VARIABLE.findall(path.read_text())}
    assert used, "no COLLAFUSE_* variable found in src/: has the scan gone stale?"
    missing = sorted(used - documented)
    assert not missing, f"docs/configuration.md 'Environment variables' has no row for {missing}"


# --- 3. links ------------------------------------------------------------------------------


def slug(heading: str) -> str:
    """GitHub's anchor of a heading's text: markup dropped, lowercase, punctuation removed
    (letters, digits, '_', '-' and spaces stay), spaces as '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of markdown file `path`'s headings (a repeated slug gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    fenced = False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        heading = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading and not fenced:
            base = slug(heading.group(1))
            count = seen.get(base, 0)
            found.add(base if count == 0 else f"{base}-{count}")
            seen[base] = count + 1
    return found


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md")), *sorted((ROOT / "results").rglob("README.md"))]


def broken_links(path: Path) -> list[str]:
    broken = []
    for number, line in enumerate(_without_code(path.read_text()).splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"^(https?:|mailto:)", target, re.I):
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (path.parent / unquote(file_part)).resolve() if file_part else path
            if not resolved.exists():
                broken.append(f"line {number}: {target} (no such file or directory)")
            elif anchor and resolved.suffix == ".md" and resolved.is_file() \
                    and unquote(anchor).lower() not in anchors(resolved):
                broken.append(f"line {number}: {target} (no heading #{anchor} in {resolved.relative_to(ROOT)})")
    return broken


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    broken = broken_links(path)
    assert not broken, f"{path.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_the_slugs_follow_github():
    assert slug("A formal guarantee") == "a-formal-guarantee"
    assert slug("Run config: `num-clients`, (defaults)") == "run-config-num-clients-defaults"
    assert slug("Datasets and partitions") == "datasets-and-partitions"


# --- 4. console scripts --------------------------------------------------------------------


def test_every_console_script_has_its_help_mentioned():
    texts = [(ROOT / "README.md").read_text(), *(p.read_text() for p in DOCS.glob("*.md"))]
    missing = [name for name in PYPROJECT["project"]["scripts"] if not any(f"{name} --help" in t for t in texts)]
    assert not missing, f"no '<script> --help' in README.md or docs/*.md for {missing}"


# --- 5. tests and modules ------------------------------------------------------------------


def _names(text: str, name: str, prefix: str = "") -> bool:
    """Whether `text` names the file `name` as a whole (e.g. `config.py`, not `myconfig.py`),
    alone or after `prefix` (e.g. `collafuse_flwr/` before `config.py`)."""
    before = rf"(?:(?<![\w/.-])|(?<={re.escape(prefix)}))" if prefix else r"(?<![\w/.-])"
    return re.search(before + re.escape(name) + r"(?![\w.-]*\w)", text) is not None


def test_every_test_file_is_in_tests_md():
    path = DOCS / "tests.md"
    assert path.is_file(), "docs/tests.md is missing"
    text = path.read_text()
    missing = [p.name for p in sorted((ROOT / "tests").glob("test_*.py")) if not _names(text, p.name, "tests/")]
    assert not missing, f"docs/tests.md does not name {missing}"


def test_every_module_is_in_code_layout_md():
    path = DOCS / "code-layout.md"
    assert path.is_file(), "docs/code-layout.md is missing"
    text = path.read_text()
    modules = [p.relative_to(PACKAGE).as_posix() for p in sorted(PACKAGE.rglob("*.py")) if p.name != "__init__.py"]
    missing = [m for m in modules if not _names(text, m, "collafuse_flwr/")]
    assert not missing, f"docs/code-layout.md does not name {missing} (paths relative to src/collafuse_flwr)"
