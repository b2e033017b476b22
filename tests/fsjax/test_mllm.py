"""fsjax.mllm: the MLLM registry (one builder contract) and mllm.smoothed (no model runs)."""

import dataclasses

import ml_collections
import pytest

from fsjax import encoders
from fsjax import mllm
from fsjax import smoothing


@dataclasses.dataclass(frozen=True, eq=False)
class _Toy:
  """The smallest thing with the MLLM surface that mllm.build and mllm.smoothed touch."""

  encoder: encoders.Encoder

  def with_encoder(self, encoder):
    return dataclasses.replace(self, encoder=encoder)


def test_a_registered_builder_is_built_by_the_config_name(toy, monkeypatch):
  encoder, params = toy
  monkeypatch.setattr(mllm, "_BUILDERS", dict(mllm._BUILDERS))  # pylint: disable=protected-access
  seen = []

  @mllm.register("toy")
  def build(config):  # pylint: disable=unused-variable
    seen.append(config.toy.size)
    return _Toy(encoder), {"vision": params, "language": {"size": config.toy.size}}

  config = ml_collections.ConfigDict(dict(mllm=dict(name="toy"), toy=dict(size=3)))
  model, built = mllm.build(config)
  assert seen == [3] and model.encoder is encoder and built["language"] == {"size": 3}
  # Without config.mllm, the one registered section present names the model.
  del config["mllm"]
  assert mllm.name_of(config) == "toy"

  smoothed, sparams = mllm.smoothed(model, built, sigma=0.25, n=3, chunk_size=2)
  assert isinstance(smoothed.encoder, smoothing.SmoothedEncoder)
  assert (smoothed.encoder.base, smoothed.encoder.sigma, smoothed.encoder.n) == (encoder, 0.25, 3)
  assert sparams["vision"] == {"encoder": params} and sparams["language"] is built["language"]


def test_the_config_must_name_one_known_mllm():
  two = ml_collections.ConfigDict(dict(llava=dict(), openflamingo=dict()))
  with pytest.raises(ValueError, match="exactly one MLLM section"):
    mllm.name_of(two)
  with pytest.raises(ValueError, match="exactly one MLLM section"):
    mllm.name_of(ml_collections.ConfigDict(dict(encoder=dict(name="clip"))))
  with pytest.raises(ValueError, match="config.mllm.name='gpt' is not a known MLLM"):
    mllm.name_of(ml_collections.ConfigDict(dict(mllm=dict(name="gpt"))))
  assert mllm.name_of(ml_collections.ConfigDict(dict(mllm=dict(name="llava")))) == "llava"
