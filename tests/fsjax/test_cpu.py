"""Tests of fsjax.cpu: flags parsed from cpuinfo texts, checked against grep and by hand."""

import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsjax import cpu
from fsjax import matmul

# Abridged /proc/cpuinfo of three machines this project runs on.
AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
bugs\t\t: spectre_v1

processor\t: 1
flags\t\t: fpu sse2 avx avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8
"""
AVX512_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu avx avx2 fma\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd bf16 sve\n"


def test_parse_flags():
  assert cpu.parse_flags(AMX) == {"fpu", "sse2", "avx", "avx2", "avx512f", "avx512_bf16",
                                  "amx_bf16", "amx_tile", "amx_int8"}
  assert cpu.parse_flags(AVX2) == {"fpu", "avx", "avx2", "fma"}
  assert cpu.parse_flags(ARM) == {"fp", "asimd", "bf16", "sve"}
  assert cpu.parse_flags("") == frozenset()


@pytest.mark.parametrize("text, support, native, fast", [
    (AMX, "amx", True, True),
    (AVX512_BF16, "avx512", True, False),
    (AVX2, "none", False, False),
    (ARM, "none", False, False),  # Not an x86 bf16 extension: treated as unknown.
])
def test_bfloat16_support(text, support, native, fast):
  flags = cpu.parse_flags(text)
  assert cpu.bfloat16_support(flags) == support
  assert cpu.native_bfloat16(flags) is native
  assert cpu.fast_bfloat16(flags) is fast
  assert cpu.preferred_dtype("cpu", flags) == ("bfloat16" if fast else "float32")
  assert cpu.preferred_dtype("gpu", flags) == cpu.preferred_dtype("tpu", flags) == "bfloat16"


def test_flags_of_a_file_and_of_this_machine(tmp_path):
  path = tmp_path / "cpuinfo"
  path.write_text(AVX2)
  assert cpu.flags(str(path)) == {"fpu", "avx", "avx2", "fma"}
  assert cpu.flags(str(tmp_path / "missing")) == frozenset()  # Not Linux: nothing known.
  assert "AMD EPYC 7B12" in cpu.describe(cpu.parse_flags(AVX2), path=str(path))
  assert "bfloat16: none" in cpu.describe(cpu.parse_flags(AVX2), path=str(path))
  if not pathlib.Path(cpu.CPUINFO).is_file():
    pytest.skip("no /proc/cpuinfo on this OS")
  # This machine, against grep's reading of the same file.
  line = subprocess.run(["grep", "-m1", "^flags", cpu.CPUINFO], capture_output=True,
                        text=True, check=True).stdout
  assert cpu.flags() == set(line.split(":", 1)[1].split())
  grep = subprocess.run(["grep", "-c", "-w", "-e", "amx_bf16", "-e", "avx512_bf16",
                         cpu.CPUINFO], capture_output=True, text=True).stdout
  assert cpu.native_bfloat16() is (int(grep) > 0)


# ------------------------------------------------------------------ XLA:CPU compiler options


def _dtypes_of(fn, *args):
  return cpu.matmul_dtypes(jax.make_jaxpr(fn)(*args))


def test_matmul_dtypes_reads_dots_and_convolutions_everywhere():
  """Operand dtypes of dots and convolutions, also inside loops, nested jits and shard_map."""
  f32 = jnp.ones((4, 4), jnp.float32)
  bf16 = f32.astype(jnp.bfloat16)
  assert _dtypes_of(lambda a: jnp.sin(a).sum(), f32) == frozenset()
  assert _dtypes_of(lambda a: a @ a, f32) == {"float32"}
  assert _dtypes_of(lambda a: matmul.dot(a, a), bf16) == {"bfloat16"}

  def in_a_loop(a, b):  # a float32 dot outside, a bfloat16 one in a loop in a nested jit
    inner = jax.jit(lambda c: jax.lax.fori_loop(0, 2, lambda i, d: d @ b, c))
    return (a @ a).sum() + inner(b).astype(jnp.float32).sum()
  assert _dtypes_of(in_a_loop, f32, bf16) == {"float32", "bfloat16"}
  mesh = jax.make_mesh((1,), ("d",))
  sharded = jax.shard_map(lambda a: a @ a, mesh=mesh, in_specs=jax.P(), out_specs=jax.P())
  assert _dtypes_of(sharded, bf16) == {"bfloat16"}
  image = jnp.ones((1, 8, 8, 3), jnp.bfloat16)
  kernel = jnp.ones((3, 3, 3, 4), jnp.bfloat16)
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert _dtypes_of(conv, image, kernel) == {"bfloat16"}


def test_compiler_options_by_dtype():
  assert cpu.compiler_options(set()) == cpu.FLOAT32_OPTIONS
  assert cpu.compiler_options({"float32"}) == cpu.FLOAT32_OPTIONS
  assert cpu.compiler_options({"float32", "float64"}) == cpu.FLOAT32_OPTIONS
  assert cpu.compiler_options({"bfloat16"}) is None
  assert cpu.compiler_options({"float32", "bfloat16"}) is None
  assert cpu.compiler_options({"float16"}) is None


def test_jit_picks_options_by_matmul_dtype():
  """float32 matmuls compile with FLOAT32_OPTIONS (no YNNPACK dot), bfloat16 ones with
  jax's defaults; results equal jax.jit's; the probe's trace is the call's; nested
  and off-CPU it is a plain jit."""
  traces = []

  def fn(a, b, *, scale):
    traces.append(a.dtype)
    return matmul.dot(a, b) * scale + jnp.sum(a, axis=-1, keepdims=True)

  f = cpu.jit(fn, static_argnames="scale")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 64)), jnp.float32)
  for dtype in (jnp.float32, jnp.bfloat16):
    a = x.astype(dtype)
    want = jax.jit(fn, static_argnames="scale")(a, a, scale=2.0)
    got = f(a, a, scale=2.0)
    assert got.dtype == want.dtype
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=1e-5 if dtype == jnp.float32 else 1e-2, atol=1e-4)
    f(a, a, scale=2.0)
  if jax.default_backend() != "cpu":
    return
  assert [f.chosen[k] for k in f.chosen] == [f.jitted["float32"], f.jitted["plain"]]
  # One trace per dtype: the probe, the call and the reference jit share jax's trace cache
  # (it does not depend on compiler options), so choosing the options costs no trace.
  assert traces.count(jnp.float32) == 1 and traces.count(jnp.bfloat16) == 1
  ours = f.jitted["float32"].lower(x, x, scale=2.0).compile().as_text()
  default = jax.jit(fn, static_argnames="scale").lower(x, x, scale=2.0).compile().as_text()
  assert "__ynn_fusion" in default
  dot_fusions = [line for line in ours.splitlines() if "__ynn_fusion" in line and "dot(" in line]
  assert not dot_fusions  # the dot is XLA's own; YNNPACK may still take the reduction
  nested = jax.jit(lambda a: f(a, a, scale=1.0))(x)  # inside a trace: a plain nested jit
  np.testing.assert_allclose(np.asarray(nested), np.asarray(f(x, x, scale=1.0)), rtol=1e-5,
                             atol=1e-4)
  with pytest.raises(TypeError, match="static_argnames"):
    cpu.jit(fn, static_argnums=2)
