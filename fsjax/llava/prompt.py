"""LLaVA prompts: the chat format, ``<image>`` expansion, tokenization, decoding.

LLaVA-1.5's format (llava-hf's chat template, the vicuna_v1 conversation without its
system sentence)::

  [{system} ]USER: <image>\n{prompt} ASSISTANT:

The tokenizer adds BOS. As ``LlavaProcessor``, each ``<image>`` is expanded to the
number of image features (T tokens: 576 for the 336-px CLIP tower, 256 for a 224-px one;
the encoder decides) *in the text*, which is then tokenized: the ids equal the
processor's for any tokenizer that knows ``<image>`` as a special token.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

IMAGE_TOKEN = "<image>"


def format_prompt(prompt: str, *, system: str | None = None) -> str:
  """``[{system} ]USER: <image>\\n{prompt} ASSISTANT:`` (LLaVA-1.5's chat format)."""
  _check_user_text(prompt)
  head = f"{system} " if system else ""
  return f"{head}USER: {IMAGE_TOKEN}\n{prompt} ASSISTANT:"


def apply_chat_template(tokenizer: Any, chat_template: str, prompt: str, *,
                        system: str | None = None) -> str:
  """The prompt in a checkpoint's own chat template (jinja, transformers' message format)."""
  _check_user_text(prompt)
  messages = []
  if system:
    messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
  messages.append({"role": "user",
                   "content": [{"type": "image"}, {"type": "text", "text": prompt}]})
  return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                       add_generation_prompt=True)


def _check_user_text(prompt) -> None:
  if not isinstance(prompt, str):
    raise ValueError(f"prompt must be a string, got {type(prompt).__name__}.")
  if IMAGE_TOKEN in prompt:
    raise ValueError(f"prompt {prompt!r} contains {IMAGE_TOKEN}: pass the user's text only; "
                     "the chat format places the image.")


def tokenize(tokenizer: Any, texts: Sequence[str], *, num_image_tokens: int,
             pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Formatted texts -> left-padded ``(input_ids int32 [B, L], valid bool [B, L])``.

  Raises:
    ValueError: if a text does not hold exactly one ``<image>``.
  """
  rows = []
  for text in texts:
    count = text.count(IMAGE_TOKEN)
    if count != 1:
      raise ValueError(f"prompt text {text!r} holds {count} {IMAGE_TOKEN} placeholders; LLaVA "
                       f"needs exactly one (where the image goes), e.g. 'USER: {IMAGE_TOKEN}\\n"
                       "What is this? ASSISTANT:' (format_prompt builds it).")
    expanded = text.replace(IMAGE_TOKEN, IMAGE_TOKEN * num_image_tokens)
    rows.append(list(tokenizer(expanded)["input_ids"]))
  length = max(len(r) for r in rows)
  ids = np.full((len(rows), length), pad_token_id, np.int32)
  valid = np.zeros((len(rows), length), bool)
  for i, r in enumerate(rows):  # left padding: every row's last token is its last position
    ids[i, length - len(r):] = r
    valid[i, length - len(r):] = True
  return ids, valid


def decode(tokenizer: Any, tokens: np.ndarray, *, eos_token_id: int | Sequence[int]) -> list[str]:
  """Generated ids ``[B, N]`` -> B strings, cut at each row's first EOS."""
  eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
  out = []
  for row in np.asarray(tokens).tolist():
    end = next((i for i, t in enumerate(row) if t in eos), len(row))
    out.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
  return out


def word_level_tokenizer(words: Sequence[str], *, vocab_size: int, image_token_id: int) -> Any:
  """A tiny offline word-level tokenizer with LLaMA's special ids, for tests and smoke runs.

  Ids: ``<pad>`` 0, ``<s>`` 1 (prepended to every text, as LLaMA's tokenizer does),
  ``</s>`` 2, ``<unk>`` 3, then ``words`` and ``USER``, ``ASSISTANT``, ``:``, fillers
  ``w{i}`` up to ``vocab_size``, with ``<image>`` (a special token) at ``image_token_id``.
  Splits on whitespace and punctuation.
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import models, pre_tokenizers, processors, decoders
  import transformers  # pylint: disable=g-import-not-at-top

  names = ["<pad>", "<s>", "</s>", "<unk>", "USER", "ASSISTANT", ":"]
  names += [w for w in words if w not in names]
  fillers = (f"w{i}" for i in range(vocab_size))
  vocab, i = {}, 0
  while len(vocab) < vocab_size:
    if i == image_token_id:
      vocab[IMAGE_TOKEN] = i
    else:
      vocab[names[i] if i < len(names) else next(fillers)] = i
    i += 1
  if len(names) + 1 > vocab_size:
    raise ValueError(f"{len(names)} words do not fit a vocabulary of {vocab_size}.")
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
  tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
  fast = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
      pad_token="<pad>")
  fast.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
  if fast.convert_tokens_to_ids(IMAGE_TOKEN) != image_token_id:
    raise ValueError(f"image_token_id={image_token_id} must be < vocab_size={vocab_size}.")
  return fast
