"""Certification: pure, jitted maths of the feature and prediction certificates, and CLIs.

The design card's calls, e.g. ``certify.fcsb(params, x, encoder=..., sigma=0.25, eps=0.5,
key=key)``. Implementation lives in private modules, re-exported here (optax style).

One pipeline for both halves: the Monte Carlo gives a :class:`ScoreEstimate`
(:func:`estimate_scores`; :func:`prediction_margin` adds the class and the margin), and a
certificate with its radius follows from it (:func:`feature_certificate`,
:func:`prediction_certificate`); ``fcsb`` / ``certify_prediction`` do both in one call.
Every estimate and certificate says whether it is one: ``is_certificate`` is False for
``bound="point"`` (the paper's plug-in estimate). Arguments are validated once, at the
public entry (:func:`check_certify_args`).
"""

from certify._answers import INNER_STREAM
from certify._answers import AnswerCertificate
from certify._answers import OptionAnswerer
from certify._answers import answer_certificate
from certify._answers import answer_counts
from certify._answers import answer_margin_loss
from certify._answers import certify_answers
from certify._answers import sequential_answers
from certify._answers import clean_answers
from certify._answers import mllm_answerer
from certify._answers import option_ids
from certify._bounds import BOUNDS
from certify._bounds import ScoreStats  # what lower_confidence_bound takes
from certify._bounds import lower_confidence_bound
from certify._closed_form import fcsb_from_score
from certify._closed_form import radius_from_score
from certify._estimate import concentration_radius
from certify._estimate import cosine_of_perturbed
from certify._estimate import estimate_cosine_bound
from certify._estimate import llm_input_bounds
from certify._estimate import samples_for_tolerance
from certify._feature import DEFAULT_ALPHA
from certify._feature import FeatureCertificate
from certify._feature import REFERENCES
from certify._feature import ScoreEstimate
from certify._feature import certified_radius
from certify._feature import check_certify_args
from certify._feature import estimate_scores
from certify._feature import fcsb
from certify._feature import feature_certificate
from certify._feature import gaussian_robustness_score
from certify._norm import NormAwareCertificate
from certify._norm import norm_aware_cosine_bound
from certify._norm import norm_aware_fcsb
from certify._norm import norm_aware_radius
from certify._norm import norm_bound
from certify._prediction import ABSTAIN
from certify._prediction import angle_margin
from certify._prediction import certified_accuracy
from certify._prediction import certified_prediction
from certify._prediction import check_prototypes
from certify._prediction import clopper_pearson_lower
from certify._prediction import per_class_radius
from certify._prediction import prediction_radius
from certify._prediction import prototype_logit_bounds
from certify._prediction import required_margin
from certify._prediction import rs_certify_from_counts
from certify._prediction import rs_predict_from_counts
from certify._sequential import FUTILITY as SEQUENTIAL_FUTILITY
from certify._sequential import STOPS as SEQUENTIAL_STOPS
from certify._sequential import SequentialCertificate
from certify._sequential import certificate_from_bounds as sequential_certificate_from_bounds
from certify._sequential import grid as sequential_grid
from certify._sequential import sequential_fcsb
from certify._sequential import sequential_predict
from certify._smoothed_prediction import PREDICTION_CERTIFICATES
from certify._smoothed_prediction import PredictionCertificate
from certify._smoothed_prediction import PredictionMargin
from certify._smoothed_prediction import certify_prediction
from certify._smoothed_prediction import class_counts
from certify._smoothed_prediction import prediction_certificate
from certify._smoothed_prediction import prediction_margin
from certify._smoothed_prediction import rs_certify
from certify._smoothed_prediction import rs_predict
# The heads are library modules (fsjax.heads); certify re-exports them for its callers.
from fsjax.heads import CosinePrototypeHead  # pylint: disable=g-bad-import-order
from fsjax.heads import LinearHead
from fsjax.heads import fs_classifier
from fsjax.heads import unit_prototypes
