"""The package's structure (docs/architecture.md), checked statically from the source:

* no import cycles between megaspark modules, and no import that points up the layering
  core → data → blocks/losses/config → models → targets → inference → export →
  arguments → training (imports inside functions count: a lazy import is still a dependency);
* the argparse namespace stays in ``megaspark/arguments`` and ``megaspark/training``: no other
  module imports argparse or takes a parameter named ``args``/``namespace``.

Each check is also run on a small synthetic package with the fault in it, so a checker that
stopped seeing faults would fail here too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "megaspark"

# (layer, module prefixes): a module may import only from its own layer or lower ones.
LAYERS = [
    ("core", ["megaspark", "megaspark.platform", "megaspark.parallel", "megaspark.fileio",
              "megaspark.errors", "megaspark.layer_ids", "megaspark.algorithms",
              "megaspark.checkpoint_files"]),
    ("data", ["megaspark.data"]),
    ("blocks/losses/config", ["megaspark.blocks", "megaspark.vocab_parallel_loss", "megaspark.losses",
                              "megaspark.config"]),
    ("models", ["megaspark.models", "megaspark.fp8", "megaspark.memory_plan"]),
    ("targets", ["megaspark.targets"]),
    ("inference", ["megaspark.inference"]),
    ("export", ["megaspark.export"]),
    ("arguments", ["megaspark.arguments"]),
    ("training", ["megaspark.training"]),
]
NAMESPACE_HOMES = ("megaspark.arguments", "megaspark.training")
# torch's override protocols name their positional tuple ``args``; it is not a namespace
PROTOCOL_METHODS = {"__torch_function__", "__torch_dispatch__"}
NAMESPACE_PARAMS = {"args", "namespace"}


def package_modules(root: Path) -> dict:
    """{dotted module name: path} of every .py file under ``root`` (a package directory)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name.removesuffix(".__init__")] = path
    return out


def imports_of(name: str, path: Path, modules: dict) -> dict:
    """{imported package module: first line number} for every import statement in the file,
    module level or not (relative imports resolved)."""
    pkg = name.split(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    is_init = path.name == "__init__.py"
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".") if is_init else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for t in targets:
            if t.split(".")[0] != pkg:
                continue
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):
                found.setdefault(t, node.lineno)
    return found


def layer_of(name: str, layers=LAYERS) -> int:
    """The layer of a module: its longest listed prefix (the package itself only by name)."""
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(layers):
        for p in prefixes:
            covers = name == p or ("." in p and name.startswith(p + "."))
            if covers and len(p) > best_len:
                best, best_len = i, len(p)
    if best is None:
        raise AssertionError(f"{name} is in no layer of the architecture table: add it")
    return best


def layering_problems(root: Path, layers=LAYERS) -> list:
    modules = package_modules(root)
    edges = {m: imports_of(m, p, modules) for m, p in modules.items()}
    problems = []
    for m, targets in edges.items():
        for t, line in targets.items():
            if t == root.name:  # the package's own __init__ (a docstring)
                continue
            lm, lt = layer_of(m, layers), layer_of(t, layers)
            if lt > lm:
                problems.append(f"{modules[m].relative_to(root.parent)}:{line}: {m} ({layers[lm][0]}) "
                                f"imports {t} ({layers[lt][0]}), a higher layer")
    # cycles (Tarjan's strongly connected components)
    index, low, stack, on, counter, sccs = {}, {}, [], set(), [0], []

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    problems += [f"import cycle: {' <-> '.join(c)}" for c in sccs]
    return problems


def namespace_problems(root: Path, homes=NAMESPACE_HOMES) -> list:
    problems = []
    for name, path in package_modules(root).items():
        if any(name == h or name.startswith(h + ".") for h in homes):
            continue
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(root.parent)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(a.name == "argparse" for a in node.names):
                problems.append(f"{where}:{node.lineno}: imports argparse")
            elif isinstance(node, ast.ImportFrom) and node.module == "argparse":
                problems.append(f"{where}:{node.lineno}: imports from argparse")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name not in PROTOCOL_METHODS:
                a = node.args
                for arg in a.posonlyargs + a.args + a.kwonlyargs:
                    annotation = ast.unparse(arg.annotation) if arg.annotation is not None else ""
                    if arg.arg in NAMESPACE_PARAMS or "Namespace" in annotation:
                        problems.append(f"{where}:{node.lineno}: {node.name}() takes '{arg.arg}' "
                                        "(the argparse namespace?): pass a typed config")
    return problems


def test_no_import_cycles_and_no_upward_imports():
    problems = layering_problems(ROOT)
    assert not problems, "\n".join(problems)


def test_the_argparse_namespace_stays_in_arguments_and_training():
    problems = namespace_problems(ROOT)
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer():
    for name in package_modules(ROOT):
        layer_of(name)
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("megaspark.new_module")


# ------------------------------------------------------------------ tests of the checkers
def _write(root: Path, files: dict) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


TOY_LAYERS = [("low", ["toy", "toy.low"]), ("high", ["toy.high"])]


@pytest.mark.parametrize("files, needle", [
    ({"low.py": "def f():\n    from toy import high\n", "high.py": ""}, "a higher layer"),
    ({"low.py": "from .high import x\n", "high.py": "x = 1\n"}, "a higher layer"),
    ({"low.py": "import toy.low2\n", "low2.py": "from toy import low\n"}, "import cycle"),
])
def test_the_layering_check_sees_faults(tmp_path, files, needle):
    root = _write(tmp_path / "toy", {"__init__.py": "", **files})
    layers = [("low", ["toy", "toy.low", "toy.low2"]), ("high", ["toy.high"])]
    problems = layering_problems(root, layers)
    assert any(needle in p for p in problems), problems
    clean = _write(tmp_path / "clean" / "toy", {"__init__.py": "", "low.py": "x = 1\n",
                                                "high.py": "from toy.low import x\n"})
    assert layering_problems(clean, TOY_LAYERS) == []


@pytest.mark.parametrize("source", [
    "import argparse\n",
    "from argparse import Namespace\n",
    "def build(args, device):\n    return args.x\n",
    "class A:\n    def __init__(self, args):\n        pass\n",
    "def build(cfg: 'argparse.Namespace'):\n    pass\n",
])
def test_the_namespace_check_sees_faults(tmp_path, source):
    root = _write(tmp_path / "toy", {"__init__.py": "", "lib.py": source,
                                     "arguments/__init__.py": source})
    problems = namespace_problems(root, homes=("toy.arguments",))
    assert len(problems) == 1 and "lib.py" in problems[0], problems
    ok = _write(tmp_path / "ok" / "toy", {"__init__.py": "", "lib.py": (
        "def f(*args, **kwargs):\n    pass\n"
        "class T:\n    def __torch_function__(self, func, types, args=(), kwargs=None):\n        pass\n")})
    assert namespace_problems(ok, homes=()) == []
