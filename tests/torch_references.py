"""Imports the PyTorch reference implementations (pytorch-fid, torch-fidelity, OpenAI's CLIP)
for parity tests.

Both import torchvision for its pure-Python model code. The torchvision wheel on PyPI links
CUDA libraries, so on CPU-only torch its C extension does not load; torchvision then still
registers fake kernels for two of its ops, which fails unless their schemas exist. We define
those two schemas (nothing is ever called) so that the Python modules import. Skips the test
when the packages are missing (`make setup-test` installs them).
"""

import importlib
import importlib.util
import os

import pytest


def define_missing_torchvision_ops() -> None:
  import torch

  try:
    importlib.import_module("torchvision")
    return
  except RuntimeError:  # "operator torchvision::nms does not exist"
    pass
  lib = torch.library.Library("torchvision", "FRAGMENT")
  for op in ("nms", "qnms"):
    try:
      lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    except RuntimeError:
      pass  # already defined
  define_missing_torchvision_ops.lib = lib  # keep the registration alive


def reference(module: str):
  """The named reference module, e.g. 'pytorch_fid.fid_score' or 'torch_fidelity.metric_isc'."""
  for package in ("torch", "torchvision", module.split(".")[0]):
    if importlib.util.find_spec(package) is None:
      pytest.skip(f"{package} is not installed (make setup-test installs it)")
  define_missing_torchvision_ops()
  return importlib.import_module(module)


def openai_clip_module():
  """OpenAI's CLIP model code (clip-anytorch's model.py, loaded alone: its package imports
  torchvision)."""
  spec = importlib.util.find_spec("clip")
  if spec is None:
    pytest.skip("needs clip-anytorch (make setup-test)")
  path = os.path.join(os.path.dirname(spec.origin), "model.py")
  s = importlib.util.spec_from_file_location("openai_clip_model", path)
  module = importlib.util.module_from_spec(s)
  s.loader.exec_module(module)
  return module
