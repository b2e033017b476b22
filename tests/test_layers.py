"""The house's layers, enforced: one-way arrows, no cycles, configs are data.

library (``fsjax``) <- certificate maths (``certify/_*.py``, ``certify/__init__.py``)
<- programs (``certify/<program>.py``) and trainers (``train/``); ``configs`` are data.
Every import statement of every module counts, including imports inside functions.
"""

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("fsjax", "certify", "train", "configs")


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


MODULES = {}


def _imports(path: pathlib.Path, name: str) -> set[str]:
  """Absolute names of everything ``path`` imports (relative imports resolved)."""
  out = set()
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      # "from pkg import submodule" imports the submodule (and runs the package's
      # __init__ first, which is no arrow of this module); "from pkg import name" the package.
      for a in node.names:
        sub = f"{base}.{a.name}"
        out.add(sub if sub in MODULES else base)
  return out


MODULES.update(_modules())
GRAPH = {name: {m for m in _imports(path, name) if m in MODULES and m != name}
         for name, path in MODULES.items()}


def _layer(name: str) -> str:
  top = name.split(".")[0]
  if top == "certify":
    last = name.split(".")[-1]
    return "maths" if name == "certify" or last.startswith("_") else "program"
  return {"fsjax": "library", "train": "trainer", "configs": "config"}[top]


# Which layers each layer may import.
ALLOWED = {
    "library": {"library"},
    "maths": {"library", "maths"},
    "program": {"library", "maths", "program"},
    "trainer": {"library", "maths", "trainer"},
    "config": {"config"},
}


def test_the_layers_are_found():
  layers = {_layer(m) for m in MODULES}
  assert layers == set(ALLOWED)
  assert "certify.run" in MODULES and "certify._feature" in MODULES


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
  bad = sorted(m for m in GRAPH[name] if _layer(m) not in ALLOWED[_layer(name)])
  assert not bad, f"{name} ({_layer(name)}) must not import {bad}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if _layer(m) == "config"))
def test_configs_are_data(name):
  """A config imports ml_collections, the standard library and other configs only."""
  third_party = {m.split(".")[0] for m in _imports(MODULES[name], name)} - {"configs"}
  assert third_party <= {"ml_collections", "os"} | set(sys.stdlib_module_names), (
      f"{name} imports {sorted(third_party)}")


# Modules of the program layer that serve every program and are no program themselves.
PROGRAM_SUPPORT = {"certify.report", "certify.records"}
PROGRAMS = sorted(m for m in MODULES if _layer(m) == "program" and m not in PROGRAM_SUPPORT)
# Known breaches of the rule below while issue 19 is being done, each owned by the helper
# rebuilding that program (delete an entry once its program passes).
PENDING: dict[str, str] = {}  # a program's known layering exception -> why (none now)


def _private(name: str) -> bool:
  """``fsjax.tasks._instructions``, ``certify._feature``: a module behind a package's API."""
  return any(part.startswith("_") for part in name.split(".")[1:])


def _program_breaches(name: str) -> list[str]:
  return sorted(m for m in GRAPH[name] if m in PROGRAMS or _private(m))


@pytest.mark.parametrize("name", PROGRAMS)
def test_programs_import_no_program_and_no_private_module(name):
  """A program is built on the public API of ``fsjax`` and ``certify`` only: never on
  another program (shared code belongs in the library) nor on a private module."""
  bad = _program_breaches(name)
  if bad and name in PENDING:
    pytest.xfail(f"{name}: {PENDING[name]}")
  assert not bad, f"{name} (a program) must not import {bad}"


def test_no_import_cycle():
  state, stack = {}, []

  def visit(m):
    state[m] = "active"
    stack.append(m)
    for n in sorted(GRAPH[m]):
      if state.get(n) == "active":
        cycle = stack[stack.index(n):] + [n]
        pytest.fail("import cycle: " + " -> ".join(cycle))
      if n not in state:
        visit(n)
    stack.pop()
    state[m] = "done"

  for m in sorted(GRAPH):
    if m not in state:
      visit(m)


def test_the_checker_sees_a_violation(tmp_path):
  """The rules have teeth: a library module importing a program is flagged."""
  p = tmp_path / "bad.py"
  p.write_text("def f():\n  from certify import run\n  import train.gsb\n")
  found = _imports(p, "fsjax.bad")
  assert {"certify.run", "train.gsb"} <= found
  assert {_layer(m) for m in found if m in MODULES} - ALLOWED["library"] == {
      "program", "trainer"}


def test_the_program_rule_sees_a_violation(tmp_path):
  """A program importing a sibling program or a private module is flagged."""
  p = tmp_path / "bad.py"
  p.write_text("from certify import robustness\nfrom fsjax.attacks import _common\n"
               "from certify import report\nfrom fsjax import attacks\n")
  found = {m for m in _imports(p, "certify.bad") if m in MODULES}
  assert sorted(m for m in found if m in PROGRAMS or _private(m)) == [
      "certify.robustness", "fsjax.attacks._common"]
  assert "certify.protection" in PROGRAMS and "certify.report" not in PROGRAMS


# The MLLM packages (registered in fsjax.mllm.PACKAGES: one package per model).
MLLM_PACKAGES = ("fsjax.llava", "fsjax.flamingo")


def _in(module: str, package: str) -> bool:
  return module == package or module.startswith(package + ".")


def test_the_mllm_packages_are_siblings():
  """Neither MLLM package imports the other: what they share (the smoothed encoder, the
  checkpoint reader, decoding) lives in the library below them."""
  from fsjax import mllm  # pylint: disable=g-import-not-at-top
  assert set(MLLM_PACKAGES) == set(mllm.PACKAGES.values())
  for package in MLLM_PACKAGES:
    others = [p for p in MLLM_PACKAGES if p != package]
    for name in (m for m in MODULES if _in(m, package)):
      bad = sorted(m for m in GRAPH[name] if any(_in(m, o) for o in others))
      assert not bad, f"{name} imports the sibling MLLM package: {bad}"


def test_the_protection_program_imports_no_mllm_package():
  """certify.protection builds its MLLM through the registry (fsjax.mllm.build)."""
  bad = sorted(m for m in GRAPH["certify.protection"]
               if any(_in(m, p) for p in MLLM_PACKAGES))
  assert not bad, f"certify.protection imports {bad}; build the model with fsjax.mllm.build"
  assert "fsjax.mllm" in GRAPH["certify.protection"]


def test_the_task_data_imports_no_mllm_package():
  """fsjax.tasks (prompts, data, tokenizer) takes a model's chat format from its caller."""
  for name in (m for m in MODULES if _in(m, "fsjax.tasks")):
    bad = sorted(m for m in GRAPH[name] if any(_in(m, p) for p in MLLM_PACKAGES))
    assert not bad, f"{name} imports {bad}; take the chat format as an argument"
