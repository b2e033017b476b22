"""Projected gradient descent in feature space, and AttackVLM (MF-ii) on top of it."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from fsjax import encoders as encoders_lib
from fsjax.attacks import _common

# A loss maps (features of x_adv [B, F], reference features [B, F]) to [B] values the
# attacker *minimises*. The reference is f(target) for a targeted attack, else f(x).
LossFn = Callable[[jax.Array, jax.Array], jax.Array]


def _cosine_untargeted(f_adv: jax.Array, f_ref: jax.Array) -> jax.Array:
  # Push the adversarial feature away from the clean one: minimise the FCS.
  return _common.cosine(f_adv, f_ref)


def _cosine_targeted(f_adv: jax.Array, f_ref: jax.Array) -> jax.Array:
  # Pull the adversarial feature onto the target's: maximise cos(f(x_adv), f(target)).
  return -_common.cosine(f_adv, f_ref)


def pgd(params: Any, x: jax.typing.ArrayLike, target: jax.typing.ArrayLike | None = None, *,
        encoder: encoders_lib.Encoder, loss: str | LossFn = "cosine", norm: str = "linf",
        eps: float = 16 / 255, step_size: float = 1 / 255, steps: int = 300,
        key: jax.Array | None = None, sigma: Any = None, eot_samples: int = 0,
        random_start: bool = True) -> jax.Array:
  """Feature-space PGD (Madry et al. 2018) on one encoder, optionally through its smoothing.

  Untargeted (``target=None``): minimise ``cos(f(x_adv), f(x))``, the feature cosine
  similarity (FCS) the paper reports. Targeted: maximise ``cos(f(x_adv), f(target))``.
  Each step is a sign step (l_inf) or a normalised-gradient step (l2) of size
  ``step_size``, then a projection onto the eps-ball around ``x`` and onto [0, 1]. The
  last iterate is returned.

  Adaptive attack on the smoothed encoder (EOT, Athalye et al. 2018): with ``sigma`` and
  ``eot_samples = m > 0`` the feature in the objective is the Monte Carlo smoothed
  ``mean_j f(x_adv + delta_j)``, delta_j ~ N(0, sigma^2 I), with fresh noise every step
  (``key`` folded with the step index); the reference feature is smoothed the same way,
  once, with its own noise. The encoder is always called with ``sigma=sigma``, so a
  GSB-boosted encoder is attacked white-box through its denoiser and mapper.

  Args:
    params: the encoder's parameters (for a GSB encoder ``{"encoder", "denoiser",
      "mapper"}``).
    x: ``[B, H, W, 3]`` clean images in [0, 1].
    target: ``[B, H', W', 3]`` target images in [0, 1], or None (untargeted).
    encoder: the ``fsjax.encoders.Encoder`` under attack (static under jit).
    loss: ``"cosine"`` or a hashable ``loss(f_adv [B, F], f_ref [B, F]) -> [B]`` to
      minimise, f_ref being the features of ``target`` if given, else of ``x``.
    norm: ``"linf"`` or ``"l2"`` (l2 over all pixels of an image).
    eps: perturbation budget, >= 0, in [0, 1] pixel units.
    step_size: step length (per pixel for l_inf, of the whole step for l2).
    steps: number of steps, >= 1.
    key: PRNG key; needed for ``random_start`` or EOT.
    sigma: smoothing noise level, or None.
    eot_samples: m, noise draws per step (0 = no EOT).
    random_start: start from a uniform random point of the eps-ball.

  Returns:
    ``[B, H, W, 3]`` adversarial images, ``||x_adv - x|| <= eps``, in [0, 1].
  """
  _common.check_budget(eps=eps, step_size=step_size, steps=steps, norm=norm)
  _common.check_smoothing(sigma=sigma, eot_samples=eot_samples)
  encoders_lib.check_images(x)
  if not isinstance(encoder, encoders_lib.Encoder):
    raise ValueError(f"pgd attacks one encoder; got {type(encoder).__name__}. For an "
                     "ensemble use mattack or foa.")
  if target is not None:
    _common.check_target(x, target)
  if isinstance(loss, str):
    if loss != "cosine":
      raise ValueError(f"loss={loss!r} is not a known loss; use 'cosine' or a callable.")
    loss_fn = _cosine_untargeted if target is None else _cosine_targeted
  elif callable(loss):
    loss_fn = loss
  else:
    raise ValueError(f"loss must be 'cosine' or a callable, got {type(loss).__name__}.")
  if random_start or eot_samples > 0:
    _common.check_key(key, why="random_start=True or eot_samples > 0")
  else:
    key = jax.random.key(0)  # Unused: the attack is deterministic.
  x = jnp.asarray(x, jnp.float32)
  ref = x if target is None else jnp.asarray(target, jnp.float32)
  return _pgd(params, x, ref, key, eps, step_size, sigma, encoder=encoder, loss_fn=loss_fn,
              norm=norm, steps=int(steps), eot_samples=int(eot_samples),
              random_start=bool(random_start))


@functools.partial(jax.jit, static_argnames=(
    "encoder", "loss_fn", "norm", "steps", "eot_samples", "random_start"))
def _pgd(params, x, ref, key, eps, step_size, sigma, *, encoder, loss_fn, norm, steps,
         eot_samples, random_start):
  ref_key, start_key, loop_key = jax.random.split(key, 3)
  f_ref = jax.lax.stop_gradient(_common.smoothed_features(
      encoder, params, ref, sigma=sigma, eot_samples=eot_samples, key=ref_key))

  def objective(x_adv, step_key):
    f_adv = _common.smoothed_features(encoder, params, x_adv, sigma=sigma,
                                      eot_samples=eot_samples, key=step_key)
    # Summed over the batch: images do not interact, so each gets its own gradient.
    return jnp.sum(loss_fn(f_adv, f_ref))

  def body(t, x_adv):
    grad = jax.grad(objective)(x_adv, jax.random.fold_in(loop_key, t))
    return _common.project(_common.descent_step(x_adv, grad, step_size, norm), x, eps, norm)

  x0 = _common.random_start(start_key, x, eps, norm) if random_start else x
  return jax.lax.fori_loop(0, steps, body, x0)


def attackvlm(params: Any, x: jax.typing.ArrayLike, target: jax.typing.ArrayLike, *,
              encoder: encoders_lib.Encoder, eps: float = 16 / 255,
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
    params, x, encoder, eps, step_size, steps, key, sigma, eot_samples: as :func:`pgd`.
    target: ``[B, H', W', 3]`` target images in [0, 1].

  Returns:
    ``[B, H, W, 3]`` adversarial images.
  """
  if target is None:
    raise ValueError("attackvlm is a targeted attack: pass target images.")
  return pgd(params, x, target, encoder=encoder, loss="cosine", norm="linf", eps=eps,
             step_size=step_size, steps=steps, key=key, sigma=sigma,
             eot_samples=eot_samples, random_start=False)
