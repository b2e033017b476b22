"""fsjax.checks: every check accepts the valid edge values and names the argument when not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsjax import checks
from fsjax import encoders
from fsjax import smoothing


@pytest.mark.parametrize("sigma", [1e-6, 0.25, 2.0, np.float32(0.5), jnp.float32(0.5)])
def test_sigma_accepts_positive_finite_scalars(sigma):
  checks.check_sigma(sigma)


@pytest.mark.parametrize("sigma", [0.0, -0.1, float("nan"), float("inf"), [0.25, 0.5], "0.25x"])
def test_sigma_rejects(sigma):
  with pytest.raises(ValueError, match=r"^noise_level must be .*noise level"):
    checks.check_sigma(sigma, name="noise_level")


@pytest.mark.parametrize("value, minimum, want", [(1, 1, 1), (10_000, 2, 10_000),
                                                  (1e4, 1, 10_000), (np.int64(3), 0, 3),
                                                  (0, 0, 0)])
def test_positive_int_accepts_whole_numbers(value, minimum, want):
  got = checks.check_positive_int(value, name="n", minimum=minimum)
  assert got == want and type(got) is int


@pytest.mark.parametrize("value, minimum", [(0, 1), (1, 2), (2.5, 1), (True, 1), (None, 1),
                                            (float("nan"), 1), (float("inf"), 1), (-1, 0)])
def test_positive_int_rejects(value, minimum):
  with pytest.raises(ValueError, match=rf"^n0 must be an integer >= {minimum} \(samples\)"):
    checks.check_positive_int(value, name="n0", minimum=minimum, meaning="samples")


@pytest.mark.parametrize("alpha", [1e-12, 0.001, 0.5, 1 - 1e-9])
def test_alpha_accepts_open_interval(alpha):
  checks.check_alpha(alpha)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.1, 1.5, float("nan"), [0.01]])
def test_alpha_rejects(alpha):
  with pytest.raises(ValueError, match=r"^alpha must be one number in \(0, 1\)"):
    checks.check_alpha(alpha)


def test_probability_and_deficit_edges():
  checks.check_probability(np.array([0.0, 0.5, 1.0]), name="p")
  checks.check_deficit(np.array([0.0, 1e-12, 1.0]))
  checks.check_probability(jnp.array([0.0, 1.0], jnp.bfloat16), name="p")
  with pytest.raises(ValueError, match=r"^h_lcb must lie in \[0.0, 1.0\] .*got 1.5"):
    checks.check_probability(1.5, name="h_lcb")
  with pytest.raises(ValueError, match=r"deficit must lie in \[0.0, 1.0\].*L > 1"):
    checks.check_deficit(np.array([0.1, -1e-3]))
  with pytest.raises(ValueError, match=r"^p contains NaN or Inf \(1 of 2"):
    checks.check_probability(np.array([0.5, np.nan]), name="p")


def test_nonnegative_and_range():
  checks.check_nonnegative([0.0, 3.0], name="eps", meaning="radii")
  with pytest.raises(ValueError, match=r"^eps must lie in \[0.0, inf\] \(radii\), got values in "
                     r"\[-0.1, 3\]"):
    checks.check_nonnegative([-0.1, 3.0], name="eps", meaning="radii")
  with pytest.raises(ValueError, match=r"delta must lie in \[0.0, 3.14"):
    checks.check_in_range(4.0, name="delta", low=0.0, high=float(np.pi), meaning="an angle")


def test_nonempty_and_choice():
  checks.check_nonempty(np.zeros((1, 2)), name="x")
  checks.check_nonempty(3.0, name="x")  # a scalar is one value
  with pytest.raises(ValueError, match=r"^x is empty \(shape \(0, 8, 8, 3\)\); pass at least one "
                     "image"):
    checks.check_nonempty(np.zeros((0, 8, 8, 3)), name="x", item="image")
  checks.check_choice("mean", name="reference", choices=("clean", "mean"))
  for bad in ("target", None, ["mean"]):
    with pytest.raises(ValueError, match=r"^reference must be one of \('clean', 'mean'\)"):
      checks.check_choice(bad, name="reference", choices=("clean", "mean"))


def test_traced_values_are_skipped_not_misread():
  """Under jit a value is unknown: the check must neither raise nor concretise it."""

  @jax.jit
  def f(sigma, p):
    checks.check_sigma(sigma)
    checks.check_probability(p, name="p")
    checks.check_alpha(sigma)
    return sigma * p

  assert float(f(0.5, 0.5)) == 0.25
  assert float(f(-1.0, 2.0)) == -2.0  # not checked: the callers check before jit


def test_check_sampling_uses_the_checks():
  smoothing.check_sampling(sigma=0.25, n=1, chunk_size=1)
  with pytest.raises(ValueError, match="^sigma must be one finite number > 0"):
    smoothing.check_sampling(sigma=0.0, n=10, chunk_size=4)
  with pytest.raises(ValueError, match=r"^config.audit.measure_n must be an integer >= 1 "
                     r"\(noise samples\), got 0"):
    smoothing.check_sampling(sigma=0.25, n=0, chunk_size=4, name_n="config.audit.measure_n")
  with pytest.raises(ValueError, match="^chunk_size must be an integer >= 1"):
    smoothing.check_sampling(sigma=0.25, n=10, chunk_size=2.5)


# ----------------------------------------------------------------- check_images (encoders)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_check_images_accepts_every_float_dtype(dtype):
  x = np.linspace(0.0, 1.0, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
  encoders.check_images(x)  # float64
  encoders.check_images(jnp.asarray(x, dtype))
  encoders.check_images(np.asarray(jnp.asarray(x, dtype)))  # numpy's view of ml_dtypes


@pytest.mark.parametrize("x, match", [
    (jnp.full((1, 4, 4, 3), 2.0, jnp.bfloat16), r"must lie in \[0, 1\] pixel space, got range "
     r"\[2, 2\]\. It looks like 0..255"),
    (jnp.full((1, 4, 4, 3), -0.5, jnp.float16), r"got range \[-0.5, -0.5\]"),
    (jnp.full((1, 4, 4, 3), jnp.nan, jnp.bfloat16), "NaN or Inf pixels"),
    (np.zeros((1, 4, 4, 3), np.uint8), r"floating-point pixels .*bfloat16.*got dtype uint8"),
    (np.zeros((0, 4, 4, 3), np.float32), r"^x is empty \(shape \(0, 4, 4, 3\)\)"),
    (np.zeros((2, 0, 4, 3), np.float32), r"^x is empty"),
])
def test_check_images_rejects_with_a_true_message(x, match):
  with pytest.raises(ValueError, match=match):
    encoders.check_images(x)
