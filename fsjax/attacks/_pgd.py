"""Projected gradient descent in feature space, and AttackVLM (MF-ii) on top of it."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from fsjax import encoders as encoders_lib
from fsjax.attacks import _common

# A loss maps (features of x_adv [B, F], reference features [B, F]) to [B] values the
# attacker *minimises*. The reference is f(target) for a targeted attack, the given
# ``reference`` features / direction, else f(x).
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _cosine_untargeted(f_adv: jax.Array, f_ref: jax.Array) -> jax.Array:
  # Push the adversarial feature away from the clean one: minimise the FCS.
  return encoders_lib.cosine(f_adv, f_ref)


def _cosine_targeted(f_adv: jax.Array, f_ref: jax.Array) -> jax.Array:
  # Pull the adversarial feature onto the target's: maximise cos(f(x_adv), f(target)).
  return -encoders_lib.cosine(f_adv, f_ref)


def _inner_product(f_adv: jax.Array, f_ref: jax.Array) -> jax.Array:
  # Push <f_adv, u> down along a fixed direction u: what the feature certificate bounds.
  return jnp.sum(f_adv * f_ref, axis=-1)


def _loss_fn(loss: str | LossFn, *, targeted: bool) -> LossFn:
  if callable(loss):
    return loss
  if loss == "cosine":
    return _cosine_targeted if targeted else _cosine_untargeted
  if loss == "inner_product":
    return _inner_product
  raise ValueError(f"loss={loss!r} is not a known loss; use 'cosine', 'inner_product' or a "
                   "callable loss(f_adv, f_ref) -> [B] to minimise.")


def pgd(params: Any, x: jax.typing.ArrayLike, target: jax.typing.ArrayLike | None = None, *,
        encoder: encoders_lib.Encoder, reference: jax.typing.ArrayLike | None = None,
        loss: str | LossFn = "cosine", norm: str = "linf",
        budget: Any = 16 / 255, step_size: Any = 1 / 255, steps: int = 300,
        key: jax.Array | None = None, sigma: Any = None, eot_samples: int = 0,
        random_start: bool = True) -> jax.Array:
  """Feature-space PGD (Madry et al. 2018) on one encoder, optionally through its smoothing.

  The loss compares the features of ``x_adv`` with reference features f_ref, given in one
  of three ways:

  * untargeted (neither ``target`` nor ``reference``): f_ref = f(x); ``"cosine"``
    minimises ``cos(f(x_adv), f(x))``, the feature cosine similarity (FCS) the paper
    reports;
  * ``target`` images: f_ref = f(target); ``"cosine"`` maximises ``cos(f(x_adv),
    f(target))``;
  * ``reference`` features ``[B, F]`` given as data (no recompilation per batch): e.g.
    the unit direction u of a feature certificate with ``loss="inner_product"``, which
    minimises ``<f(x_adv), u>`` -- the quantity the certificate bounds (the soundness
    audit, ``certify.audit``).

  Each step is a sign step (l_inf) or a normalised-gradient step (l2) of size
  ``step_size``, then a projection onto the budget ball around ``x`` and onto [0, 1]. The
  last iterate is returned. ``budget`` and ``step_size`` are scalars or one per image.

  Adaptive attack on the smoothed encoder (EOT, Athalye et al. 2018): with ``sigma`` and
  ``eot_samples = m > 0`` the feature in the objective is the Monte Carlo smoothed
  ``mean_j f(x_adv + delta_j)``, delta_j ~ N(0, sigma^2 I), with fresh noise every step
  (``key`` folded with the step index); a reference computed from images is smoothed the
  same way, once, with its own noise. The encoder is always called with ``sigma=sigma``,
  so a GSB-boosted encoder is attacked white-box through its denoiser and mapper.

  Args:
    params: the encoder's parameters (for a GSB encoder ``{"encoder", "denoiser",
      "mapper"}``).
    x: ``[B, H, W, 3]`` clean images in [0, 1].
    target: ``[B, H', W', 3]`` target images in [0, 1], or None.
    encoder: the ``fsjax.encoders.Encoder`` under attack (static under jit).
    reference: ``[B, F]`` reference features (exclusive with ``target``), or None.
    loss: ``"cosine"``, ``"inner_product"`` or a hashable ``loss(f_adv [B, F], f_ref
      [B, F]) -> [B]`` to minimise.
    norm: ``"linf"`` or ``"l2"`` (l2 over all pixels of an image).
    budget: perturbation budget, >= 0, in [0, 1] pixel units (scalar or ``[B]``).
    step_size: step length (per pixel for l_inf, of the whole step for l2; scalar or
      ``[B]``).
    steps: number of steps, >= 1.
    key: PRNG key; needed for ``random_start`` or EOT.
    sigma: smoothing noise level, or None.
    eot_samples: m, noise draws per step (0 = no EOT).
    random_start: start from a uniform random point of the budget ball.

  Returns:
    ``[B, H, W, 3]`` adversarial images, ``||x_adv - x|| <= budget``, in [0, 1].
  """
  encoders_lib.check_images(x)
  batch = int(np.shape(x)[0])
  _common.check_budget(budget=budget, step_size=step_size, steps=steps, norm=norm,
                       batch=batch)
  _common.check_smoothing(sigma=sigma, eot_samples=eot_samples)
  if not isinstance(encoder, encoders_lib.Encoder):
    raise ValueError(f"pgd attacks one encoder; got {type(encoder).__name__}. For an "
                     "ensemble use mattack or foa.")
  if target is not None and reference is not None:
    raise ValueError("pass target images or reference features, not both.")
  if target is not None:
    _common.check_target(x, target)
  if reference is not None and np.shape(reference)[:1] != (batch,):
    raise ValueError(f"reference must be [B={batch}, F] features, one per image, got shape "
                     f"{np.shape(reference)}.")
  loss_fn = _loss_fn(loss, targeted=target is not None)
  if random_start or eot_samples > 0:
    _common.check_key(key, why="random_start=True or eot_samples > 0")
  else:
    key = jax.random.key(0)  # Unused: the attack is deterministic.
  x = jnp.asarray(x, jnp.float32)
  budget, step_size = _common.per_image(budget, batch), _common.per_image(step_size, batch)
  if reference is not None:
    return _pgd_features(params, x, jnp.asarray(reference, jnp.float32), key, budget,
                         step_size, sigma, encoder=encoder, loss_fn=loss_fn, norm=norm,
                         steps=int(steps), eot_samples=int(eot_samples),
                         random_start=bool(random_start))
  ref = x if target is None else jnp.asarray(target, jnp.float32)
  return _pgd(params, x, ref, key, budget, step_size, sigma, encoder=encoder,
              loss_fn=loss_fn, norm=norm, steps=int(steps), eot_samples=int(eot_samples),
              random_start=bool(random_start))


_STATIC = ("encoder", "loss_fn", "norm", "steps", "eot_samples", "random_start")


def _descend(params, x, f_ref, start_key, loop_key, budget, step_size, sigma, *, encoder,
             loss_fn, norm, steps, eot_samples, random_start):
  """The PGD loop against fixed reference features ``f_ref`` ``[B, F]``."""

  def objective(x_adv, step_key):
    f_adv = _common.smoothed_features(encoder, params, x_adv, sigma=sigma,
                                      eot_samples=eot_samples, key=step_key)
    # Summed over the batch: images do not interact, so each gets its own gradient.
    return jnp.sum(loss_fn(f_adv, f_ref))

  def body(t, x_adv):
    grad = jax.grad(objective)(x_adv, jax.random.fold_in(loop_key, t))
    return _common.project(_common.descent_step(x_adv, grad, step_size, norm), x, budget,
                           norm)

  x0 = _common.random_start(start_key, x, budget, norm) if random_start else x
  return jax.lax.fori_loop(0, steps, body, x0)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _pgd(params, x, ref, key, budget, step_size, sigma, **static):
  ref_key, start_key, loop_key = jax.random.split(key, 3)
  f_ref = jax.lax.stop_gradient(_common.smoothed_features(
      static["encoder"], params, ref, sigma=sigma, eot_samples=static["eot_samples"],
      key=ref_key))
  return _descend(params, x, f_ref, start_key, loop_key, budget, step_size, sigma, **static)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _pgd_features(params, x, f_ref, key, budget, step_size, sigma, **static):
  start_key, loop_key = jax.random.split(key)
  return _descend(params, x, f_ref, start_key, loop_key, budget, step_size, sigma, **static)


def attackvlm(params: Any, x: jax.typing.ArrayLike, target: jax.typing.ArrayLike, *,
              encoder: encoders_lib.Encoder, budget: float = 16 / 255,
              step_size: float = 1 / 255, steps: int = 300, key: jax.Array | None = None,
              sigma: Any = None, eot_samples: int = 0) -> jax.Array:
  """AttackVLM, its MF-ii variant (Zhao et al. 2023): match the target image's feature.

  Maximises ``cos(f(x_adv), f(target))`` with l_inf sign steps from ``x_adv = x`` (no
  random start), 300 steps of 1/255 within 16/255, as the original. This is
  :func:`pgd` with ``target``, ``norm="linf"``, ``random_start=False``; ``sigma`` and
  ``eot_samples`` make it adaptive to smoothing as there.

  References:
    Zhao et al., On Evaluating Adversarial Robustness of Large Vision-Language Models,
    NeurIPS 2023. https://arxiv.org/abs/2305.16934

  Args:
    params, x, encoder, budget, step_size, steps, key, sigma, eot_samples: as :func:`pgd`.
    target: ``[B, H', W', 3]`` target images in [0, 1].

  Returns:
    ``[B, H, W, 3]`` adversarial images.
  """
  if target is None:
    raise ValueError("attackvlm is a targeted attack: pass target images.")
  return pgd(params, x, target, encoder=encoder, loss="cosine", norm="linf", budget=budget,
             step_size=step_size, steps=steps, key=key, sigma=sigma,
             eot_samples=eot_samples, random_start=False)
