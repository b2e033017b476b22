"""Tests of fsjax.tasks: prompts, answer parsing, metrics and judges, on hand-computed values."""

import json
import math
import string
import sys

import numpy as np
import pytest
import torch
import transformers

from fsjax import tasks

# Appendix A.4.1 of the paper, copied from the paper text (l.364-366).
PAPER_CAPTION = "Describe this image in one concise sentence, no longer than 20 words."
PAPER_CLASSIFY = (
    "You are a precise visual classifier. What are the main objects in this image?: 0. "
    "rooster, 1. gibbon, 2. golden_retriever, 3. goldfish, 4. hen, 5. hognose_snake, 6. "
    "ice_bear, 7. killer_whale, 8. king_crab, 9. kite, 10. shark. Output only a single "
    "integer between 0 and 10 with no explanation, no text, no punctuation.")
PAPER_VQA = (
    "You are a knowledgeable multimodal assistant. Please answer the multiple-choice "
    "question ONLY by outputting the single letter of the correct option. Do not include "
    "explanations or extra text. Question: Which ocean is highlighted? Options: A. the "
    "Arctic Ocean B. the Atlantic Ocean C. the Pacific Ocean D. the Southern Ocean E. None "
    "of the above. If the visual information is not clear or uncorrelated with the "
    "questions, you should select the choice: None of the above. Answer with exactly one "
    "letter from the options above (e.g., A).")
OCEANS = ["the Arctic Ocean", "the Atlantic Ocean", "the Pacific Ocean", "the Southern Ocean"]


def test_paper_prompts_verbatim():
  assert tasks.CAPTION_PROMPT == PAPER_CAPTION
  assert tasks.classification_prompt(tasks.PAPER_CLASSES) == PAPER_CLASSIFY
  assert tasks.classification_prompt(tasks.PAPER_CLASSES, "shark") == PAPER_CLASSIFY
  assert tasks.vqa_prompt("Which ocean is highlighted?", OCEANS) == PAPER_VQA


def test_prompts_built_from_data():
  assert tasks.classification_prompt(["cat", "dog"], "car") == (
      "You are a precise visual classifier. What are the main objects in this image?: 0. "
      "cat, 1. dog, 2. car. Output only a single integer between 0 and 2 with no "
      "explanation, no text, no punctuation.")
  prompt = tasks.vqa_prompt(" Is it red? ", ["yes", "no"])
  assert "Question: Is it red? Options: A. yes B. no C. None of the above. If" in prompt
  q = tasks.classification_question(["cat", "dog"], 1, "car")
  assert (q.num_options, q.answer, q.target, q.answer_format) == (3, 1, 2, "integer")
  assert q.parse("2") == 2 and q.answer_text(2) == "2"
  q = tasks.vqa_question("Which ocean is highlighted?", OCEANS, 2)
  assert q.prompt == PAPER_VQA
  assert (q.num_options, q.answer, q.target, q.answer_format) == (5, 2, 4, "letter")
  assert q.parse("E") == 4 and q.answer_text(4) == "E" and q.parse("F") == tasks.UNPARSABLE


@pytest.mark.parametrize("call, match", [
    (lambda: tasks.classification_prompt(["cat", "cat"], "car"), "distinct"),
    (lambda: tasks.classification_prompt(["cat", "car"], "car"), "distinct"),
    (lambda: tasks.classification_prompt([], "car"), "non-empty"),
    (lambda: tasks.classification_prompt("cat", "car"), "list of strings"),
    (lambda: tasks.vqa_prompt("Q?", ["yes", "none of the above"]), "None of the above"),
    (lambda: tasks.vqa_prompt("", ["yes"]), "question"),
    (lambda: tasks.classification_question(["cat", "dog"], 2, "car"), "label=2"),
    (lambda: tasks.vqa_question("Q?", ["a", "b"], 2), "answer=2"),
])
def test_prompt_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize("text, expected", [
    ("3", 3), (" 10", 10), ("10.", 10), ("The answer is 7.", 7), ("3 or 4", 3),
    ("0", 0), ("11", tasks.UNPARSABLE), ("shark", tasks.UNPARSABLE), ("", tasks.UNPARSABLE),
])
def test_parse_integer(text, expected):
  assert tasks.parse_integer(text, 11) == expected


@pytest.mark.parametrize("text, expected", [
    ("B", 1), (" (C).", 2), ("Answer: D", 3), ("I think C", 2), ("E", 4), ("A dog", 0),
    ("Fine, A", 0), ("F", tasks.UNPARSABLE), ("b", tasks.UNPARSABLE), ("BC", tasks.UNPARSABLE),
    ("none", tasks.UNPARSABLE), ("", tasks.UNPARSABLE),
])
def test_parse_letter(text, expected):
  assert tasks.parse_letter(text, 5) == expected


def test_choice_metrics_hand_computed():
  # Rows: correct, target, unparsable, correct, target, wrong.
  pred = [0, 10, tasks.UNPARSABLE, 3, 10, 2]
  answer = [0, 1, 2, 3, 4, 5]
  fcs = [0.5, 0.25, 1.0, 0.75, 0.0, 0.5]
  out = tasks.choice_outcomes(pred, answer, 10)
  np.testing.assert_array_equal(out["correct"], [1, 0, 0, 1, 0, 0])
  np.testing.assert_array_equal(out["success"], [0, 1, 0, 0, 1, 0])
  np.testing.assert_array_equal(out["unparsable"], [0, 0, 1, 0, 0, 0])
  s = tasks.summarize_choices(fcs, pred, answer, 10)
  assert math.isclose(s.acc, 2 / 6, rel_tol=1e-6) and math.isclose(s.asr, 2 / 6, rel_tol=1e-6)
  assert math.isclose(s.fcs, 3.0 / 6) and s.unparsable == 1 and s.count == 6
  assert s.acc_score is None and s.cells() == {"FCS": "0.500", "ACC": "33.3%", "ASR": "33.3%"}
  # A target per row: only rows 1 (10) and 3 (3, also correct) hit their targets.
  s = tasks.summarize_choices(fcs, pred, answer, [9, 10, 9, 3, 9, 9])
  assert math.isclose(s.asr, 2 / 6, rel_tol=1e-6) and math.isclose(s.acc, 2 / 6, rel_tol=1e-6)
  s = tasks.summarize_choices(fcs, pred, answer, [9, 10, 9, 9, 9, 9])
  assert math.isclose(s.asr, 1 / 6, rel_tol=1e-6)
  # Every answer unparsable: ACC = ASR = 0, all counted.
  s = tasks.summarize_choices(fcs, [-1] * 6, answer, 10)
  assert (s.acc, s.asr, s.unparsable) == (0.0, 0.0, 6)
  with pytest.raises(ValueError, match="fcs must be"):
    tasks.summarize_choices(fcs[:5], pred, answer, 10)
  with pytest.raises(ValueError, match="same shape"):
    tasks.choice_outcomes(pred[:5], answer, 10)


def test_features_cosine(toy):
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 4, 5))
  fa, fb = a.reshape(3, -1), b.reshape(3, -1)
  expected = np.sum(fa * fb, 1) / np.linalg.norm(fa, axis=1) / np.linalg.norm(fb, axis=1)
  np.testing.assert_allclose(tasks.features_cosine(a, b), expected, rtol=1e-5)
  np.testing.assert_allclose(tasks.features_cosine(a, a), 1.0, rtol=1e-5)
  # From images, the attacks library's FCS (re-exported) agrees with numpy on the features.
  encoder, params = toy
  x = rng.uniform(size=(2, 8, 8, 3)).astype(np.float32)
  x_adv = np.clip(x + rng.uniform(-0.3, 0.3, size=x.shape), 0, 1).astype(np.float32)
  f, f_adv = np.asarray(encoder(params, x)), np.asarray(encoder(params, x_adv))
  expected = np.sum(f * f_adv, 1) / np.linalg.norm(f, axis=1) / np.linalg.norm(f_adv, axis=1)
  np.testing.assert_allclose(tasks.feature_cosine_similarity(params, x_adv, x, encoder=encoder),
                             expected, rtol=1e-5)
  np.testing.assert_allclose(tasks.features_cosine(f, f_adv), expected, rtol=1e-5)
  with pytest.raises(ValueError, match="same shape"):
    tasks.features_cosine(a, b[:2])


def test_caption_rate_and_mean():
  assert tasks.rate_and_mean([0.1, 0.3, 0.6, 0.2]) == pytest.approx((0.5, 0.3))
  assert tasks.rate_and_mean([0.1, 0.3, 0.6, 0.2], threshold=0.5) == pytest.approx((0.25, 0.3))
  s = tasks.summarize_captions([0.6, 0.4], [0.9, 0.1], [0.3, 0.0])
  assert (s.acc, s.asr) == (0.5, 0.5)
  assert s.acc_score == pytest.approx(0.5) and s.asr_score == pytest.approx(0.15)
  assert s.cells() == {"FCS": "0.500", "ACC": "50.0% (0.500)", "ASR": "50.0% (0.150)"}
  assert json.loads(json.dumps(s.to_dict()))["asr_score"] == pytest.approx(0.15)
  with pytest.raises(ValueError, match="non-empty"):
    tasks.rate_and_mean([])


def test_markdown_table_layout():
  a = tasks.Summary(fcs=0.4271, acc=0.082, asr=0.782, count=500)
  b = tasks.Summary(fcs=0.59, acc=0.848, asr=0.002, count=500, unparsable=3)
  table = tasks.markdown_table({"Org.": {"M-Attack": a, "FOA": b},
                                "Smoothed org.": {"M-Attack": b, "FOA": a}})
  assert table.splitlines() == [
      "| model | M-Attack FCS | M-Attack ACC | M-Attack ASR | FOA FCS | FOA ACC | FOA ASR |",
      "|---|---|---|---|---|---|---|",
      "| Org. | 0.427 | 8.2% | 78.2% | 0.590 | 84.8% | 0.2% |",
      "| Smoothed org. | 0.590 | 84.8% | 0.2% | 0.427 | 8.2% | 78.2% |"]
  with pytest.raises(ValueError, match="expected"):
    tasks.markdown_table({"a": {"x": a}, "b": {"y": a}})


def test_exact_match_and_judge_plumbing():
  scores = tasks.exact_match(["A cat, sitting.", "a dog", "a  cat"], ["a cat sitting", "a cat",
                                                                      "A CAT!"])
  np.testing.assert_array_equal(scores, [1.0, 0.0, 1.0])
  assert scores.dtype == np.float32
  clean, target = tasks.judge_captions(tasks.exact_match, ["a cat", "a shark", "a cat"],
                                       ["a cat", "a cat", "a dog"],
                                       ["a shark", "a shark", "a shark"])
  np.testing.assert_array_equal(clean, [1, 0, 0])
  np.testing.assert_array_equal(target, [0, 1, 0])
  s = tasks.summarize_captions([1.0, 0.5, 0.9], clean, target)
  assert s.cells()["ACC"] == "33.3% (0.333)" and s.cells()["ASR"] == "33.3% (0.333)"
  with pytest.raises(ValueError, match="pair up"):
    tasks.exact_match(["a"], ["a", "b"])
  with pytest.raises(ValueError, match="outside"):
    tasks.judge_captions(lambda p, r: np.full(len(p), 1.5), ["a"], ["a"], ["b"])
  with pytest.raises(ValueError, match="shape"):
    tasks.judge_captions(lambda p, r: np.zeros(3), ["a"], ["a"], ["b"])
  assert tasks.judges.get("exact") is tasks.exact_match
  with pytest.raises(ValueError, match="not known"):
    tasks.judges.get("gpt5")


def test_llm_judge_with_a_fake_endpoint():
  prompts = []
  replies = iter(["0.8", "Score: 1.5", "0.25 out of 1", "It is .5", "no idea"])

  def complete(prompt):
    prompts.append(prompt)
    return next(replies)

  judge = tasks.LLMJudge(complete)
  scores = judge(["a red car", "a cat", "x", "y"], ["a car", "a dog", "z", "w"])
  np.testing.assert_allclose(scores, [0.8, 1.0, 0.25, 0.5])
  assert len(prompts) == 4
  assert "Text 1: a red car\nText 2: a car\n" in prompts[0]
  assert "Text 1: a cat\nText 2: a dog\n" in prompts[1]
  with pytest.raises(ValueError, match="'no idea' holds no score"):
    judge(["a"], ["b"])
  custom = tasks.LLMJudge(lambda p: p, template="{prediction}|{reference} 0.")
  np.testing.assert_allclose(custom(["1"], ["2"]), [1.0])  # the first number of the reply
  with pytest.raises(ValueError, match="template"):
    tasks.LLMJudge(complete, template="no fields")
  with pytest.raises(ValueError, match="callable"):
    tasks.LLMJudge("https://example.invalid")


def test_lexical_judge_names_the_extra_when_missing(monkeypatch):
  for name in ("pycocoevalcap", "pycocoevalcap.bleu", "pycocoevalcap.cider"):
    monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
  for metric in ("bleu", "cider"):
    with pytest.raises(ImportError, match=r"fsjax\[judges\]"):
      tasks.LexicalJudge(metric)
  with pytest.raises(ValueError, match="metric"):
    tasks.LexicalJudge("rouge")


def test_lexical_judge_values():
  pytest.importorskip("pycocoevalcap")  # the optional extra 'judges', not a test dependency
  bleu = tasks.LexicalJudge("bleu")
  # Precisions 4/5, 3/4, 2/3, 1/2, equal lengths (no brevity penalty): BLEU-4 = 0.2 ** 0.25.
  scores = bleu(["a b c d f", "A, b c d e.", "x y z w"], ["a b c d e", "a b c d e", "a b c d"])
  np.testing.assert_allclose(scores, [0.2 ** 0.25, 1.0, 0.0], atol=1e-6)
  cider = tasks.LexicalJudge("cider")
  scores = cider(["a red bus on the road", "green apples on grass"],
                 ["a red bus on the road", "two cats sleep on a sofa"])
  np.testing.assert_allclose(scores, [1.0, 0.0], atol=1e-6)


# A tiny CLIP (the tokenizer below has 60 tokens: bos 58, eos 59, the last id).
CLIP_TEXT = dict(vocab_size=60, hidden_size=24, intermediate_size=29, num_hidden_layers=2,
                 num_attention_heads=3, max_position_embeddings=32, bos_token_id=58,
                 eos_token_id=59, pad_token_id=59)
CLIP_VISION = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                   num_attention_heads=4, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
  """A random transformers CLIPModel (weights made O(1)) and a hand-written BPE tokenizer."""
  torch.manual_seed(0)
  config = transformers.CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION,
                                   projection_dim=16)
  model = transformers.CLIPModel(config).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=gen))
  directory = tmp_path_factory.mktemp("clip_judge")
  model.save_pretrained(directory)
  chars = list(string.ascii_lowercase) + ["."]
  tokens = chars + [c + "</w>" for c in chars] + ["ph", "pho", "phot", "photo</w>"]
  tokens += ["<|startoftext|>", "<|endoftext|>"]
  (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
  (directory / "merges.txt").write_text("#version: 0.2\np h\nph o\npho t\nphot o</w>\n")
  return model, directory


def test_clip_text_judge_matches_transformers(clip_checkpoint):
  model, directory = clip_checkpoint
  preds = ["a photo of a cat", "a dog", "a red car", "sky"]
  refs = ["a photo of a dog", "a dog", "a blue bus", "a sea"]
  judge = tasks.ClipTextJudge(directory)
  scores = judge(preds, refs)
  tok = transformers.CLIPTokenizer.from_pretrained(directory)
  with torch.no_grad():
    z = []
    for texts in (preds, refs):
      out = model.get_text_features(**tok(texts, padding=True, return_tensors="pt"))
      out = getattr(out, "pooler_output", out)
      z.append((out / out.norm(dim=-1, keepdim=True)).numpy())
  cos = np.sum(z[0] * z[1], axis=-1)
  np.testing.assert_allclose(scores, np.clip(cos, 0, 1), atol=1e-4)
  assert scores[1] == pytest.approx(1.0, abs=1e-5)
  assert len(set(np.round(cos, 3))) == 4  # not a degenerate model
  assert tasks.judges.get("clip", checkpoint=directory)(["a"], ["a"]) == pytest.approx(1.0)
