"""One default per config field: every field the library reads is declared in `config_base`
(`base_config`, `rarm_model`, `PART`), the library reads fields as attributes (never
`get(key, default)`, which would hide a second default), and no preset adds a field.

The reads are found in rdm_jax's source with Python's own parser: attribute chains on `config`
(a parameter or `self.config`), on `dataset` (config.dataset), on parameters named `*config` /
`*cfg` or annotated ConfigDict, and on local names bound to any of these."""

from __future__ import annotations

import ast
import os
import pathlib

import ml_collections as mlc
import pytest

from rdm_jax import config_base
from rdm_jax.data import sources
from rdm_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_METHODS = set(dir(mlc.ConfigDict)) | {"items", "keys", "values"}


def declared() -> mlc.ConfigDict:
  """Every field a config may have: base_config with both model families' fields."""
  c = config_base.base_config()
  with c.unlocked():
    for k, v in config_base.rarm_model().items():
      if k not in c.model:
        c.model[k] = v
  return c


def _chain(e: ast.AST) -> tuple[ast.AST, list[str]]:
  """(root expression, attribute names) of a.b.c; the root is where the chain stops."""
  names = []
  while isinstance(e, ast.Attribute):
    names.append(e.attr)
    e = e.value
  return e, names[::-1]


def _config_reads(tree: ast.Module):
  """(node, path prefix or None, attribute names, is_get) of each read from a config object:
  prefix is the config path the root stands for (() = the whole config), None when unknown
  (a section passed in as `cfg`)."""
  for fn in ast.walk(tree):
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    roots: dict[str, tuple[str, ...] | None] = {}
    for a in fn.args.args + fn.args.kwonlyargs:
      annotated = a.annotation is not None and "ConfigDict" in ast.unparse(a.annotation)
      if a.arg == "config":
        roots[a.arg] = ()
      elif a.arg == "dataset":  # the library's name for config.dataset
        roots[a.arg] = ("dataset",)
      elif a.arg.endswith(("config", "cfg")) or annotated:
        roots[a.arg] = None

    def resolve(e: ast.AST) -> tuple[tuple[str, ...] | None, list[str]] | None:
      base, names = _chain(e)
      if isinstance(base, ast.Name) and base.id in roots:
        return roots[base.id], names
      if isinstance(base, ast.Name) and base.id == "self" and names[:1] == ["config"]:
        return (), names[1:]
      return None

    for n in ast.walk(fn):  # local names bound to config sections: m = config.model
      if isinstance(n, ast.Assign) and len(n.targets) == 1:
        pairs = [(n.targets[0], n.value)]
        if isinstance(n.targets[0], ast.Tuple) and isinstance(n.value, ast.Tuple):
          pairs = list(zip(n.targets[0].elts, n.value.elts))
        for target, value in pairs:
          r = resolve(value) if isinstance(value, (ast.Attribute, ast.Name)) else None
          if isinstance(target, ast.Name) and r is not None:
            prefix, names = r
            roots[target.id] = None if prefix is None else prefix + tuple(names)
    inner = {id(n.value) for n in ast.walk(fn) if isinstance(n, ast.Attribute)}
    for n in ast.walk(fn):
      if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "get":
        r = resolve(n.func.value)
        if r is not None:
          yield n, r[0], r[1], True
      elif isinstance(n, ast.Attribute) and id(n) not in inner:  # the whole chain a.b.c once
        r = resolve(n)
        if r is not None and r[1]:
          yield n, r[0], r[1], False


def _library_reads():
  for path in sorted((ROOT / "rdm_jax").rglob("*.py")):
    tree = ast.parse(path.read_text(), str(path))
    for node, prefix, names, is_get in _config_reads(tree):
      yield f"{path.relative_to(ROOT)}:{node.lineno}", prefix, names, is_get


def _lookup(tree: mlc.ConfigDict, names: list[str]) -> bool:
  """Whether names[0].names[1]... is declared; it may end in a ConfigDict method (update,
  to_dict) or a method of a declared leaf (str.split)."""
  node = tree
  for name in names:
    if not isinstance(node, mlc.ConfigDict):
      return True  # a method of the leaf's value
    if name in node:
      node = node[name]
    elif name in CONFIG_METHODS:
      return True
    else:
      return False
  return True


def _sections(tree: mlc.ConfigDict):
  yield tree
  for v in tree.values():
    if isinstance(v, mlc.ConfigDict):
      yield from _sections(v)


def test_reads_are_found():
  """The scan sees reads on `config`, on sections passed in and on local aliases (a hand-made
  module: if the scan missed these, the tests below could not fail)."""
  src = (
    "def f(config, first_cfg, x):\n  m, o = config.model, config.optim\n  t = config.train\n  "
    "return m.heads, o.get('eps', 1.0), t.nope, first_cfg.get('weights', ''), x.get('a', 1)\n"
  )
  reads = {(p, tuple(n), g) for _, p, n, g in _config_reads(ast.parse(src))}
  assert ((), ("model",), False) in reads and ((), ("optim",), False) in reads
  assert (("model",), ("heads",), False) in reads
  assert (("optim",), (), True) in reads and (None, (), True) in reads
  assert (("train",), ("nope",), False) in reads
  assert len([r for r in reads if r[2]]) == 2  # x.get is not a config read


def test_no_get_with_default_on_configs():
  gets = [where for where, _, _, is_get in _library_reads() if is_get]
  assert not gets, f"config fields read with .get (declare them in config_base instead): {gets}"


def test_every_field_read_is_declared():
  tree = declared()
  leaves = {k for s in _sections(tree) for k in s}
  undeclared = []
  for where, prefix, names, is_get in _library_reads():
    if is_get:
      continue
    if prefix is None:  # a section passed in: the field must exist in some section
      ok = names[0] in leaves or names[0] in CONFIG_METHODS
    else:
      ok = _lookup(tree, list(prefix) + names)
    if not ok:
      undeclared.append(f"{where}: {'.'.join(list(prefix or ('<section>',)) + names)}")
  assert not undeclared, f"fields read but not declared in config_base: {undeclared}"


def test_an_undeclared_read_fails_the_check():
  tree = declared()
  assert _lookup(tree, ["retrieval", "index", "kind"]) and _lookup(tree, ["model", "heads"])
  assert _lookup(tree, ["model", "update"]) and _lookup(tree, ["data_dir", "endswith"])
  assert not _lookup(tree, ["retrieval", "index", "knid"]) and not _lookup(tree, ["modle"])


def _presets():
  for name in sorted(os.listdir(ROOT / "configs")):
    if name.endswith(".py"):
      path = str(ROOT / "configs" / name)
      for arg in {
        "imagenet_rarm.py": ("dogs,released,fig5",),
        "imagenet_rdm.py": (None, "in-db"),
      }.get(name, (None,)):
        yield name, config_base.config_file(path, *([arg] if arg else []))


def _added(config: mlc.ConfigDict, tree: mlc.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for k, v in config.items():
    if k not in tree:
      out.append(prefix + k)
    elif isinstance(v, mlc.ConfigDict) and isinstance(tree[k], mlc.ConfigDict) and len(tree[k]):
      out += _added(v, tree[k], f"{prefix}{k}.")
  return out


@pytest.mark.parametrize(
  "name,config", list(_presets()), ids=lambda x: x if isinstance(x, str) else ""
)
def test_presets_add_no_field(name, config):
  """A preset sets declared fields only (parts: PART's fields)."""
  assert not _added(config, declared()), name
  for part in config.dataset.parts:
    sources.part_spec(config.dataset, part)


def test_part_fields():
  dataset = config_base.base_config().dataset
  dataset.parts = {"train": {"split": "train", "stop": 10}, "test": {"split": "test", "stopp": 5}}
  assert sources.part_spec(dataset, "train") == {
    "split": "train",
    "start": 0,
    "stop": 10,
    "files": "",
  }
  assert sources.split_range(dataset, "train") == ("train", 0, 10)
  with pytest.raises(
    UserError, match="parts.test sets stopp; a part takes split, start, stop, files"
  ):
    sources.part_spec(dataset, "test")
  with pytest.raises(UserError, match="has no 'database' part"):
    sources.part_spec(dataset, "database")
