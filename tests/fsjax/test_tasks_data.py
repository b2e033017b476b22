"""Tests of fsjax.tasks' local data, embedded instruction data and tokenizer."""

import collections
import json
import re

import numpy as np
from PIL import Image
import pytest
import transformers

from fsjax import tasks
from fsjax.llava import format_prompt
from fsjax.llava import prompt as llava_prompt
from fsjax.tasks import instructions

# ------------------------------------------------------------------------------
# Local files.
# ------------------------------------------------------------------------------


def _png(path, value, size=8):
  """A flat RGB PNG whose pixels are ``value`` (3 uint8)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def test_image_pairs_order_pixels_and_errors(tmp_path):
  clean, target = tmp_path / "bigscale", tmp_path / "target_images"
  for i, name in enumerate(["b.png", "a.png", "c.jpg"]):
    _png(clean / "nips17" / name, [10 * i, 0, 0])
  for i, name in enumerate(["2.png", "1.png"]):
    _png(target / "1" / name, [0, 100 + i, 0])
  (clean / "nips17" / "notes.txt").write_text("not an image")
  pairs = tasks.image_pairs(clean, target, image_size=8)
  # Sorted relative paths; pairs stop at the shorter (target) list.
  assert pairs.clean_names == ["nips17/a.png", "nips17/b.png"]
  assert pairs.target_names == ["1/1.png", "1/2.png"]
  assert pairs.clean.shape == pairs.target.shape == (2, 8, 8, 3)
  assert pairs.clean.dtype == np.float32
  np.testing.assert_allclose(pairs.clean[:, 0, 0], [[10 / 255, 0, 0], [0, 0, 0]], atol=1e-6)
  np.testing.assert_allclose(pairs.target[:, 0, 0], [[0, 101 / 255, 0], [0, 100 / 255, 0]],
                             atol=1e-6)
  one = tasks.image_pairs(clean, target, image_size=4, num_examples=1)
  assert one.clean.shape == (1, 4, 4, 3) and one.clean_names == ["nips17/a.png"]
  with pytest.raises(FileNotFoundError, match="clean_dir=.*missing"):
    tasks.image_pairs(tmp_path / "missing", target, image_size=8)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="target_dir=.*empty holds no images"):
    tasks.image_pairs(clean, tmp_path / "empty", image_size=8)
  with pytest.raises(ValueError, match="num_examples=3 exceeds the 2 pairs"):
    tasks.image_pairs(clean, target, image_size=8, num_examples=3)
  (target / "1" / "0.png").write_text("broken")
  with pytest.raises(ValueError, match="cannot read the image .*0.png"):
    tasks.image_pairs(clean, target, image_size=8)


def test_classification_images_map_labels_to_options(tmp_path, make_folder_dataset):
  # Class colours of the fixture: 0 red, 1 green, 2 blue, 3 yellow.
  root = make_folder_dataset(tmp_path / "folder", classes=4, per_split=(("test", 3),))
  out = tasks.classification_images(image_size=8, per_class=2, dataset=f"folder:{root}",
                                    split="test", class_ids=(2, 0), target_class_id=3)
  assert out.images.shape == out.target_images.shape == (4, 8, 8, 3)
  assert sorted(out.labels.tolist()) == [0, 0, 1, 1] and out.class_ids == (2, 0)
  rgb = out.images.mean(axis=(1, 2))
  for colour, label in ((2, 0), (0, 1)):  # option 0 is blue (class 2), option 1 red
    assert np.all(np.argmax(rgb[out.labels == label], axis=-1) == colour)
  yellow = out.target_images.mean(axis=(1, 2))
  assert np.all(yellow[:, 0] > 0.6) and np.all(yellow[:, 1] > 0.6) and np.all(yellow[:, 2] < 0.3)
  # Three target images for four clean ones: taken in turn.
  np.testing.assert_array_equal(out.target_images[3], out.target_images[0])
  assert not np.array_equal(out.target_images[1], out.target_images[0])
  with pytest.raises(ValueError, match="exclude target_class_id"):
    tasks.classification_images(image_size=8, dataset=f"folder:{root}", split="test",
                                class_ids=(2, 3), target_class_id=3)


def test_classification_images_imagenet_needs_local_tars(tmp_path):
  with pytest.raises(ValueError, match="manual_dir=.*never downloaded"):
    tasks.classification_images(image_size=8, data_dir=tmp_path)
  assert tasks.PAPER_IMAGENET_IDS == (7, 368, 207, 1, 8, 54, 296, 148, 121, 21)


def _scienceqa_records(tmp_path):
  _png(tmp_path / "images" / "5" / "image.png", [0, 0, 200])
  _png(tmp_path / "images" / "6" / "image.png", [200, 0, 0], size=16)
  return [
      {"id": "5", "question": "Which ocean is highlighted?", "answer": 2, "hint": "",
       "choices": ["the Arctic Ocean", "the Atlantic Ocean", "the Pacific Ocean"],
       "image": "images/5/image.png"},
      {"question": "Is it red?", "choices": ["yes", "no"], "answer": 0,
       "image": str(tmp_path / "images" / "6" / "image.png")},
  ]


@pytest.mark.parametrize("layout", ["list", "dict", "jsonl"])
def test_load_scienceqa(tmp_path, layout):
  records = _scienceqa_records(tmp_path)
  if layout == "jsonl":
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  else:
    path = tmp_path / "qa.json"
    if layout == "dict":
      records = {"5": {k: v for k, v in records[0].items() if k != "id"}, "x": records[1]}
    path.write_text(json.dumps(records))
  qa = tasks.load_scienceqa(path, image_size=8)
  assert qa.images.shape == (2, 8, 8, 3) and qa.answers.tolist() == [2, 0]
  assert qa.ids == ["5", "x" if layout == "dict" else "1"]
  assert qa.questions == ["Which ocean is highlighted?", "Is it red?"]
  assert qa.choices[1] == ["yes", "no"]
  np.testing.assert_allclose(qa.images[0, 0, 0], [0, 0, 200 / 255], atol=1e-6)
  np.testing.assert_allclose(qa.images[1, 0, 0], [200 / 255, 0, 0], atol=1e-6)
  q = tasks.vqa_question(qa.questions[0], qa.choices[0], int(qa.answers[0]))
  assert "Options: A. the Arctic Ocean B. the Atlantic Ocean C. the Pacific Ocean D. None " \
         "of the above." in q.prompt and (q.answer, q.target) == (2, 3)
  assert len(tasks.load_scienceqa(path, image_size=8, num_examples=1).ids) == 1


@pytest.mark.parametrize("change, error, match", [
    (None, FileNotFoundError, "path=.*does not exist"),
    ("{not json", ValueError, "not valid JSON"),
    ([], ValueError, "non-empty list"),
    ([{"question": "q", "choices": ["a", "b"], "answer": 0}], ValueError,
     r"record 0: missing fields \['image'\]"),
    ([{"question": "q", "choices": ["a"], "answer": 0, "image": "i.png"}], ValueError,
     "at least two strings"),
    ([{"question": "q", "choices": ["a", "b"], "answer": 2, "image": "i.png"}], ValueError,
     "answer=2 must be an index"),
    ([{"question": "q", "choices": ["a", "b"], "answer": 1, "image": "nope.png"}],
     FileNotFoundError, "record 0: image .*nope.png does not exist"),
])
def test_load_scienceqa_errors(tmp_path, change, error, match):
  path = tmp_path / "qa.json"
  if change is not None:
    path.write_text(change if isinstance(change, str) else json.dumps(change))
  with pytest.raises(error, match=match):
    tasks.load_scienceqa(path, image_size=8)


# ------------------------------------------------------------------------------
# Embedded instruction data.
# ------------------------------------------------------------------------------

LEVELS = {0.85: "white", 0.65: "light gray", 0.3: "dark gray"}


def _fashion_like(per_class=5):
  """Balanced labels 0-9; each image a bright square on black at one of LEVELS."""
  labels = np.repeat(np.arange(10), per_class)
  levels = np.array(list(LEVELS))[np.arange(len(labels)) % 3]
  images = np.zeros((len(labels), 12, 12, 3), np.float32)
  images[:, 3:9, 3:9] = levels[:, None, None, None]
  return images, labels, levels


def _vqa_options(prompt):
  listed = re.search(r"Options: (.*)\. If the visual", prompt).group(1)
  return re.findall(r"([A-E])\. (.+?)(?= [A-E]\. |$)", listed)


def test_instruction_examples():
  images, labels, levels = _fashion_like()
  examples = tasks.instruction_examples(images, labels, seed=0)
  assert len(examples) == 3 * len(labels)
  assert [e.task for e in examples[:3]] == ["classify", "vqa", "caption"]
  by_task = collections.defaultdict(list)
  for e in examples:
    by_task[e.task].append(e)
  # Classification: the paper's format, options 0-8 the clothes, 9 "bag" (the target).
  expected = tasks.classification_prompt(
      ["t_shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
       "ankle_boot"], "bag")
  assert all(e.prompt == expected for e in by_task["classify"])
  option = {0: "0", 1: "1", 2: "2", 3: "3", 4: "4", 5: "5", 6: "6", 7: "7", 8: "9", 9: "8"}
  assert [e.answer for e in by_task["classify"]] == [option[c] for c in labels]
  # VQA: four classes + "E. None of the above"; E exactly when the class is not listed.
  letters = collections.Counter()
  for e, label in zip(by_task["vqa"], labels):
    options = _vqa_options(e.prompt)
    assert [o[0] for o in options] == list("ABCDE") and options[4][1] == "None of the above"
    names = [o[1] for o in options[:4]]
    assert len(set(names)) == 4 and set(names) <= set(instructions.CAPTION_NAMES)
    truth = instructions.CAPTION_NAMES[label]
    if e.answer == "E":
      assert truth not in names
    else:
      assert names["ABCD".index(e.answer)] == truth
    letters[e.answer] += 1
  assert letters == {letter: 10 for letter in "ABCDE"}  # balanced: 50 images / 5 letters
  # Captions: the class and the brightness word, each of the five templates equally often.
  templates = collections.Counter()
  for e, label, level in zip(by_task["caption"], labels, levels):
    assert e.prompt == tasks.CAPTION_PROMPT
    item, tone = instructions.CAPTION_NAMES[label], LEVELS[level]
    a_item = ("an " if item == "ankle boot" else "a ") + item
    candidates = [f"a photo of a {tone} {item} on a black background",
                  f"a {tone} {item} on a black background",
                  f"a grayscale photo of {a_item}",
                  f"a picture of a {tone} {item}",
                  f"{a_item} in the center of the image"]
    assert e.answer in candidates
    templates[candidates.index(e.answer)] += 1
  assert templates == {i: 10 for i in range(5)}
  # Seeded and deterministic.
  again = tasks.instruction_examples(images, labels, seed=0)
  assert again == examples
  assert tasks.instruction_examples(images, labels, seed=1) != examples
  only = tasks.instruction_examples(images, labels, seed=0, tasks=["caption"])
  assert [e.answer for e in only] == [e.answer for e in by_task["caption"]]
  with pytest.raises(ValueError, match="unknown"):
    tasks.instruction_examples(images, labels, tasks=["translate"])
  with pytest.raises(ValueError, match="labels 0-9"):
    tasks.instruction_examples(images, labels + 1)


def test_evaluation_questions():
  q = instructions.classify_question(9)  # ankle boot: option 8; bag is option 9
  assert (q.answer, q.target, q.num_options) == (8, 9, 10)
  assert q.prompt == tasks.instruction_examples(np.zeros((1, 4, 4, 3)), [9])[0].prompt
  assert q.parse("9") == 9 and q.parse("10") == tasks.UNPARSABLE
  with pytest.raises(ValueError, match="attacker's target"):
    instructions.classify_question(8)
  labels = np.repeat(np.arange(10), 4)
  questions, targets = instructions.vqa_questions(labels, seed=0)
  letters = collections.Counter()
  for q, label, target in zip(questions, labels, targets):
    options = _vqa_options(q.prompt)
    names = [o[1] for o in options[:4]]
    assert names[q.answer] == instructions.CAPTION_NAMES[label]
    assert instructions.CAPTION_NAMES[target] not in names and q.target == 4
    letters[q.answer] += 1
  assert letters == {i: 10 for i in range(4)}
  again, targets_again = instructions.vqa_questions(labels, seed=0)
  assert again == questions and targets_again.tolist() == targets.tolist()


def test_load_instructions_through_fsjax_data(tmp_path):
  # Ten class folders in label order stand in for Fashion-MNIST (whose TFDS build takes
  # about a minute); the same fsjax.data path, balanced selection.
  for c in range(10):
    for i in range(3):
      _png(tmp_path / "fm" / f"{c:02d}" / f"{i}.png", [25 * c + i, 25 * c + i, 25 * c + i])
  images, labels, examples = tasks.load_instructions(
      dataset=f"folder:{tmp_path / 'fm'}", image_size=8, per_class=2, seed=3)
  assert images.shape == (20, 8, 8, 3) and sorted(labels.tolist()) == sorted(list(range(10)) * 2)
  np.testing.assert_array_equal(np.round(images[:, 0, 0, 0] * 255) // 25, labels)  # each image its class
  assert examples == tasks.instruction_examples(images, labels, seed=3)
  for c in range(2):
    _png(tmp_path / "two" / str(c) / "0.png", [c, c, c])
  with pytest.raises(ValueError, match="has 2 classes"):
    tasks.load_instructions(dataset=f"folder:{tmp_path / 'two'}", image_size=8, per_class=1)


# ------------------------------------------------------------------------------
# Tokenizer and training arrays.
# ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus():
  """Examples of two seeds and the tokenizer's texts (the fixed vocabulary set)."""
  images, labels, _ = _fashion_like()
  examples = (tasks.instruction_examples(images, labels, seed=0)
              + tasks.instruction_examples(images, labels, seed=1))
  return examples, tasks.vocabulary_texts(format_prompt)


def test_vocabulary_order_is_hand_computed():
  tok = tasks.build_tokenizer(["x y y", "y z"])
  # Words: "x", " y", " y" | "y", " z". By count, then code point (" " < "x" < "y").
  assert tok.get_vocab() == {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<image>": 4,
                             " y": 5, " z": 6, "x": 7, "y": 8}
  assert tok("x y z")["input_ids"] == [1, 7, 5, 6]
  assert tok("x q", add_special_tokens=False)["input_ids"] == [7, 3]  # " q" is unknown


def test_tokenizer_round_trip_and_special_tokens(corpus, tmp_path):
  examples, texts = corpus
  tok = tasks.build_tokenizer(texts)
  assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
  assert tok.convert_tokens_to_ids("<image>") == 4
  assert tok("<image>", add_special_tokens=False)["input_ids"] == [4]
  for e in examples:
    text = format_prompt(e.prompt)
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and ids.count(4) == 1 and 3 not in ids
    assert tok.decode(ids) == "<s>" + text
    assert tok.decode(ids, skip_special_tokens=True) == text.replace("<image>", "")
    answer = tok(" " + e.answer, add_special_tokens=False)["input_ids"]
    assert 3 not in answer and tok.decode(answer) == " " + e.answer
  assert tok(format_prompt("What?"))["input_ids"][:6] == [
      1, tok.convert_tokens_to_ids("USER"), tok.convert_tokens_to_ids(":"),
      tok.convert_tokens_to_ids(" "), 4, tok.convert_tokens_to_ids("\n")]
  # Saved, it loads with AutoTokenizer and gives the same ids.
  tasks.save_tokenizer(tok, tmp_path / "tok")
  loaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
  assert loaded.get_vocab() == tok.get_vocab()
  assert (loaded.pad_token_id, loaded.bos_token_id, loaded.eos_token_id) == (0, 1, 2)
  for text in texts[::7]:
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(loaded(text)["input_ids"]) == "<s>" + text
  # Stable: the vocabulary is a function of the (fixed) texts; it covers a corpus of
  # examples, and a corpus adds no word to it.
  assert tasks.build_tokenizer(
      tasks.vocabulary_texts(format_prompt)).get_vocab() == tok.get_vocab()
  used = [format_prompt(e.prompt) for e in examples] + [" " + e.answer for e in examples]
  assert set(tasks.build_tokenizer(used).get_vocab()) <= set(tok.get_vocab())
  # <image> repeated in the text (as LlavaProcessor expands it) is one id per copy.
  assert tok("<image>" * 3, add_special_tokens=False)["input_ids"] == [4, 4, 4]


@pytest.mark.parametrize("num_image_tokens", [1, 3])
def test_training_arrays_hand_built(num_image_tokens):
  tok = tasks.build_tokenizer([format_prompt("Is it red?"), " yes", " no no"])
  t = num_image_tokens
  arrays = tasks.training_arrays(tok, ["Is it red?", "Is it red?"], ["yes", "no no"],
                                 format_prompt=format_prompt, num_image_tokens=t)
  ids = tok.convert_tokens_to_ids
  prompt = (["<s>", "USER", ":", " ", "<image>"] + ["<image>"] * (t - 1)
            + ["\n", "Is", " it", " red", "?", " ASSISTANT", ":"])
  rows = [prompt + [" yes", "</s>", "<pad>"], prompt + [" no", " no", "</s>"]]
  np.testing.assert_array_equal(arrays["input_ids"], [[ids(w) for w in r] for r in rows])
  n = len(prompt)
  np.testing.assert_array_equal(arrays["loss_mask"], [[0] * n + [1, 1, 0], [0] * n + [1, 1, 1]])
  np.testing.assert_array_equal(arrays["attention_mask"], [[1] * (n + 2) + [0], [1] * (n + 3)])
  assert arrays["input_ids"].dtype == np.int32 and arrays["loss_mask"].dtype == np.float32
  assert int(np.sum(arrays["input_ids"][0] == 4)) == t
  padded = tasks.training_arrays(tok, ["Is it red?"], ["yes"], format_prompt=format_prompt,
                                 num_image_tokens=t, max_length=n + 5)
  assert padded["input_ids"].shape == (1, n + 5) and padded["input_ids"][0, -1] == 0
  with pytest.raises(ValueError, match="max_length=.* shorter"):
    tasks.training_arrays(tok, ["Is it red?"], ["yes"], format_prompt=format_prompt,
                          num_image_tokens=t, max_length=n)
  with pytest.raises(ValueError, match="num_image_tokens"):
    tasks.training_arrays(tok, ["Is it red?"], ["yes"], format_prompt=format_prompt,
                          num_image_tokens=0)
  with pytest.raises(ValueError, match="exactly one '<image>'"):
    tasks.training_arrays(tok, ["Is it red?"], ["yes"], format_prompt=lambda p: p,
                          num_image_tokens=t)


def test_training_arrays_split_matches_joint_tokenization(corpus):
  examples, texts = corpus
  tok = tasks.build_tokenizer(texts)
  arrays = tasks.training_arrays(tok, [e.prompt for e in examples],
                                 [e.answer for e in examples], format_prompt=format_prompt,
                                 num_image_tokens=3)
  for row, e in enumerate(examples):
    text = format_prompt(e.prompt).replace("<image>", "<image>" * 3) + " " + e.answer
    joint = tok(text)["input_ids"] + [2]
    length = int(arrays["attention_mask"][row].sum())
    assert arrays["input_ids"][row, :length].tolist() == joint
    answer = arrays["input_ids"][row][arrays["loss_mask"][row] == 1]
    assert tok.decode(answer) == " " + e.answer + "</s>"
  # The training prefix is what fsjax.llava feeds at inference, and its decoder reads the
  # answer back.
  prompts = [e.prompt for e in examples[:6]]
  ids, valid = llava_prompt.tokenize(tok, [format_prompt(p) for p in prompts],
                                     num_image_tokens=3, pad_token_id=tok.pad_token_id)
  for row in range(6):
    start = int(np.argmax(arrays["loss_mask"][row]))
    assert ids[row][valid[row]].tolist() == arrays["input_ids"][row, :start].tolist()
  answers = np.where(arrays["loss_mask"][:6] == 1, arrays["input_ids"][:6], tok.pad_token_id)
  answers = [row[row != tok.pad_token_id] for row in answers]
  assert llava_prompt.decode(tok, np.stack([np.pad(a, (0, 20 - len(a))) for a in answers]),
                             eos_token_id=2) == [e.answer for e in examples[:6]]
