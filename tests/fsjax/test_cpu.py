"""Tests of fsjax.cpu: flags parsed from cpuinfo texts, checked against grep and by hand."""

import pathlib
import subprocess

import pytest

from fsjax import cpu

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
