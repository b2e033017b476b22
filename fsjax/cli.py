"""The one way every entry point reads ``--config``, ``--workdir`` and ``--verbose``.

Flags are defined only when a module runs as ``__main__`` (inside :func:`run`), never at
import, so programs can import each other's helpers without absl flag clashes.

What a person sees: third-party INFO logs (orbax, absl, TensorFlow) and known noisy
warnings are off unless ``--verbose``; a bad command line (a missing config file, a
mistyped ``--config.a.b`` key, a bad value, an empty ``--workdir``) is one line naming the
fix, not a traceback.

Ctrl-C, the same for every program: inside a loop, :func:`interruptible` turns the first
SIGINT into a flag that the loop checks at safe points (between steps, between images); a
program that stops there raises :class:`Interrupted` after saving what it can. Outside
(loading, writing tables) a Ctrl-C stops at once. :func:`run` turns either into one
line on stderr and exit status 130 (128 + SIGINT, as a shell does), so
``python -m train.gsb ... && python -m certify.run ...`` stops instead of going on with a
half-finished result.

Pod runs: with ``JAX_COORDINATOR_ADDRESS`` (and ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``)
set, :func:`run` joins the pod (:func:`fsjax.pod.initialize`) before the program starts.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import logging as std_logging
import os
import signal
import sys
from typing import Any, Callable, Iterator
import warnings

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from fsjax import pod

# TensorFlow (the TFDS pipelines) reads this when it is first imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# The exit status of a run stopped by Ctrl-C: 128 + SIGINT, what a shell reports.
INTERRUPTED_EXIT_STATUS = 130


class Interrupted(KeyboardInterrupt):
  """Ctrl-C arrived and the program stopped at a safe point; ``str(e)`` is the one line
  a person reads (what was saved and how to resume)."""


# Ctrl-C's flag: None while no handler of ours is installed, else the SIGINTs seen. Once
# up it stays up for the rest of the run (:func:`run`) or the outermost context, so a
# Ctrl-C is never lost between two loops (the end of one training stage and the start of
# the next) nor when the KeyboardInterrupt it raised outside a loop was swallowed (raised
# inside a finalizer or a library's broad except while data and models load).
_pressed: list[int] | None = None
# How many interruptible() contexts are open: none, and a Ctrl-C stops at once.
_listening = 0


def _handler(signum, frame):
  del frame
  first = not _pressed
  _pressed.append(signum)
  if not first or not _listening:  # the user insists, or no loop will look at the flag
    raise KeyboardInterrupt
  print("\nCtrl-C: stopping at the next safe point, after saving (Ctrl-C again to "
        "abort without saving)...", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _handling_ctrl_c() -> Iterator[None]:
  """Installs :func:`_handler` with a fresh flag unless one is installed already. A
  SIGINT that the shell set to be ignored (a background job) stays ignored; outside the
  main thread nothing is installed (the flag stays down)."""
  global _pressed
  if _pressed is not None:
    yield
    return
  previous = signal.getsignal(signal.SIGINT)
  installed = False
  if previous is not signal.SIG_IGN:
    try:
      signal.signal(signal.SIGINT, _handler)
      installed = True
    except ValueError:  # not the main thread: leave SIGINT alone
      pass
  _pressed = []
  previous_hook = sys.unraisablehook

  def unraisable(u):
    # The KeyboardInterrupt of a Ctrl-C that struck inside a finalizer or a gc callback
    # (jax's _xla_gc_callback) cannot propagate; the flag keeps it, so its "Exception
    # ignored in ..." traceback is noise.
    if not (installed and isinstance(u.exc_value, KeyboardInterrupt)):
      previous_hook(u)

  sys.unraisablehook = unraisable
  try:
    yield
  finally:  # the handler goes first: it must never run with the flag gone
    if installed and signal.getsignal(signal.SIGINT) is _handler:
      signal.signal(signal.SIGINT, previous)
    if sys.unraisablehook is unraisable:
      sys.unraisablehook = previous_hook
    _pressed = None


@contextlib.contextmanager
def interruptible() -> Iterator[Callable[[], bool]]:
  """``with interruptible() as stop: ... if stop(): save; raise Interrupted(...)``.

  While inside, SIGINT only sets a flag (a second Ctrl-C interrupts at once, as usual):
  an XLA compilation, a data load or a step is never cut in half, and the program saves
  before stopping. Outside, a Ctrl-C raises KeyboardInterrupt at once, and under
  :func:`run` it also raises the flag, which stays up: a Ctrl-C while a trainer loads its
  data, or during the last step of one stage, is seen by the next loop that looks. Nested
  uses share the flag.
  """
  global _listening
  with _handling_ctrl_c():
    pressed = _pressed
    _listening += 1
    try:
      yield lambda: bool(pressed)
    finally:
      _listening -= 1


def stopped(program: str, done: str, where, rest: str) -> Interrupted:
  """What a certification program raises at a safe point after a Ctrl-C, its rows
  written: ``"<program>: interrupted (Ctrl-C); <done> in <where>; rerun the same command
  to <rest>."`` (``done``: "3 of 8 images are certified"; ``rest``: "certify the rest")."""
  return Interrupted(f"{program}: interrupted (Ctrl-C); {done} in {where}; rerun the same "
                     f"command to {rest}.")


def interrupted_line(program: str, error: KeyboardInterrupt) -> str:
  """The one line printed for a Ctrl-C: the program's own (:class:`Interrupted`), or a
  plain one for a Ctrl-C that struck outside any safe point."""
  if isinstance(error, Interrupted) and str(error):
    return str(error)
  return f"{program}: interrupted (Ctrl-C); nothing more was saved."


class _QuietThirdParty(std_logging.Filter):
  """Drops INFO lines of libraries (orbax: several per checkpoint) that bury progress."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno >= std_logging.WARNING:
      return True
    return not any(lib in record.pathname for lib in ("orbax", "jax/_src", "tensorflow"))


def quiet() -> None:
  """Turns third-party INFO logs and known harmless warnings off (``--verbose`` keeps them)."""
  logging.get_absl_handler().addFilter(_QuietThirdParty())
  for name in ("orbax", "jax._src.xla_bridge", "tensorflow", "absl"):
    std_logging.getLogger(name).setLevel(std_logging.WARNING)
  # "An NVIDIA GPU may be present ... falling back to cpu" and TPU probing messages.
  std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.ERROR)
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  warnings.filterwarnings("ignore", message=".*Unable to import.*")


def _config_path(argv: list[str]) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config(path: str):
  """The config ``path[:arg]`` describes, or None if it cannot be loaded."""
  file, _, arg = path.partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_fsjax_cli_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # pylint: disable=broad-except
    return None


_ABSENT = object()


def config_differences(a: Any, b: Any, prefix: str = "config") -> list[str]:
  """Every leaf where two JSON config trees differ, as ``"path: old in the workdir, new
  now"`` (dotted paths under ``prefix``, sorted; ``absent`` for a key only one tree has,
  ``a section`` for a whole sub-tree only one has): what a refusal to resume names."""
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b), key=str)
            for d in config_differences(a.get(k, _ABSENT), b.get(k, _ABSENT),
                                        f"{prefix}.{k}" if prefix else str(k))]
  if a == b:
    return []
  show = lambda v: "absent" if v is _ABSENT else "a section" if isinstance(v, dict) else repr(v)
  return [f"{prefix or 'config'}: {show(a)} in the workdir, {show(b)} now"]


def _keys(config, prefix: str = "config") -> list[str]:
  out = []
  for k in config.keys():
    v = config[k]
    out.append(f"{prefix}.{k}")
    if hasattr(v, "keys") and not isinstance(v, str):
      out += _keys(v, f"{prefix}.{k}")
  return out


def explain(argv: list[str], error: Exception) -> str:
  """One line saying what is wrong with a command line and how to fix it."""
  path = _config_path(argv)
  if path is None:
    return "--config is required: e.g. --config configs/default.py"
  file = path.partition(":")[0]
  if not os.path.isfile(file):
    return f"--config {file}: no such file (the configs are in configs/, e.g. configs/default.py)"
  config = _load_config(path)
  overrides = [a[2:].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  if config is not None:
    known = _keys(config)
    for o in overrides:
      if o not in known:
        close = difflib.get_close_matches(o, known, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('--' + c for c in close)}?" if close else (
            f"; the keys of {o.rpartition('.')[0] or 'config'} are: " + ", ".join(
                sorted(k.rpartition(".")[2] for k in known
                       if k.rpartition(".")[0] == o.rpartition(".")[0])))
        return f"--{o}: not a key of {file}{hint}"
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  message = lines[0] if lines else type(error).__name__
  if message.endswith(":") and len(lines) > 1:  # the cause is on the last line
    message = f"{message} {lines[-1]}"
  if "not supported for overriding" in message:
    message = (message.split(" is not supported")[0].replace("Type <class 'NoneType'> of "
                                                              "field ", "")
               + " is None in the config file and has no type, so it cannot be set from "
               "the command line; declare it as ml_collections.config_dict.placeholder(<type>)")
  return f"bad command line: {message}"


def run(main: Callable[..., object], *, workdir_help: str = "Output folder.",
        define_extra: Callable[[], None] | None = None) -> None:
  """Defines ``--config`` / ``--workdir`` / ``--verbose`` (+ extras), runs ``main``.

  Args:
    main: called as ``main(config, workdir, **extra_flag_values)``.
    workdir_help: help text of ``--workdir``.
    define_extra: defines further flags; their values are passed to ``main`` by name.
  """
  config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py); "
                                  "override fields with --config.a.b=value.", lock_config=True)
  flags.DEFINE_string("workdir", None, workdir_help)
  flags.DEFINE_bool("verbose", False, "Show third-party INFO logs and warnings.")
  before = set(flags.FLAGS)
  if define_extra is not None:
    define_extra()
  extra = sorted(set(flags.FLAGS) - before)

  def parse(argv: list[str]) -> list[str]:
    try:
      rest = flags.FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{os.path.basename(argv[0])}: {explain(argv, e)}", file=sys.stderr)
      sys.exit(2)
    path = _config_path(argv)
    if path is None or not os.path.isfile(path.partition(":")[0]):
      print(f"{os.path.basename(argv[0])}: {explain(argv, ValueError())}", file=sys.stderr)
      sys.exit(2)
    try:
      flags.FLAGS.config.keys()
    except Exception as e:  # pylint: disable=broad-except
      # config_flags defers a failure to load (syntax error, bad get_config argument).
      cause = e.__cause__ or e
      print(f"{os.path.basename(argv[0])}: --config {path} does not load: "
            f"{str(cause).splitlines()[-1].strip()}", file=sys.stderr)
      sys.exit(2)
    if flags.FLAGS.workdir is None:
      print(f"{os.path.basename(argv[0])}: --workdir is required ({workdir_help})",
            file=sys.stderr)
      sys.exit(2)
    if not flags.FLAGS.workdir.strip():
      # '' would put checkpoints and results into the current directory.
      print(f"{os.path.basename(argv[0])}: --workdir is empty; give a folder, e.g. "
            f"--workdir=runs/default ({workdir_help})", file=sys.stderr)
      sys.exit(2)
    return rest

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS.verbose:
      quiet()
    program = _program_name(main)
    try:
      # Outside the program's loops a Ctrl-C stops at once (one line, 130); inside, it
      # is a flag the loop looks at. Either way the flag stays up until the end.
      with _handling_ctrl_c():
        if pod.requested():  # a pod run: join it before anything touches a device
          pod.initialize()
        main(flags.FLAGS.config, flags.FLAGS.workdir,
             **{name: flags.FLAGS[name].value for name in extra})
        if _pressed:  # pressed after the last point where the program looked
          raise Interrupted(f"{program}: interrupted (Ctrl-C) as it ended; it had "
                            "finished, and its outputs are complete.")
    except KeyboardInterrupt as e:
      if flags.FLAGS.verbose and not isinstance(e, Interrupted):
        raise
      print(interrupted_line(program, e), file=sys.stderr, flush=True)
      sys.exit(INTERRUPTED_EXIT_STATUS)
    except (ValueError, FileNotFoundError) as e:
      if flags.FLAGS.verbose:
        raise
      # Our errors say what is wrong and how to fix it; the traceback adds nothing.
      print(f"error: {e}\n(--verbose shows the traceback)", file=sys.stderr)
      sys.exit(1)

  app.run(_main, flags_parser=parse)


def _program_name(main: Callable[..., object]) -> str:
  """``train.gsb`` for a ``main`` of the module run as ``python -m train.gsb``."""
  module = getattr(main, "__module__", None)
  if module == "__main__":
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    module = spec.name if spec is not None else os.path.basename(sys.argv[0])
  return module or "fsjax"
