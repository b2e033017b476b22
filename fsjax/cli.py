"""The one way every entry point reads ``--config`` and ``--workdir``.

Flags are defined only when a module runs as ``__main__`` (inside :func:`run`), never at
import: the CLIs import each other's helpers (``certify.table2`` uses ``certify.run``),
and absl flags are global, so flags defined at import would clash.
"""

from __future__ import annotations

from typing import Callable

from absl import app
from absl import flags
from ml_collections import config_flags


def run(main: Callable[..., object], *, workdir_help: str = "Output folder.",
        define_extra: Callable[[], None] | None = None) -> None:
  """Defines ``--config`` / ``--workdir`` (+ extras), then runs ``main(config, workdir)``.

  Args:
    main: called as ``main(config, workdir, **extra_flag_values)``.
    workdir_help: help text of ``--workdir``.
    define_extra: defines further flags; their values are passed to ``main`` by name.
  """
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py); "
                                  "override fields with --config.a.b=value.", lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  before = set(flags.FLAGS)
  if define_extra is not None:
    define_extra()
  extra = sorted(set(flags.FLAGS) - before)
  flags.mark_flags_as_required(["config", "workdir"])

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    main(flags.FLAGS.config, flags.FLAGS.workdir,
         **{name: flags.FLAGS[name].value for name in extra})

  app.run(_main)
