"""fsjax.weights: the one weight-file reader, against safetensors' and torch's own writers."""

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from fsjax import weights


def test_safetensors_bfloat16_and_shards(tmp_path):
  a = torch.randn(3, 4).to(torch.bfloat16)
  b = torch.arange(6, dtype=torch.int64).reshape(2, 3)
  safetensors.torch.save_file({"a": a}, str(tmp_path / "s1.safetensors"))
  safetensors.torch.save_file({"b": b}, str(tmp_path / "s2.safetensors"))
  (tmp_path / "m.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))
  state = weights.read_state_dict(str(tmp_path / "m.safetensors.index.json"))
  assert sorted(state) == ["a", "b"]
  np.testing.assert_array_equal(state["a"].astype(np.float32), a.float().numpy())
  np.testing.assert_array_equal(state["b"], b.numpy())


def test_corrupt_file_error_names_the_file(tmp_path):
  bad = tmp_path / "model.safetensors"
  bad.write_bytes(b"\xff" * 64)  # a header size far larger than the file
  with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors"):
    weights.read_state_dict(str(bad))


def test_hf_directory_reads_config_and_the_preferred_weights(tmp_path):
  """The one Hugging Face directory reader (CLIP, LLaVA, MPT): config.json, the first
  weight file present in the caller's order, cache folders resolved to their snapshot."""
  snapshot = tmp_path / "models--org--name" / "snapshots" / "abc123"
  snapshot.mkdir(parents=True)
  (snapshot / "config.json").write_text(json.dumps({"model_type": "x", "width": 3}))
  (snapshot / "pytorch_model.bin").write_bytes(b"")
  (snapshot / "model.safetensors").write_bytes(b"")
  cache = tmp_path / "models--org--name"
  d = weights.hf_directory(cache, what="Test", weight_files=("model.safetensors",
                                                              "pytorch_model.bin"))
  assert d.path == str(snapshot) and d.config == {"model_type": "x", "width": 3}
  assert d.weights == str(snapshot / "model.safetensors")
  assert d.config_file == str(snapshot / "config.json")
  # refs/main picks the snapshot when there are several.
  (cache / "snapshots" / "old").mkdir()
  with pytest.raises(ValueError, match="2 snapshots and no refs/main"):
    weights.resolve(cache, what="path")
  (cache / "refs").mkdir()
  (cache / "refs" / "main").write_text("abc123\n")
  assert weights.resolve(cache, what="path") == str(snapshot)
  with pytest.raises(ValueError, match="Test directory .* none of the weight files"):
    weights.hf_directory(snapshot, what="Test", weight_files=("flax_model.msgpack",))
  with pytest.raises(ValueError, match="not a Hugging Face Test directory"):
    weights.hf_directory(snapshot / "model.safetensors", what="Test", weight_files=("a",))
  with pytest.raises(ValueError, match="Test checkpoint path .* does not exist"):
    weights.hf_directory(tmp_path / "missing", what="Test", weight_files=("a",))
