"""Imports between the packages of pointrend_jax point downward only, and never in a cycle.

Levels, bottom first: errors; ops (with the top-level module postprocess, numpy host code);
modeling; checkpoint, data, evaluation (with the top-level modules inference, image_predictor,
stablehlo and visualization); training; tools and parity. A package may import its own
level or any lower one; imports inside functions count too.
"""

from __future__ import annotations

import ast
import collections
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "pointrend_jax"

LEVELS = {
    "errors": 0,
    "ops": 1, "postprocess": 1,
    "modeling": 2,
    "checkpoint": 3, "data": 3, "evaluation": 3, "inference": 3, "visualization": 3,
    "image_predictor": 3, "stablehlo": 3,
    "training": 4,
    "tools": 5, "parity": 5,
}

# Upward edges (importer, imported) that still exist; lead/predict helper is removing these.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _unit(path: pathlib.Path) -> str:
  """The package (or top-level module) a file of pointrend_jax belongs to."""
  first = path.relative_to(PACKAGE).parts[0]
  return first[:-len(".py")] if first.endswith(".py") else first


def _imported_units(tree: ast.AST) -> set[str]:
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      modules = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      # ``from pointrend_jax import __version__`` imports the package's __init__ (level-free).
      modules = ([f"pointrend_jax.{a.name}" for a in node.names if not a.name.startswith("__")]
                 if node.module == "pointrend_jax" else [node.module])
    else:
      assert not (isinstance(node, ast.ImportFrom) and node.level), "use absolute imports"
      continue
    out.update(m.split(".")[1] for m in modules
               if m.startswith("pointrend_jax.") and m.split(".")[1] != "__init__")
  return out


def _edges() -> dict[tuple[str, str], list[str]]:
  edges = collections.defaultdict(list)
  for path in sorted(PACKAGE.rglob("*.py")):
    if path.parent == PACKAGE and path.name == "__init__.py":
      continue  # the package's lazy name table (strings), not imports
    src = _unit(path)
    for dst in _imported_units(ast.parse(path.read_text(encoding="utf-8"))):
      if dst != src:
        edges[(src, dst)].append(str(path.relative_to(PACKAGE.parent)))
  return edges


def test_every_package_has_a_level():
  units = {_unit(p) for p in PACKAGE.rglob("*.py")} - {"__init__"}
  assert units - set(LEVELS) == set(), "give new packages a level in LEVELS"


def test_imports_point_downward():
  upward = {edge: files for edge, files in _edges().items()
            if LEVELS[edge[1]] > LEVELS[edge[0]]}
  assert set(upward) - KNOWN_UPWARD == set(), upward
  assert KNOWN_UPWARD - set(upward) == set(), "remove fixed edges from KNOWN_UPWARD"


def test_no_cycles_between_packages():
  graph = collections.defaultdict(set)
  for src, dst in _edges():
    graph[src].add(dst)

  def reaches(start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
      node = todo.pop()
      if node == goal:
        return True
      if node not in seen:
        seen.add(node)
        todo.extend(graph[node])
    return False

  cycles = sorted((a, b) for a in list(graph) for b in graph[a] if reaches(b, a))
  assert cycles == [], f"package edges on a cycle: {cycles}"
