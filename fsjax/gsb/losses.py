"""The training losses of GSB (Section 4, Eq. 7-9 and 11-13), as pure functions of arrays.

The composed losses take the already computed arrays (denoised images, features), not
the networks, so that a training step chooses how to run D, g and M (and how many Monte
Carlo noise draws per image) and the maths stays testable on tiny arrays. With ``n``
noise draws per image, flatten them into the batch axis and repeat the clean targets
(``jnp.repeat(z_clean, n, axis=0)``).

Conventions (the paper writes ``||.||^2`` and "MSE" without normalisation):

* Squared-norm losses (L_rec, L_id, L_stat) are MEANS over elements (mean squared
  error), so their size does not depend on the resolution or on N x D, and one set of
  weights suits every encoder. Appendix A.2.1 calls L_rec an MSE objective.
* Cosine losses (L_rob, L_mrob) are means over the batch of ``1 - cos``, the cosine taken
  over the whole flattened feature ``[N * D]``: the unit feature ``f`` the certificate
  sees (method.md section 1). Note ``L_rob = 2 (1 - S)`` with S the Gaussian robustness
  score (Eq. 5) when the inputs are ``D(x + delta)`` and ``x``.
* Every composed loss returns ``(loss, parts)``, ``parts`` a dict of its terms for logging.

Default weights (the paper does not print lambda, lambda1, lambda2; ours, also in
``fsjax.gsb.default_gsb_config``): ``lam_rob = 1``: L_rob is the quantity the
certificate depends on, L_rec (an MSE of order 1e-3 at sigma = 0.25) keeps D's output a
faithful image; ``lam_id = 1``; ``lam_stat = 0.1``, a light hold on the feature
distribution next to the main objective L_mrob.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

LAM_ROB = 1.0
LAM_ID = 1.0
LAM_STAT = 0.1


def _check_same_shape(a: jax.Array, b: jax.Array, names: str) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{names} must have the same shape, got {a.shape} and {b.shape}; with "
                     "n noise draws per image repeat the clean target n times along the "
                     "batch axis.")


def _cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine over everything but the batch axis: ``[B, ...]`` x2 -> ``[B]`` float32."""
  a = a.reshape(a.shape[0], -1).astype(jnp.float32)
  b = b.reshape(b.shape[0], -1).astype(jnp.float32)
  # Floored norms (zero gradient below the floor) keep zero features NaN-free.
  na = jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=-1), 1e-24))
  nb = jnp.sqrt(jnp.maximum(jnp.sum(b * b, axis=-1), 1e-24))
  return jnp.sum(a * b, axis=-1) / (na * nb)


def reconstruction_loss(denoised: ArrayLike, clean: ArrayLike) -> jax.Array:
  """L_rec = E ||D(x + delta, sigma) - x||^2 (Eq. 7), as a mean squared error.

  Args:
    denoised: ``[B, H, W, 3]`` denoiser outputs D(x + delta, sigma).
    clean: ``[B, H, W, 3]`` clean images x.

  Returns:
    Scalar float32: the mean over all pixels and images of the squared error.
  """
  denoised, clean = jnp.asarray(denoised), jnp.asarray(clean)
  _check_same_shape(denoised, clean, "denoised and clean")
  return jnp.mean(jnp.square(denoised.astype(jnp.float32) - clean.astype(jnp.float32)))


def robustness_loss(f_denoised: ArrayLike, f_clean: ArrayLike) -> jax.Array:
  """L_rob = E [1 - cos(f(D(x + delta, sigma)), f(x))] (Eq. 8).

  Args:
    f_denoised: ``[B, ...]`` features of the denoised images (unit or raw: the cosine
      normalises, over the flattened trailing axes).
    f_clean: ``[B, ...]`` features of the clean images, same shape.

  Returns:
    Scalar float32 in [0, 2]: the batch mean of ``1 - cos``.
  """
  f_denoised, f_clean = jnp.asarray(f_denoised), jnp.asarray(f_clean)
  _check_same_shape(f_denoised, f_clean, "f_denoised and f_clean")
  return jnp.mean(1.0 - _cosine(f_denoised, f_clean))


def denoiser_loss(denoised: ArrayLike, clean: ArrayLike, f_denoised: ArrayLike,
                  f_clean: ArrayLike, *, lam_rob: float = LAM_ROB
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_D = L_rec + lam_rob * L_rob (Eq. 9), the denoiser's training loss.

  Args:
    denoised: ``[B, H, W, 3]`` D(x + delta, sigma).
    clean: ``[B, H, W, 3]`` x.
    f_denoised: ``[B, ...]`` f(D(x + delta, sigma)), the frozen encoder's features.
    f_clean: ``[B, ...]`` f(x).
    lam_rob: lambda of Eq. 9 (the paper does not print it; default 1).

  Returns:
    ``(loss, {"rec": L_rec, "rob": L_rob})``, scalars float32.
  """
  rec = reconstruction_loss(denoised, clean)  # Eq. 7
  rob = robustness_loss(f_denoised, f_clean)  # Eq. 8
  return rec + lam_rob * rob, {"rec": rec, "rob": rob}  # Eq. 9


def mapper_robustness_loss(mapped_noisy: ArrayLike, z_clean: ArrayLike) -> jax.Array:
  """L_mrob = E [1 - cos(M(z_noisy, sigma), z_clean)] (Eq. 11).

  The cosine is over the flattened ``[N * D]`` feature (the unit feature the
  certificate sees), not per token.

  Args:
    mapped_noisy: ``[B, N, D]`` M(g(D(x + delta)), sigma).
    z_clean: ``[B, N, D]`` g(x).

  Returns:
    Scalar float32 in [0, 2].
  """
  mapped_noisy, z_clean = jnp.asarray(mapped_noisy), jnp.asarray(z_clean)
  _check_same_shape(mapped_noisy, z_clean, "mapped_noisy and z_clean")
  return jnp.mean(1.0 - _cosine(mapped_noisy, z_clean))


def identity_loss(mapped_clean: ArrayLike, z_clean: ArrayLike) -> jax.Array:
  """L_id = ||M(z_clean, 0) - z_clean||^2 (Eq. 12), as a mean over elements.

  For ``fsjax.gsb.SmoothnessMapper`` M(z, 0) = z exactly, so at sigma = 0 this term is
  identically zero (kept for fidelity to the paper and for other mappers; a trainer may
  evaluate M on clean features at a sigma > 0 instead: ``config.gsb.mapper.id_sigma``).

  Args:
    mapped_clean: ``[B, N, D]`` M(z_clean, sigma_id).
    z_clean: ``[B, N, D]`` g(x).

  Returns:
    Scalar float32.
  """
  mapped_clean, z_clean = jnp.asarray(mapped_clean), jnp.asarray(z_clean)
  _check_same_shape(mapped_clean, z_clean, "mapped_clean and z_clean")
  return jnp.mean(jnp.square(mapped_clean.astype(jnp.float32) - z_clean.astype(jnp.float32)))


def statistics_loss(mapped_noisy: ArrayLike, z_clean: ArrayLike) -> jax.Array:
  """L_stat = ||mean(M(z_noisy)) - mean(z_clean)||^2 + ||std(M(z_noisy)) - std(z_clean)||^2.

  The statistical term of Eq. 12 (the paper's Eq. 12 defines L_id and L_stat together;
  Eq. 13 is L_M, "the objective defined in Equation 13", Appendix A.2.2). Moments are
  taken over the batch axis, element-wise for each (token, channel) (method.md section
  4); std is the population std (ddof = 0); each squared norm is a mean over the N x D
  elements. The two batches may differ in size (e.g. several noise draws per image).

  Args:
    mapped_noisy: ``[B1, N, D]`` M(z_noisy, sigma).
    z_clean: ``[B2, N, D]`` g(x).

  Returns:
    Scalar float32.
  """
  mapped_noisy = jnp.asarray(mapped_noisy).astype(jnp.float32)
  z_clean = jnp.asarray(z_clean).astype(jnp.float32)
  if mapped_noisy.shape[1:] != z_clean.shape[1:]:
    raise ValueError(f"mapped_noisy and z_clean must agree after the batch axis, got "
                     f"{mapped_noisy.shape} and {z_clean.shape}.")

  def moments(z):
    mean = jnp.mean(z, axis=0)
    var = jnp.mean(jnp.square(z - mean), axis=0)
    # Floored sqrt: a zero variance (B = 1, constant channel) has a zero, not NaN, gradient.
    return mean, jnp.sqrt(jnp.maximum(var, 1e-12))

  mean_m, std_m = moments(mapped_noisy)
  mean_c, std_c = moments(z_clean)
  return jnp.mean(jnp.square(mean_m - mean_c)) + jnp.mean(jnp.square(std_m - std_c))


def mapper_loss(mapped_noisy: ArrayLike, mapped_clean: ArrayLike, z_clean: ArrayLike, *,
                lam_id: float = LAM_ID, lam_stat: float = LAM_STAT
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_M = L_mrob + lam_id * L_id + lam_stat * L_stat (Eq. 13), the mapper's loss.

  Args:
    mapped_noisy: ``[B, N, D]`` M(z_noisy, sigma), z_noisy = g(D(x + delta)).
    mapped_clean: ``[B, N, D]`` M(z_clean, 0) (Eq. 12).
    z_clean: ``[B, N, D]`` g(x).
    lam_id: lambda_1 (the paper does not print it; default 1).
    lam_stat: lambda_2 (the paper does not print it; default 0.1).

  Returns:
    ``(loss, {"mrob": L_mrob, "id": L_id, "stat": L_stat})``, scalars float32.
  """
  mrob = mapper_robustness_loss(mapped_noisy, z_clean)  # Eq. 11
  ident = identity_loss(mapped_clean, z_clean)  # Eq. 12
  stat = statistics_loss(mapped_noisy, z_clean)  # Eq. 12
  return (mrob + lam_id * ident + lam_stat * stat,  # Eq. 13
          {"mrob": mrob, "id": ident, "stat": stat})
