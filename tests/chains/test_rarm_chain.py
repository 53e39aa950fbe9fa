"""configs/imagenet_rarm.py:mammals end to end on mock ImageNet (the RDM chain's assets and
commands, tests/chains/conftest.py; its own file so that the two chains run on different
workers)."""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("taming.modules.diffusionmodules.model")

from tests.taming_reference import TINY, nhwc  # noqa: E402

from tests.chains.conftest import config_of, mock_images, run  # noqa: E402
from tests.conftest import tensorboard_events  # noqa: E402

from rdm_jax.data import store  # noqa: E402


@pytest.mark.slow  # CI's budget: see docs/development.md, Tests
def test_rarm_trains_resumes_and_samples_through_the_same_jobs(assets):
  """configs/imagenet_rarm.py on the tiny VQ: the encode job writes its tokens (taming's indices of
  the same images), the neighbour, train and sample jobs run unchanged; training stopped at its
  checkpoint and resumed ends where an uninterrupted run ends, bit for bit; samples are tokens
  decoded by the first stage."""
  from rdm_jax import checkpoint

  root, vq, _ = assets
  run(root, "rdm_jax.jobs.encode", rarm=True)
  tokens = store.read(f"{root}/data_rarm/latents_train", "latents", hint="")
  images = mock_images("train", 24, 32)
  with torch.no_grad():
    want = vq.tokens(
      torch.as_tensor(images.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)
    ).numpy()
  assert tokens.manifest["tokens"] and tokens["latents"].dtype == np.int32
  np.testing.assert_array_equal(tokens["latents"], want.reshape(24, 64))
  for job in ("rdm_jax.jobs.embed", "rdm_jax.jobs.index", "rdm_jax.jobs.neighbors"):
    run(root, job, rarm=True)  # the database and its index are the RDM chain's, reused
  steps = ["--config.train.num_steps=4", "--config.train.checkpoint_every=2"]
  run(root, "rdm_jax.train", f"--workdir={root}/rarm_a", *steps, rarm=True)
  run(root, "rdm_jax.train", f"--workdir={root}/rarm_b", "--config.train.num_steps=2", rarm=True)
  out = run(root, "rdm_jax.train", f"--workdir={root}/rarm_b", *steps, rarm=True)
  assert "resumed from step 2" in out.stderr, out.stderr[-2000:]
  config = config_of(root, rarm=True)
  _, a, _, step_a = checkpoint.load_trained(config, f"{root}/rarm_a")
  _, b, _, step_b = checkpoint.load_trained(config, f"{root}/rarm_b")
  assert step_a == step_b == 4
  for x, y in zip(jax_leaves(a), jax_leaves(b)):
    np.testing.assert_array_equal(x, y)
  run(
    root,
    "rdm_jax.jobs.context_ablation",
    f"--workdir={root}/rarm_a",
    "--num_examples=8",
    "--repeats=1",
    "--batch=4",
    rarm=True,
  )
  import json

  with open(f"{root}/rarm_a/context_ablation.json") as f:
    ablation = json.load(f)
  for key in ("true_neighbors", "zeros_context", "shuffled_neighbors"):  # NLL in nats per token
    assert 0 < ablation[key] < 2 * np.log(TINY["vq_f4"]["n_embed"]), ablation
  scalars, _ = tensorboard_events(f"{root}/rarm_a")  # beside the training's, at its step
  for key in ("true_neighbors", "zeros_context", "shuffled_neighbors"):
    assert scalars[f"context_ablation/nll/{key}"] == {4: pytest.approx(ablation[key], rel=1e-6)}
  assert 4 in scalars["learning_rate"]
  run(root, "rdm_jax.sample", f"--workdir={root}/rarm_a", rarm=True)
  shards = [f for f in os.listdir(f"{root}/rarm_a/samples/exemplar") if f.startswith("shard-")]
  with np.load(f"{root}/rarm_a/samples/exemplar/{shards[0]}") as z:
    assert z["images"].shape == (8, 32, 32, 3) and z["images"].dtype == np.uint8
    assert z["latents"].shape == (8, 64) and z["latents"].max() < TINY["vq_f4"]["n_embed"]
    with torch.no_grad():  # the images are the first stage's decoding of the sampled tokens
      decoded = vq.decode_code(torch.as_tensor(z["latents"]).long(), (8, 8, 8, 3))
    pixels = np.clip(np.round((nhwc(decoded) + 1) * 127.5), 0, 255)
    assert np.abs(pixels - z["images"]).max() <= 1


def jax_leaves(tree):
  import jax

  return [np.asarray(x) for x in jax.tree.leaves(tree)]
