"""Every config file: loads, is complete where programs need it, and is overridable."""

import importlib
import pkgutil

import ml_collections
from ml_collections import config_dict
import pytest

import configs

NAMES = sorted(m.name for m in pkgutil.iter_modules(configs.__path__)
               if hasattr(importlib.import_module(f"configs.{m.name}"), "get_config"))


def _untyped_nones(c, prefix="config"):
  out = []
  for k in c.keys():
    v = c[k]
    if v is None and not isinstance(c._fields[k], config_dict.FieldReference):  # pylint: disable=protected-access
      out.append(f"{prefix}.{k}")
    if isinstance(v, ml_collections.ConfigDict):
      out += _untyped_nones(v, f"{prefix}.{k}")
  return out


@pytest.mark.parametrize("name", NAMES)
def test_every_optional_field_can_be_set_from_the_command_line(name):
  """A plain None has no type and --config.a.b=... fails on it; placeholders are typed."""
  config = importlib.import_module(f"configs.{name}").get_config()
  assert not _untyped_nones(config), name


@pytest.mark.parametrize("name", NAMES)
def test_get_config_rejects_an_unknown_argument(name):
  with pytest.raises(ValueError):
    importlib.import_module(f"configs.{name}").get_config("no_such_option")


def test_runlocal_shrinks_clip_l14():
  from configs import clip_l14  # pylint: disable=g-import-not-at-top
  full, small = clip_l14.get_config(), clip_l14.get_config("runlocal")
  assert small.certify.n < full.certify.n and small.data.num_examples < full.data.num_examples
  assert small.encoder.to_dict() == full.encoder.to_dict()
