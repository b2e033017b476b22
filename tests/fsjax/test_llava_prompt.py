"""fsjax.llava prompts: ids equal transformers' LlavaProcessor's for a tiny tokenizer."""

import json

import numpy as np
import pytest
import transformers
from PIL import Image

import fsjax.llava as fl

IMAGE = 100
WORDS = ["describe", "this", "image", "in", "one", "sentence", "you", "are", "a", "helpful",
         "assistant", "what", "is", "it", "?", "."]
# llava-hf/llava-1.5-7b-hf's chat template (its chat_template.json).
LLAVA_HF_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | "
    "selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


def _processor(tokenizer, size):
  image_processor = transformers.LlavaImageProcessorPil(
      size={"shortest_edge": size}, crop_size={"height": size, "width": size})
  return transformers.LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                     patch_size=14, vision_feature_select_strategy="default",
                                     num_additional_image_tokens=1,
                                     chat_template=LLAVA_HF_TEMPLATE)


def _model(tokenizer, chat_template=None, system=None):
  text = fl.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=1, num_attention_heads=4)
  config = fl.LlavaConfig(text_config=text, image_token_id=IMAGE)
  return fl.Llava(config=config, encoder=None, tokenizer=tokenizer, chat_template=chat_template,
                  system_prompt=system, pad_token_id=0)


def _messages(text, system=None):
  out = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
  return out + [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("size,system", [(28, None), (336, None),
                                         (28, "you are a helpful assistant .")])
def test_prompt_ids_equal_llava_processor(size, system):
  tok = fl.prompt.word_level_tokenizer(WORDS, vocab_size=128, image_token_id=IMAGE)
  processor = _processor(tok, size)
  question = "describe this image in one sentence ."
  text = processor.apply_chat_template(_messages(question, system), add_generation_prompt=True)
  assert text == fl.format_prompt(question, system=system)  # the built-in format = llava-hf's
  image = Image.fromarray(np.zeros((size, size, 3), np.uint8))
  want = processor(images=image, text=text, return_tensors="np")["input_ids"]
  tokens = (size // 14) ** 2  # 576 at 336 px
  for template in (None, LLAVA_HF_TEMPLATE):
    ids, valid = _model(tok, template, system).prompt_ids(question, batch=1,
                                                            num_image_tokens=tokens)
    np.testing.assert_array_equal(ids, want)
    assert valid.all()
  assert np.sum(want == IMAGE) == tokens and want[0, 0] == 1  # BOS, then the chat format


def test_batch_of_prompts_is_left_padded():
  tok = fl.prompt.word_level_tokenizer(WORDS, vocab_size=128, image_token_id=IMAGE)
  processor = _processor(tok, 28)
  prompts = ["what is it ?", "describe this image in one sentence ."]
  ids, valid = _model(tok).prompt_ids(prompts, batch=2, num_image_tokens=4)
  image = Image.fromarray(np.zeros((28, 28, 3), np.uint8))
  for row, p in enumerate(prompts):
    want = processor(images=image, text=fl.format_prompt(p), return_tensors="np")["input_ids"][0]
    np.testing.assert_array_equal(ids[row][valid[row]], want)
    assert not valid[row, :ids.shape[1] - len(want)].any()  # padding on the left
    assert np.all(ids[row][~valid[row]] == 0)
  with pytest.raises(ValueError, match="3 prompts for 2 images"):
    _model(tok).prompt_ids(prompts + ["what"], batch=2, num_image_tokens=4)


def test_chat_template_and_tokenizer_load_from_the_directory(tmp_path):
  tok = fl.prompt.word_level_tokenizer(WORDS, vocab_size=128, image_token_id=IMAGE)
  tok.save_pretrained(tmp_path)
  (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": LLAVA_HF_TEMPLATE}))
  assert fl.checkpoint._chat_template(tmp_path) == LLAVA_HF_TEMPLATE  # pylint: disable=protected-access
  loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
  assert loaded.convert_tokens_to_ids("<image>") == IMAGE
  assert loaded("what <image>")["input_ids"] == [1, tok.convert_tokens_to_ids("what"), IMAGE]


def test_decode_cuts_at_eos():
  tok = fl.prompt.word_level_tokenizer(WORDS, vocab_size=128, image_token_id=IMAGE)
  what, it = tok.convert_tokens_to_ids("what"), tok.convert_tokens_to_ids("it")
  out = fl.prompt.decode(tok, np.array([[what, it, 2, what], [it, 0, 0, 0]]), eos_token_id=2)
  assert out == ["what it", "it"]
