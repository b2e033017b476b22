"""train.llava: a short run lowers the loss, resumes, saves a loadable LLaVA, stops on NaN."""

import json

import numpy as np
from PIL import Image
import pytest

import fsjax.llava
from configs import llava_embedded
from fsjax import encoders
from fsjax import tasks
from train import llava as train_llava
from train import loop


def _config(folder, *, steps=30):
  config = llava_embedded.get_config("runlocal")
  config.encoder.resolution = 32        # 1 image token; the smallest EfficientNet input
  config.encoder.dtype = "float32"
  config.llava.text.update(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           num_key_value_heads=1)
  config.llava.max_new_tokens = 4
  config.llava.train.update(dataset=f"folder:{folder}", image_size=32, per_class=2,
                            test_per_class=1, steps=steps, batch_size=16, log_every=5,
                            checkpoint_every=10, learning_rate=3e-3, warmup_steps=2,
                            feature_batch_size=20, tasks=("classify", "vqa"))
  return config


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Ten class folders stand in for Fashion-MNIST's ten classes (same fsjax.data path):
  class c is a noisy 32 px image of its own colour."""
  root = tmp_path_factory.mktemp("fm")
  rng = np.random.default_rng(0)
  colours = rng.integers(30, 225, (10, 3))
  for split, count in (("train", 2), ("test", 1)):
    for c in range(10):
      (root / split / f"class_{c}").mkdir(parents=True)
      for i in range(count):
        img = np.clip(colours[c] + rng.normal(0, 15, (32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / split / f"class_{c}" / f"{i}.png")
  return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, folder):
  """30 steps as a user resumes them: a 10-step run, then the 30-step config in the same
  workdir, which continues from the checkpoint at step 10 (one training run fewer than a
  30-step run and a separate resume test: ~20 s of the suite's time)."""
  workdir = tmp_path_factory.mktemp("llava")
  train_llava.train_and_evaluate(_config(folder, steps=10), str(workdir))
  config = _config(folder)
  result = train_llava.train_and_evaluate(config, str(workdir))
  return config, workdir, result


def _rows(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_short_run_lowers_the_loss(trained):
  _, workdir, result = trained
  rows = _rows(workdir)
  assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
  assert rows[-1]["loss"] < 0.8 * rows[0]["loss"]
  assert all(np.isfinite(r["grad_norm"]) for r in rows)
  for name in ("config.json", "model.safetensors", "tokenizer.json", "eval.json"):
    assert (workdir / name).is_file(), name
  # 10 test images, 9 of them of clean classes (bag is the target).
  assert result["classify_images"] == 9 and result["test_images"] == 10
  assert 0 <= result["classify_accuracy"] <= 1 and result["image_tokens"] == 1


def test_saved_model_loads_with_the_encoder_and_its_loss_is_the_masked_cross_entropy(trained):
  """fsjax.llava.load reads the workdir; the training loss equals a numpy cross-entropy
  of the loaded model's logits over the answer tokens (shifted by one, prompt masked)."""
  config, workdir, _ = trained
  encoder, encoder_params = encoders.build(config.encoder)
  model, params = fsjax.llava.load(workdir, encoder=encoder, encoder_params=encoder_params)
  assert model.config.vision_config is None and model.config.vision_feature_size == 1280
  tokenizer = train_llava.build_tokenizer()
  assert model.tokenizer.get_vocab() == tokenizer.get_vocab()
  images, labels, examples = tasks.load_instructions(
      dataset=config.llava.train.dataset, split="train", image_size=32, per_class=2,
      tasks=("classify", "vqa"))
  feats = train_llava.encoder_features(encoder_params, images, encoder=encoder, batch_size=20)
  arrays = train_llava.token_arrays(tokenizer, examples[:6], num_image_tokens=1)
  batch = {k: arrays[k] for k in ("input_ids", "loss_mask", "attention_mask")}
  batch["features"] = feats[arrays["image"]]
  loss, _ = train_llava.loss_fn(model.language, params["language"], batch)

  logits = np.asarray(model.logits(params, batch["input_ids"], batch["features"],
                                   valid=batch["attention_mask"].astype(bool)), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  ids, mask = batch["input_ids"], batch["loss_mask"]
  nll = [-logp[b, t - 1, ids[b, t]] for b in range(len(ids)) for t in range(1, ids.shape[1])
         if mask[b, t]]
  # Each row's answer tokens + EOS: " 3" or " C", then </s>.
  assert len(nll) == 2 * len(ids)
  np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-4)


def test_resume_continues_from_the_latest_checkpoint(trained):
  _, workdir, _ = trained  # 10 steps, then the 30-step config in the same workdir
  steps = [r["step"] for r in _rows(workdir)]
  assert steps == [5, 10, 15, 20, 25, 30]  # the second run started at step 10
  # A finished run keeps its final state only (train.loop.run).
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == [30]


def test_nan_loss_stops_before_saving(tmp_path, folder, monkeypatch):
  real = train_llava.encoder_features
  monkeypatch.setattr(train_llava, "encoder_features",
                      lambda *a, **k: np.full_like(real(*a, **k), np.nan))
  with pytest.raises(loop.NonFiniteLossError, match="step 1"):
    train_llava.train_and_evaluate(_config(folder, steps=10), str(tmp_path))
  assert not (tmp_path / "model.safetensors").exists()
  assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]


def test_batches_are_seeded_epoch_permutations():
  n, bs = 10, 3
  epoch = np.concatenate([train_llava.batch_indices(n, bs, s, 0) for s in range(3)])
  assert len(set(epoch.tolist())) == 9  # 3 full batches of one permutation, no repeats
  np.testing.assert_array_equal(train_llava.batch_indices(n, bs, 4, 0),
                                train_llava.batch_indices(n, bs, 4, 0))


def test_bad_train_config_is_named(folder):
  config = _config(folder)
  config.llava.train.steps = 0
  with pytest.raises(ValueError, match="config.llava.train.steps"):
    train_llava.train_and_evaluate(config, "/nonexistent/never")
  config = _config(folder)
  config.llava.train.tasks = ("classify", "dance")
  with pytest.raises(ValueError, match="dance"):
    train_llava.check_train_config(config.llava.train)
