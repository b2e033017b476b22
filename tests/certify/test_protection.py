"""certify.protection: the MLLM experiment end to end on a tiny random LLaVA and a tiny
random OpenFlamingo, metrics recomputed from the jsonl rows, and the smoothed row's
features (what each MLLM's language side consumes) against a closed form."""

import contextlib
import csv
import dataclasses
import io
import json
import os
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

import fsjax.llava
from certify import protection
from configs import common
from configs import llava15_7b
from configs import llava_embedded
from configs import llava_tiny
from configs import openflamingo_9b
from configs import openflamingo_tiny
from fsjax import attacks
from fsjax import cli
from fsjax import encoders
from fsjax import flamingo
from fsjax import mllm
from fsjax import smoothing
from fsjax import tasks
from fsjax.tasks import _instructions as instructions


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """Ten class folders (Fashion-MNIST's labels 0-9) of noisy single-colour 28 px images."""
  root = tmp_path_factory.mktemp("fm")
  rng = np.random.default_rng(0)
  colours = rng.integers(30, 225, (10, 3))
  for c in range(10):
    (root / "test" / f"class_{c}").mkdir(parents=True)
    for i in range(3):
      img = np.clip(colours[c] + rng.normal(0, 15, (28, 28, 3)), 0, 255).astype(np.uint8)
      Image.fromarray(img).save(root / "test" / f"class_{c}" / f"{i}.png")
  return root


def _config(folder):
  config = llava_tiny.get_config()
  config.seed = 0
  embedded = llava_embedded.get_config("runlocal")
  config.attack, config.protection = embedded.attack, embedded.protection
  config.attack.update(num_images=3, batch_size=3, steps=2, n=2, eot_samples=1, examples=2)
  config.protection.update(max_new_tokens=4, certify_n=8, certify_n0=4)
  config.protection.data = ml_collections.ConfigDict(dict(
      name=f"folder:{folder}", split="test", image_size=28, seed=0))
  return config


def _first_integer(text, k):
  """The classification parser, written again: first run of digits, < k, else -1."""
  m = re.search(r"[0-9]+", text)
  return int(m.group()) if m and int(m.group()) < k else -1


def _csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def classified(tmp_path_factory, folder):
  """One classification run (two rows x two attacks), its stderr, and the MLLM and rows
  it built: later runs in this file reuse them (and so their compilations)."""
  config = _config(folder)
  workdir = tmp_path_factory.mktemp("classify")
  built = {}
  build_mllm, build_rows = protection.build_mllm, protection.build_rows
  with pytest.MonkeyPatch.context() as m:
    m.setattr(protection, "build_mllm", lambda c: built.setdefault("mllm", build_mllm(c)))
    m.setattr(protection, "build_rows", lambda c, model, params: built.setdefault(
        "rows", build_rows(c, model, params)))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
      table = protection.run(config, str(workdir), task="classify", attack="attackvlm,pgd")
  return config, workdir, table, err.getvalue(), built


def _reuse(monkeypatch, built):
  monkeypatch.setattr(protection, "build_mllm", lambda c: built["mllm"])
  monkeypatch.setattr(protection, "build_rows", lambda c, model, params: built["rows"])


def test_classification_end_to_end(classified):
  _, workdir, table, err, _ = classified
  # One honest bar: image-steps, the stages named, compilation said, and it ends full.
  assert "image-step" in err and "compiling first" in err and "loading the MLLM" in err
  assert "attackvlm, 2 steps on 3 images" in err and "100%" in err
  for name in ("protection_classify.jsonl", "protection_classify.md",
               "protection_classify.csv", "protection_classify_config.json",
               "protection_classify_attackvlm.png", "protection_classify_pgd.png"):
    assert (workdir / name).is_file(), name
  rows = [json.loads(l) for l in (workdir / "protection_classify.jsonl").read_text().split("\n")
          if l]
  assert [t["variant"] for t in table] == ["original", "smoothed"]
  assert len(rows) == 2 * 2 * 3  # variants x attacks x images
  assert [r["attack_index"] for r in rows] == [0, 0, 0, 1, 1, 1] * 2
  _check_classification_cells(workdir, rows, ("attackvlm", "pgd"))


OUTPUTS = ("protection_classify.md", "protection_classify.csv",
           "protection_classify_attackvlm.png", "protection_classify_pgd.png")


def test_interrupted_run_resumes_to_the_same_table(classified, tmp_path, monkeypatch):
  """Issue 21: killed while writing the last (row, attack) group's rows (a torn line), then
  the same command, stopped by a real Ctrl-C while it attacks that group again, then the
  same command again: the uninterrupted run's table and strips, nothing attacked twice."""
  config, workdir, table, _, built = classified
  _reuse(monkeypatch, built)
  for name in ("protection_classify.jsonl", "protection_classify_config.json",
               "protection_classify_examples.npz"):
    shutil.copy(workdir / name, tmp_path / name)
  results = tmp_path / "protection_classify.jsonl"
  lines = results.read_text().splitlines(keepends=True)
  results.write_text("".join(lines[:-2]) + lines[-2][:30])  # smoothed, pgd: 1 of 3 rows
  attacked, attack_images = [], attacks.attack_images

  def ctrl_c_while_attacking(name, encoder, *args, **kwargs):
    attacked.append(name)
    os.kill(os.getpid(), signal.SIGINT)  # seen once the group is done
    return attack_images(name, encoder, *args, **kwargs)
  monkeypatch.setattr(attacks, "attack_images", ctrl_c_while_attacking)
  with pytest.raises(cli.Interrupted, match=r"4 of 4 \(row, attack\) groups are done .*"
                     r"rerun the same command to write the table and strips"):
    protection.run(config, str(tmp_path), task="classify", attack="attackvlm,pgd")
  assert attacked == ["pgd"] and not any((tmp_path / name).exists() for name in OUTPUTS)
  assert protection.run(config, str(tmp_path), task="classify",
                        attack="attackvlm,pgd") == table
  assert attacked == ["pgd"]  # nothing left to attack
  for name in OUTPUTS:
    assert (tmp_path / name).read_bytes() == (workdir / name).read_bytes(), name


def test_other_config_is_refused_and_writes_nothing(classified):
  config, workdir, _, _, _ = classified
  before = {p.name: p.read_bytes() for p in workdir.iterdir()}
  other = config.copy_and_resolve_references()
  other.protection.threshold = 0.5
  with pytest.raises(ValueError, match=r"different config .*use another --workdir"):
    protection.run(other, str(workdir), task="classify", attack="attackvlm,pgd")
  assert {p.name: p.read_bytes() for p in workdir.iterdir()} == before


def _check_classification_cells(tmp_path, rows, attacks):
  """The table's cells, recomputed from the jsonl rows with a parser written again."""
  cells = {r["variant"]: r for r in _csv(tmp_path / "protection_classify.csv")}
  for variant in ("original", "smoothed"):
    for attack in attacks:
      rs = [r for r in rows if r["variant"] == variant and r["attack"] == attack]
      assert [r["image"] for r in rs] == [0, 1, 2]
      # Clean images are never of the target class ("bag", 8); options 0-9, target 9.
      assert all(r["label"] != 8 and r["target_option"] == 9 for r in rs)
      assert all(r["linf"] <= 16 / 255 + 1e-6 for r in rs)
      options = [_first_integer(r["answer"], 10) for r in rs]
      assert options == [r["option"] for r in rs]
      correct = np.mean([o == r["correct_option"] for o, r in zip(options, rs)])
      success = np.mean([o == 9 for o in options])
      # The strip's colours are the table's outcomes.
      judged = [protection.outcome("classify", r, 0.3) for r in rs]
      assert np.mean([j == "attacked" for j in judged]) == success
      assert np.mean([j == "correct" for j in judged]) == np.mean(
          [o == r["correct_option"] for o, r in zip(options, rs)])
      cell = cells[variant]
      assert cell[f"{attack} ACC"] == f"{100 * correct:.1f}%"
      assert cell[f"{attack} ASR"] == f"{100 * success:.1f}%"
      assert int(cell[f"{attack} unparsable"]) == sum(o == -1 for o in options)
      assert cell[f"{attack} FCS"] == f"{np.mean([r['fcs'] for r in rs]):.3f}"
      if variant == "original":  # no smoothing, no certificate
        assert cell[f"{attack} cert cos z_n"] == "-" and "cert_cos_zn" not in rs[0]
      else:  # the bound on what the LLM receives never exceeds the certified f_s cosine
        assert all(-1 <= r["cert_cos_zn"] <= r["cert_cos_fs"] <= 1 for r in rs)
        # A larger radius certifies less: the clean image's bounds are never below.
        assert all(r["cert_cos_zn_clean"] >= r["cert_cos_zn"] and r["l2"] > 0 for r in rs)
        for key, col in (("cert_cos_fs", "cert cos f_s"), ("cert_cos_zn", "cert cos z_n")):
          assert cell[f"{attack} {col}"] == f"{np.mean([r[key] for r in rs]):.3f}"
  # The random tower's features of an attacked image move: FCS < 1 for the original.
  assert max(r["fcs"] for r in rows if r["variant"] == "original") < 1


@pytest.fixture(scope="module")
def flamingo_tokenizer(tmp_path_factory):
  """A word-level tokenizer folder for the tiny OpenFlamingo: 127 base tokens (the
  prompts' words, then fillers), so that OpenFlamingo's added ``<|endofchunk|>``,
  ``<image>`` and ``<PAD>`` get ids 127-129 (configs/openflamingo_tiny.py)."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  split = tokenizers.pre_tokenizers.Whitespace()
  texts = [instructions.classify_prompt(), tasks.CAPTION_PROMPT, "Output:"]
  words = ["<unk>"] + sorted({w for t in texts for w, _ in split.pre_tokenize_str(t)})
  words += [f"w{i}" for i in range(127 - len(words))]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(
      {w: i for i, w in enumerate(words)}, unk_token="<unk>"))
  tok.pre_tokenizer = split
  folder = tmp_path_factory.mktemp("flamingo_tokenizer")
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(
      folder)
  return folder


def _flamingo_config(folder, tokenizer):
  config = openflamingo_tiny.get_config()
  config.openflamingo.tokenizer = str(tokenizer)
  config.attack.update(num_images=3, batch_size=3, steps=2, n=2, eot_samples=1, examples=2)
  config.protection.update(max_new_tokens=4, certify_n=8, certify_n0=4)
  config.protection.data = ml_collections.ConfigDict(dict(
      name=f"folder:{folder}", split="test", image_size=28, seed=0))
  return config


def test_openflamingo_classification_end_to_end(tmp_path, folder, flamingo_tokenizer):
  config = _flamingo_config(folder, flamingo_tokenizer)
  table = protection.run(config, str(tmp_path), task="classify", attack="attackvlm")
  for name in ("protection_classify.jsonl", "protection_classify.md",
               "protection_classify.csv", "protection_classify_config.json",
               "protection_classify_attackvlm.png"):
    assert (tmp_path / name).is_file(), name
  assert "openflamingo (random init)" in (tmp_path / "protection_classify.md").read_text()
  rows = [json.loads(l) for l in (tmp_path / "protection_classify.jsonl").read_text().split("\n")
          if l]
  assert [t["variant"] for t in table] == ["original", "smoothed"]
  assert len(rows) == 2 * 1 * 3  # variants x attacks x images
  _check_classification_cells(tmp_path, rows, ("attackvlm",))
  # The original row's clean answers are OpenFlamingo's own, through its id-level
  # generate on the images: "<image>" + the prompt, cut at <|endofchunk|> (id 127).
  of, _ = flamingo.build(config)
  data = protection.task_data(config, "classify")
  batch = of.tokenizer(["<image>" + q.prompt for q in data["questions"]], return_tensors="np",
                       padding=True)
  tokens, _ = of.generate(batch["input_ids"], data["images"],
                          attention_mask=batch["attention_mask"], max_new_tokens=4)
  expected = [of.tokenizer.decode(row[:row.index(127)] if 127 in row else row,
                                  skip_special_tokens=True).strip()
              for row in np.asarray(tokens).tolist()]
  answers = [r["answer_clean"] for r in rows
             if r["variant"] == "original" and r["attack"] == "attackvlm"]
  assert answers == expected


def test_captions_judged_against_the_original_models_captions(tmp_path, folder):
  config = _config(folder)
  table = protection.run(config, str(tmp_path), task="caption", attack="pgd")
  rows = [json.loads(l) for l in (tmp_path / "protection_caption.jsonl").read_text().split("\n")
          if l]
  # The original model's clean answers are its own references: exact matches.
  assert table[0]["clean ACC"] == "100.0% (1.000)"
  assert all(r["answer_clean"] == r["reference_clean"] for r in rows
             if r["variant"] == "original")
  for variant in ("original", "smoothed"):
    rs = [r for r in rows if r["variant"] == variant]
    norm = lambda s: " ".join(s.lower().split())
    clean = np.array([norm(r["answer"]) == norm(r["reference_clean"]) for r in rs], float)
    target = np.array([norm(r["answer"]) == norm(r["reference_target"]) for r in rs], float)
    np.testing.assert_array_equal(clean, [r["score_clean"] for r in rs])
    t = [t for t in table if t["variant"] == variant][0]
    assert t["pgd ACC"] == f"{100 * clean.mean():.1f}% ({clean.mean():.3f})"
    assert t["pgd ASR"] == f"{100 * target.mean():.1f}% ({target.mean():.3f})"


def test_timing_table(tmp_path, folder):
  config = _config(folder)
  config.protection.update(timing_n=(1, 2), timing_images=1, timing_repeats=1)
  table = protection.run(config, str(tmp_path), task="timing")
  assert [t["variant"] for t in table] == ["original", "smoothed n=1", "smoothed n=2"]
  assert table[0]["x original"] == 1.0 and all(t["seconds per image"] > 0 for t in table)
  assert (tmp_path / "timing.md").is_file() and (tmp_path / "timing.jsonl").is_file()


@dataclasses.dataclass(frozen=True, eq=False)
class LogNormalEncoder(encoders.Encoder):
  """g(x) = exp(w * mean(x)) * U: every feature points along the fixed U ([T, D]).

  Smoothed: the unit features are all U / ||U||, so the smoothed direction is exactly
  that, and the Monte Carlo mean norm estimates E exp(w * mean(x + delta)) = exp(w *
  mean(x) + w^2 sigma^2 / (2 P)) (log-normal, P pixels): the features handed to the LLM
  are U * exp(w * mean(x) + w^2 sigma^2 / (2 P)).
  """

  def tokens(self, params, x, *, sigma=None):
    x = encoders.resize(x, self.resolution)
    s = jnp.exp(params["w"] * x.reshape(x.shape[0], -1).mean(-1))
    return s[:, None, None] * params["u"][None]


def _toy_mllm(kind, encoder):
  """A LLaVA or an OpenFlamingo (vision width 5) on ``encoder``; no language params."""
  if kind == "llava":
    return fsjax.llava.Llava(config=None, encoder=encoder)
  arch = openflamingo_tiny.get_config().openflamingo.architecture.to_dict()
  model = flamingo.Flamingo(flamingo.FlamingoConfig.from_dict(arch | {"vis_dim": 5}))
  return flamingo.OpenFlamingo(model=model, params=None, encoder=encoder, encoder_params=None)


@pytest.mark.parametrize("kind", ["llava", "openflamingo"])
def test_smoothed_row_features_equal_the_closed_form(kind):
  """The features handed to LLaVA's projector / OpenFlamingo's resampler in a smoothed row."""
  encoder = LogNormalEncoder(resolution=8)
  u = jax.random.normal(jax.random.key(1), (2, 5))
  params = {"w": jnp.float32(20.0), "u": u}
  x = np.stack([np.full((8, 8, 3), 0.2, np.float32), np.full((8, 8, 3), 0.35, np.float32)])
  config = llava_embedded.get_config("runlocal").attack
  config.update(n=4096, sigma=0.25, batch_size=2)
  row = attacks.Row("smoothed", smoothing.SmoothedEncoder(encoder, sigma=0.25, n=4096,
                                                          chunk_size=16), {"encoder": params})
  model = _toy_mllm(kind, encoder)
  assert isinstance(model, mllm.MLLM)
  z = protection.llm_features(model, {"vision": params}, row, x, config, jax.random.key(0))
  p = 8 * 8 * 3
  expected = np.exp(20.0 * x.reshape(2, -1).mean(-1) + 20.0 ** 2 * 0.25 ** 2 / (2 * p))
  expected = expected[:, None, None] * np.asarray(u)[None]
  # Monte Carlo: relative std of the norm estimate ~0.6% at n = 4096; the log-normal
  # factor (+6.7%) is far outside the tolerance, so this checks the smoothing, not f(x).
  np.testing.assert_allclose(z, expected, rtol=0.025)
  cos = (z * expected).sum((1, 2)) / np.linalg.norm(z.reshape(2, -1), axis=1) \
      / np.linalg.norm(expected.reshape(2, -1), axis=1)
  np.testing.assert_allclose(cos, 1.0, atol=1e-5)  # the direction is exact
  plain = protection.llm_features(model, {"vision": params}, attacks.Row(
      "original", encoder, params), x, config, jax.random.key(0))
  np.testing.assert_allclose(plain, np.exp(20.0 * x.reshape(2, -1).mean(-1))[:, None, None]
                             * np.asarray(u)[None], rtol=1e-5)


def test_bad_settings_are_named(tmp_path, folder):
  config = _config(folder)
  with pytest.raises(ValueError, match="--task"):
    protection.run(config, str(tmp_path), task="dance")
  config.attack.n = 0
  with pytest.raises(ValueError, match="config.attack.n"):
    protection.run(config, str(tmp_path), task="classify")
  config = llava_embedded.get_config("runlocal")
  with pytest.raises(ValueError, match="config.llava.checkpoint"):
    protection.build_mllm(config)
  config.openflamingo = openflamingo_tiny.get_config().openflamingo
  with pytest.raises(ValueError, match="exactly one MLLM section"):
    protection.build_mllm(config)
  with pytest.raises(ValueError, match="config.openflamingo.tokenizer is not set"):
    protection.build_mllm(openflamingo_tiny.get_config())
  config = _config(folder)
  config.protection.data.source = "web"
  with pytest.raises(ValueError, match="config.protection.data.source"):
    protection.run(config, str(tmp_path), task="classify")


def _png_folder(root, count, seed):
  root.mkdir(parents=True)
  rng = np.random.default_rng(seed)
  for i in range(count):
    Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(root / f"{i}.png")
  return root


def test_paper_data_from_local_files(tmp_path):
  """The paper's caption pairs and ScienceQA questions, read from local files."""
  config = llava15_7b.get_config()
  config.attack.update(num_images=3)
  config.protection.data.update(image_size=16)
  with pytest.raises(ValueError, match="config.protection.data.target_dir is not set"):
    protection.task_data(config, "caption")
  config.protection.data.target_dir = str(_png_folder(tmp_path / "target", 2, seed=1))
  with pytest.raises(ValueError, match="config.protection.data.clean_dir is not set"):
    protection.task_data(config, "caption")
  config.protection.data.clean_dir = str(_png_folder(tmp_path / "clean", 4, seed=0))
  with pytest.raises(ValueError, match="num_examples=3 exceeds the 2 pairs"):
    protection.task_data(config, "caption")
  config.attack.num_images = 2
  d = protection.task_data(config, "caption")
  assert d["images"].shape == d["targets"].shape == (2, 16, 16, 3)
  assert d["questions"] is None and d["titles"] == ["0.png", "1.png"]
  records = [{"id": f"q{i}", "question": f"Question {i}?", "choices": ["a", "b", "c"],
              "answer": i, "image": f"clean/{i}.png"} for i in range(3)]
  (tmp_path / "sqa.jsonl").write_text("\n".join(json.dumps(r) for r in records))
  config.protection.data.scienceqa = str(tmp_path / "sqa.jsonl")
  config.attack.num_images = 3
  d = protection.task_data(config, "vqa")
  assert [q.answer for q in d["questions"]] == [0, 1, 2]
  assert all(q.target == 3 and "D. None of the above" in q.prompt for q in d["questions"])
  # Targets: the target folder's images in turn (2 images for 3 questions).
  np.testing.assert_array_equal(d["targets"][2], d["targets"][0])
  assert not np.array_equal(d["targets"][1], d["targets"][0])
  assert d["titles"] == ["clean: q0", "clean: q1", "clean: q2"]


def test_mllm_configs_carry_the_papers_protection_settings():
  for config in (llava15_7b.get_config(), openflamingo_9b.get_config()):
    a = config.attack
    assert (a.linf_budget, a.step_size, a.steps, a.sigma, a.n) == (16 / 255, 1 / 255, 300,
                                                                  0.25, 8)
    c = config.protection
    assert c.data.source == "paper" and c.data.image_size == config.encoder.resolution
  assert llava15_7b.get_config().protection.caption_prompt == tasks.CAPTION_PROMPT
  assert openflamingo_9b.get_config("sigma=0.5").attack.sigma == 0.5


def test_item_judge_on_fixed_strings():
  pred = ["a grayscale photo of a bag", "a t-shirt in the center of the image",
          "a picture of a white shirt", "a black background", "a bag"]
  ref = ["a bag in the center of the image", "a picture of a dark gray t-shirt",
         "a grayscale photo of a t-shirt", "a black background", "a picture of a sandal"]
  np.testing.assert_array_equal(protection.item_match(pred, ref), [1, 1, 0, 0, 0])


def test_gsb_rows_follow_the_smoothed_row(folder, monkeypatch):
  """With a booster: original, smoothed, smoothed + GSB, and each extra encoder boosted by
  the booster of the vanilla encoder (the paper's FARE/TeCoA "+ GSB" rows)."""
  from fsjax import gsb  # pylint: disable=g-import-not-at-top
  config = _config(folder)
  with config.unlocked():
    config.gsb = common.gsb_config()
  encoder = LogNormalEncoder(resolution=8)  # tokens [B, 2, 8]
  params = {"vision": {"w": jnp.float32(1.0), "u": jnp.ones((2, 8))}}
  model = _toy_mllm("llava", encoder)
  mapper_params = {"trained": np.zeros(3)}  # passed through, never called here
  loaded = []
  monkeypatch.setattr(gsb.checkpoint, "load", lambda path, config=None: loaded.append(path)
                      or {"mapper": mapper_params})
  fare_params = dict(params["vision"])  # another tower (a copy), built by its sub-config
  monkeypatch.setattr(encoders, "build",
                      lambda c: (model.encoder, fare_params) if c.name == "fare" else None)
  with config.unlocked():
    config.gsb.checkpoint = "/gsb/workdir"
    config.attack.extra_encoders = ({"label": "FARE", "name": "fare"},)
  rows = protection.build_rows(config, model, params)
  assert [r.label for r in rows] == [
      "original", "smoothed", "smoothed + GSB (FS+M)", "FARE", "FARE + smoothed",
      "FARE + smoothed + GSB (FS+M)"]
  assert loaded == ["/gsb/workdir"]  # loaded once, used for both boosted rows
  assert [isinstance(r.encoder, smoothing.SmoothedEncoder) for r in rows] == [
      False, True, True, False, True, True]
  for boosted, base_row in ((rows[2], rows[0]), (rows[5], rows[3])):
    booster = boosted.encoder.base  # smoothed(boosted(base))
    assert isinstance(booster, gsb.BoostedEncoder)
    assert booster.base is base_row.encoder and booster.denoiser is None
    assert boosted.params["encoder"]["encoder"] is base_row.params
    assert boosted.params["encoder"]["mapper"] is mapper_params
