"""benchmarks/llava_decode.py's prefill floor: the products it times are the model's own."""

import os
import sys

import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

import common  # noqa: E402  pylint: disable=wrong-import-position
import llava_decode  # noqa: E402  pylint: disable=wrong-import-position

import fsjax.llava as fl  # noqa: E402  pylint: disable=wrong-import-position
from fsjax import flamingo as fl_flamingo  # noqa: E402  pylint: disable=wrong-import-position


def test_weight_products_are_the_prefills_weight_matmuls():
  """Closed form from the config: every LLaMA layer's q, k, v, o and MLP kernels on each
  prompt row (the last layer: k and v only, the rest on the last row), the projector on the
  image tokens, the LM head on the last row."""
  hf_dict = llava_decode._hf_dict(llava_decode.SMALL)  # pylint: disable=protected-access
  config = fl.LlavaConfig.from_hf_dict(hf_dict)
  shapes = fl.language_param_shapes(config)
  text = llava_decode.SMALL["text"]
  hidden, mlp, layers = text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"]
  batch, length, image = 2, 592, 576
  products = llava_decode.weight_products(shapes, batch, length, image)
  assert len(products) == 7 * layers + 2 + 1
  flops = sum(2 * m * k * n for m, k, n in products)
  feature = llava_decode.SMALL["vision"]["hidden_size"]
  per_row = 4 * hidden * hidden + 3 * hidden * mlp  # q, k, v, o and the MLP
  kv = 2 * hidden * hidden
  want = 2 * batch * ((layers - 1) * length * per_row + length * kv + (per_row - kv)
                      + image * (feature * hidden + hidden * hidden)
                      + hidden * text["vocab_size"])
  assert flops == want


def test_matmul_floor_times_the_products():
  seconds = common.matmul_floor([(8, 16, 32), (1, 32, 64)], jnp.float32, reps=2)
  assert 0 < seconds < 10
  assert common.matmul_floor([(1, 16, 32)], jnp.bfloat16, reps=1) > 0


def test_flamingo_step_gflops_counts_a_decoding_step():
  """benchmarks/flamingo_decode.py --flops-9b: one step's count is the closed-form weight
  products per row (MPT layers, the gated layers without the media's keys and values,
  the tied LM head) within the elementwise work, the same per row at any batch."""
  import flamingo_decode  # pylint: disable=import-outside-toplevel
  from fsjax.flamingo import mpt  # pylint: disable=import-outside-toplevel
  d, vocab, layers, inner = 256, 1000, 4, 8 * 64
  config = fl_flamingo.FlamingoConfig(
      lang=mpt.MPTConfig(d_model=d, n_heads=4, n_layers=layers, vocab_size=vocab,
                         expansion_ratio=4, max_seq_len=64),
      media_token_id=vocab - 1, eoc_token_id=vocab - 2, vis_dim=128, cross_attn_every_n_layers=2)
  mpt_layer = 2 * (3 * d * d + d * d + 2 * 4 * d * d)  # Wqkv, out_proj, the MLP
  gated = 2 * (2 * d * inner + 2 * 4 * d * d)  # to_q, to_out, the feed-forward
  want = layers * mpt_layer + 2 * gated + 2 * d * vocab
  per_row = [flamingo_decode.step_gflops(config, batch=b, prompt_tokens=8) * 1e9 / b
             for b in (1, 3)]
  assert abs(per_row[0] - per_row[1]) < 1e-3 * per_row[0]
  assert want <= per_row[0] < 1.1 * want, (per_row[0], want)


def test_faults_of_counts_the_pages_a_call_touches_afresh():
  """A call that maps 64 MB afresh and writes all of it faults at least once per page
  (checked against 2 MiB huge pages, the largest; 4 KiB pages give 512x that), more than a
  call that touches nothing."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  touch = lambda: np.ones(16 * 1024 * 1024, np.float32).sum()  # 64 MB, mmapped by malloc
  count, system = llava_decode.faults_of(touch)
  assert count >= 64 * 1024 * 1024 // (2 * 1024 * 1024) and system >= 0.0
  idle, _ = llava_decode.faults_of(lambda: None)
  assert idle < count
