r"""Soundness audit of the feature certificate: attack it inside its own radius.

  python -m certify.audit --config configs/default.py --workdir /tmp/fsjax_audit

The certificate (method.md section 2; :func:`certify.fcsb`) says: with probability at
least 1 - alpha over the certification noise, for every ``||x' - x||_2 <= eps``

    <f_s(x'), u>  >=  B(eps) = 2 Phi( Phi^-1(L) - eps / sigma ) - 1,

with u the reference direction (``"mean"``: the stage-1 mean direction; ``"clean"``:
the paper's u = f(x)) and L the lower confidence bound of h_u(x). This CLI tries to break
it. For each image, variant and reference it

1. certifies with the same two-stage Monte Carlo as :func:`certify.fcsb`
   (:func:`certify.estimate_scores`, then :func:`certify.feature_certificate`: for the
   same key and image batch the numbers are ``certify.fcsb``'s), which gives L, u and the
   radius R_c for cos >= c;
2. picks eps inside the certificate: ``config.audit.eps_fractions`` of R_c (images
   with R_c <= 0 are not certified at level c and are skipped), or, with
   ``config.audit.eps`` set, those radii where the cosine is certified (B >= 0);
3. runs l2 PGD with EOT over the smoothing noise at radius eps, *minimising*
   ``<mean_j f(x_adv + delta_j), u>`` (the exact quantity bounded, against the fixed
   direction u; a fresh set of m noise draws every step, random start in the ball,
   steps of ``step_factor * eps / steps``, the last iterate is kept; x_adv stays in
   [0, 1] like any image, a subset of the ball the certificate covers);
4. measures ``<f_s(x_adv), u>`` with ``measure_n`` fresh noise samples (independent of
   the certification and the attack), with its standard error ``se`` (sample standard
   deviation / sqrt(n)); with ``screen_n`` set, every pair is first screened with
   ``screen_n`` samples and only pairs within ``screen_k`` standard errors of B are
   measured with ``measure_n`` (each row records the n it used);
5. also measures ``<f_s(x), u>`` at the clean image (``measured_clean``, same n as the
   screen, or ``measure_n``), so the report shows how far the attack moved it;
6. counts violations: ``raw`` (measured < B) and ``beyond k sigma`` (measured + k se <
   B, i.e. the Monte Carlo error of the measurement cannot explain it).

A sound certificate may fail on at most a fraction alpha of the *images* (all eps and
both references of one image share its certification noise), so the expected number of
images with a real violation is <= alpha * images; the summary prints both rates.
Raw violations without k-sigma ones are measurement noise: the attack pushed the true
value to within a few standard errors of B, which a tight certificate allows.

The attack is :func:`fsjax.attacks.pgd` with the certificate's direction u given as
``reference`` features and ``loss="inner_product"``: the library's one PGD loop.

Writes ``audit.jsonl`` (one row per image, eps, variant, reference), ``audit_batches.jsonl``
(one row per audited (batch, variant): its images, pairs and uncertified images),
``audit_config.json`` and ``audit.md`` (summary, per-fraction table) into the workdir.

Interrupted (Ctrl-C: it stops after the (batch, variant) group being audited, exit status
130) or killed, the same command resumes: it audits only the groups not marked in
``audit_batches.jsonl`` and ends with the ``audit.md`` of an uninterrupted run. A workdir
holding rows of another config is refused in one line (use another workdir).
"""

from __future__ import annotations

import collections
import pathlib
from typing import Any

import jax
import numpy as np

import certify
from certify import report
from fsjax import attacks
from fsjax import batching
from fsjax import checkpointing
from fsjax import checks
from fsjax import cli
from fsjax import data as data_lib
from fsjax import encoders as encoders_lib
from fsjax import smoothing
from fsjax import variants as variants_lib

RESULTS, BATCHES, CONFIG_NAME = "audit.jsonl", "audit_batches.jsonl", "audit_config.json"

# Streams of randomness, folded into the seed's key: certification, attack, measurement
# never share noise (a measurement that reused the certification samples would be biased).
_CERTIFY, _ATTACK, _MEASURE = 0, 1, 2


# Taken from ``config.certify`` when ``config.audit`` does not set them: the Monte Carlo
# settings, and the mode with the sequential engine's settings (docs/method.md 2b).
_FROM_CERTIFY = ("n0", "n", "alpha", "chunk_size", "mode", "stop", "futility",
                 "sequential_chunk_size", "slots", "eps")
_SEQUENTIAL_DEFAULTS = dict(mode="fixed", stop="decision", futility="predictive",
                            sequential_chunk_size=64, slots=8)


def audit_settings(config) -> Any:
  """``config.audit`` with its unset Monte Carlo settings (n0, n, alpha, chunk_size, and
  the mode: ``config.certify.mode="sequential"`` audits sequential certificates, stopped at
  their data-dependent times) taken from ``config.certify``: the audit certifies as
  Table 1 does unless told not to. (``certify_eps``: the decisions a sequential run stops
  on, config.certify.eps.)"""
  a = config.audit.copy_and_resolve_references()
  with a.unlocked():
    for k in _FROM_CERTIFY:
      target = "certify_eps" if k == "eps" else k
      if a.get(target) is None:
        a[target] = config.certify.get(k, _SEQUENTIAL_DEFAULTS.get(k))
  return a


def check_audit_config(a) -> None:
  """Validates ``config.audit`` (errors name the key and the fix), before any jit."""
  try:
    certify.check_certify_args(sigma=a.sigma, n=a.n, n0=a.n0, alpha=a.alpha, bound=a.bound,
                               cos=a.cos, chunk_size=a.chunk_size)
  except ValueError as e:
    raise ValueError(f"config.audit: {e}") from None
  if a.bound == "point":
    raise ValueError("config.audit.bound='point' is the paper's plug-in estimate, not a "
                     "certificate; audit 'bernstein', 'betting' or 'hoeffding'.")
  if not a.references or any(r not in certify.REFERENCES for r in a.references):
    raise ValueError(f"config.audit.references={a.references!r}: use a non-empty subset of "
                     f"{certify.REFERENCES}.")
  if a.eps is None:
    fr = np.asarray(a.eps_fractions, np.float64)
    if fr.ndim != 1 or fr.size == 0 or np.any(fr <= 0) or np.any(fr > 1):
      raise ValueError(f"config.audit.eps_fractions={a.eps_fractions!r} must be fractions in "
                       "(0, 1] of the certified radius (e.g. (0.25, 0.5, 0.75, 1.0)).")
  else:
    eps = np.asarray(a.eps, np.float64)
    if eps.ndim != 1 or eps.size == 0 or np.any(eps <= 0) or not np.all(np.isfinite(eps)):
      raise ValueError(f"config.audit.eps={a.eps!r} must be a non-empty list of l2 radii > 0, "
                       "or None to use eps_fractions of the certified radius.")
  checks.check_positive_int(a.steps, name="config.audit.steps", meaning="l2 PGD steps")
  if not a.step_factor > 0:
    raise ValueError(f"config.audit.step_factor={a.step_factor!r} must be > 0 (the l2 step "
                     "is step_factor * eps / steps; Madry et al. use 2.5).")
  checks.check_positive_int(a.eot_samples, name="config.audit.eot_samples",
                            meaning="the attack targets the smoothed feature, an "
                            "expectation over noise")
  checks.check_positive_int(a.measure_n, name="config.audit.measure_n", minimum=2,
                            meaning="the standard error needs a sample variance")
  if a.get("screen_n") is not None:
    smoothing.check_sampling(sigma=a.sigma, n=a.screen_n, chunk_size=a.chunk_size,
                             name_n="config.audit.screen_n")
    if a.screen_n < 2 or not a.screen_k > 0:
      raise ValueError(f"config.audit.screen_n={a.screen_n} must be >= 2 and screen_k="
                       f"{a.screen_k} > 0 (or screen_n=None: measure every pair with "
                       "measure_n).")
  if not a.k_sigma >= 0:
    raise ValueError(f"config.audit.k_sigma={a.k_sigma!r} must be >= 0 (e.g. 3).")
  checks.check_positive_int(a.batch_size, name="config.audit.batch_size")
  if a.get("mode", "fixed") not in ("fixed", "sequential"):
    raise ValueError(f"config.audit.mode={a.mode!r} (or config.certify.mode) must be 'fixed' "
                     "or 'sequential'.")
  if a.get("mode") == "sequential":
    checks.check_choice(a.stop, name="config.certify.stop", choices=certify.SEQUENTIAL_STOPS)
    checks.check_choice(a.get("futility", "predictive"), name="config.certify.futility",
                        choices=certify.SEQUENTIAL_FUTILITY)
    for k in ("sequential_chunk_size", "slots"):
      checks.check_positive_int(a[k], name=f"config.certify.{k}")
    eps = np.asarray(a.certify_eps if a.eps is None else a.eps, np.float64)
    if eps.ndim != 1 or eps.size == 0:
      raise ValueError("a sequential audit stops on the decisions at config.certify.eps (or "
                       f"config.audit.eps): set a non-empty list of radii, got {eps!r}.")


# ---------------------------------------------------------------------------------------
# The attack and the measurement.
# ---------------------------------------------------------------------------------------


def attack_direction(params: Any, x: jax.typing.ArrayLike, u: jax.typing.ArrayLike, *,
                     encoder: encoders_lib.Encoder, eps: jax.typing.ArrayLike, sigma: float,
                     steps: int, eot_samples: int, key: jax.Array,
                     step_factor: float = 2.5) -> jax.Array:
  """l2 PGD + EOT (:func:`fsjax.attacks.pgd`) minimising ``<f_s(x_adv), u>`` inside eps.

  ``<mean_j f(x_adv + delta_j), u>`` with m = ``eot_samples`` fresh draws per step, over
  ``||x_adv - x||_2 <= eps`` (one radius per image), x_adv in [0, 1]; random start in the
  ball, normalised-gradient steps of ``step_factor * eps / steps`` (Madry et al.'s
  2.5 eps / steps), the last iterate returned.
  """
  if not step_factor > 0:
    raise ValueError(f"step_factor={step_factor!r} must be > 0.")
  eps = np.broadcast_to(np.asarray(eps, np.float32), (np.shape(x)[0],))
  return attacks.pgd(params, x, encoder=encoder, reference=u, loss="inner_product",
                     norm="l2", budget=eps, step_size=eps * np.float32(step_factor / steps),
                     steps=steps, key=key, sigma=sigma, eot_samples=eot_samples)


# ---------------------------------------------------------------------------------------
# One batch of images: certify, choose eps, attack, measure.
# ---------------------------------------------------------------------------------------


def _task(progress: report.SampleProgress | None, label: str, **kwargs):
  """``progress.task(label, ...)``, or None without a bar (then nothing reports)."""
  return None if progress is None else progress.task(label, **kwargs)


def _grow(progress: report.SampleProgress | None, samples: int) -> None:
  if progress is not None:
    progress.grow(samples)


def _measure_pairs(params, x_adv, u, certified, encoder, a, key, *,
                   progress: report.SampleProgress | None = None, label: str = "measure"):
  """Measures ``<f_s(x_adv), u>``; returns ``(mean, standard error, samples used)``.

  Without ``a.screen_n`` every pair gets ``a.measure_n`` fresh samples. With it, every
  pair first gets ``screen_n``; pairs whose screened margin over the bound is below
  ``screen_k`` standard errors are measured again with ``measure_n`` fresh samples (a
  cheap screen: a pair 6 standard errors clear of B cannot turn into a violation).
  ``progress`` counts the first measurement in its total already; the second one is
  added to it when it is known to be needed.
  """
  b = x_adv.shape[0]
  task = lambda n, what: _task(progress, f"{label}: {what}, {n} samples", images=b,
                               compile_key=("measure", encoder, b, n))
  if not a.get("screen_n"):
    measured, se = smoothing.measure_inner_product(
        params, x_adv, u, encoder=encoder, sigma=a.sigma, n=a.measure_n,
        chunk_size=a.chunk_size, key=key, progress=task(a.measure_n, "measuring"))
    return np.asarray(measured, np.float64), np.asarray(se, np.float64), np.full(
        b, a.measure_n)
  measured, se = smoothing.measure_inner_product(
      params, x_adv, u, encoder=encoder, sigma=a.sigma, n=a.screen_n,
      chunk_size=a.chunk_size, key=jax.random.fold_in(key, 0),
      progress=task(a.screen_n, "screening"))
  measured, se = np.asarray(measured, np.float64), np.asarray(se, np.float64)
  used = np.full(b, a.screen_n)
  close = np.flatnonzero(measured - certified < a.screen_k * se)
  if close.size:
    _grow(progress, b * a.measure_n)
    m2, se2 = smoothing.measure_inner_product(
        params, batching.pad_rows(np.asarray(x_adv)[close], b),
        batching.pad_rows(np.asarray(u)[close], b),
        encoder=encoder, sigma=a.sigma, n=a.measure_n, chunk_size=a.chunk_size,
        key=jax.random.fold_in(key, 1),
        progress=task(a.measure_n, f"measuring {close.size} close pairs"))
    measured[close] = np.asarray(m2, np.float64)[:close.size]
    se[close] = np.asarray(se2, np.float64)[:close.size]
    used[close] = a.measure_n
  return measured, se, used


def audit_images(encoder: encoders_lib.Encoder, params: Any, images: np.ndarray,
                 labels: np.ndarray, audit, key: jax.Array, *, name: str = "FS",
                 first_index: int = 0, pad_to: int | None = None,
                 progress: report.SampleProgress | None = None) -> tuple[list[dict], dict]:
  """Audits the certificate on a batch of images; returns ``(rows, counts)``.

  Args:
    encoder: the encoder (a base encoder or a GSB-boosted one).
    params: its parameters.
    images: ``[B, H, W, 3]`` in [0, 1].
    labels: ``[B]`` labels (recorded only).
    audit: the ``config.audit`` section (see ``configs/common.py``).
    key: PRNG key; the certify, attack and measure streams are folded from it.
    name: the variant's name, recorded in the rows.
    first_index: index of ``images[0]`` in the audited set (recorded).
    pad_to: certify a batch padded to this many images (a smaller last batch then reuses
      the compilation of the full ones); padded images are dropped.
    progress: the program's bar (noise samples x images through the encoder; attack
      steps count ``eot_samples`` each). Its total must hold this batch's certification;
      the attacks and measurements are added to it once the certified pairs are known.

  Returns:
    One row per (image, eps, reference) tested, and counts of the images and
    (image, reference) pairs that were skipped as uncertified.
  """
  a = audit
  sigma = float(a.sigma)
  b = images.shape[0]
  rows, skipped = [], collections.Counter()
  for r_index, (reference, deficit, u, radius, bound_of, samples) in enumerate(
      _certificates(encoder, params, images, a, key, name=name, first_index=first_index,
                    pad_to=pad_to, progress=progress)):
    # The (image, eps) pairs inside the certificate, each with its bound B(eps).
    pairs = []  # (image, eps, fraction or None, B)
    for i in range(b):
      if a.eps is None:
        if radius[i] <= 0:
          skipped["uncertified"] += 1
          continue
        eps = [float(f) * radius[i] for f in a.eps_fractions]
        fractions = [float(f) for f in a.eps_fractions]
      else:
        eps, fractions = [float(e) for e in np.asarray(a.eps, np.float32)], [None] * len(a.eps)
      # The attack runs at float32(eps), so B is that radius's.
      bound = bound_of(i, np.asarray(eps, np.float32))
      kept = [(i, e, f, float(bb)) for e, f, bb in zip(eps, fractions, bound)
              if a.eps is None or bb >= 0]
      if a.eps is not None:
        skipped["uncertified"] += int(not kept)
        skipped["uncertified_eps"] += len(eps) - len(kept)
      pairs += kept
    bs = int(a.batch_size)
    # <f_s(x), u> at the clean image, for the attack's effect (clean - adversarial).
    clean_n = a.get("screen_n") or a.measure_n
    certified = sorted({p[0] for p in pairs})
    label = f"{name}, {reference}"
    # The work ahead, in padded batches of bs: the clean measurements, then per batch of
    # pairs the attack and the first measurement (clean_n samples too; a second one with
    # measure_n joins when _measure_pairs finds close pairs).
    _grow(progress, bs * (-(-len(certified) // bs) * clean_n
                          + -(-len(pairs) // bs) * (a.steps * a.eot_samples + clean_n)))
    clean = {}
    for start in range(0, len(certified), bs):
      idx = np.array(certified[start:start + bs])
      m, _ = smoothing.measure_inner_product(
          params, batching.pad_rows(images[idx], bs), batching.pad_rows(u[idx], bs),
          encoder=encoder, sigma=sigma,
          n=clean_n, chunk_size=a.chunk_size,
          key=jax.random.fold_in(key, 100_000 + 1000 * r_index + start // bs),
          progress=_task(progress, f"{label}: clean images, {clean_n} samples", images=bs,
                         compile_key=("measure", encoder, bs, clean_n)))
      clean.update(zip(idx.tolist(), np.asarray(m, np.float64)[:len(idx)].tolist()))
    for start in range(0, len(pairs), bs):
      chunk = pairs[start:start + bs]
      idx = np.array([p[0] for p in chunk])
      eps = np.array([p[1] for p in chunk], np.float32)
      # Fixed shapes (batch_size) so every chunk reuses one compilation.
      x_c, u_c, eps_c = (batching.pad_rows(images[idx], bs), batching.pad_rows(u[idx], bs),
                         batching.pad_rows(eps, bs))
      ck = jax.random.fold_in(key, 1000 * r_index + start // bs + 1)
      attacked = _task(
          progress, f"{label}: attacking pairs {start + 1}-{start + len(chunk)} of "
          f"{len(pairs)}", images=bs, compile_key=("attack", encoder))
      x_adv = jax.block_until_ready(attack_direction(
          params, x_c, u_c, encoder=encoder, eps=eps_c, sigma=sigma, steps=a.steps,
          eot_samples=a.eot_samples, step_factor=a.step_factor,
          key=jax.random.fold_in(ck, _ATTACK)))
      if attacked is not None:
        attacked(a.steps * a.eot_samples)
      certified = batching.pad_rows(np.array([p[3] for p in chunk], np.float64), bs)
      measured, se, used = _measure_pairs(params, x_adv, u_c, certified, encoder, a,
                                          jax.random.fold_in(ck, _MEASURE),
                                          progress=progress, label=label)
      dist = np.sqrt(np.sum((np.asarray(x_adv) - x_c) ** 2, axis=(1, 2, 3)))
      for j, (i, e, frac, _) in enumerate(chunk):
        rows.append({
            "variant": name, "image": first_index + int(i), "label": int(labels[i]),
            "reference": reference,
            "bound": a.bound if samples is None else "betting (sequential)", "sigma": sigma,
            "alpha": float(a.alpha), "cos": float(a.cos), "radius": float(radius[i]),
            "fraction": frac, "eps": float(e), "perturbation_l2": float(dist[j]),
            "score_lcb": float(1.0 - deficit[i]),
            "certified_inner_product": float(certified[j]), "measured": float(measured[j]),
            "standard_error": float(se[j]), "measure_n": int(used[j]),
            "measured_clean": clean[i], "clean_n": int(clean_n),
            "margin": float(measured[j] - certified[j]),
            "violation": bool(measured[j] < certified[j]),
            "violation_k_sigma": bool(measured[j] + a.k_sigma * se[j] < certified[j]),
            **({} if samples is None else {"mode": "sequential",
                                           "samples": int(samples[i])})})
  return rows, dict(skipped)


def _certificates(encoder, params, images, a, key, *, name, first_index, pad_to, progress):
  """Per reference: ``(reference, deficit [B], u [B, D], radius [B], bound_of, samples)``.

  ``bound_of(i, eps [E])`` is image i's B(eps) (float64); ``samples`` is None for fixed n,
  else ``[B]`` the samples each sequential certificate used. Fixed n: the same two-stage
  Monte Carlo as :func:`certify.fcsb`. Sequential (``a.mode``): :func:`certify.
  sequential_fcsb` (inner product, each image stopped once its decisions "cos >= a.cos
  at every eps of config.certify.eps (or a.eps)" are settled, at a data-dependent time),
  whose deficit bound holds at that time: the audit attacks exactly that certificate.
  """
  sigma = float(a.sigma)
  b = images.shape[0]
  if a.get("mode") == "sequential":
    eps = list(a.certify_eps if a.eps is None else a.eps)
    for reference in a.references:
      cert = certify.sequential_fcsb(
          params, images, encoder=encoder, sigma=sigma, eps=eps,
          key=jax.random.fold_in(key, _CERTIFY), cos=a.cos, n_max=a.n, n0=a.n0,
          alpha=a.alpha, norm_aware=False, reference=reference, stop=a.stop,
          futility=a.get("futility", "predictive"),
          chunk_size=a.sequential_chunk_size, slots=a.slots,
          image_ids=first_index + np.arange(b))
      deficit = np.asarray(cert.deficit, np.float64)
      samples = np.asarray(cert.samples)
      _grow(progress, int(samples.sum()))  # known once the images have stopped
      done = _task(progress, f"{name}, {reference}: certified sequentially", images=1)
      if done is not None:
        done(int(samples.sum()))
      scores = 1.0 - np.asarray(cert.deficit)

      def bound_of(i, e, scores=scores):
        return np.asarray(certify.fcsb_from_score(scores[i], eps=e, sigma=sigma), np.float64)
      yield (reference, deficit, np.asarray(cert.direction, np.float32),
             np.asarray(cert.radius, np.float64), bound_of, samples)
    return
  padded = batching.pad_rows(images, max(pad_to or b, b))
  estimates = certify.estimate_scores(
      params, padded, encoder=encoder, sigma=sigma,
      key=jax.random.fold_in(key, _CERTIFY), n=a.n, n0=a.n0, alpha=a.alpha,
      bounds=(a.bound,), references=tuple(a.references), chunk_size=a.chunk_size,
      progress=_task(
          progress, f"{name}: certifying, {a.n0} + {a.n} samples x {len(padded)} images",
          images=len(padded), compile_key=("certify", encoder, padded.shape)))
  for estimate in estimates:
    def bound_of(i, e, estimate=estimate):
      return np.asarray(certify.feature_certificate(
          estimate.take(np.array([i])), eps=e, cos=a.cos).inner_product_bound[0], np.float64)
    yield (estimate.reference, np.asarray(estimate.deficit, np.float64),
           np.asarray(estimate.direction, np.float32),
           np.asarray(certify.feature_certificate(estimate, eps=0.0, cos=a.cos).radius,
                      np.float64), bound_of, None)


# ---------------------------------------------------------------------------------------
# Summary and files.
# ---------------------------------------------------------------------------------------


def summarise(rows: list[dict], *, alpha: float, k_sigma: float,
              images: int) -> dict[str, Any]:
  """Counts of pairs and violations, and the rates to compare with alpha."""
  raw = sum(r["violation"] for r in rows)
  beyond = sum(r["violation_k_sigma"] for r in rows)
  bad_images = {(r["variant"], r["image"]) for r in rows if r["violation_k_sigma"]}
  tested_images = {(r["variant"], r["image"]) for r in rows}
  margins = np.array([r["margin"] for r in rows]) if rows else np.zeros(1)
  return {
      "pairs": len(rows),
      "image_eps_pairs": len({(r["variant"], r["image"], r["eps"]) for r in rows}),
      "images": images, "images_tested": len(tested_images),
      "violations_raw": int(raw), "violations_k_sigma": int(beyond), "k_sigma": k_sigma,
      "violation_rate_raw": raw / max(len(rows), 1),
      "violation_rate_k_sigma": beyond / max(len(rows), 1),
      "images_violated_k_sigma": len(bad_images),
      "image_violation_rate_k_sigma": len(bad_images) / max(len(tested_images), 1),
      "alpha": alpha, "expected_images_violated_at_most": alpha * len(tested_images),
      "min_margin": float(margins.min()), "mean_margin": float(margins.mean()),
      "mean_attack_drop": float(np.mean([r["measured_clean"] - r["measured"]
                                         for r in rows])) if rows else 0.0,
      "mean_bound_drop": float(np.mean([(2 * r["score_lcb"] - 1) - r["certified_inner_product"]
                                        for r in rows])) if rows else 0.0,
  }


def by_fraction(rows: list[dict]) -> list[dict]:
  """One row per (encoder, reference, fraction or eps): averages and violation counts."""
  groups = collections.defaultdict(list)
  for r in rows:
    level = f"{r['fraction']:g} R" if r["fraction"] is not None else f"{r['eps']:g}"
    groups[(r["variant"], r["reference"], level)].append(r)
  table = []
  for (enc, ref, level), rs in sorted(groups.items()):
    table.append({
        "variant": enc, "reference": ref, "eps": level, "pairs": len(rs),
        "mean eps": float(np.mean([r["eps"] for r in rs])),
        "mean bound B": float(np.mean([r["certified_inner_product"] for r in rs])),
        "mean measured": float(np.mean([r["measured"] for r in rs])),
        "mean clean": float(np.mean([r["measured_clean"] for r in rs])),
        "min margin": float(np.min([r["margin"] for r in rs])),
        "max se": float(np.max([r["standard_error"] for r in rs])),
        "raw violations": int(sum(r["violation"] for r in rs)),
        "k-sigma violations": int(sum(r["violation_k_sigma"] for r in rs))})
  return table


def audit_markdown(summary: dict, table: list[dict], audit, skipped: dict) -> str:
  """The Markdown of ``audit.md``."""
  s = summary
  levels = (f"eps = {tuple(audit.eps_fractions)} x the certified radius for cos >= "
            f"{audit.cos:g}" if audit.eps is None
            else f"eps in {tuple(audit.eps)} where the cosine is certified (B >= 0)")
  text = [
      "# Soundness audit of the feature certificate",
      "",
      f"sigma = {audit.sigma:g}, bound = "
      + (f"{audit.bound}, alpha = {audit.alpha:g}, n0 = {audit.n0}, n = {audit.n}"
         if audit.get("mode") != "sequential" else
         f"betting (sequential: stopped once 'cos >= {audit.cos:g}' is settled at every eps "
         f"of {tuple(audit.certify_eps if audit.eps is None else audit.eps)}, stop = "
         f"{audit.stop}), alpha = {audit.alpha:g}, n0 = {audit.n0}, n_max = {audit.n}")
      + f"; {levels}; references {tuple(audit.references)}.",
      f"Attack: l2 PGD + EOT ({audit.steps} steps of {audit.step_factor:g} eps / steps, "
      f"{audit.eot_samples} noise draws per step) minimising <f_s(x'), u>; measured with "
      f"{audit.measure_n} fresh samples"
      + (f" (after a screen with {audit.screen_n}: pairs more than {audit.screen_k:g} "
         "standard errors above B keep the screened value)." if audit.get("screen_n")
         else "."),
      "",
      f"* pairs tested (image x eps x reference): **{s['pairs']}** "
      f"({s['image_eps_pairs']} (image, eps) pairs, {s['images_tested']} of {s['images']} "
      f"images certified at the level; skipped: {skipped or 'none'})",
      f"* violations, raw (measured < B): **{s['violations_raw']}** "
      f"(rate {s['violation_rate_raw']:.4f})",
      f"* violations beyond {s['k_sigma']:g} standard errors: **{s['violations_k_sigma']}** "
      f"(rate {s['violation_rate_k_sigma']:.4f}); images with one: "
      f"{s['images_violated_k_sigma']} (rate {s['image_violation_rate_k_sigma']:.4f}; a "
      f"sound certificate fails on at most alpha = {s['alpha']:g} of the images, i.e. "
      f"<= {s['expected_images_violated_at_most']:.3f} expected)",
      f"* margin measured - B: min {s['min_margin']:.4f}, mean {s['mean_margin']:.4f}",
      f"* the attack lowered <f_s, u> by {s['mean_attack_drop']:.4f} on average (clean minus "
      f"adversarial measurement); the bound allows a drop of {s['mean_bound_drop']:.4f} "
      "from B(0) = 2 L - 1 on average",
      "",
      report.markdown(table, digits=4),
  ]
  return "\n".join(text)


def _audit_data(config):
  a = config.audit
  spec = a.get("data") or config.data
  spec = dict(spec.items())
  if a.get("num_images"):
    spec["num_examples"] = int(a.num_images)
  return data_lib.from_config(spec)


def _done_groups(workdir: pathlib.Path, batch_size: int) -> dict[tuple, tuple[dict, list]]:
  """What an earlier run of the same config finished: ``{(batch, variant): (its
  audit_batches.jsonl row, its audit.jsonl rows)}``.

  A group is marked after its rows, so its rows are the last ``pairs`` of its rows in
  the file, in the order they were made (a group killed between its rows and its mark
  is audited again and appended again; the mark then follows the complete copy).
  """
  marks = report.done_rows(workdir / BATCHES, ("batch", "variant"))
  if not marks:
    return {}
  rows = {}
  for r in report.read_rows(workdir / RESULTS):
    rows.setdefault((r["image"] // batch_size, r["variant"]), []).append(report.as_read(r))
  out = {}
  for group, mark in marks.items():
    mine = rows.get(group, [])
    if len(mine) >= mark["pairs"]:
      out[group] = (mark, mine[len(mine) - mark["pairs"]:])
  return out


def run(config, workdir: str, *, variants: list[tuple[str, Any, Any]] | None = None
        ) -> dict[str, Any]:
  """Audits every variant on ``config.audit.data`` (default ``config.data``); writes files.

  ``variants``: the ``fsjax.variants.encoder_variants(config)`` to audit (default: built
  here); passing ones that are already compiled saves the compilations (an encoder is a
  static argument, hashed by identity).

  Resumable (as ``certify.run``): the (batch, variant) groups an earlier run of the same
  config finished (``audit_batches.jsonl`` marks each, with its uncertified images, after
  its rows; :func:`certify.report.check_workdir` refuses another config's folder in one
  line) are not audited again, and the summary is made from all rows in the
  uninterrupted run's order: the same ``audit.md``. Ctrl-C stops after the group being
  audited (its rows written) with :class:`fsjax.cli.Interrupted`.
  """
  a = audit_settings(config)
  check_audit_config(a)
  workdir = pathlib.Path(workdir)
  for name in (RESULTS, BATCHES):  # another config's rows: refuse now
    report.check_workdir(config, workdir / name, CONFIG_NAME)
  variants = variants or variants_lib.encoder_variants(config)
  if a.get("variants"):
    unknown = sorted(set(a.variants) - {v[0] for v in variants})
    if unknown:
      raise ValueError(f"config.audit.variants: {unknown} not among the configured variants "
                       f"{[v[0] for v in variants]}.")
    variants = [v for v in variants if v[0] in a.variants]
  dataset = _audit_data(config)
  key = jax.random.PRNGKey(config.seed)
  groups = [(b, v[0]) for b in range(len(dataset)) for v in variants]
  done = _done_groups(workdir, dataset.batch_size)
  todo = [g for g in groups if g not in done]
  if len(todo) < len(groups):
    print(f"certify.audit: resuming {workdir}: {len(groups) - len(todo)} of {len(groups)} "
          "(batch, variant) groups are audited"
          + ("; auditing the rest." if todo else "; nothing left to audit."), flush=True)
  rows, skipped, offset = [], collections.Counter(), 0
  # The certifications; attacks and measurements join the total as pairs are certified
  # (sequential: each image's samples join it once the image has stopped).
  certify_samples = (0 if a.get("mode") == "sequential" else
                     len(todo) * dataset.batch_size * (a.n0 + a.n))
  with checkpointing.lock_workdir(workdir, "certify.audit"), report.rows(
      workdir / RESULTS, config, config_name=CONFIG_NAME) as write, report.rows(
          workdir / BATCHES, config, config_name=CONFIG_NAME) as mark, \
      cli.interruptible() as stop, report.SampleProgress(certify_samples, "audit") as progress:
    for b, batch in enumerate(dataset):
      for name, encoder, params in variants:
        if (b, name) in done:
          group_mark, group_rows = done[(b, name)]
          batch_skipped = group_mark["skipped"]
        else:
          group_rows, batch_skipped = audit_images(
              encoder, params, batch["image"], batch["label"], a,
              jax.random.fold_in(key, b), name=name, first_index=offset,
              pad_to=dataset.batch_size, progress=progress)
          for r in group_rows:
            write(r)
          mark({"batch": b, "variant": name, "first_image": offset,
                "images": int(batch["image"].shape[0]), "pairs": len(group_rows),
                "skipped": batch_skipped})
          # As a resumed run reads them back: the same summary, bit for bit.
          group_rows = [report.as_read(r) for r in group_rows]
          todo.remove((b, name))
          if stop():  # pressed while this group ran: its rows are written, stop here
            rest = "audit the rest" if todo else "write audit.md"
            raise cli.stopped("certify.audit", f"{len(groups) - len(todo)} of {len(groups)} "
                              "(batch, variant) groups are audited", workdir / RESULTS, rest)
        skipped.update(batch_skipped)
        rows += group_rows
      offset += batch["image"].shape[0]
  summary = summarise(rows, alpha=float(a.alpha), k_sigma=float(a.k_sigma),
                      images=offset * len(variants))
  text = audit_markdown(summary, by_fraction(rows), a, dict(skipped))
  report.write_text(workdir / "audit.md", text)
  print(text)
  return summary


def main(config, workdir: str) -> None:
  run(config, workdir)


if __name__ == "__main__":
  cli.run(main, workdir_help="Where audit.jsonl and audit.md are written.")
