"""The word-level tokenizer of the embedded MLLM, its chat format, and training arrays.

Built offline with the ``tokenizers`` library from the instruction data's words. A
"word" is a run of letters (or digits) with its leading space, a punctuation mark, or a
single whitespace character (``" rooster"``, ``","``, ``" 10"``, ``"\\n"``), so
decoding is plain concatenation and every text made of known words round-trips
exactly. Special tokens: ``<pad>`` 0, ``<s>`` 1 (BOS, prepended), ``</s>`` 2 (EOS),
``<unk>`` 3, ``<image>`` 4 (one id, as LLaVA's image placeholder). Saved with
``save_pretrained``, it loads with ``transformers.AutoTokenizer.from_pretrained(dir)``.

The chat format is the caller's (``format_prompt``: the user's text -> the model's prompt
with one ``<image>``; the embedded MLLM uses LLaVA-1.5's, :func:`fsjax.llava.format_prompt`,
``USER: <image>\\n{prompt} ASSISTANT:``), then `` {answer}</s>`` in training; the task
data knows no model's format. For inference, ``fsjax.llava.prompt.tokenize`` expands
``<image>`` the same way.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
import os

import numpy as np

IMAGE = "<image>"  # the image placeholder of every chat format (one token id)
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE)  # ids 0..4
# Letter runs (with "_" as in golden_retriever) or digit runs, each with an optional
# leading space; else one punctuation mark (with its space) or one whitespace character.
WORD_PATTERN = r" ?[A-Za-z_]+| ?[0-9]+| ?[^\sA-Za-z0-9_]|\s"


def _pre_tokenizer():
  from tokenizers import Regex  # pylint: disable=g-import-not-at-top
  from tokenizers import pre_tokenizers  # pylint: disable=g-import-not-at-top
  return pre_tokenizers.Split(Regex(WORD_PATTERN), behavior="isolated")


def words(text: str) -> list[str]:
  """The words of ``text`` as the tokenizer splits it (special tokens not recognised)."""
  return [w for w, _ in _pre_tokenizer().pre_tokenize_str(text)]


def build_tokenizer(texts: Iterable[str]):
  """A word-level ``PreTrainedTokenizerFast`` over the words of ``texts``.

  The vocabulary is the special tokens, then every word of ``texts`` by decreasing
  count (ties in code-point order): the same texts give the same ids.

  Args:
    texts: the corpus, e.g. :func:`~fsjax.tasks.vocabulary_texts` (chat-formatted
      prompts, so the chat words are known, and answers with their leading space).

  Returns:
    The tokenizer; ``tokenizer("...")`` prepends BOS, ``decode`` concatenates.
  """
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  from tokenizers import decoders, models, processors  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  counts = collections.Counter()
  for text in texts:
    for part in text.split(IMAGE):
      counts.update(words(part))
  for token in SPECIAL_TOKENS:
    counts.pop(token, None)
  vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
  for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
    vocab[word] = len(vocab)
  tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  tok.pre_tokenizer = _pre_tokenizer()
  tok.decoder = decoders.Fuse()  # words carry their spaces: decoding concatenates
  tok.post_processor = processors.TemplateProcessing(
      single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, 1)])
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token=BOS, eos_token=EOS, unk_token=UNK, pad_token=PAD,
      extra_special_tokens={"image_token": IMAGE}, clean_up_tokenization_spaces=False,
      padding_side="right")


def save_tokenizer(tokenizer, directory: str | os.PathLike) -> None:
  """Saves it so that ``transformers.AutoTokenizer.from_pretrained(directory)`` loads it."""
  tokenizer.save_pretrained(os.fspath(directory))


def training_arrays(tokenizer, prompts: Sequence[str], answers: Sequence[str], *,
                    format_prompt: Callable[[str], str], num_image_tokens: int,
                    max_length: int | None = None) -> dict[str, np.ndarray]:
  """Padded arrays to train a causal LM on ``format_prompt(prompt) + " " + answer + EOS``.

  The ``<image>`` token is repeated ``num_image_tokens`` times in place, as the
  LLaVA processor expands it: the model scatters its T projected image tokens into
  those positions. T comes from the encoder (e.g. ``encoder.tokens(...).shape[1]``),
  never from a constant here.

  Args:
    tokenizer: from :func:`build_tokenizer` (or loaded with ``AutoTokenizer``).
    prompts: N prompt texts (without the chat format).
    answers: N answer texts.
    format_prompt: the model's chat format, the user's text -> a prompt with one
      ``<image>`` (e.g. ``fsjax.llava.format_prompt``).
    num_image_tokens: T, the number of image tokens of the encoder.
    max_length: the padded length L; default the longest sequence. A longer sequence
      is an error (truncating would cut the answer).

  Returns:
    ``{"input_ids": int32 [N, L], "loss_mask": float32 [N, L], "attention_mask": int32
    [N, L]}``, right-padded with ``<pad>``. ``loss_mask[n, t] = 1`` where token t is an
    answer token or the EOS, i.e. a token the model must predict (from position t - 1;
    shift by one in the loss, as Hugging Face ``labels``).
  """
  if len(prompts) != len(answers) or not len(prompts):
    raise ValueError(f"prompts and answers must pair up and be non-empty, got "
                     f"{len(prompts)} and {len(answers)}.")
  if isinstance(num_image_tokens, bool) or not isinstance(num_image_tokens, (int, np.integer)) \
      or num_image_tokens < 1:
    raise ValueError(f"num_image_tokens must be an int >= 1 (the encoder's token count T), "
                     f"got {num_image_tokens!r}.")
  image_id = tokenizer.convert_tokens_to_ids(IMAGE)
  if image_id == tokenizer.unk_token_id:
    raise ValueError(f"the tokenizer has no {IMAGE!r} token; build it with build_tokenizer.")
  rows = []
  for prompt, answer in zip(prompts, answers):
    text = format_prompt(prompt)
    if not isinstance(text, str) or text.count(IMAGE) != 1:
      raise ValueError(f"format_prompt({prompt!r}) must give a string with exactly one "
                       f"{IMAGE!r}, got {text!r}.")
    head = tokenizer(text)["input_ids"]  # BOS prepended
    tail = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    at = head.index(image_id)
    head = head[:at] + [image_id] * int(num_image_tokens) + head[at + 1:]
    rows.append((head + tail + [tokenizer.eos_token_id], len(head)))
  longest = max(len(ids) for ids, _ in rows)
  length = longest if max_length is None else int(max_length)
  if length < longest:
    raise ValueError(f"max_length={max_length} is shorter than the longest sequence "
                     f"({longest} tokens with {num_image_tokens} image tokens); raise it.")
  n = len(rows)
  input_ids = np.full((n, length), tokenizer.pad_token_id, np.int32)
  loss_mask = np.zeros((n, length), np.float32)
  attention_mask = np.zeros((n, length), np.int32)
  for i, (ids, answer_start) in enumerate(rows):
    input_ids[i, :len(ids)] = ids
    attention_mask[i, :len(ids)] = 1
    loss_mask[i, answer_start:len(ids)] = 1.0
  return {"input_ids": input_ids, "loss_mask": loss_mask, "attention_mask": attention_mask}
