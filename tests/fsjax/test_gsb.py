"""Tests of fsjax.gsb: the denoiser, the smoothness mapper, the losses, BoostedEncoder."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from fsjax import encoders
from fsjax import gsb


# "rbg" keys: the same tests, but jitted inits compile about 4x faster on CPU than threefry.
key = lambda seed: jax.random.key(seed, impl="rbg")

B, SIDE, N, DIM = 4, 8, 3, 8  # one set of shapes throughout, so compilations are reused
TINY_DENOISER = dict(width=8, channel_mults=(1, 2), blocks_per_level=1, emb_dim=16,
                     num_groups=4)
TINY_MAPPER = dict(num_blocks=2, num_heads=2, mlp_ratio=2.0, kernel_size=3, sigma_hidden=4)


def n_params(tree) -> int:
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def normal(seed, shape):
  """Test data from numpy (eager jax.random would compile once per shape)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def uniform(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def perturb(params, seed, scale=0.5):
  """Adds N(0, scale^2) to every parameter (damping included)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: (np.asarray(a) + scale * rng.normal(size=a.shape)).astype(np.float32), params)


@dataclasses.dataclass(frozen=True, eq=False)
class LinearEncoder(encoders.Encoder):
  """Toy frozen encoder: a fixed linear map of the flattened image to N tokens of dim D."""

  num_tokens: int = N
  dim: int = DIM

  def tokens(self, params, x, *, sigma=None):
    x = encoders.resize(x, self.resolution)
    z = x.reshape(x.shape[0], -1) @ params
    return z.reshape(x.shape[0], self.num_tokens, self.dim)

  def init(self, seed):
    return normal(seed, (self.resolution**2 * 3, self.num_tokens * self.dim))


@pytest.fixture(scope="module")
def tiny_denoiser():
  d = gsb.Denoiser(**TINY_DENOISER)
  return d, jax.jit(d.init)(key(0), jnp.zeros((B, SIDE, SIDE, 3)), 0.1)["params"]


@pytest.fixture(scope="module")
def tiny_mapper():
  m = gsb.SmoothnessMapper(**TINY_MAPPER)
  return m, jax.jit(m.init)(key(0), jnp.zeros((B, N, DIM)), 0.1)["params"]


# ---------------------------------------------------------------------------------------
# Denoiser.
# ---------------------------------------------------------------------------------------


def test_denoiser_default_size_and_shapes():
  d = gsb.build_denoiser(ml_collections.ConfigDict())
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  params = jax.eval_shape(d.init, key(0), x, 0.25)
  megabytes = 4 * n_params(params) / 1e6  # float32
  assert 8.0 < megabytes < 12.0, megabytes
  out = jax.eval_shape(d.apply, params, x, jnp.zeros(2))
  assert out.shape == (2, 224, 224, 3) and out.dtype == jnp.float32


def test_denoiser_is_identity_at_init(tiny_denoiser):
  d, params = tiny_denoiser
  apply = jax.jit(d.apply)
  x = uniform(1, (B, SIDE, SIDE, 3)) + 0.2  # leaves [0, 1]
  # The output conv is zero-initialised: D starts as x_noisy + 0.
  np.testing.assert_array_equal(apply({"params": params}, x, jnp.full((B,), 0.3)), x)
  out = apply({"params": perturb(params, 2, 0.05)}, x, jnp.full((B,), 0.3))
  assert np.all(np.isfinite(out)) and not np.allclose(out, x)


def test_denoiser_rejects_bad_shapes():
  d = gsb.Denoiser(**TINY_DENOISER)
  with pytest.raises(ValueError, match="divisible by 2"):
    jax.eval_shape(d.init, key(0), jnp.zeros((1, 7, 8, 3)), 0.1)
  with pytest.raises(ValueError, match="sigma"):
    jax.eval_shape(d.init, key(0), jnp.zeros((2, 8, 8, 3)), jnp.zeros(3))


# ---------------------------------------------------------------------------------------
# Mapper.
# ---------------------------------------------------------------------------------------


def test_mapper_parameter_count_by_hand(tiny_mapper):
  _, params = tiny_mapper
  hidden, k, s, blocks = 16, 3, 4, 2
  sigma_mlp = lambda out: (s + s) + (s * out + out)  # Dense(1 -> s), Dense(s -> out)
  per_block = (sigma_mlp(2 * DIM)  # film_in: gamma, beta
               + sigma_mlp(2 * DIM)  # film_out: gamma_c, beta_c
               + sigma_mlp(2)  # a, b
               + (DIM * hidden + hidden + hidden * DIM + DIM)  # MLP
               + (k * DIM + DIM)  # depthwise conv
               + DIM)  # damping lambda_c
  attention = 4 * DIM * DIM + 4 * DIM  # q, k, v, out, first block only
  assert n_params(params) == blocks * per_block + attention == 1316


@pytest.mark.parametrize("num_tokens", [1, 5])
def test_mapper_default_shapes(num_tokens):
  m = gsb.build_mapper(ml_collections.ConfigDict(), token_dim=64)
  z = jax.ShapeDtypeStruct((2, num_tokens, 64), jnp.float32)
  params = jax.eval_shape(m.init, key(0), z, 0.25)["params"]
  assert sorted(params) == ["block_0", "block_1"]  # K = 2
  assert "attention" in params["block_0"] and "attention" not in params["block_1"]
  out = jax.eval_shape(m.apply, {"params": params}, z, jnp.zeros(2))
  assert out.shape == z.shape and out.dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mapper_is_exact_identity_at_sigma_zero(tiny_mapper, dtype):
  m, params = tiny_mapper
  apply = jax.jit(m.clone(dtype=dtype).apply)
  z = 3.0 * normal(1, (B, N, DIM))
  for p in [params, perturb(params, 2, 1.0)]:
    out = apply({"params": p}, z, jnp.zeros(B))
    np.testing.assert_array_equal(out, z)
    assert float(gsb.identity_loss(out, z)) == 0.0
    # Per-example sigma: only the sigma = 0 rows are left unchanged.
    out = apply({"params": p}, z, jnp.array([0.0, 0.5, 0.0, 1.0]))
    np.testing.assert_array_equal(out[::2], z[::2])
    assert np.all(np.any(out[1::2] != z[1::2], axis=(1, 2)))


def test_mapper_gradients_finite_at_sigma_zero(tiny_mapper):
  m, params = tiny_mapper
  params = perturb(params, 3)

  @jax.jit
  @functools.partial(jax.grad, argnums=(0, 1, 2))
  def grads(p, z, sigma):
    return jnp.sum(jnp.sin(m.apply({"params": p}, z, sigma)))

  z = normal(1, (B, N, DIM))
  g_p, g_z, g_s = grads(params, z, jnp.zeros(B))
  for leaf in jax.tree.leaves(g_p):
    # M(z, 0) = z whatever the parameters, so its parameter gradient is exactly 0.
    np.testing.assert_array_equal(leaf, 0.0)
  np.testing.assert_allclose(g_z, np.cos(z), rtol=1e-6)  # d/dz sum(sin(z))
  assert np.all(np.isfinite(g_s))
  # A zero feature (u = 0, LayerNorm of a constant) stays NaN-free at sigma > 0 too.
  g = grads(params, jnp.zeros((B, N, DIM)), jnp.full((B,), 0.3))
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(g))


def test_mapper_works_on_pooled_features(tiny_mapper):
  m, params = tiny_mapper
  z = normal(1, (B, 1, DIM))  # N = 1
  out = jax.jit(m.apply)({"params": perturb(params, 4)}, z, jnp.full((B,), 0.5))
  assert out.shape == z.shape and np.all(np.isfinite(out))


def test_mapper_residual_size_at_init_and_after_perturbing_damping(tiny_mapper):
  m, params = tiny_mapper
  apply = jax.jit(m.apply)
  # Switch block 1 off; block 0 at init has a = b = 1, gamma_c = 1, beta_c = 0, so
  # r = sigma * d * lambda_c with unit d and lambda_c = 1e-3 (Eq. A.31-A.32):
  # ||M(z) - z|| = 1e-3 * sigma per token.
  params = jax.tree.map(lambda a: a, params)
  params["block_1"]["damping"] = jnp.zeros(DIM)
  z = normal(1, (B, N, DIM))
  sigma = jnp.array([0.1, 0.25, 0.5, 1.0])
  r = apply({"params": params}, z, sigma) - z
  np.testing.assert_allclose(np.linalg.norm(r, axis=-1),
                             np.broadcast_to(1e-3 * sigma[:, None], (B, N)), rtol=1e-2)
  params["block_0"]["damping"] = jnp.full((DIM,), 0.5)
  r = apply({"params": params}, z, jnp.full((B,), 0.5)) - z
  np.testing.assert_allclose(np.linalg.norm(r, axis=-1), 0.25, rtol=1e-4)


def test_mapper_rejects_bad_inputs():
  m = gsb.SmoothnessMapper(**TINY_MAPPER)
  with pytest.raises(ValueError, match=r"\[B, N, D\]"):
    jax.eval_shape(m.init, key(0), jnp.zeros((2, 8)), 0.1)
  with pytest.raises(ValueError, match="num_heads"):
    jax.eval_shape(m.init, key(0), jnp.zeros((2, 1, 7)), 0.1)
  with pytest.raises(ValueError, match="num_heads"):
    gsb.build_mapper(ml_collections.ConfigDict(), token_dim=30)  # 4 heads


# ---------------------------------------------------------------------------------------
# Losses, against numpy.
# ---------------------------------------------------------------------------------------


def np_one_minus_cos(a, b):
  a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
  cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
  return np.mean(1 - cos)


def np_stat(m, c):
  return (np.mean((m.mean(0) - c.mean(0)) ** 2) + np.mean((m.std(0) - c.std(0)) ** 2))


RNG = np.random.default_rng(0)
IMG_D, IMG_C = RNG.uniform(size=(3, 4, 4, 3)), RNG.uniform(size=(3, 4, 4, 3))
F_D, F_C = RNG.normal(size=(3, 2, 5)), RNG.normal(size=(3, 2, 5))
Z_M, Z_C, Z_ID = RNG.normal(size=(6, 2, 5)), RNG.normal(size=(6, 2, 5)), RNG.normal(size=(6, 2, 5))


def test_reconstruction_and_robustness_losses():
  np.testing.assert_allclose(gsb.reconstruction_loss(IMG_D, IMG_C),
                             np.sum((IMG_D - IMG_C) ** 2) / IMG_D.size, rtol=1e-6)
  np.testing.assert_allclose(gsb.robustness_loss(F_D, F_C), np_one_minus_cos(F_D, F_C),
                             rtol=1e-6)
  # Cosine over the flattened [N * D] feature: 1 - cos of a vector with itself is 0,
  # with its negative 2, whatever its scale.
  np.testing.assert_allclose(gsb.robustness_loss(3 * F_C, F_C), 0.0, atol=1e-6)
  np.testing.assert_allclose(gsb.robustness_loss(-F_C, F_C), 2.0, rtol=1e-6)
  with pytest.raises(ValueError, match="same shape"):
    gsb.robustness_loss(F_D, F_C[:2])


def test_denoiser_loss():
  loss, parts = gsb.denoiser_loss(IMG_D, IMG_C, F_D, F_C, lam_rob=0.3)
  rec = np.mean((IMG_D - IMG_C) ** 2)
  rob = np_one_minus_cos(F_D, F_C)
  np.testing.assert_allclose(parts["rec"], rec, rtol=1e-6)
  np.testing.assert_allclose(parts["rob"], rob, rtol=1e-6)
  np.testing.assert_allclose(loss, rec + 0.3 * rob, rtol=1e-6)


def test_mapper_losses():
  np.testing.assert_allclose(gsb.mapper_robustness_loss(Z_M, Z_C), np_one_minus_cos(Z_M, Z_C),
                             rtol=1e-6)
  np.testing.assert_allclose(gsb.identity_loss(Z_ID, Z_C), np.mean((Z_ID - Z_C) ** 2),
                             rtol=1e-6)
  np.testing.assert_allclose(gsb.statistics_loss(Z_M, Z_C), np_stat(Z_M, Z_C), rtol=1e-5)
  # Batches of different sizes (noise draws); identical batches have zero loss.
  np.testing.assert_allclose(gsb.statistics_loss(Z_M[:4], Z_C), np_stat(Z_M[:4], Z_C),
                             rtol=1e-5)
  np.testing.assert_allclose(gsb.statistics_loss(Z_C, Z_C), 0.0, atol=1e-12)
  loss, parts = gsb.mapper_loss(Z_M, Z_ID, Z_C, lam_id=0.5, lam_stat=2.0)
  expected = (np_one_minus_cos(Z_M, Z_C) + 0.5 * np.mean((Z_ID - Z_C) ** 2)
              + 2.0 * np_stat(Z_M, Z_C))
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert sorted(parts) == ["id", "mrob", "stat"]


def test_statistics_loss_gradient_finite_for_batch_of_one():
  g = jax.grad(gsb.statistics_loss)(jnp.asarray(Z_M[:1]), jnp.asarray(Z_C))
  assert np.all(np.isfinite(g))


# ---------------------------------------------------------------------------------------
# A few optimiser steps lower L_D and L_M.
# ---------------------------------------------------------------------------------------


def _fit(loss_fn, params, steps, lr):
  opt = optax.adam(lr)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  return losses + [float(loss_fn(params))]


def test_denoiser_training_lowers_denoiser_loss(tiny_denoiser):
  d, d_params = tiny_denoiser
  base = LinearEncoder(resolution=SIDE)
  enc = gsb.BoostedEncoder(base, denoiser=d)
  params = {"encoder": base.init(1), "denoiser": d_params}
  x = uniform(2, (B, SIDE, SIDE, 3))
  sigma = jnp.full((B,), 0.25)
  x_noisy = x + sigma[:, None, None, None] * normal(3, x.shape)
  f_clean = base(params["encoder"], x)

  def loss_fn(trainable):
    p = {**params, "denoiser": trainable}
    denoised = enc.denoise(p, x_noisy, sigma=sigma)  # unclipped, for L_rec (Eq. 7)
    # f(D(x + delta)) as BoostedEncoder computes it, reusing the one forward pass of D.
    f_denoised = base(params["encoder"], jnp.clip(denoised, 0.0, 1.0))
    return gsb.denoiser_loss(denoised, x, f_denoised, f_clean)[0]

  losses = _fit(loss_fn, d_params, steps=15, lr=3e-3)
  assert losses[-1] < 0.8 * losses[0], losses


def test_mapper_training_lowers_mapper_loss(tiny_mapper):
  m, params = tiny_mapper
  # Clean tokens on a 2-D subspace of R^8: noise off it is what M can learn to remove.
  basis = normal(1, (2, DIM))
  z_clean = normal(2, (B, N, 2)) @ basis
  z_noisy = z_clean + 0.5 * normal(3, z_clean.shape)

  sigma = jnp.concatenate([jnp.full((B,), 0.5), jnp.zeros(B)])

  def loss_fn(p):
    # One pass for M(z_noisy, 0.5) and M(z_clean, 0) (Eq. 11-12): sigma is per example.
    mapped = m.apply({"params": p}, jnp.concatenate([z_noisy, z_clean]), sigma)
    return gsb.mapper_loss(mapped[:B], mapped[B:], z_clean)[0]

  losses = _fit(loss_fn, params, steps=30, lr=1e-2)
  assert losses[-1] < 0.8 * losses[0], losses


# ---------------------------------------------------------------------------------------
# BoostedEncoder and the config.
# ---------------------------------------------------------------------------------------


def test_boosted_without_modules_is_the_base_encoder():
  base = LinearEncoder(resolution=SIDE)
  enc = gsb.BoostedEncoder(base)
  w = base.init(0)
  x = uniform(1, (B, SIDE, SIDE, 3))
  assert enc.resolution == SIDE
  np.testing.assert_array_equal(enc.tokens({"encoder": w}, x), base.tokens(w, x))
  np.testing.assert_array_equal(enc({"encoder": w}, x), base(w, x))


def test_boosted_output_and_clipping(tiny_denoiser, tiny_mapper):
  base = LinearEncoder(resolution=SIDE)
  enc = gsb.BoostedEncoder(base, denoiser=tiny_denoiser[0], mapper=tiny_mapper[0])
  params = {"encoder": base.init(0), "denoiser": tiny_denoiser[1],
            "mapper": tiny_mapper[1]}
  x = uniform(2, (B, SIDE, SIDE, 3))
  x_noisy = x + 0.5 * normal(3, x.shape)
  f = jax.jit(enc)(params, x_noisy, sigma=jnp.array([0.5, 0.5, 0.25, 0.1]))
  assert f.shape == (B, N * DIM) and f.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(f, axis=-1), 1.0, rtol=1e-6)
  # D starts as the identity and M is the identity at sigma = 0, so the boosted
  # encoder is then g(clip(x_noisy, 0, 1)).
  np.testing.assert_allclose(jax.jit(enc.tokens)(params, x_noisy, sigma=jnp.zeros(B)),
                             base.tokens(params["encoder"], np.clip(x_noisy, 0, 1)),
                             rtol=1e-5, atol=1e-5)


def test_boosted_init_params_and_resize(tiny_mapper):
  base = LinearEncoder(resolution=SIDE)
  enc = gsb.BoostedEncoder(base, mapper=tiny_mapper[0])
  params = enc.init_params(key(1), base.init(0))
  assert sorted(params) == ["encoder", "mapper"]
  assert jax.tree.map(jnp.shape, params["mapper"]) == jax.tree.map(jnp.shape,
                                                                   tiny_mapper[1])
  # Inputs above the encoder's resolution are resized (before the denoiser, if any).
  big = jnp.zeros((B, 2 * SIDE, 2 * SIDE, 3))
  enc = gsb.BoostedEncoder(base, denoiser=gsb.Denoiser(**TINY_DENOISER))
  d_params = jax.eval_shape(enc.denoiser.init, key(0), big, 0.1)["params"]
  out = jax.eval_shape(functools.partial(enc.denoise, sigma=0.1),
                       {"encoder": params["encoder"], "denoiser": d_params}, big)
  assert out.shape == (B, SIDE, SIDE, 3)


def test_boosted_params_and_sigma_errors(tiny_mapper):
  base = LinearEncoder(resolution=SIDE)
  w = base.init(0)
  enc = gsb.BoostedEncoder(base, mapper=tiny_mapper[0])
  params = {"encoder": w, "mapper": tiny_mapper[1]}
  x = jnp.zeros((B, SIDE, SIDE, 3))
  with pytest.raises(ValueError, match="keys"):
    enc.tokens({"encoder": w}, x, sigma=0.1)  # mapper params missing
  with pytest.raises(ValueError, match="keys"):
    enc.tokens({**params, "denoiser": {}}, x, sigma=0.1)  # no denoiser here
  with pytest.raises(ValueError, match="keys"):
    gsb.BoostedEncoder(base).tokens(w, x)  # bare base params
  with pytest.raises(ValueError, match="sigma is required"):
    enc(params, x)
  with pytest.raises(ValueError, match="Encoder"):
    gsb.BoostedEncoder("clip")


def test_config_and_factories():
  c = gsb.default_gsb_config()
  assert (c.denoiser.lam_rob, c.mapper.lam_id, c.mapper.lam_stat) == (1.0, 1.0, 0.1)
  assert (gsb.build_denoiser(ml_collections.ConfigDict()).width, c.mapper.num_blocks) == (32, 2)
  config = ml_collections.ConfigDict()
  config.gsb = gsb.default_gsb_config()
  config.gsb.denoiser.width = 16
  config.gsb.mapper.num_blocks = 3
  config.gsb.mapper.dtype = "bfloat16"
  d, m = gsb.build_denoiser(config), gsb.build_mapper(config, token_dim=64)
  assert (d.width, d.channel_mults, m.num_blocks, m.dtype) == (16, (1, 2, 4), 3, jnp.bfloat16)
  config.gsb.mapper.num_block = 2  # typo of num_blocks
  with pytest.raises(ValueError, match="num_blocks"):
    gsb.build_mapper(config, token_dim=64)


def test_experiment_configs_spell_out_the_library_defaults():
  """configs/common.py writes the GSB defaults as data; they must equal the library's."""
  written = common.gsb_config().to_dict()
  for key in ("checkpoint", "log_every", "checkpoint_every"):  # where it lives, how it logs
    written.pop(key)
  assert written == gsb.default_gsb_config().to_dict()


def test_factories_accept_the_experiment_configs():
  config = ml_collections.ConfigDict({"gsb": common.gsb_config()})
  d, m = gsb.build_denoiser(config), gsb.build_mapper(config, token_dim=1280)
  assert d.width == config.gsb.denoiser.width
  assert m.num_blocks == config.gsb.mapper.num_blocks


def test_ablation_variants(tiny_denoiser, tiny_mapper):
  base = LinearEncoder(resolution=SIDE)
  config = ml_collections.ConfigDict({"gsb": {"denoiser": TINY_DENOISER,
                                              "mapper": TINY_MAPPER}})
  gsb_params = {"denoiser": tiny_denoiser[1], "mapper": tiny_mapper[1]}
  variants = gsb.ablation_variants(base, base.init(0), gsb_params, config)
  assert [v[0] for v in variants] == ["FS+D", "FS+M", "FS+D+M"]
  x = jax.ShapeDtypeStruct((B, SIDE, SIDE, 3), jnp.float32)
  for name, enc, params in variants:
    assert sorted(params) == sorted({"FS+D": ["encoder", "denoiser"],
                                     "FS+M": ["encoder", "mapper"],
                                     "FS+D+M": ["encoder", "denoiser", "mapper"]}[name])
    out = jax.eval_shape(functools.partial(enc, sigma=0.25), params, x)
    assert out.shape == (B, N * DIM)
  only_d = gsb.ablation_variants(base, base.init(0), {"denoiser": tiny_denoiser[1]}, config)
  assert [v[0] for v in only_d] == ["FS+D"]
