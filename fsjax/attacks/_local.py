"""FOA-Attack's local feature alignment: k-means of the tokens, then optimal transport.

Jia et al. (2025) cluster the patch tokens of the adversarial and of the target image
with k-means and align the two sets of cluster centres by entropic optimal transport with
cost ``1 - cos``. The Sinkhorn solver is ott-jax's; nothing is hand-written here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from ott.geometry import costs
from ott.geometry import pointcloud
from ott.solvers import linear


def _maximin_init(points: jax.Array, num_clusters: int) -> jax.Array:
  """Deterministic k-means++-like init: token 0, then each next centre is the token
  farthest (squared Euclidean) from the centres chosen so far. ``[N, D] -> [k, D]``."""
  d2 = jnp.sum((points - points[0]) ** 2, axis=-1)
  idx = jnp.zeros((num_clusters,), jnp.int32)

  def body(j, carry):
    idx, d2 = carry
    i = jnp.argmax(d2).astype(jnp.int32)
    return idx.at[j].set(i), jnp.minimum(d2, jnp.sum((points - points[i]) ** 2, axis=-1))

  idx, _ = jax.lax.fori_loop(1, num_clusters, body, (idx, d2))
  return points[idx]


def _assign(points: jax.Array, centres: jax.Array) -> jax.Array:
  d2 = jnp.sum((points[:, None, :] - centres[None, :, :]) ** 2, axis=-1)  # [N, k]
  return jnp.argmin(d2, axis=-1)


def _update(points: jax.Array, centres: jax.Array, assignments: jax.Array):
  one_hot = jax.nn.one_hot(assignments, centres.shape[0], dtype=points.dtype)  # [N, k]
  sizes = one_hot.sum(0)
  means = one_hot.T @ points / jnp.maximum(sizes, 1.0)[:, None]
  # An empty cluster keeps its previous centre (it gets zero mass in the transport).
  return jnp.where(sizes[:, None] > 0, means, centres), sizes


@functools.partial(jax.jit, static_argnames=("num_clusters", "iterations"))
def kmeans(points: jax.Array, num_clusters: int, *,
           iterations: int = 20) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Lloyd's k-means of one token set; gradients flow through the means only.

  Initialisation is deterministic (:func:`_maximin_init`), then ``iterations`` rounds
  of (assign each token to its nearest centre, move each centre to its tokens' mean).
  Assignments are computed on ``stop_gradient(points)``: they are piecewise constant
  anyway, and the centres returned are the differentiable means of the points in the
  final assignment, as in FOA-Attack's reference code.

  Args:
    points: ``[N, D]`` tokens.
    num_clusters: k (static), ``1 <= k <= N``.
    iterations: Lloyd rounds (static), >= 1.

  Returns:
    ``(centres [k, D], sizes [k] float, assignments [N] int32)``.
  """
  frozen = jax.lax.stop_gradient(points)
  centres = _maximin_init(frozen, num_clusters)

  def body(_, centres):
    return _update(frozen, centres, _assign(frozen, centres))[0]

  centres = jax.lax.fori_loop(0, iterations - 1, body, centres)
  assignments = _assign(frozen, centres)
  centres, sizes = _update(points, jax.lax.stop_gradient(centres), assignments)
  return centres, sizes, assignments.astype(jnp.int32)


def transport_cost(centres_a: jax.Array, weights_a: jax.Array, centres_b: jax.Array,
                   weights_b: jax.Array, *, epsilon: float = 0.1) -> jax.Array:
  """Entropic OT cost between two weighted point sets under the cosine distance.

  ``<P, C>`` with ``C_ij = 1 - cos(a_i, b_j)`` and P the Sinkhorn plan (ott-jax,
  regularisation ``epsilon``) between the weights. P is held constant in the gradient
  (computed from stopped inputs), as FOA-Attack does; the gradient flows through C.

  Args:
    centres_a: ``[k, D]``.
    weights_a: ``[k]`` non-negative, summing to 1.
    centres_b: ``[l, D]``.
    weights_b: ``[l]`` non-negative, summing to 1.
    epsilon: entropic regularisation (absolute, on costs in [0, 2]).

  Returns:
    Scalar transport cost in [0, 2].
  """
  stop = jax.lax.stop_gradient
  geom = pointcloud.PointCloud(stop(centres_a), stop(centres_b), cost_fn=costs.Cosine(),
                               epsilon=epsilon)
  plan = linear.solve(geom, stop(weights_a), stop(weights_b), threshold=1e-5,
                      max_iterations=5000).matrix
  cost = pointcloud.PointCloud(centres_a, centres_b, cost_fn=costs.Cosine()).cost_matrix
  return jnp.sum(stop(plan) * cost)


@functools.partial(jax.jit, static_argnames=("num_clusters", "iterations"))
def local_alignment_loss(tokens_adv: jax.Array, tokens_target: jax.Array, *,
                         num_clusters: int = 10, iterations: int = 20,
                         epsilon: float = 0.1) -> jax.Array:
  """FOA's local loss: OT cost between the k-means centres of two token sets.

  Each image's tokens are clustered (:func:`kmeans`, k = min(num_clusters, N)); the
  centres carry the cluster sizes, normalised, as transport weights (FOA's code uses
  uniform weights; sizes let an empty or tiny cluster count for nothing or little).

  Args:
    tokens_adv: ``[B, N, D]`` tokens of the (cropped) adversarial images.
    tokens_target: ``[B, M, D]`` tokens of the (cropped) target images.
    num_clusters: k (static).
    iterations: Lloyd rounds (static).
    epsilon: Sinkhorn regularisation.

  Returns:
    ``[B]`` transport costs, to minimise.
  """
  def one(a, b):
    ca, sa, _ = kmeans(a, min(num_clusters, a.shape[0]), iterations=iterations)
    cb, sb, _ = kmeans(b, min(num_clusters, b.shape[0]), iterations=iterations)
    return transport_cost(ca, sa / sa.sum(), cb, sb / sb.sum(), epsilon=epsilon)

  return jax.vmap(one)(tokens_adv.astype(jnp.float32), tokens_target.astype(jnp.float32))
