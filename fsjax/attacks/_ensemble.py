"""M-Attack and FOA-Attack: targeted, crop-augmented attacks on an ensemble of encoders."""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from fsjax import checks
from fsjax import encoders as encoders_lib
from fsjax.attacks import _common
from fsjax.attacks import _crop
from fsjax.attacks import _local


def dynamic_ensemble_weights(current: jax.Array, previous: jax.Array, *,
                             temperature: float = 1.0) -> jax.Array:
  """FOA-Attack's dynamic ensemble weights, as in its released code.

  With ``S_i(t)`` encoder i's objective at step t (a similarity, maximised),
  ``w_i(t) = K softmax_i( (S_i(t) / S_i(t - 1)) / T )``: weights average to 1, an encoder
  whose objective is growing fastest gets the most weight; at the first step the ratio
  is 1 and the weights are equal. The weights are constants in the gradient. (A
  denominator below 1e-8 in magnitude is replaced by 1e-8 with its sign.)

  Args:
    current: ``[K, B]`` objectives at this step.
    previous: ``[K, B]`` objectives at the previous step.
    temperature: T > 0.

  Returns:
    ``[K, B]`` weights, summing to K over axis 0.
  """
  den = jnp.where(jnp.abs(previous) < 1e-8, jnp.where(previous < 0, -1e-8, 1e-8), previous)
  ratio = current / den
  return current.shape[0] * jax.nn.softmax(ratio / temperature, axis=0)


def mattack(params: Any, x: jax.typing.ArrayLike, target: jax.typing.ArrayLike, *,
            encoder: Any, budget: float = 16 / 255, step_size: float = 1 / 255,
            steps: int = 300, key: jax.Array | None = None,
            scale: tuple[float, float] = (0.5, 0.9),
            ratio: tuple[float, float] = (3 / 4, 4 / 3), sigma: Any = None,
            eot_samples: int = 0) -> jax.Array:
  """M-Attack (Li et al. 2025): crop-matching targeted attack on an encoder ensemble.

  Every step draws a fresh RandomResizedCrop of the adversarial image and, independently,
  of the target image (area fraction in ``scale``, aspect in ``ratio``, resized back),
  and takes an l_inf sign step that increases the ensemble mean of
  ``cos(f_i(crop(x_adv)), f_i(crop(target)))``; then projects onto the budget ball and
  [0, 1]. Starts at ``x``. Defaults are the original's: 300 steps of 1/255 within 16/255.
  With ``sigma`` and ``eot_samples > 0`` every feature is Monte Carlo smoothed as in
  :func:`fsjax.attacks.pgd` (adaptive attack on the smoothed encoder).

  References:
    Li et al., A Frustratingly Simple Yet Highly Effective Attack Baseline: Over 90%
    Success Rate Against the Strong Black-box Models of GPT-4.5/4o/o1, 2025.
    https://arxiv.org/abs/2503.10635

  Args:
    params: parameters, or a tuple of them matching an ensemble ``encoder``.
    x: ``[B, H, W, 3]`` clean images in [0, 1].
    target: ``[B, H', W', 3]`` target images in [0, 1].
    encoder: an ``Encoder`` or a tuple of them (the ensemble; static under jit).
    budget: l_inf budget, >= 0.
    step_size: sign-step size.
    steps: number of steps, >= 1.
    key: PRNG key of the crops (and of the EOT noise).
    scale: crop area fraction bounds.
    ratio: crop aspect-ratio bounds.
    sigma: smoothing noise level, or None.
    eot_samples: noise draws per feature (0 = no EOT).

  Returns:
    ``[B, H, W, 3]`` adversarial images.
  """
  return _run(params, x, target, encoder=encoder, budget=budget, step_size=step_size,
              steps=steps, key=key, scale=scale, ratio=ratio, sigma=sigma,
              eot_samples=eot_samples, local_weight=0.0, num_clusters=1,
              kmeans_iterations=1, ot_epsilon=0.1, dynamic_weights=False)


def foa(params: Any, x: jax.typing.ArrayLike, target: jax.typing.ArrayLike, *,
        encoder: Any, budget: float = 16 / 255, step_size: float = 1 / 255, steps: int = 300,
        key: jax.Array | None = None, scale: tuple[float, float] = (0.5, 0.9),
        ratio: tuple[float, float] = (3 / 4, 4 / 3), num_clusters: int = 10,
        kmeans_iterations: int = 20, local_weight: float = 0.2, ot_epsilon: float = 0.1,
        dynamic_weights: bool = True, sigma: Any = None, eot_samples: int = 0) -> jax.Array:
  """FOA-Attack (Jia et al. 2025): M-Attack plus optimal-transport local alignment.

  Per encoder i and step, on fresh independent crops of the adversarial and target
  images, the objective (maximised) is ``S_i = cos(f_i(adv), f_i(tgt)) + local_weight *
  (1 - OT_i)``, with ``OT_i`` the cosine transport cost between the k-means centres of
  the two images' tokens (:func:`fsjax.attacks.local_alignment_loss`); ``1 - OT_i`` is
  FOA's ``<P, cos>`` similarity because the plan P sums to 1. The ensemble objective is
  ``mean_i w_i S_i`` with :func:`dynamic_ensemble_weights` (or w = 1 if
  ``dynamic_weights=False``). l_inf sign steps, start at ``x``, projection onto the
  budget ball and [0, 1] each step. Defaults are the paper's: 10 clusters, local weight
  0.2, Sinkhorn epsilon 0.1, 300 steps of 1/255 within 16/255.

  Departures from the reference code, all documented: k-means starts from a
  deterministic maximin init and runs ``kmeans_iterations`` Lloyd rounds (the original
  draws a random init and runs to convergence); transport weights are the normalised
  cluster sizes (the original: uniform); the projection onto [0, 1] happens every step
  (the original clips once at the end).

  References:
    Jia et al., Adversarial Attacks against Closed-Source MLLMs via Feature Optimal
    Alignment, NeurIPS 2025. https://arxiv.org/abs/2505.21494

  Args:
    params, x, target, encoder, budget, step_size, steps, key, scale, ratio, sigma,
      eot_samples: as :func:`mattack`.
    num_clusters: k of the k-means (clamped to the number of tokens).
    kmeans_iterations: Lloyd rounds, >= 1.
    local_weight: weight of the local (OT) term, >= 0.
    ot_epsilon: Sinkhorn entropic regularisation, > 0.
    dynamic_weights: use FOA's dynamic ensemble weights.

  Returns:
    ``[B, H, W, 3]`` adversarial images.
  """
  checks.check_positive_int(num_clusters, name="num_clusters",
                            meaning="k-means clusters of the local alignment")
  checks.check_positive_int(kmeans_iterations, name="kmeans_iterations",
                            meaning="k-means iterations")
  if not isinstance(local_weight, numbers.Real) or not local_weight >= 0:
    raise ValueError(f"local_weight={local_weight!r} must be a real number >= 0.")
  if not isinstance(ot_epsilon, numbers.Real) or not ot_epsilon > 0:
    raise ValueError(f"ot_epsilon={ot_epsilon!r} must be > 0 (paper: 0.1).")
  return _run(params, x, target, encoder=encoder, budget=budget, step_size=step_size,
              steps=steps, key=key, scale=scale, ratio=ratio, sigma=sigma,
              eot_samples=eot_samples, local_weight=float(local_weight),
              num_clusters=int(num_clusters), kmeans_iterations=int(kmeans_iterations),
              ot_epsilon=float(ot_epsilon), dynamic_weights=bool(dynamic_weights))


def _run(params, x, target, *, encoder, budget, step_size, steps, key, scale, ratio, sigma,
         eot_samples, local_weight, num_clusters, kmeans_iterations, ot_epsilon,
         dynamic_weights):
  """Validates everything (before jit), then runs the jitted loop."""
  _common.check_budget(budget=budget, step_size=step_size, steps=steps, norm="linf")
  _common.check_smoothing(sigma=sigma, eot_samples=eot_samples)
  _crop.check_crop(scale, ratio)
  _common.check_key(key, why="the random crops")
  encoders_lib.check_images(x)
  if target is None:
    raise ValueError("this attack is targeted: pass target images.")
  _common.check_target(x, target)
  encs, params = _common.as_ensemble(encoder, params)
  return _ensemble_attack(
      params, jnp.asarray(x, jnp.float32), jnp.asarray(target, jnp.float32), key, budget,
      step_size, sigma, local_weight, ot_epsilon, encoders=encs, steps=int(steps),
      eot_samples=int(eot_samples), scale=tuple(map(float, scale)),
      ratio=tuple(map(float, ratio)), local=local_weight > 0,
      num_clusters=num_clusters, kmeans_iterations=kmeans_iterations,
      dynamic_weights=dynamic_weights)


@functools.partial(jax.jit, static_argnames=(
    "encoders", "steps", "eot_samples", "scale", "ratio", "local", "num_clusters",
    "kmeans_iterations", "dynamic_weights"))
def _ensemble_attack(params, x, target, key, budget, step_size, sigma, local_weight,
                     ot_epsilon, *, encoders, steps, eot_samples, scale, ratio, local,
                     num_clusters, kmeans_iterations, dynamic_weights):
  b, h, w, _ = x.shape

  def objectives(x_adv, target_crop, boxes, step_key):
    """``[K, B]`` per-encoder similarity objectives S_i of this step (maximised)."""
    adv_crop = _crop.crop_and_resize(x_adv, boxes)
    out = []
    for i, (enc, p) in enumerate(zip(encoders, params)):
      k_adv, k_tgt = jax.random.split(jax.random.fold_in(step_key, i))
      f_adv, t_adv = _common.smoothed_tokens(enc, p, adv_crop, sigma=sigma,
                                             eot_samples=eot_samples, key=k_adv)
      f_tgt, t_tgt = jax.lax.stop_gradient(_common.smoothed_tokens(
          enc, p, target_crop, sigma=sigma, eot_samples=eot_samples, key=k_tgt))
      s = encoders_lib.cosine(f_adv, f_tgt)
      if local:
        s = s + local_weight * (1.0 - _local.local_alignment_loss(
            t_adv, t_tgt, num_clusters=num_clusters, iterations=kmeans_iterations,
            epsilon=ot_epsilon))
      out.append(s)
    return jnp.stack(out)

  def loss(x_adv, previous, target_crop, boxes, step_key):
    s = objectives(x_adv, target_crop, boxes, step_key)
    if dynamic_weights:
      previous = jnp.where(jnp.isnan(previous), s, previous)  # Step 0: ratio 1.
      weights = jax.lax.stop_gradient(dynamic_ensemble_weights(s, previous))
    else:
      weights = jnp.ones_like(s)
    # Minimise the negative weighted ensemble mean; images are independent, so sum.
    return -jnp.sum(jnp.mean(weights * s, axis=0)), jax.lax.stop_gradient(s)

  def body(t, carry):
    x_adv, previous = carry
    k_src, k_tgt, k_noise = jax.random.split(jax.random.fold_in(key, t), 3)
    boxes = _crop.sample_crop_boxes(k_src, b, h, w, scale=scale, ratio=ratio)
    target_crop = _crop.random_resized_crop(k_tgt, target, scale=scale, ratio=ratio)
    grad, s = jax.grad(loss, has_aux=True)(x_adv, previous, target_crop, boxes, k_noise)
    x_adv = _common.project(_common.descent_step(x_adv, grad, step_size, "linf"), x, budget,
                            "linf")
    return x_adv, s

  previous = jnp.full((len(encoders), b), jnp.nan, jnp.float32)
  return jax.lax.fori_loop(0, steps, body, (x, previous))[0]
