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
