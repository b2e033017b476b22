"""The paper's MLLM metrics (Section 6.1, "Evaluation metrics"): FCS, ACC and ASR.

In the paper's words: "FCS measures the cosine similarity between clean and adversarial
features extracted by the same feature encoder, reflecting its feature-wise robustness.
ACC denotes the proportion of correctly completed tasks, while ASR indicates the
proportion of cases where the model is successfully manipulated to produce the
adversarially targeted outputs." Classification and VQA: ACC and ASR compare the parsed
answer with the correct and the target option; an unparsable answer is neither and is
counted. Captioning: a judge scores the caption against the vanilla MLLM's captions of
the clean and of the target image; ACC / ASR are the rates of scores >= a threshold, and
the table shows "rate (mean score)", as the paper's "59% (0.483)".

Per-row values are numpy arrays; :func:`summarize_choices` / :func:`summarize_captions`
reduce them to a :class:`Summary`, and :func:`markdown_table` lays summaries out as the
paper's Tables 3-5 (one row per model, FCS / ACC / ASR per attack).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fsjax import encoders
from fsjax import tables
from fsjax.attacks import accuracy
from fsjax.attacks import attack_success_rate
from fsjax.attacks import feature_cosine_similarity  # FCS from images (reexported).
from fsjax.tasks import _prompts

# M-Attack's caption evaluator counts a GPT score >= 0.3 as a match; the paper lost its
# thresholds in extraction, so this default is our choice, not the paper's.
DEFAULT_THRESHOLD = 0.3


def features_cosine(clean: jax.typing.ArrayLike, adversarial: jax.typing.ArrayLike) -> np.ndarray:
  """FCS from features already computed: the cosine of clean vs adversarial features.

  Use it on the features handed to the LLM (e.g. the smoothed tokens of the same
  encoder); :func:`feature_cosine_similarity` (from :mod:`fsjax.attacks`) computes the
  same from images.

  Args:
    clean: ``[B, ...]`` features of the clean images (tokens are flattened).
    adversarial: the same shape, features of the adversarial images.

  Returns:
    ``[B]`` float32 cosines in [-1, 1].
  """
  clean, adversarial = jnp.asarray(clean, jnp.float32), jnp.asarray(adversarial, jnp.float32)
  if clean.shape != adversarial.shape or clean.ndim < 2:
    raise ValueError(f"clean and adversarial features must have the same shape [B, ...], "
                     f"got {clean.shape} and {adversarial.shape}.")
  b = clean.shape[0]
  return np.asarray(encoders.cosine(clean.reshape(b, -1), adversarial.reshape(b, -1)))


def choice_outcomes(pred: Sequence[int], answer: Sequence[int],
                    target: Sequence[int] | int) -> dict[str, np.ndarray]:
  """Per-row outcomes of a multiple-choice task.

  Args:
    pred: ``[B]`` parsed options (:data:`~fsjax.tasks.UNPARSABLE` = -1 if unparsable).
    answer: ``[B]`` correct options.
    target: ``[B]`` or one int: the attacker's target option.

  Returns:
    ``{"correct", "success", "unparsable"}``, each bool ``[B]``; an unparsable row is
    neither correct nor a success.
  """
  pred, answer, target = np.asarray(pred), np.asarray(answer), np.asarray(target)
  if pred.ndim != 1 or answer.shape != pred.shape or target.shape not in ((), pred.shape):
    raise ValueError(f"pred, answer (and a per-row target) must be [B] of the same shape, "
                     f"got {pred.shape}, {answer.shape} and {target.shape}.")
  target = np.broadcast_to(target, pred.shape)
  if np.any(answer < 0) or np.any(target < 0):
    raise ValueError("answer and target must be option indices >= 0.")
  return {"correct": pred == answer, "success": pred == target,
          "unparsable": pred == _prompts.UNPARSABLE}


def rate_and_mean(scores: Sequence[float], threshold: float = DEFAULT_THRESHOLD
                  ) -> tuple[float, float]:
  """The caption cell "% (mean)": the share of ``scores >= threshold`` and their mean."""
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 1 or not len(scores):
    raise ValueError(f"scores must be a non-empty [B] array, got shape {scores.shape}.")
  return float(np.mean(scores >= threshold)), float(np.mean(scores))


@dataclasses.dataclass(frozen=True)
class Summary:
  """One cell group of the paper's tables: FCS, ACC, ASR of one model under one attack.

  Attributes:
    fcs: mean FCS over the images.
    acc: ACC, the share of correctly completed tasks (unparsable rows count as wrong).
    asr: ASR, the share steered to the attacker's target.
    count: the number of images.
    unparsable: the number of unparsable answers (0 for captions).
    acc_score: captions only: the mean judge score against the clean caption.
    asr_score: captions only: the mean judge score against the target caption.
  """
  fcs: float
  acc: float
  asr: float
  count: int
  unparsable: int = 0
  acc_score: float | None = None
  asr_score: float | None = None

  def cells(self) -> dict[str, str]:
    """The table cells: ``{"FCS": "0.427", "ACC": "8.2%", "ASR": "78.2%"}``; captions
    ``"59.0% (0.483)"``."""
    def cell(rate, score):
      text = f"{100 * rate:.1f}%"
      return text if score is None else f"{text} ({score:.3f})"
    return {"FCS": f"{self.fcs:.3f}", "ACC": cell(self.acc, self.acc_score),
            "ASR": cell(self.asr, self.asr_score)}

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def summarize_choices(fcs: Sequence[float], pred: Sequence[int], answer: Sequence[int],
                      target: Sequence[int] | int) -> Summary:
  """Summary of a classification / VQA run (Tables 4 and 5); args as `choice_outcomes`.

  ACC and ASR are :func:`fsjax.attacks.accuracy` and
  :func:`fsjax.attacks.attack_success_rate` of the parsed answers (an unparsable -1
  matches neither), over all rows.
  """
  outcomes = choice_outcomes(pred, answer, target)
  fcs = _check_fcs(fcs, len(outcomes["correct"]))
  pred = np.asarray(pred)
  return Summary(fcs=float(np.mean(fcs)), acc=float(accuracy(pred, np.asarray(answer))),
                 asr=float(attack_success_rate(pred, np.broadcast_to(target, pred.shape))),
                 count=len(pred), unparsable=int(np.sum(outcomes["unparsable"])))


def summarize_captions(fcs: Sequence[float], clean_scores: Sequence[float],
                       target_scores: Sequence[float], *,
                       threshold: float = DEFAULT_THRESHOLD) -> Summary:
  """Summary of a captioning run (Table 3).

  Args:
    fcs: ``[B]`` FCS per image.
    clean_scores: ``[B]`` judge(predicted caption, vanilla caption of the clean image).
    target_scores: ``[B]`` judge(predicted caption, vanilla caption of the target image).
    threshold: a score at or above it is a match (default 0.3, M-Attack's evaluator; the
      paper's own value is lost: our choice).

  Returns:
    ACC = rate of ``clean_scores >= threshold``, ASR = rate of ``target_scores >=
    threshold``, with the mean scores beside them.
  """
  acc, acc_score = rate_and_mean(clean_scores, threshold)
  asr, asr_score = rate_and_mean(target_scores, threshold)
  if len(np.asarray(clean_scores)) != len(np.asarray(target_scores)):
    raise ValueError("clean_scores and target_scores must have the same length.")
  fcs = _check_fcs(fcs, len(np.asarray(clean_scores)))
  return Summary(fcs=float(np.mean(fcs)), acc=acc, asr=asr, count=len(fcs),
                 acc_score=acc_score, asr_score=asr_score)


def _check_fcs(fcs, n: int) -> np.ndarray:
  fcs = np.asarray(fcs, np.float64)
  if fcs.shape != (n,):
    raise ValueError(f"fcs must be [B] with B = {n} (one per row), got shape {fcs.shape}.")
  return fcs


def markdown_table(results: Mapping[str, Mapping[str, Summary]]) -> str:
  """The paper's layout: one row per model, FCS / ACC / ASR under each attack.

  Args:
    results: ``{model: {attack: Summary}}``; the attacks (columns) are those of the
      first model, in order; every model must have them all.

  Returns:
    A markdown table (two header lines, then one line per model).
  """
  if not results:
    raise ValueError("results is empty: nothing to lay out.")
  attacks = list(next(iter(results.values())))
  header = ["model"] + [f"{a} {m}" for a in attacks for m in ("FCS", "ACC", "ASR")]
  rows = []
  for model, row in results.items():
    if list(row) != attacks:
      raise ValueError(f"model {model!r} has attacks {list(row)}, expected {attacks}.")
    rows.append([model] + [c for a in attacks for c in row[a].cells().values()])
  return tables.markdown(header, rows)
