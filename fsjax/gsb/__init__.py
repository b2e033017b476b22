"""Gaussian Smoothness Booster (GSB), paper Section 4 and Appendix A.2.

A denoiser D before the frozen encoder and a residual smoothness mapper M after it,
trained one after the other to raise the Gaussian robustness score that the certificate
depends on (method.md section 4):

* :class:`Denoiser`: the conditional U-Net D(x_noisy, sigma).
* :class:`SmoothnessMapper`: the residual mapper M(z, sigma) (Eq. 10).
* losses: :func:`reconstruction_loss` (Eq. 7), :func:`robustness_loss` (Eq. 8),
  :func:`denoiser_loss` (Eq. 9), :func:`mapper_robustness_loss` (Eq. 11),
  :func:`identity_loss` and :func:`statistics_loss` (Eq. 12), :func:`mapper_loss` (Eq. 13).
* :class:`BoostedEncoder`: ``normalise(M(g(D(x, sigma)), sigma))`` (Eq. 14), any subset.
* :func:`default_gsb_config` (and :func:`resolved_gsb_config`, a config's ``gsb`` over
  them), :func:`build_denoiser`, :func:`build_mapper`,
  :func:`ablation_variants` (the Table 6 rows).
* :mod:`fsjax.gsb.checkpoint`: :func:`~fsjax.gsb.checkpoint.load` reads the final D and M
  parameters of a ``python -m train.gsb`` workdir back.

Training and plugging GSB into certification::

  python -m train.gsb --config configs/default.py --workdir WORKDIR
  python -m certify.run --config configs/default.py --workdir OUT \
      --config.gsb.checkpoint=WORKDIR

With ``config.gsb.checkpoint`` set, ``certify.run`` loads the booster
(``checkpoint.load(WORKDIR, config=config)``, which refuses a booster trained for another
encoder or architecture) and certifies the Table 6 rows FS, FS+D, FS+M, FS+D+M. Use the
same config for both commands (at least the same ``config.encoder`` and
``config.gsb.denoiser`` / ``config.gsb.mapper`` architecture). In code::

  gsb_params = fsjax.gsb.checkpoint.load(WORKDIR, config=config)
  boosted = fsjax.gsb.BoostedEncoder(encoder, denoiser=fsjax.gsb.build_denoiser(config),
                                     mapper=fsjax.gsb.build_mapper(config, token_dim))
  features = boosted({"encoder": encoder_params, **gsb_params}, x + delta, sigma=sigma)
"""

from fsjax.gsb import checkpoint
from fsjax.gsb.boosted import ablation_variants
from fsjax.gsb.boosted import BoostedEncoder
from fsjax.gsb.boosted import build_denoiser
from fsjax.gsb.boosted import build_mapper
from fsjax.gsb.boosted import default_gsb_config
from fsjax.gsb.boosted import resolved_gsb_config
from fsjax.gsb.denoiser import Denoiser
from fsjax.gsb.losses import denoiser_loss
from fsjax.gsb.losses import identity_loss
from fsjax.gsb.losses import mapper_loss
from fsjax.gsb.losses import mapper_robustness_loss
from fsjax.gsb.losses import reconstruction_loss
from fsjax.gsb.losses import robustness_loss
from fsjax.gsb.losses import statistics_loss
from fsjax.gsb.mapper import SmoothnessMapper

__all__ = [
    "BoostedEncoder",
    "Denoiser",
    "SmoothnessMapper",
    "ablation_variants",
    "build_denoiser",
    "checkpoint",
    "build_mapper",
    "default_gsb_config",
    "denoiser_loss",
    "identity_loss",
    "mapper_loss",
    "mapper_robustness_loss",
    "reconstruction_loss",
    "resolved_gsb_config",
    "robustness_loss",
    "statistics_loss",
]
