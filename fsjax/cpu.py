"""What this CPU computes natively, read at run time: bfloat16 above all.

CPUs differ from machine to machine, and bfloat16 pays only where the CPU has it in
hardware: with AMX (``amx_bf16``, Sapphire Rapids and later) XLA's bfloat16 matrix
multiply runs ~3x its float32 one, provided it asks for a float32 result (a bfloat16-out
dot is no faster than float32; :mod:`fsjax.matmul`); with ``avx512_bf16`` alone
(dot-product instructions, no tiles) it is about as fast as float32; on an AVX2-only CPU
bfloat16 is emulated (converted to float32 and back), slower than float32, and a large
bfloat16 matmul can take minutes. So dtype defaults and benchmarks ask this module rather
than assume.

Linux only (``/proc/cpuinfo``); elsewhere nothing is detected, which means float32.

Usage::

  from fsjax import cpu
  cpu.bfloat16_support()   # "amx", "avx512" or "none"
  cpu.native_bfloat16()    # True for "amx" and "avx512"
  cpu.fast_bfloat16()      # True only with AMX: bfloat16 matmuls beat float32 ones
  cpu.preferred_dtype()    # "bfloat16" on AMX CPUs and accelerators, else "float32"
  cpu.resolve_dtype("auto")  # a config's dtype as it runs: "auto" -> preferred_dtype()
"""

from __future__ import annotations

import functools
import os

CPUINFO = "/proc/cpuinfo"
BFLOAT16_SUPPORT = ("amx", "avx512", "none")


def parse_flags(cpuinfo: str) -> frozenset[str]:
  """The feature flags of the first processor in a ``/proc/cpuinfo`` text.

  Args:
    cpuinfo: the file's text (x86 ``flags`` lines; ARM's ``Features`` lines also work).

  Returns:
    The flags, e.g. ``{"avx2", "avx512_bf16", ...}``; empty if the text has none.
  """
  for line in cpuinfo.splitlines():
    key, sep, value = line.partition(":")
    if sep and key.strip() in ("flags", "Features"):
      return frozenset(value.split())
  return frozenset()


@functools.cache
def flags(path: str | os.PathLike[str] = CPUINFO) -> frozenset[str]:
  """The CPU's feature flags (cached); empty where ``path`` cannot be read."""
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      return parse_flags(f.read())
  except OSError:
    return frozenset()


def bfloat16_support(cpu_flags: frozenset[str] | None = None) -> str:
  """How bfloat16 runs here: ``"amx"``, ``"avx512"`` (AVX512-BF16 only) or ``"none"``.

  Args:
    cpu_flags: flags to judge (default: this CPU's, :func:`flags`).
  """
  cpu_flags = flags() if cpu_flags is None else cpu_flags
  if "amx_bf16" in cpu_flags:
    return "amx"
  if "avx512_bf16" in cpu_flags:
    return "avx512"
  return "none"


def native_bfloat16(cpu_flags: frozenset[str] | None = None) -> bool:
  """Whether the CPU has bfloat16 instructions (AMX or AVX512-BF16), i.e. is not emulating."""
  return bfloat16_support(cpu_flags) != "none"


def fast_bfloat16(cpu_flags: frozenset[str] | None = None) -> bool:
  """Whether bfloat16 matrix multiplies are faster than float32 ones here (AMX tiles)."""
  return bfloat16_support(cpu_flags) == "amx"


def preferred_dtype(backend: str | None = None,
                    cpu_flags: frozenset[str] | None = None) -> str:
  """The faster matmul dtype here: ``"bfloat16"`` or ``"float32"``.

  Args:
    backend: a JAX backend name (default: ``jax.default_backend()``); GPUs and TPUs have
      native bfloat16, so anything but ``"cpu"`` gets ``"bfloat16"``.
    cpu_flags: CPU flags to judge (default: this CPU's).

  Returns:
    ``"bfloat16"`` on accelerators and AMX CPUs (:func:`fast_bfloat16`), else ``"float32"``.
  """
  if backend is None:
    import jax  # pylint: disable=g-import-not-at-top
    backend = jax.default_backend()
  if backend != "cpu":
    return "bfloat16"
  return "bfloat16" if fast_bfloat16(cpu_flags) else "float32"


def resolve_dtype(dtype: str, backend: str | None = None) -> str:
  """The compute dtype a config's ``dtype`` names here: ``"auto"`` is
  :func:`preferred_dtype` (what the encoders run with), any other name is itself.

  Programs record it (``config.json``, table captions, result records), since ``"auto"``
  alone does not say which arithmetic produced the numbers.
  """
  return preferred_dtype(backend) if dtype == "auto" else dtype


def describe(cpu_flags: frozenset[str] | None = None, path: str = CPUINFO) -> str:
  """One line for benchmark tables: the CPU model and its bfloat16 support."""
  model = "unknown CPU"
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        key, sep, value = line.partition(":")
        if sep and key.strip() == "model name":
          model = value.strip()
          break
  except OSError:
    pass
  cpu_flags = flags() if cpu_flags is None else cpu_flags
  count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return (f"{model}, {count} usable CPUs, bfloat16: "
          f"{bfloat16_support(cpu_flags)} (amx_bf16: {'amx_bf16' in cpu_flags}, "
          f"avx512_bf16: {'avx512_bf16' in cpu_flags})")
