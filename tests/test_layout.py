"""The package's shape: each concept in one home, imports that run one way.

Reads the source (AST, function-local imports included) rather than importing it, so a cycle hidden behind a
function-local import is found too."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "lmfusion_jax")
MAX_LINES = 450
MAX_TOP_LEVEL_MODULES = 8


def _modules() -> dict:
  """dotted module name -> file path, for every module of the package."""
  out = {}
  for folder, _, files in os.walk(PKG):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(folder, f), ROOT)[:-3].replace(os.sep, ".")
        out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(folder, f)
  return out


MODULES = _modules()


def _imports(path: str, name: str) -> set:
  """The package modules `path` imports, anywhere in the file."""
  tree = ast.parse(open(path).read(), path)
  is_pkg = path.endswith("__init__.py")
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = name.split(".")
        parent = parts if is_pkg else parts[:-1]
        parent = parent[:len(parent) - node.level + 1]
        base = ".".join(parent + ([base] if base else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    else:
      continue
    for t in targets:
      if t.startswith("lmfusion_jax"):
        found.add(t)
  return found


GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def test_every_imported_module_exists():
  missing = sorted((m, t) for m, ts in GRAPH.items() for t in ts if t not in MODULES)
  assert not missing, missing


def test_no_import_cycle():
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):   # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in GRAPH.get(v, ()):
      if w not in MODULES or w == "lmfusion_jax":
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1 or v in GRAPH.get(v, ()):
        cycles.append(sorted(comp))

  for v in MODULES:
    if v not in index:
      visit(v)
  assert not cycles, f"import cycles: {cycles}"


def test_only_cli_imports_commands():
  offenders = sorted(m for m, ts in GRAPH.items()
                     if not m.startswith("lmfusion_jax.commands") and m != "lmfusion_jax.cli"
                     and any(t.startswith("lmfusion_jax.commands") for t in ts))
  assert not offenders, offenders


def test_few_top_level_modules():
  top = sorted(f for f in os.listdir(PKG) if f.endswith(".py") and f not in ("__init__.py", "cli.py"))
  assert len(top) <= MAX_TOP_LEVEL_MODULES, top


@pytest.mark.parametrize("folder", ["lmfusion_jax", "tests", "benchmarks", "configs"])
def test_no_long_files(folder):
  long = []
  for d, _, files in os.walk(os.path.join(ROOT, folder)):
    for f in files:
      if f.endswith(".py"):
        n = sum(1 for _ in open(os.path.join(d, f)))
        if n > MAX_LINES:
          long.append((os.path.relpath(os.path.join(d, f), ROOT), n))
  assert not long, long
