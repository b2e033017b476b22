"""Human-readable names of the 1000 ImageNet-1k (ILSVRC-2012) classes.

``CLASS_NAMES[i]`` is the first WordNet synonym of class ``i`` (285 ``'Egyptian cat'``, 967
``'espresso'``, 657 ``'missile'``), ``CLASS_SYNONYMS[i]`` the full synonym string
(``'tabby, tabby cat'``) and ``WNIDS[i]`` its WordNet id (``'n02124075'``). The table is
``fsjax/assets/imagenet_classes.txt``, taken from tensorflow-datasets (Apache-2.0); its
header says exactly where from.
"""

from __future__ import annotations

import importlib.resources


def _read_table() -> tuple[tuple[str, ...], tuple[str, ...]]:
  text = importlib.resources.files("fsjax").joinpath("assets/imagenet_classes.txt").read_text(
      encoding="utf-8")
  rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
  if len(rows) != 1000 or any(len(r) != 2 for r in rows):
    raise RuntimeError("fsjax/assets/imagenet_classes.txt is damaged: expected 1000 lines "
                       "'<wnid>\\t<synonyms>'; reinstall fsjax.")
  wnids, synonyms = zip(*rows)
  return tuple(wnids), tuple(synonyms)


WNIDS, CLASS_SYNONYMS = _read_table()
CLASS_NAMES: tuple[str, ...] = tuple(s.split(",")[0].strip() for s in CLASS_SYNONYMS)
