"""Certified MLLM answers (certify.certify_answers, certify.answers): a tiny MLLM whose
answer under noise is known in closed form, the Clopper-Pearson certificate against scipy,
bad inputs, and the program end to end on a tiny random LLaVA."""

import csv
import dataclasses
import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest
from scipy import stats

import certify
from certify import answers
from configs import common
from configs import llava_embedded
from configs import llava_tiny
from fsjax import cli
from fsjax import encoders
from fsjax import smoothing

SIDE = 4  # images [B, 4, 4, 3]


@dataclasses.dataclass(frozen=True, eq=False)
class LinearEncoder(encoders.Encoder):
  """tokens = w . x + b, one token of width 1."""
  resolution: int = SIDE

  def tokens(self, params, x, *, sigma=None):
    del sigma
    s = jnp.sum(x * params["w"], axis=(1, 2, 3)) + params["b"]
    return s[:, None, None]


@dataclasses.dataclass(frozen=True, eq=False)
class SignMLLM:
  """An MLLM of the registry's surface whose language side answers option 0 when its one
  image feature is > 0, else option 1 (scores s and -s): the sign of w . x + b. Under
  Gaussian noise P(answer 0) = Phi((w.x + b) / (sigma ||w||)) and the smoothed answer is
  the base answer, with exact l2 radius |w.x + b| / ||w||."""
  encoder: encoders.Encoder

  def with_encoder(self, encoder):
    return dataclasses.replace(self, encoder=encoder)

  def image_features(self, params, images, *, key=None):
    vision = params["vision"] if key is None else self.encoder.with_key(params["vision"], key)
    return self.encoder.tokens(vision, images)

  def prompt_ids(self, prompt, *, batch, num_image_tokens):
    del prompt
    ids = np.full((batch, 2 + num_image_tokens), 5, np.int32)
    return ids, np.ones(ids.shape, bool)

  def option_scores(self, params, input_ids, features, options, *, valid=None):
    del params, valid
    assert np.shape(input_ids)[0] == np.shape(features)[0] and len(options) == 2
    s = features[:, 0, 0]
    return jnp.stack([s, -s], axis=-1)


def _linear(seed=0, b=0.0):
  w = np.random.default_rng(seed).normal(size=(SIDE, SIDE, 3)).astype(np.float32)
  w /= np.linalg.norm(w)  # ||w|| = 1: the margin is the exact radius
  return {"vision": {"w": jnp.asarray(w), "b": jnp.float32(b)}, "language": {}}, w


def _answerer(encoder=None):
  return certify.mllm_answerer(SignMLLM(encoder or LinearEncoder()), "is it positive?",
                               [[1], [2]], num_image_tokens=1)


def _images_with_margins(w, margins, seed=1):
  """Images in [0, 1] with w . x = margin (b = 0): a mid-grey image moved along w."""
  base = np.full((SIDE, SIDE, 3), 0.5, np.float32)
  base -= np.sum(base * w) * w  # w . base = 0
  x = base[None] + np.asarray(margins, np.float32)[:, None, None, None] * w[None]
  assert x.min() >= 0 and x.max() <= 1, "margins too large for [0, 1] images"
  return x


def test_certified_radius_against_the_exact_one():
  """The certified radius never exceeds the exact |w.x + b| / ||w|| (beyond alpha) and is
  close to it for large n; the counts follow Phi(margin / sigma)."""
  params, w = _linear()
  margins = np.array([0.3, -0.2, 0.05, 0.6])
  x = _images_with_margins(w, margins)
  sigma, n, alpha = 0.25, 5_000, 1e-3
  cert = certify.certify_answers(params, x, answerer=_answerer(), sigma=sigma,
                                 key=jax.random.key(3), n0=64, n=n, alpha=alpha,
                                 chunk_size=n)
  exact = np.abs(margins)
  np.testing.assert_array_equal(cert.answer, np.where(margins > 0, 0, 1))
  assert np.all(cert.radius <= exact)
  # Close for large n: at least the radius of a count 4 sd below its mean.
  p = stats.norm.cdf(exact / sigma)
  k_low = n * p - 4 * np.sqrt(n * p * (1 - p))
  r_low = sigma * stats.norm.ppf(stats.beta.ppf(alpha, k_low, n - k_low + 1))
  assert np.all(cert.radius >= r_low), (cert.radius, r_low, exact)
  assert np.all(exact - r_low < 0.1)  # the test has teeth: r_low is near the exact radius
  # The counts of the top answer: binomial with the closed-form p (5 sd).
  k = cert.counts[np.arange(4), cert.top]
  assert np.all(np.abs(k - n * p) <= 5 * np.sqrt(n * p * (1 - p)) + 1)
  assert cert.is_certificate and cert.bound == "clopper-pearson"
  np.testing.assert_array_equal(cert.samples, 64 + n)


def test_soundness_count_over_many_images():
  """Over 200 images the certified radius exceeds the exact one no more often than a
  binomial(200, alpha) allows (alpha = 0.05 makes a failure count observable)."""
  params, w = _linear(seed=2)
  margins = np.linspace(0.02, 0.4, 200)
  x = _images_with_margins(w, margins)
  alpha = 0.05
  cert = certify.certify_answers(params, x, answerer=_answerer(), sigma=0.5,
                                 key=jax.random.key(5), n0=16, n=200, alpha=alpha,
                                 chunk_size=100)
  over = int(np.sum((cert.answer != certify.ABSTAIN) & (cert.radius > margins)))
  wrong = int(np.sum((cert.answer != certify.ABSTAIN) & (cert.answer != 0)))
  assert wrong == 0
  assert over <= stats.binom.ppf(1 - 1e-6, 200, alpha), over


def test_answers_are_reproducible_from_the_key_and_chunking():
  params, w = _linear()
  x = _images_with_margins(w, [0.02, -0.01])
  a = _answerer()
  run = lambda key, chunk: certify.answer_counts(params, x, answerer=a, sigma=0.5, n=37,
                                                 key=key, chunk_size=chunk)
  first = run(jax.random.key(1), 8)
  np.testing.assert_array_equal(first, run(jax.random.key(1), 8))
  np.testing.assert_array_equal(first, run(jax.random.key(1), 37))  # any chunking
  assert not np.array_equal(first, run(jax.random.key(2), 8))
  np.testing.assert_array_equal(first.sum(1), [37, 37])
  # The same noise as the feature certificates: sample i is smoothing.noise(key, i).
  key = jax.random.key(1)
  s = np.array([np.sum((x + np.asarray(smoothing.noise(key, i, x.shape, 0.5))) * w,
                       axis=(1, 2, 3)) for i in range(37)])
  np.testing.assert_array_equal(first[:, 0], np.sum(s > 0, axis=0))


def test_smoothed_vision_side_has_a_fixed_inner_key():
  """An FS-smoothed vision side (inner n) is certified as a deterministic base classifier:
  its inner noise is the key's INNER_STREAM, the same for every outer sample."""
  params, w = _linear()
  x = _images_with_margins(w, [0.1, -0.15])
  smoothed = smoothing.SmoothedEncoder(LinearEncoder(), sigma=0.25, n=4, chunk_size=4)
  a = _answerer(smoothed)
  p = dict(params, vision={"encoder": params["vision"]})
  key = jax.random.key(4)
  cert = certify.certify_answers(p, x, answerer=a, sigma=0.25, key=key, n0=8, n=64,
                                 alpha=1e-2, chunk_size=16)
  again = certify.certify_answers(p, x, answerer=a, sigma=0.25, key=key, n0=8, n=64,
                                  alpha=1e-2, chunk_size=32)
  np.testing.assert_array_equal(cert.counts, again.counts)
  clean = certify.clean_answers(p, x, answerer=a, key=key)
  # A 1-d unit feature is the sign of the margin; the smoothed direction is the sign of
  # the mean of 4 such signs on the inner noise (a tie gives the zero feature: answer 0).
  inner = jax.random.fold_in(key, certify.INNER_STREAM)
  votes = np.mean([np.sign(np.sum((x + np.asarray(smoothing.noise(inner, j, x.shape, 0.25)))
                                  * w, axis=(1, 2, 3))) for j in range(4)], axis=0)
  np.testing.assert_array_equal(clean, np.where(votes >= 0, 0, 1))


def test_certificate_from_counts_is_clopper_pearson():
  counts0 = np.array([[1, 9, 0], [5, 5, 0], [0, 0, 10], [3, 4, 3]])
  counts = np.array([[10, 990, 0], [400, 600, 0], [0, 2, 998], [300, 400, 300]])
  sigma, alpha = 0.5, 1e-3
  cert = certify.answer_certificate(counts0, counts, sigma=sigma, alpha=alpha)
  top = np.array([1, 0, 2, 1])  # ties go to the first answer
  np.testing.assert_array_equal(cert.top, top)
  k = counts[np.arange(4), top]
  want_p = stats.beta.ppf(alpha, k, 1000 - k + 1)
  np.testing.assert_allclose(cert.p_lower, want_p, rtol=1e-12)
  certified = want_p > 0.5
  np.testing.assert_array_equal(cert.answer, np.where(certified, top, -1))
  np.testing.assert_allclose(cert.radius, np.where(certified, sigma * stats.norm.ppf(want_p),
                                                   0.0), rtol=1e-12)
  np.testing.assert_array_equal(cert.samples, [1010, 1010, 1010, 1010])
  assert cert.abstain_rate == 0.5
  radius = np.where(certified, sigma * stats.norm.ppf(want_p), 0.0)
  labels = np.array([1, 0, 2, 1])
  want_acc = [np.mean(certified & (top == labels) & (radius >= r)) for r in (0.0, 1.0, 2.0)]
  np.testing.assert_allclose(cert.certified_accuracy(labels, radii=(0.0, 1.0, 2.0)),
                             want_acc)
  assert want_acc[0] == 0.5 and 0 < want_acc[1] < 0.5  # image 2 (998 / 1000) beyond r = 1


def test_margin_loss():
  f = jnp.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
  ref = jnp.array([[1.0, 0, 0], [1.0, 0, 0]])
  np.testing.assert_allclose(certify.answer_margin_loss(f, ref), [0.3, -0.3], atol=1e-7)


def test_bad_inputs_are_named():
  params, w = _linear()
  x = _images_with_margins(w, [0.1])
  a = _answerer()
  ok = dict(answerer=a, sigma=0.25, key=jax.random.key(0), n0=2, n=4)
  for bad, match in ((dict(sigma=0.0), "sigma"), (dict(n=0), "n"), (dict(n0=0), "n0"),
                     (dict(alpha=1.5), "alpha"), (dict(key=None), "key"),
                     (dict(answerer=LinearEncoder()), "answerer")):
    with pytest.raises(ValueError, match=match):
      certify.certify_answers(params, x, **{**ok, **bad})
  for images, match in ((x * np.nan, "NaN"), (x + 2.0, r"\[0, 1\]"), (x[0], "shape")):
    with pytest.raises(ValueError, match=match):
      certify.certify_answers(params, images, **ok)
  with pytest.raises(ValueError, match="params"):
    certify.certify_answers(params["vision"], x, **ok)
  for options, match in (([[1]], "at least 2"), ([[1], []], "non-empty"),
                         ([[1], [1]], "twice"), ("ab", "sequence")):
    with pytest.raises(ValueError, match=match):
      certify.mllm_answerer(SignMLLM(LinearEncoder()), "q", options, num_image_tokens=1)
  with pytest.raises(ValueError, match="prompt"):
    certify.mllm_answerer(SignMLLM(LinearEncoder()), " ", [[1], [2]], num_image_tokens=1)
  with pytest.raises(ValueError, match=r"\[1, L\]"):
    certify.OptionAnswerer(SignMLLM(LinearEncoder()), np.ones((2, 3)), np.ones((2, 3)),
                           [[1], [2]])


# ---------------------------------------------------------------------------------------
# The program, end to end, on a tiny random LLaVA.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("fm")
  rng = np.random.default_rng(0)
  for c in range(10):
    (root / "test" / f"class_{c}").mkdir(parents=True)
    for i in range(2):
      img = rng.integers(0, 255, (28, 28, 3)).astype(np.uint8)
      Image.fromarray(img).save(root / "test" / f"class_{c}" / f"{i}.png")
  return root


def _program_config(folder):
  config = llava_tiny.get_config()
  config.seed = 0
  embedded = llava_embedded.get_config("runlocal")
  config.attack, config.protection = embedded.attack, embedded.protection
  config.answers = embedded.answers
  config.answers.update(sigmas=(0.5,), num_images=2, rows=("original", "smoothed"))
  config.protection.data = ml_collections.ConfigDict(dict(
      name=f"folder:{folder}", split="test", image_size=28, seed=0))
  # The random LLaVA's tokenizer must know the options' words (the digits).
  config.llava.words = tuple(config.llava.words) + tuple(str(i) for i in range(10)) + (
      "which", "of", "the", "following")
  return config


def _csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_program_end_to_end_and_audit(tmp_path, folder, monkeypatch):
  config = _program_config(folder)
  # A real Ctrl-C during the first batch: its rows are written, one line, then the rerun
  # certifies the rest.
  calls, certify_answers = [], answers.certify.certify_answers

  def ctrl_c_in_the_first_batch(*args, **kwargs):
    calls.append(kwargs["key"])
    if len(calls) == 1:
      os.kill(os.getpid(), signal.SIGINT)  # seen once the batch's rows are written
    return certify_answers(*args, **kwargs)
  monkeypatch.setattr(answers.certify, "certify_answers", ctrl_c_in_the_first_batch)
  with pytest.raises(cli.Interrupted, match=r"certify.answers: interrupted \(Ctrl-C\); 2 of 4 "
                     r"answers are certified in .*rerun the same command"):
    answers.run(config, str(tmp_path))
  assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 2
  table = answers.run(config, str(tmp_path))
  assert len(calls) == 2  # the rerun certified only the missing batch
  assert [t["row"] for t in table] == ["original", "smoothed (FS, n=2)"]
  rows = [json.loads(l) for l in (tmp_path / "answers.jsonl").read_text().splitlines()]
  assert len(rows) == 4
  for t in table:  # the table is recomputed from the per-image rows
    mine = [r for r in rows if r["row"] == t["row"]]
    want = certify.answer_certificate(np.array([r["counts0"] for r in mine]),
                                      np.array([r["counts"] for r in mine]),
                                      sigma=0.5, alpha=config.answers.alpha)
    np.testing.assert_array_equal(want.answer, [r["answer"] for r in mine])
    acc = want.certified_accuracy([r["correct_answer"] for r in mine], config.answers.radii)
    assert [t[f"cert acc r={r:g}"] for r in config.answers.radii] == pytest.approx(list(acc))
    assert t["abstain"] == pytest.approx(want.abstain_rate)
    assert -1.0 <= t["FCSB@0.25"] <= 1.0
  assert len(_csv(tmp_path / "answers.csv")) == 2
  assert (tmp_path / "answers.png").stat().st_size > 0
  # A rerun resumes: nothing new is certified, the same table.
  again = answers.run(config, str(tmp_path))
  assert again == table
  assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 4
  # The audit attacks every certified (image, radius); none certified here is fine too.
  audit = answers.audit(config, str(tmp_path))
  certified = sum(r["answer"] != -1 for r in rows)
  assert sum(t["certified attacked"] for t in audit) == certified
  # Another config is refused before anything is written.
  config.answers.n = 9
  with pytest.raises(ValueError, match="different config"):
    answers.run(config, str(tmp_path))


def test_bad_program_settings_are_named(tmp_path, folder):
  for key, value, match in (("rows", ("nope",), "rows"), ("sigmas", (), "sigmas"),
                            ("radii", (0.5, 0.25), "radii"), ("n", 0, "n")):
    config = _program_config(folder)
    config.answers[key] = value
    with pytest.raises(ValueError, match=match):
      answers.run(config, str(tmp_path))
  assert not list(tmp_path.iterdir())
  assert common.answers_config().n == 1_000


def test_sequential_answers_are_sound_and_stop_early():
  """certify.sequential_answers on the sign MLLM (exact radius |w.x| / ||w||): over 200
  images no more radii above the exact one than a binomial(200, alpha) allows, the right
  answers, and far fewer samples than n_max where the answer is clear."""
  params, w = _linear(seed=4)
  rng = np.random.default_rng(0)
  margins = rng.uniform(-0.45, 0.45, 200)
  x = _images_with_margins(w, margins)
  alpha, sigma, n_max = 0.05, 0.25, 1000
  cert = certify.sequential_answers(params, x, answerer=_answerer(), sigma=sigma,
                                    key=jax.random.key(7), radii=(0.0, 0.1, 0.2, 0.3),
                                    n_max=n_max, n0=32, alpha=alpha, chunk_size=64, slots=32)
  certified = cert.answer != certify.ABSTAIN
  assert np.all(cert.answer[certified] == np.where(margins > 0, 0, 1)[certified])
  over = int(np.sum(certified & (cert.radius > np.abs(margins))))
  assert over <= stats.binom.ppf(1 - 1e-6, 200, alpha), over
  assert np.mean(certified[np.abs(margins) > 0.15]) > 0.9
  clear = np.abs(margins) > 0.15  # stage 1 (32 samples) picks the right answer there
  np.testing.assert_array_equal(cert.top[clear], np.where(margins > 0, 0, 1)[clear])
  assert cert.bound == "betting (sequential)" and cert.counts is None
  np.testing.assert_allclose(cert.radius[certified],
                             sigma * stats.norm.ppf(cert.p_lower[certified]), rtol=1e-4)
  # Images far from a decision (the exact radius > 0.05 away from every r) stop early.
  far = np.min(np.abs(np.abs(margins)[:, None] - np.array([0.0, 0.1, 0.2, 0.3])), 1) > 0.05
  assert np.median(cert.samples[far]) <= 32 + 6 * 64 < n_max / 2


def test_program_sequential_mode_matches_direct_calls(tmp_path, folder):
  """``config.answers.mode="sequential"``: rows from certify.sequential_answers with the
  row's key and the images' indices as noise ids; samples in the rows and the table."""
  config = _program_config(folder)
  config.answers.update(mode="sequential", rows=("original",), feature_n=0, n=64, n0=16)
  table = answers.run(config, str(tmp_path))
  rows = [json.loads(l) for l in (tmp_path / "answers.jsonl").read_text().splitlines()]
  assert len(rows) == 2 and all(r["mode"] == "sequential" and "counts" not in r for r in rows)
  model, params = answers.build_mllm(config)
  label, encoder, vparams = answers.build_rows(config, model, params)[0]
  data = answers.task_data(config)
  answerer = answers.answerer_of(model, params, data, encoder)
  key = jax.random.fold_in(smoothing.sigma_key(jax.random.PRNGKey(config.seed), 0.5), 0)
  want = certify.sequential_answers(dict(params, vision=vparams), data["images"][:2],
                                    answerer=answerer, sigma=0.5, key=key,
                                    radii=config.answers.radii, n_max=64, n0=16,
                                    alpha=config.answers.alpha,
                                    chunk_size=config.answers.chunk_size,
                                    slots=config.answers.batch_size, image_ids=np.arange(2))
  np.testing.assert_array_equal([r["answer"] for r in rows], want.answer)
  np.testing.assert_allclose([r["radius"] for r in rows], want.radius, rtol=1e-6)
  assert [r["samples"] for r in rows] == list(want.samples)
  assert table[0]["mean samples"] == pytest.approx(np.mean(want.samples), abs=0.5)
