"""The package's shape, checked on every run: no import cycle, imports at the top (a deferred
import says why), short functions (a longer one says why), no repeated blocks, and registries
that name only what exists. Pure source analysis: runs in well under a second."""

from __future__ import annotations

import ast
import functools
import re
from collections import defaultdict
from pathlib import Path

import pandas as pd
import pytest

from dtl import config
from dtl.data import datasets, kinds
from dtl.train import strategies

PKG = Path(__file__).resolve().parent.parent / "dtl"
MAX_LINES = 60  # no function is longer
WINDOW = 6  # no block of this many (non-trivial) lines may appear twice in dtl/


@functools.cache
def _tree(path: Path) -> ast.Module:
    """``path`` parsed once per session (the checks only read the trees)."""
    return ast.parse(path.read_text(), str(path))


@functools.cache
def _walk(node: ast.AST) -> tuple[ast.AST, ...]:
    """``ast.walk(node)``, listed once per session: the tag check walks every scope of every module."""
    return tuple(ast.walk(node))


@functools.cache
def _providers() -> dict[str, list[str]]:
    """Top-level module -> the installed distributions providing it (reads every installed RECORD)."""
    import importlib.metadata as md

    return md.packages_distributions()


def _modules() -> dict[str, ast.Module]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        name = ".".join(p.relative_to(PKG.parent).with_suffix("").parts).removesuffix(".__init__")
        out[name] = _tree(p)
    return out


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The dtl modules ``name`` imports, at any depth (function-level imports included)."""
    deps = set()
    for n in _walk(tree):
        if isinstance(n, ast.Import):
            deps |= {a.name for a in n.names if a.name in known}
        elif isinstance(n, ast.ImportFrom) and n.module and n.module.startswith("dtl"):
            deps |= {f"{n.module}.{a.name}" for a in n.names if f"{n.module}.{a.name}" in known}
            if n.module in known and n.module != "dtl":  # `from dtl import x` names a module x, not dtl/__init__
                deps.add(n.module)
    return deps - {name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v: str) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_import_graph_has_no_cycle():
    mods = _modules()
    graph = {m: _imports(m, t, set(mods)) for m, t in mods.items()}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"


def test_the_cycle_finder_finds_a_cycle():  # the check above must be able to fail
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_imports_are_at_the_top_or_say_why_not():
    """cli.py defers its command modules by design (its docstring says why); elsewhere a
    function-level import carries a ``# deferred: <reason>`` comment."""
    bad = []
    for p in sorted(PKG.rglob("*.py")):
        if p.name == "cli.py":
            continue
        lines = p.read_text().split("\n")
        for fn in _walk(_tree(p)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for n in _walk(fn):
                    if isinstance(n, (ast.Import, ast.ImportFrom)) and "# deferred:" not in lines[n.lineno - 1]:
                        bad.append(f"{p.relative_to(PKG.parent)}:{n.lineno}")
    assert not bad, f"function-level imports without a '# deferred:' reason: {bad}"


def test_no_function_is_over_sixty_lines():
    long = []
    for p in sorted(PKG.rglob("*.py")):
        for fn in _walk(_tree(p)):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and fn.end_lineno - fn.lineno + 1 > MAX_LINES:
                long.append(f"{p.relative_to(PKG.parent)}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)")
    assert not long, f"functions over {MAX_LINES} lines: {long}"


# What dtl.model (the code inside every logged model) may import besides itself: the standard
# library and the distributions the model pins. The fuzzy head's model also pins scikit-fuzzy.
MODEL_MAY_IMPORT = {"torch", "timm", "numpy", "PIL", "safetensors", "mlflow", "pandas", "yaml"}
MODEL_EXTRA = {"dtl.model.fuzzy": {"skfuzzy"}, "dtl.fuzzy_serving": {"skfuzzy"}}
# Everything that travels in code/dtl besides dtl/model/ (dtl.tracking.logged.SHIPPED): held to the same rule.
SHIPPED_MODULES = {"dtl", "dtl.model", "dtl.serving", "dtl.fuzzy_serving", "dtl.models"}


def _model_violations(mods: dict[str, ast.Module]) -> list[str]:
    import sys

    bad = []
    for name, tree in mods.items():
        if not (name in SHIPPED_MODULES or name.startswith("dtl.model.")):
            continue
        allowed = MODEL_MAY_IMPORT | MODEL_EXTRA.get(name, set())
        for n in _walk(tree):
            targets = [a.name for a in n.names] if isinstance(n, ast.Import) else []
            if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
                targets = [n.module] if n.module != "dtl" else [f"dtl.{a.name}" for a in n.names]
            for t in targets:
                top = t.split(".")[0]
                ok = (t == "dtl.model" or t.startswith("dtl.model.")) if top == "dtl" else (
                    top in sys.stdlib_module_names or top in allowed)
                if not ok:
                    bad.append(f"{name}:{n.lineno} imports {t}")
    return bad


def test_the_served_package_imports_only_itself_and_what_models_pin():
    """dtl.model travels inside every logged model (code/dtl/model), with dtl/__init__ and the shims:
    none may reach training code (config, strategies, data scanners, progress bars) or libraries
    the model does not pin."""
    from dtl.tracking.logged import SHIPPED

    assert {f"dtl.{Path(f).stem}" for f in SHIPPED if f.endswith(".py") and f != "__init__.py"} | {"dtl", "dtl.model"} \
        == SHIPPED_MODULES
    assert not _model_violations(_modules())


def test_the_served_package_check_can_fail():
    trees = {"dtl.model.x": ast.parse("from dtl.config import AugmentConfig\nimport tqdm\nfrom dtl import progress"),
             "dtl.model.fuzzy": ast.parse("import skfuzzy"), "dtl.model.y": ast.parse("import skfuzzy")}
    assert _model_violations(trees) == ["dtl.model.x:1 imports dtl.config", "dtl.model.x:2 imports tqdm",
                                        "dtl.model.x:3 imports dtl.progress", "dtl.model.y:1 imports skfuzzy"]


def _top_imports(n: ast.AST) -> set[str]:
    if isinstance(n, ast.Import):
        return {a.name.split(".")[0] for a in n.names}
    if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module:
        return {n.module.split(".")[0]}
    return set()


def test_the_model_pins_match_what_the_served_package_imports():
    """SERVING_DISTRIBUTIONS (the logged model's requirements.txt) pins every distribution that
    dtl.model imports, and nothing it does not need (each extra pin says why)."""
    from dtl.model.pyfunc import SERVING_DISTRIBUTIONS

    provider = _providers()
    tops = {t for name, tree in _modules().items() if name.startswith("dtl.model") and name not in MODEL_EXTRA
            for n in _walk(tree) for t in _top_imports(n)} & MODEL_MAY_IMPORT
    imported = {d.lower() for m in tops for d in provider[m]} - {"mlflow-skinny", "mlflow-tracing"}
    reasons = {"torchvision": "timm imports it when it builds the network",
               "pyyaml": "mlflow reads MLmodel with it; pinned so that a model reads its files as it wrote them"}
    pinned = {d.lower() for d in SERVING_DISTRIBUTIONS}
    assert imported <= pinned, f"imported by dtl.model but not pinned: {imported - pinned}"
    assert pinned - imported <= set(reasons), f"pinned without a reason: {pinned - imported - set(reasons)}"


def _blocks(text: str) -> list[tuple[int, str]]:
    """Windows of WINDOW consecutive meaningful lines (stripped; blank lines, comments, lone
    brackets and import lines skipped), each with the line number where it starts."""
    keep = [(i + 1, re.sub(r"\s+", " ", line.strip())) for i, line in enumerate(text.split("\n"))]
    keep = [(i, s) for i, s in keep if len(s) > 3 and not s.startswith(("#", "import ", "from "))]
    return [(keep[k][0], "\n".join(s for _, s in keep[k:k + WINDOW])) for k in range(len(keep) - WINDOW + 1)]


def test_no_block_of_six_lines_is_repeated():
    seen: dict[str, list[str]] = defaultdict(list)
    for p in sorted(PKG.rglob("*.py")):
        for line, block in _blocks(p.read_text()):
            seen[block].append(f"{p.relative_to(PKG.parent)}:{line}")
    repeats = {b.split("\n")[0]: where for b, where in seen.items() if len(where) > 1}
    assert not repeats, f"blocks of {WINDOW} lines written twice: {repeats}"


def test_the_block_finder_finds_a_repeat():
    text = "\n".join(f"value_{i} = compute({i})" for i in range(WINDOW))
    blocks = [b for _, b in _blocks(text + "\n\n" + text)]
    assert len(blocks) > len(set(blocks))


@pytest.mark.parametrize("kind", kinds.names())
def test_every_registered_data_kind_has_a_loader_and_a_default_protocol(kind):
    k = kinds.get(kind)
    assert callable(getattr(datasets, k.loader)), f"{kind}: dtl.data.datasets.{k.loader} does not exist"
    assert k.protocols and config.split_protocol(config.DataConfig(kind=kind)) == k.protocols[0]


def test_the_kind_registry_feeds_config_and_cli():
    from dtl.cli import build_parser

    assert config.DATA_KINDS == kinds.names()
    assert kinds.default_kind("phase1") == "cnmc" and kinds.default_kind("phase2") == "aria"
    data = next(a for a in build_parser()._subparsers._group_actions[0].choices["data"]._actions
                if "--kind" in a.option_strings)
    assert tuple(data.choices) == kinds.names()  # presplit included


def test_the_strategy_registry_feeds_config():
    assert config.STRATEGIES == tuple(strategies.STRATEGIES) == ("double", "single", "scratch")
    assert strategies.needs_phase1(["scratch", "double"]) and not strategies.needs_phase1(["single", "scratch"])
    assert strategies.STRATEGIES["single"].init("imagenet") == "imagenet"
    assert strategies.STRATEGIES["scratch"].init("imagenet") == "scratch"


def test_report_sections_render_their_markdown_as_html():
    """report.html showed raw Markdown (in <pre>, then bold, links and lists as literal text, and a
    `|` inside a cell as `/`): every page goes through one Markdown library."""
    from dtl.report.tables import markdown_table, markdown_to_html

    cells = markdown_table(pd.DataFrame({"set": ["a|b"], "acc": [0.9]}))
    page = markdown_to_html("## Robustness\n\nsplit `test` (n=3), **bold**, *it*, [docs](docs/x.md)\n\n" + cells
                            + "\n- one\n- two\n\n![grid](cam_grid.png)\n\n```\ndtl explain --split test\n```",
                            {"cam_grid.png": b"PNG"})
    assert "<h2>Robustness</h2>" in page and "<code>test</code>" in page
    assert "<strong>bold</strong>" in page and "<em>it</em>" in page and '<a href="docs/x.md">docs</a>' in page
    assert "<td>a|b</td>" in page and "<td>0.9000</td>" in page and "---" not in page
    assert "<li>one</li>\n<li>two</li>" in page and 'src="data:image/png;base64,UE5H"' in page
    assert "dtl explain --split test" in page and "<pre><code>" in page


ROOT = PKG.parent


def _third_party_imports(dirs: tuple[str, ...]) -> dict[str, set[str]]:
    """Top-level module -> the files importing it, for every non-stdlib, non-project import."""
    import sys

    # The repository's own packages (every top-level folder with an __init__.py: dtl/, bench/) and the
    # tests' conftest are first-party: the CI failure of 2026-12-03 was tests/ importing bench, listed
    # here as a missing dependency.
    local = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()} | {"tests", "conftest"}
    out: dict[str, set[str]] = defaultdict(set)
    for d in dirs:
        for p in sorted((ROOT / d).rglob("*.py")):
            for n in _walk(_tree(p)):
                names = [a.name for a in n.names] if isinstance(n, ast.Import) else []
                if isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                    names = [n.module]
                for m in (x.split(".")[0] for x in names):
                    if m not in sys.stdlib_module_names and m not in local:
                        out[m].add(str(p.relative_to(ROOT)))
    return out


def _closure(reqs: list[str]) -> set[str]:
    """Distribution names pip installs for ``reqs``, read from the installed metadata."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[str] = set()
    todo = [(Requirement(r), set()) for r in reqs]
    while todo:
        req, _ = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            sub = md.requires(req.name) or []
        except md.PackageNotFoundError:
            continue
        for s in map(Requirement, sub):
            wanted = req.extras | {""}
            if s.marker is None or any(s.marker.evaluate({"extra": e}) for e in wanted):
                todo.append((s, set()))
    return seen


def test_every_import_is_a_declared_dependency():
    """The CI failure of 2026-12-01: dtl.tables imported markdown_it, which this machine had
    (through rich) but pyproject.toml never asked for, so a clean install could not import the
    report. Every third-party import in dtl/ must come from the install closure of
    ``pip install -e .``; every one in tests/ from that of ``.[test]``."""

    import tomllib
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    provider = _providers()
    for dirs, reqs in ((("dtl",), project["dependencies"]),
                       (("tests",), project["dependencies"] + project["optional-dependencies"]["test"])):
        closure = _closure(reqs)
        missing = {m: sorted(files) for m, files in _third_party_imports(dirs).items()
                   if not {canonicalize_name(d) for d in provider.get(m, [m])} & closure}
        assert not missing, f"imported but not installed by {reqs}: {missing}"



TAG_CALLS = {"set_tags", "set_tag", "start_run", "register", "create_run", "command_run", "create_logged_model",
             "create_model_version", "set_model_version_tag", "set_registered_model_tag", "set_logged_model_tags"}


def _tag_names(tree: ast.Module) -> set[str]:
    """Variables bound to a tag dict: ``tags``, and any name assigned ``<expr>.tags`` (``t = r.data.tags``,
    ``t, m = r.data.tags, r.data.metrics``)."""
    names = {"tags"}
    for n in (tree.body if isinstance(tree, ast.Module) else ast.walk(tree)):
        if isinstance(n, ast.Assign):
            for target in n.targets:
                pairs = (zip(target.elts, n.value.elts) if isinstance(target, ast.Tuple) and isinstance(n.value, ast.Tuple)
                         else [(target, n.value)])
                names |= {t.id for t, v in pairs if isinstance(t, ast.Name) and isinstance(v, ast.Attribute) and v.attr == "tags"}
    return names


def _is_tags(e: ast.AST, names: set[str] = frozenset({"tags"})) -> bool:
    """``something.tags`` or a variable bound to a tag dict: a run's, version's or model's tags."""
    return (isinstance(e, ast.Attribute) and e.attr == "tags") or (isinstance(e, ast.Name) and e.id in names)


def _tag_keys_used(n: ast.AST, names: set[str] = frozenset({"tags"})) -> list[ast.AST]:
    """The expressions that ``n`` uses as tag keys: ``tags[K]``, ``tags.get(K)``, the keys of a dict
    given to a tag-writing call (positionally or as ``tags=``), the key of ``set_tag(K, v)`` and
    ``set_model_version_tag(name, version, K, v)``."""
    if isinstance(n, ast.Subscript) and _is_tags(n.value, names):
        return [n.slice]
    if isinstance(n, ast.Assign) and isinstance(n.value, ast.Dict) and any(_is_tags(t, names) for t in n.targets):
        return [k for k in n.value.keys if k is not None]  # tags = {...}
    if not isinstance(n, ast.Call):
        return []
    fn = n.func
    name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
    if isinstance(fn, ast.Attribute) and _is_tags(fn.value, names) and name in ("get", "pop", "setdefault") and n.args:
        return [n.args[0]]
    keys = []
    if name in ("set_tag", "set_registered_model_tag") and n.args:
        keys.append(n.args[0] if name == "set_tag" else n.args[1] if len(n.args) > 1 else n.args[0])
    if name == "set_model_version_tag" and len(n.args) > 2:
        keys.append(n.args[2])
    dicts = [k.value for k in n.keywords if k.arg == "tags"] + (list(n.args) if name in TAG_CALLS else [])
    for d in dicts:
        if isinstance(d, ast.Dict):
            keys += [k for k in d.keys if k is not None]
    return keys


def _scopes(tree: ast.Module):
    """The module's top level and each function, with the names bound to a tag dict in it."""
    yield tree, _tag_names(tree)
    for fn in _walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield fn, _tag_names(fn)


def _dict_keys(tree: ast.AST) -> set[int]:
    """ids of the string constants that are keys of a dict literal or the argument of ``startswith``."""
    out = set()
    for n in _walk(tree):
        if isinstance(n, ast.Dict):
            out |= {id(k) for k in n.keys if isinstance(k, ast.Constant)}
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "startswith":
            out |= {id(a) for a in n.args if isinstance(a, ast.Constant)}
    return out


def _tag_literals(trees: dict[str, ast.Module], keys: frozenset[str]) -> list[str]:
    """String literals outside the schema module that are a prefixed run-schema tag key (or, as a
    dict key, start with a prefix key such as ``metric.``), an MLflow filter on tags or attributes
    (docstrings excepted), or any literal used as a tag key."""
    bad, prefixes = [], tuple(k for k in keys if k.endswith("."))
    for name, tree in trees.items():
        if name == "dtl.tracking.schema":
            continue
        docs = {id(n.value) for n in _walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        as_keys = _dict_keys(tree)
        for n in _walk(tree):
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs and (
                    n.value in keys or (id(n) in as_keys and n.value.startswith(prefixes))
                    or re.search(r"(tags|attributes)\.[`\w]+\s*(=|!=|LIKE)", n.value)):
                bad.append(f"{name}:{n.lineno} {n.value[:60]!r}")
        for scope, names in _scopes(tree):
            for n in _walk(scope):
                for k in _tag_keys_used(n, names):
                    lit = k if isinstance(k, ast.Constant) else next(
                        (c for c in ast.walk(k) if isinstance(k, ast.JoinedStr) and isinstance(c, ast.Constant)), None)
                    if isinstance(lit, ast.Constant) and isinstance(lit.value, str) and lit.value not in keys:
                        bad.append(f"{name}:{lit.lineno} {lit.value[:60]!r} used as a tag key")
    return sorted(set(bad), key=lambda b: (b.split(":")[0], int(b.split(":")[1].split()[0])))


def test_no_tag_string_outside_the_schema_module():
    """Roles, tag keys and filter strings come from dtl.tracking.schema: a typo there is a NameError
    or a ValueError from schema.where, not a search that silently finds nothing. A literal used as a
    tag key (``tags.get("phase")``, ``set_tags({"init": ...})``) is an error too, so a new tag is
    written into the schema before it is written into a store."""
    from dtl.tracking import schema

    prefixed = frozenset(k for k in schema.KEYS if "." in k)
    assert not _tag_literals(_modules(), prefixed)


def test_the_tag_literal_check_can_fail():
    trees = {"dtl.x": ast.parse('"""tags.`dtl.role` = \'x\' in a docstring is fine"""\n'
                                't = {"dtl.role": "study"}\nflt = f"tags.phase = \'{p}\'"\nr.data.tags.get("mlflow.parentRunId")\n'
                                'run.set_tags({"init": i, schema.PHASE: p})\nv = r.data.tags["phase"]\n'
                                'c.set_model_version_tag(n, v, "calibration.t", x)\nstart_run(t, "n", {f"best.{k}": 1})\n'
                                'params = {"phase": p}\nrun.set_tags(tags)\nt, m = r.data.tags, r.data.metrics\n'
                                'b = t.get("backbone")\nx = m.get("val_accuracy")\ntags = {"metric.val_f1": 1}\n')}
    assert sorted({b.split()[0] for b in _tag_literals(trees, frozenset({"dtl.role", "mlflow.parentRunId", "metric."}))},
                  key=lambda b: int(b.split(":")[1])) == \
        ["dtl.x:2", "dtl.x:3", "dtl.x:4", "dtl.x:5", "dtl.x:6", "dtl.x:7", "dtl.x:8", "dtl.x:12", "dtl.x:14"]


def test_the_schema_refuses_a_key_it_does_not_know():
    from dtl.tracking import schema

    assert schema.where({schema.ROLE: schema.Role.STUDY, schema.PHASE: "phase1"}, status="FINISHED") == \
        "tags.`dtl.role` = 'study' and tags.`phase` = 'phase1' and attributes.status = 'FINISHED'"
    with pytest.raises(ValueError, match="dtl.rol"):
        schema.where({"dtl.rol": "study"})


def _broken_links(md: Path) -> list[str]:
    """Relative Markdown links of ``md`` whose target does not exist (anchors ignored)."""
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", md.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (md.parent / target.split("#")[0]).exists():
            bad.append(f"{md.name}: {target}")
    return bad


def test_the_readme_is_a_short_guide_and_every_link_works():
    """Issue 21: the README is read in ten minutes; the reference lives in docs/, one page per topic."""
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) < 200
    pages = [readme, *sorted((ROOT / "docs").glob("*.md"))]
    assert not [b for p in pages for b in _broken_links(p)]
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", readme.read_text()))
    assert linked == {p.name for p in (ROOT / "docs").glob("*.md")}, "every docs page is linked from the README"


def test_the_link_check_can_fail(tmp_path):
    (tmp_path / "a.md").write_text("[ok](a.md) [web](https://x.org) [gone](docs/nope.md#x) [anchor](#top)")
    assert _broken_links(tmp_path / "a.md") == ["a.md: docs/nope.md#x"]


def test_the_cli_only_parses_and_calls():
    """cli.py parses arguments and calls one job function per command: every ``cmd_*`` is short,
    and no tracking, training, data-science or plotting library is used in it directly."""
    tree = ast.parse((PKG / "cli.py").read_text())
    long = {f.name: f.end_lineno - f.lineno + 1 for f in tree.body
            if isinstance(f, ast.FunctionDef) and f.name.startswith("cmd_") and f.end_lineno - f.lineno + 1 > 12}
    assert not long, f"commands that do more than parse and call: {long}"
    heavy = {"mlflow", "torch", "timm", "pandas", "numpy", "matplotlib", "optuna", "sklearn"}
    used = {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
            for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert not used & heavy, f"cli.py imports {sorted(used & heavy)}: that belongs in the job modules"


def test_imports_shown_to_users_resolve():
    """Every ``from dtl... import ...`` that a user copies (the README, docs/, the reports'
    reproduce scripts) names a module and attributes that exist."""
    import importlib

    bad = []
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "reports").rglob("*.sh"))]
    for f in files:
        for m in re.finditer(r"^\s*from (dtl[\w.]*) import ([\w, ]+)$", f.read_text(), re.M):
            try:
                mod = importlib.import_module(m.group(1))
            except ImportError as e:
                bad.append(f"{f.relative_to(ROOT)}: {m.group(0).strip()} ({e})")
                continue
            bad += [f"{f.relative_to(ROOT)}: {m.group(1)} has no {a}" for a in (x.strip() for x in m.group(2).split(","))
                    if a and not hasattr(mod, a) and importlib.util.find_spec(f"{m.group(1)}.{a}") is None]
    assert not bad, bad
