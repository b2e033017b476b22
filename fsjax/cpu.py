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

It also says how XLA:CPU should compile an executable: :func:`jit` is ``jax.jit`` with the
compiler options that suit the dtypes of the function's matmuls (:data:`FLOAT32_OPTIONS`).

Usage::

  from fsjax import cpu
  cpu.bfloat16_support()   # "amx", "avx512" or "none"
  cpu.native_bfloat16()    # True for "amx" and "avx512"
  cpu.fast_bfloat16()      # True only with AMX: bfloat16 matmuls beat float32 ones
  cpu.preferred_dtype()    # "bfloat16" on AMX CPUs and accelerators, else "float32"
  cpu.resolve_dtype("auto")  # a config's dtype as it runs: "auto" -> preferred_dtype()

  @cpu.jit(static_argnames="encoder")  # jax.jit, with XLA:CPU options per matmul dtype
  def features(params, x, *, encoder): ...
"""

from __future__ import annotations

import functools
import os
from typing import Any

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


# ------------------------------------------------------------------------------------------
# XLA:CPU compiler options: which library runs an executable's matmuls and reductions.
# ------------------------------------------------------------------------------------------

#: The per-compile option that lists the op kinds XLA:CPU (jax 0.10) hands to YNNPACK.
#: jax's default sends YNNPACK its dots (one per fusion) and its reductions; ``""`` sends it
#: nothing (XLA's own Eigen dots, reductions as XLA loops).
YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"

#: XLA:CPU options of an executable whose matrix multiplies are all float32 (or wider):
#: XLA's own (Eigen) dots, YNNPACK reductions. Without YNNPACK at all, a softmax's row sums
#: become a reduce-window tree, 3.4x slower than YNNPACK's reduction; with jax's default,
#: YNNPACK's float32 dots are slower than Eigen's at the shapes of smoothing and prefill
#: (127 against 142 GFLOP/s at [1576, 768] x [768, 768], one core). Measured on a 2-core
#: AMX Xeon, one thread, against jax's default (benchmarks/README.md, "XLA:CPU options per
#: executable"): ViT-B/16 float32 smoothing 1.11-1.12x, EfficientNet-Lite0 1.09-1.10x;
#: against Eigen for everything (LLaVA's earlier setting): the small LLaVA's batch-8
#: prefill 1.05x and decode 1.28x. With bfloat16 matmuls jax's default stays: YNNPACK's
#: dots are the ones on AMX tiles (Eigen's bfloat16 dot is 2.2x slower on ViT-B/16). Not
#: for executables dominated by a wide matrix-vector product: at [8, 512] x [512, 50280]
#: (OpenFlamingo's tied LM head) Eigen is 3x slower than YNNPACK, so OpenFlamingo keeps a
#: plain jax.jit.
FLOAT32_OPTIONS = {YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_REDUCE"}

_WIDE = ("float32", "float64")


def matmul_dtypes(jaxpr) -> frozenset[str]:
  """The operand dtypes of every ``dot_general`` and convolution in a (closed) jaxpr,
  its sub-jaxprs included (loops, conditionals, nested jits, ``shard_map``)."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      found.update(str(v.aval.dtype) for v in eqn.invars)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
          found |= matmul_dtypes(sub)
  return frozenset(found)


def compiler_options(dtypes: frozenset[str] | set[str]) -> dict[str, str] | None:
  """XLA:CPU options for an executable whose matmul operands have ``dtypes``
  (:func:`matmul_dtypes`): :data:`FLOAT32_OPTIONS` when they are all float32 or float64,
  else None (jax's default)."""
  return dict(FLOAT32_OPTIONS) if set(dtypes) <= set(_WIDE) else None


def jit(fn: Any = None, **jit_kwargs) -> Any:
  """``jax.jit`` with the XLA:CPU options that suit the function's matmul dtypes.

  On the CPU backend the first call with new static arguments or input dtypes traces the
  function (``jax.jit(...).trace``; jax's trace cache does not depend on compiler options,
  so the call reuses that trace), reads the dtypes of its matmuls (:func:`matmul_dtypes`)
  and compiles with :func:`compiler_options`. Elsewhere, and inside another trace
  (compiler options belong to the top-level jit), it is a plain ``jax.jit``. Results are
  the same as ``jax.jit``'s up to float32 rounding. Use as
  ``@cpu.jit(static_argnames=...)``; ``static_argnums`` is not supported.
  """
  if fn is None:
    return functools.partial(jit, **jit_kwargs)
  if "static_argnums" in jit_kwargs:
    raise TypeError("fsjax.cpu.jit takes static_argnames, not static_argnums.")
  import inspect  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  static = jit_kwargs.get("static_argnames", ())
  static = (static,) if isinstance(static, str) else tuple(static)
  signature = inspect.signature(fn)
  plain = jax.jit(fn, **jit_kwargs)
  float32 = jax.jit(fn, compiler_options=dict(FLOAT32_OPTIONS), **jit_kwargs)
  chosen = {}  # (static values, input dtypes) -> the jitted function to call

  def pick(args, kwargs):
    """The jitted function for these arguments (probing the matmul dtypes once per key)."""
    leaves = jax.tree.leaves((args, kwargs))
    if jax.default_backend() != "cpu" or any(isinstance(a, jax.core.Tracer) for a in leaves):
      return plain
    bound = signature.bind(*args, **kwargs).arguments
    key = (tuple(kwargs[name] if name in kwargs else bound.get(name) for name in static),
           tuple(getattr(a, "dtype", type(a)) for a in leaves))
    if key not in chosen:
      dtypes = matmul_dtypes(float32.trace(*args, **kwargs).jaxpr)
      chosen[key] = float32 if compiler_options(dtypes) else plain
    return chosen[key]

  @functools.wraps(fn)
  def call(*args, **kwargs):
    return pick(args, kwargs)(*args, **kwargs)

  # As on a jax.jit function: lower for these arguments, and the executables compiled.
  call.lower = lambda *args, **kwargs: pick(args, kwargs).lower(*args, **kwargs)
  call._cache_size = (  # pylint: disable=protected-access
      lambda: plain._cache_size() + float32._cache_size())  # pylint: disable=protected-access
  call.jitted = {"plain": plain, "float32": float32}  # for inspection
  call.chosen = chosen
  return call
