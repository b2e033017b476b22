"""Tests of train.gsb (the GSB trainer) and fsjax.gsb.checkpoint (loading its result).

One tiny setting throughout: a toy tanh encoder at 8 px with 2 tokens of dim 8 (registered
here as ``gsb_test_toy``, so that the trainer builds it from ``config.encoder`` like any
encoder), a width-8 two-level denoiser, a one-block mapper, 16 LFW-subset images.
Compilation dominates, so the uninterrupted run is shared by most tests.
"""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fsjax import checkpointing
from fsjax import encoders
from fsjax import gsb
from train import gsb as train_gsb

SIDE, TOKENS, DIM = 8, 2, 8
ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True, eq=False)
class TanhEncoder(encoders.Encoder):
  """Frozen toy encoder: ``tanh(x W1) W2 + 1`` as ``[B, 2, dim]`` tokens.

  Not very robust to noise, and with a component shared by all images (as pooled CNN
  features, all positive, have), which a mapper can learn to restore.
  """

  def tokens(self, params, x, *, sigma=None):
    x = encoders.resize(x, self.resolution)
    h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["w1"])
    return (h @ params["w2"]).reshape(x.shape[0], TOKENS, -1) + 1.0


@encoders.register("gsb_test_toy")
def _build_toy(config):
  rng = np.random.default_rng(config.seed)
  params = {"w1": rng.normal(size=(SIDE * SIDE * 3, 32)).astype(np.float32) / 4.0,
            "w2": rng.normal(size=(32, TOKENS * config.dim)).astype(np.float32) / 4.0}
  return TanhEncoder(resolution=config.resolution), jax.tree.map(jnp.asarray, params)


def tiny_config(data_dir, **gsb_overrides):
  """16 images; D: 4 batches of 4 x 3 epochs = 12 steps; M: 20 steps; 2 draws per image.

  Steps are cheap here (compiling is not), so M, slow to start (its residual is damped
  at init, Fixup-style), gets more of them.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.encoder = ml_collections.ConfigDict(dict(name="gsb_test_toy", seed=0, dim=DIM,
                                                  resolution=SIDE))
  config.train_data = ml_collections.ConfigDict(dict(
      name="lfw_subset", split="train", image_size=SIDE, batch_size=4, num_examples=16,
      seed=0, data_dir=str(data_dir)))
  config.gsb = gsb.default_gsb_config()
  config.gsb.update(checkpoint=None, log_every=1, checkpoint_every=3, noise_samples=2)
  config.gsb.denoiser.update(width=8, channel_mults=(1, 2), blocks_per_level=1,
                             emb_dim=16, num_groups=4, batch_size=4, epochs=3,
                             learning_rate=1e-2)
  config.gsb.mapper.update(num_blocks=1, num_heads=2, sigma_hidden=8, batch_size=4,
                           epochs=5, learning_rate=0.1)
  for k, v in gsb_overrides.items():
    stage, key = k.split("__") if "__" in k else (None, k)
    (config.gsb[stage] if stage else config.gsb)[key] = v
  return config


D_STEPS, M_STEPS = 12, 20


@pytest.fixture(scope="module", autouse=True)
def rbg_keys():
  """"rbg" PRNG keys in this module: the same code, but jitted inits compile ~4x faster."""
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  yield
  jax.config.update("jax_default_prng_impl", previous)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def full_run(data_dir, tmp_path_factory):
  """An uninterrupted run: ``(config, workdir, final params)``."""
  config = tiny_config(data_dir)
  workdir = tmp_path_factory.mktemp("gsb_full")
  return config, workdir, train_gsb.train_and_evaluate(config, str(workdir))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def metrics(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------


def test_run_writes_config_metrics_and_checkpoints(full_run):
  config, workdir, params = full_run
  assert set(params) == {"denoiser", "mapper"}
  assert json.loads((workdir / "config.json").read_text())["gsb"]["mapper"]["num_blocks"] == 1
  rows = metrics(workdir)
  assert [(r["stage"], r["step"]) for r in rows] == (
      [("denoiser", s) for s in range(1, D_STEPS + 1)]
      + [("mapper", s) for s in range(1, M_STEPS + 1)])
  for r in rows:
    assert {"loss", "grad_norm", "learning_rate", "examples_per_s", "epoch"} <= set(r)
  assert {"rec", "rob"} <= set(rows[0]) and {"mrob", "id", "stat"} <= set(rows[-1])
  # L_D = L_rec + lam_rob * L_rob (Eq. 9), as logged.
  lam = config.gsb.denoiser.lam_rob
  assert rows[0]["loss"] == pytest.approx(rows[0]["rec"] + lam * rows[0]["rob"], rel=1e-5)
  # Adam: constant rate; AdamW: cosine decay from the peak to ~0 over the stage.
  assert all(r["learning_rate"] == pytest.approx(1e-2) for r in rows[:D_STEPS])
  m_lr = [r["learning_rate"] for r in rows[D_STEPS:]]
  expected = [0.1 * 0.5 * (1 + np.cos(np.pi * s / M_STEPS)) for s in range(M_STEPS)]
  np.testing.assert_allclose(m_lr, expected, rtol=1e-5, atol=1e-9)
  # Every checkpoint_every (3) steps and at the end; a finished stage keeps only its
  # final parameters (no optimiser state): what resuming and fsjax.gsb.checkpoint need.
  for stage, final in (("denoiser", D_STEPS), ("mapper", M_STEPS)):
    assert sorted(int(p.name) for p in (workdir / stage).iterdir() if p.name.isdigit()) == [
        final]
    mngr = checkpointing.manager(str(workdir), stage)
    assert set(checkpointing.restore_as_saved(mngr, final)) == {"step", "params"}
    checkpointing.close(mngr)


def _fixed_noise_losses(config, stage_name, params, frozen):
  """The stage's mean loss over all 16 images at fixed noise, for init and given params.

  Runs the (cached) update step itself at a fixed step number: its loss is that of the
  parameters it is given, on the same batches and noise for both.
  """
  encoder, encoder_params = encoders.build(config.encoder)
  dataset = train_gsb.training_images(config)
  stage = train_gsb.build_stages(config, encoder, encoder_params, dataset,
                                 n_devices=1)[stage_name]
  update = train_gsb.update_step(stage)
  mesh = train_gsb.data_mesh()  # the trainer's shardings, so the compilation is reused
  batches = list(train_gsb.epoch_batches(dataset, batch_size=4, seed=123, epoch=0))
  out = {}
  for name, p in (("init", stage.init_params()), ("trained", params)):
    losses = []
    for i, batch in enumerate(batches):
      state = {"step": jnp.asarray(100 + i, jnp.int32), "params": p,
               "opt_state": stage.tx.init(p)}
      state = jax.device_put(jax.tree.map(jnp.copy, state),  # a copy: it is donated
                             train_gsb.replicated(mesh))
      frozen_ = jax.device_put({"encoder": encoder_params, **frozen},
                               train_gsb.replicated(mesh))
      images = jax.device_put(batch["image"], train_gsb.batch_sharded(mesh))
      losses.append(float(update(state, frozen_, images, stage.key)[1]["loss"]))
    out[name] = float(np.mean(losses))
  return out


def test_training_lowers_both_losses(full_run):
  config, _, params = full_run
  d = _fixed_noise_losses(config, "denoiser", params["denoiser"], {})
  assert d["trained"] < 0.95 * d["init"], d
  m = _fixed_noise_losses(config, "mapper", params["mapper"],
                          {"denoiser": params["denoiser"]})
  assert m["trained"] < 0.97 * m["init"], m


def test_resume_reproduces_uninterrupted_run(full_run, data_dir, tmp_path):
  """Stop in stage 1, resume and stop in stage 2 (across the boundary), resume to the end."""
  config, full_workdir, full_params = full_run
  partial = train_gsb.train_and_evaluate(config, str(tmp_path), max_steps=4)
  assert set(partial) == {"denoiser"}
  assert sorted(p.name for p in (tmp_path / "denoiser").iterdir() if p.name.isdigit()) == [
      "3", "4"]
  partial = train_gsb.train_and_evaluate(config, str(tmp_path), max_steps=D_STEPS + 2)
  assert_trees_equal(partial["denoiser"], full_params["denoiser"])
  resumed = train_gsb.train_and_evaluate(config, str(tmp_path))
  assert_trees_equal(resumed, full_params)
  # The logs of the pieces are the log of the whole.
  strip = lambda rows: [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rows]
  assert strip(metrics(tmp_path)) == strip(metrics(full_workdir))


def test_warmup_lowers_rec_below_the_noisy_input_and_starts_the_denoiser(data_dir,
                                                                         tmp_path):
  """L_rec-only warm-up (no encoder pass): L_rec falls, and falls below the noisy input's
  own error (what handing the encoder x + delta would cost); the denoiser stage then
  starts from the warm-up's parameters, not from a fresh init."""
  config = tiny_config(data_dir, denoiser__warmup_epochs=10, denoiser__epochs=1,
                       mapper__epochs=0)
  params = train_gsb.train_and_evaluate(config, str(tmp_path))
  rows = metrics(tmp_path)
  warm = [r for r in rows if r["stage"] == "warmup"]
  assert len(warm) == 40 and {"rec", "noisy_mse"} <= set(warm[0]) and "rob" not in warm[0]
  assert warm[-1]["rec"] < 0.5 * warm[0]["rec"]
  assert warm[-1]["rec"] < warm[-1]["noisy_mse"]
  den = [r for r in rows if r["stage"] == "denoiser"]
  assert den[0]["rec"] < 0.5 * warm[0]["rec"]  # started warm
  assert set(params) == {"denoiser"}
  # Ctrl-C-safe bookkeeping: a finished run with a warm-up only reports.
  again = train_gsb.train_and_evaluate(config, str(tmp_path))
  assert_trees_equal(again, params)


def test_finished_run_only_reports(full_run, capsys):
  config, workdir, params = full_run
  before = (workdir / "metrics.jsonl").read_text()
  again = train_gsb.train_and_evaluate(config, str(workdir))
  assert "nothing to do" in capsys.readouterr().out
  assert (workdir / "metrics.jsonl").read_text() == before
  assert_trees_equal(again, params)


def test_restart_with_another_config_is_refused(full_run, data_dir):
  _, workdir, _ = full_run
  with pytest.raises(ValueError, match=r"gsb\.denoiser\.width: 8 in the workdir, 16 now"):
    train_gsb.train_and_evaluate(tiny_config(data_dir, denoiser__width=16), str(workdir))


def test_nan_loss_stops_training_loudly(full_run, tmp_path, monkeypatch):
  """A NaN image in the third batch: the error names the stage, step and loss parts."""
  config, _, _ = full_run  # same config: the compiled step is reused
  batches = train_gsb.epoch_batches

  def poisoned(*args, **kwargs):
    for i, batch in enumerate(batches(*args, **kwargs)):
      if i == 2 and kwargs["epoch"] == 0 and not kwargs.get("skip"):
        batch["image"][0, 0, 0, 0] = np.nan
      yield batch

  monkeypatch.setattr(train_gsb, "epoch_batches", poisoned)
  with pytest.raises(FloatingPointError,
                     match=r"stage 'denoiser'\) diverged at step 3: grad_norm=nan, loss=nan"):
    train_gsb.train_and_evaluate(config, str(tmp_path))
  # Step 3 is a checkpoint step (checkpoint_every = 3), but it diverged: nothing saved.
  assert not [p for p in (tmp_path / "denoiser").iterdir() if p.name.isdigit()]


def test_bad_options_raise_before_training(data_dir, tmp_path):
  with pytest.raises(ValueError, match="noise_samples"):
    train_gsb.train_and_evaluate(tiny_config(data_dir, noise_samples=0), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="fewer than one batch"):
    train_gsb.train_and_evaluate(tiny_config(data_dir, mapper__batch_size=32),
                                 str(tmp_path / "b"))
  with pytest.raises(ValueError, match="max_steps"):
    train_gsb.train_and_evaluate(tiny_config(data_dir), str(tmp_path / "c"), max_steps=-1)
  # A refused config leaves no config.json behind to block the corrected one.
  assert not list(tmp_path.glob("*/config.json"))


def test_epoch_order_depends_on_seed_plus_epoch_only(data_dir):
  dataset = train_gsb.training_images(tiny_config(data_dir))
  order = lambda **kw: [b["label"].tolist() + [float(b["image"].sum())] for b in
                        train_gsb.epoch_batches(dataset, batch_size=4, **kw)]
  assert order(seed=0, epoch=1) == order(seed=1, epoch=0)
  assert order(seed=0, epoch=1)[2:] == order(seed=0, epoch=1, skip=2)
  assert order(seed=0, epoch=0) != order(seed=0, epoch=1)


def test_noisy_copies_repeat_each_image_with_its_own_sigma():
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 8, 8, 3)), jnp.float32)
  x_rep, x_noisy, sigma = train_gsb.noisy_copies(x, jax.random.key(0), sigma_range=(0.2, 0.4),
                                                 noise_samples=3)
  np.testing.assert_array_equal(x_rep, np.repeat(np.asarray(x), 3, axis=0))
  assert sigma.shape == (6,) and np.all((0.2 <= sigma) & (sigma <= 0.4))
  assert len(set(np.asarray(sigma).tolist())) == 6
  delta = np.asarray(x_noisy - x_rep).reshape(6, -1)
  # Per-copy empirical std of delta tracks its sigma (192 pixels each).
  np.testing.assert_allclose(delta.std(axis=1), sigma, rtol=0.25)


# ----------------------------------------------------------------------------------------
# Loading the trained booster.
# ----------------------------------------------------------------------------------------


def test_load_gives_the_trainers_features(full_run):
  config, workdir, params = full_run
  loaded = gsb.checkpoint.load(workdir, config=config)
  assert_trees_equal(loaded, params)
  encoder, encoder_params = encoders.build(config.encoder)
  boosted = gsb.BoostedEncoder(encoder, denoiser=gsb.build_denoiser(config),
                               mapper=gsb.build_mapper(config, DIM))
  x = np.random.default_rng(1).uniform(size=(3, SIDE, SIDE, 3)).astype(np.float32)
  features = jax.jit(lambda p, x: boosted({"encoder": encoder_params, **p}, x, sigma=0.3))
  host = lambda tree: jax.tree.map(np.asarray, tree)  # one placement: one compilation
  np.testing.assert_array_equal(features(host(loaded), x), features(host(params), x))
  # And the Table 6 rows that certify.run builds from it.
  names = [v[0] for v in gsb.ablation_variants(encoder, encoder_params, loaded, config)]
  assert names == ["FS+D", "FS+M", "FS+D+M"]


def test_load_errors(full_run, data_dir, tmp_path):
  config, workdir, _ = full_run
  with pytest.raises(FileNotFoundError, match="does not exist"):
    gsb.checkpoint.load(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="No GSB checkpoint"):
    gsb.checkpoint.load(tmp_path)
  other_encoder = tiny_config(data_dir)
  other_encoder.encoder.seed = 1
  with pytest.raises(ValueError, match=r"another encoder: config\.encoder\.seed"):
    gsb.checkpoint.load(workdir, config=other_encoder)
  with pytest.raises(ValueError, match="mapper parameters"):
    gsb.checkpoint.load(workdir, config=tiny_config(data_dir, mapper__num_blocks=2))
  with pytest.raises(ValueError, match=r"num_groups: trained with 4, given 2"):
    gsb.checkpoint.load(workdir, config=tiny_config(data_dir, denoiser__num_groups=2))


def test_load_rejects_an_encoder_with_another_token_dim(full_run, data_dir):
  _, workdir, _ = full_run
  config = tiny_config(data_dir)
  config.encoder.dim = 2 * DIM
  with pytest.raises(ValueError, match=r"config\.encoder\.dim: trained with 8, given 16"):
    gsb.checkpoint.load(workdir, config=config)
  # The same encoder in another compute dtype is accepted (rounding only).
  config.encoder.dim, config.encoder.dtype = DIM, "bfloat16"
  assert set(gsb.checkpoint.load(workdir, config=config)) == {"denoiser", "mapper"}


# ----------------------------------------------------------------------------------------
# The command line: Ctrl-C (a real SIGINT), resume, one-line errors.
# ----------------------------------------------------------------------------------------


CONFIG_FILE = """
import jax
from tests.train import test_gsb  # registers the toy encoder in this process

jax.config.update("jax_default_prng_impl", "rbg")  # as the in-process runs


def get_config():
  return test_gsb.tiny_config({data_dir!r})
"""


class Run:
  """``python -m train.gsb`` on the tiny config, its output read as it comes."""

  def __init__(self, config_file, workdir):
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "train.gsb", f"--config={config_file}",
         f"--workdir={workdir}"], cwd=ROOT, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    self.out, self.err = b"", b""
    self._threads = [threading.Thread(target=self._read, args=(s, n), daemon=True)
                     for s, n in ((self.proc.stdout, "out"), (self.proc.stderr, "err"))]
    for t in self._threads:
      t.start()

  def _read(self, stream, name):
    while chunk := os.read(stream.fileno(), 4096):
      setattr(self, name, getattr(self, name) + chunk)

  def wait_for(self, text: str, where: str = "out", timeout: float = 300):
    deadline = time.monotonic() + timeout
    while text.encode() not in getattr(self, where):
      assert self.proc.poll() is None, (self.out + self.err).decode()[-3000:]
      assert time.monotonic() < deadline, f"no {text!r} in {where}"
      time.sleep(0.02)

  def finish(self, timeout: float = 300) -> tuple[int, str, str]:
    rc = self.proc.wait(timeout=timeout)
    for t in self._threads:
      t.join()
    self.proc.stdout.close()
    self.proc.stderr.close()
    return rc, self.out.decode(), self.err.decode()


def last_line(err: str) -> str:
  return err.replace("\r", "\n").strip().splitlines()[-1]


def test_ctrl_c_exits_130_and_the_same_command_resumes_to_the_same_booster(
    full_run, data_dir, tmp_path):
  """SIGINT while loading, then while the first step compiles: each run stops with exit
  status 130 and one line; the same command then finishes with the uninterrupted run's
  parameters and metrics."""
  _, full_workdir, full_params = full_run
  config_file = tmp_path / "tiny.py"
  config_file.write_text(CONFIG_FILE.format(data_dir=str(data_dir)))
  workdir = tmp_path / "gsb"
  # 1. Ctrl-C during loading: stops at once (nothing to save yet), one line, 130.
  run = Run(config_file, workdir)
  run.wait_for("loading encoder")
  run.proc.send_signal(signal.SIGINT)
  rc, out, err = run.finish()
  assert rc == 130, err[-3000:]
  assert "Traceback" not in err
  assert last_line(err) in (
      "train.gsb: interrupted (Ctrl-C); nothing more was saved.",
      # (on a machine so loaded that the signal came only once the loop had started)
      "train.gsb (stage 'denoiser'): interrupted before its first step; nothing to save. "
      "Rerun the same command to start.",
      "train.gsb (stage 'denoiser'): interrupted, saved at step 1; rerun the same command "
      "to resume from there."), err[-3000:]
  # 2. Ctrl-C while the first step compiles: that step finishes, is saved, exit 130.
  run = Run(config_file, workdir)
  run.wait_for("compiling the first step", "err")
  run.proc.send_signal(signal.SIGINT)
  rc, out, err = run.finish()
  assert rc == 130 and "Traceback" not in err, err[-3000:]
  line = last_line(err)
  saved = int(line.split("saved at step ")[1].split(";")[0])
  assert line.startswith("train.gsb (stage 'denoiser'): interrupted") and saved >= 1, line
  assert (workdir / "denoiser" / str(saved)).is_dir()
  # 3. The same command resumes and finishes: the uninterrupted run's booster.
  rc, out, err = Run(config_file, workdir).finish()
  assert rc == 0, err[-3000:]
  assert f"resuming {workdir}" in out
  assert f"booster saved to {workdir} (denoiser/{D_STEPS}, mapper/{M_STEPS})" in out
  assert_trees_equal(gsb.checkpoint.load(workdir), full_params)
  strip = lambda rows: [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rows]
  assert strip(metrics(workdir)) == strip(metrics(full_workdir))


def test_damaged_checkpoint_and_busy_workdir_are_one_line(full_run, data_dir, tmp_path):
  """A truncated array file: train.gsb (which would only report) and fsjax.gsb.checkpoint
  name the step folder and the fix; a workdir held by another trainer is refused with the
  holder's pid and host."""
  _, full_workdir, _ = full_run
  config_file = tmp_path / "tiny.py"
  config_file.write_text(CONFIG_FILE.format(data_dir=str(data_dir)))
  workdir = tmp_path / "damaged"
  shutil.copytree(full_workdir, workdir)
  data = sorted((workdir / "mapper" / str(M_STEPS)).rglob("d/*"), key=lambda p: -p.stat().st_size)
  with open(data[0], "r+b") as f:
    f.truncate(10)
  expected = f"GSB mapper checkpoint {workdir}/mapper/{M_STEPS} cannot be read"
  with pytest.raises(checkpointing.DamagedCheckpointError, match=expected) as e:
    gsb.checkpoint.load(workdir)
  assert "\n" not in str(e.value) and "train.gsb --workdir" in str(e.value)
  rc, out, err = Run(config_file, workdir).finish()
  assert rc == 1 and "Traceback" not in err, err[-3000:]
  assert err.splitlines()[0].startswith(f"error: {expected}"), err[-3000:]
  assert "nothing to do" not in out
  # One writer per workdir: this process holds it, the trainer is refused at once.
  with checkpointing.lock_workdir(workdir, "a test"):
    rc, out, err = Run(config_file, workdir).finish()
  assert rc == 1 and "Traceback" not in err, err[-3000:]
  assert err.splitlines()[0] == (
      f"error: workdir {workdir} is in use by a test (pid {os.getpid()} on host "
      f"{socket.gethostname()}, since " + err.split(", since ")[1].split(")")[0] + "): two "
      "writers would corrupt its checkpoints. Wait for it to finish (or stop it), or use "
      "another --workdir.")
  assert not (workdir / checkpointing.LOCK_FILE).exists()  # released on exit
