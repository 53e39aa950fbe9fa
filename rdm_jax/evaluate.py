r"""Evaluate generated samples against a reference set: Frechet distance (FID with the FID
Inception, CLIP-FID with CLIP), precision/recall (k=3), IS, KID and the CLIP score, on the
features of one named extractor (config.eval.extractor).

  python -m rdm_jax.evaluate --config=configs/fashion_mnist_rdm.py --workdir=runs/fmnist \
      [--samples=sample_set_dir,a.npz,image_folder] [--config.eval.reference=test]

Samples: the sample job's directories of .npz shards (`images`, uint8; a set whose run did not
finish is refused), single .npz files, or folders of PNG/JPEG images; by default every set the
sample job wrote in <workdir>/samples (one row each, named by its directory).
Reference (`config.eval.reference`): a part of the config's dataset ("test", "train",
"database"), "tfds:NAME/SPLIT", a folder of images, or an .npz with `images`. Its features
are cached under <data_dir>/eval_cache, keyed by the reference, the extractor (name,
weights hash, preprocessing) and the count, and reused by later runs.
A row "real (<baseline part>)" evaluates as many real images from `config.eval.baseline_part`
as the largest sample set has: what a perfect model would score at that sample count.

Writes <workdir>/eval/metrics.json, <workdir>/eval/metrics.md (the table it prints) and
<workdir>/eval/metrics.png (precision and recall of each set as bars, and FD).
"""

from __future__ import annotations

import json
import warnings
from typing import Any, Sequence

import numpy as np
from absl import flags

from rdm_jax import files, metrics
from rdm_jax.data import sources
from rdm_jax.errors import UserError, fail
from rdm_jax.jobs import cli
from rdm_jax.metrics import extractors, sample_sets

_WORKDIR = cli.define_once(
  flags.DEFINE_string, "workdir", None, "The training run's directory (samples in, eval/ out)."
)
_SAMPLES = cli.define_once(
  flags.DEFINE_list,
  "samples",
  None,
  "Sample sets: .npz files, directories of .npz shards or "
  "image folders (default: the sample job's sets in <workdir>/samples).",
)
_OUT = cli.define_once(
  flags.DEFINE_string, "out", None, "Output directory (default <workdir>/eval)."
)


MADE_BY = "rdm_jax.evaluate"
OUTPUTS = ("metrics.json", "metrics.md", "metrics.png")


def check_output_dir(out_dir: str) -> None:
  """Refuses an output directory whose metrics files an earlier evaluation did not write."""
  if files.exists(out_dir) and not files.isdir(out_dir):
    fail(f"{out_dir} exists and is not a directory; choose another --out")
  try:
    ours = files.read_json(files.join(out_dir, OUTPUTS[0])).get("made_by") == MADE_BY
  except FileNotFoundError:
    ours = not any(files.exists(files.join(out_dir, name)) for name in OUTPUTS[1:])
  except (OSError, UserError, AttributeError):
    ours = False
  if not ours:
    fail(
      f"{out_dir} holds {' or '.join(OUTPUTS)} that rdm_jax.evaluate did not write; refusing to "
      "overwrite them: choose another --out"
    )


def check_comparable(what: str, images: np.ndarray, reference: np.ndarray) -> None:
  if images.shape[1:] != reference.shape[1:]:
    fail(
      f"{what} images are {'x'.join(map(str, images.shape[1:]))} but the reference images are "
      f"{'x'.join(map(str, reference.shape[1:]))} (H x W x C): evaluate at the reference's size "
      "and channels (crop, resize or convert the samples first)"
    )


def compute_metrics(
  cfg: Any,
  fake: dict[str, np.ndarray],
  real: dict[str, np.ndarray],
  real_stats: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
  """The metrics named in cfg.metrics for one sample set against the reference features."""
  out: dict[str, Any] = {"num_samples": len(fake["features"])}
  if "fd" in cfg.metrics:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      mu, sigma = metrics.feature_statistics(fake["features"])
      out["fd"] = metrics.frechet_distance(mu, sigma, *real_stats)
    out["warnings"] = sorted({str(w.message) for w in caught})
  if "precision_recall" in cfg.metrics:
    out["precision"], out["recall"] = metrics.precision_recall(
      real["features"], fake["features"], k=cfg.k
    )
  if "is" in cfg.metrics and fake["logits"].shape[1]:
    splits = min(cfg.is_splits, len(fake["logits"]))
    out["is_mean"], out["is_std"] = metrics.inception_score(fake["logits"], splits=splits)
  if "kid" in cfg.metrics:
    size = min(cfg.kid_subset_size, len(fake["features"]), len(real["features"]))
    out["kid_mean"], out["kid_std"] = metrics.kernel_inception_distance(
      real["features"], fake["features"], subsets=cfg.kid_subsets, subset_size=size
    )
    out["kid_subset_size"] = size
  if "clip_score" in cfg.metrics and "text_features" in fake:
    out["clip_score"] = metrics.clip_score(fake["features"], fake["text_features"])
  return out


def fd_name(extractor: str) -> str:
  """The Frechet distance's name on an extractor's features: FID only on the FID Inception's."""
  return {"Inception": "FID", "CLIP": "CLIP-FID"}.get(extractor, f"FD ({extractor})")


def table(rows: dict[str, dict[str, Any]], extractor: str, reference: str) -> str:
  """A markdown table of the results, metric names labelled with the extractor."""
  fd = fd_name(extractor)
  cols = [
    ("num_samples", "samples", "{:d}"),
    ("fd", fd, "{:.2f}"),
    ("precision", "precision (k=3)", "{:.3f}"),
    ("recall", "recall (k=3)", "{:.3f}"),
    ("is_mean", "IS" if extractor == "Inception" else f"IS ({extractor})", "{:.2f}"),
    ("kid_mean", f"KID ({extractor})", "{:.4f}"),
    ("clip_score", "CLIP score (cosine)", "{:.4f}"),
  ]
  cols = [c for c in cols if any(c[0] in r for r in rows.values())]
  lines = [
    f"| set (reference: {reference}) | " + " | ".join(c[1] for c in cols) + " |",
    "|---|" + "---|" * len(cols),
  ]
  for name, r in rows.items():
    lines.append(
      f"| {name} | " + " | ".join(fmt.format(r[k]) if k in r else "" for k, _, fmt in cols) + " |"
    )
  return "\n".join(lines)


def chart(rows: dict[str, dict[str, Any]], extractor: str, reference: str):
  """A matplotlib Figure of the table's key numbers: precision and recall (k=3) of each set as
  bars from 0 to 1, and its FD beside them (the metrics the rows have)."""
  from matplotlib.figure import Figure

  names = list(rows)
  pr = [m for m in ("precision", "recall") if any(m in r for r in rows.values())]
  fd = any("fd" in r for r in rows.values())
  panels = [p for p in (pr, ["fd"] if fd else []) if p]
  fig = Figure(figsize=(1.2 + 1.4 * len(names) * len(panels), 3.6), dpi=100)
  axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
  x = np.arange(len(names))
  for ax, metrics_shown in zip(axes, panels):
    width = 0.8 / len(metrics_shown)
    for i, m in enumerate(metrics_shown):
      values = [float(rows[n].get(m, np.nan)) for n in names]
      bars = ax.bar(x + (i - (len(metrics_shown) - 1) / 2) * width, values, width, label=m)
      ax.bar_label(bars, fmt="%.3f" if m != "fd" else "%.1f", fontsize=7)
    ax.set_xticks(x, [n if len(n) <= 20 else n[:19] + "..." for n in names], fontsize=8)
    if metrics_shown == ["fd"]:
      ax.set_title(fd_name(extractor))
    else:
      ax.set_ylim(0, 1.1)
      ax.set_title("precision and recall (k=3)")
      ax.legend(fontsize=7, loc="upper left", ncols=2)
  fig.suptitle(f"against {reference}", fontsize=9)
  fig.tight_layout()
  return fig


def check_expected(rows: dict[str, dict[str, Any]], expect: Any) -> tuple[list[str], list[str]]:
  """(the checks that held, the ones that did not) of `config.eval.expect`: (set, metric, low, high)
  rows, each a band the recipe's figure must fall in; sets not evaluated are not checked."""
  held, failed = [], []
  for entry in expect:
    if len(entry) != 4:
      fail(f"config.eval.expect entry {tuple(entry)!r}; each entry is (set, metric, low, high)")
    name, metric, low, high = entry
    if name not in rows:
      continue
    if metric not in rows[name]:
      fail(
        f"config.eval.expect names metric {metric!r} of set {name!r}, which has "
        f"{', '.join(k for k in rows[name] if k != 'warnings')}"
      )
    value = float(rows[name][metric])
    (held if low <= value <= high else failed).append(
      f"{name} {metric} {value:.3f} (band {low:g}..{high:g})"
    )
  return held, failed


def evaluate(
  config: Any, workdir: str = "", samples: Sequence[str] = (), out: str = ""
) -> dict[str, Any]:
  """config.eval's metrics of the sample sets `samples` (default: every set under
  <workdir>/samples) against the reference set, written to `out` (default <workdir>/eval) as
  metrics.json and metrics.md; a figure outside config.eval.expect fails. Returns metrics.json's
  content."""
  cfg = config.eval
  paths = list(samples) or sample_sets.default_sample_sets(
    workdir or fail("--workdir or --samples is required")
  )
  if not paths:
    fail(
      f"no sample sets in {workdir}/samples; run `python -m rdm_jax.sample` first or pass --samples"
    )
  out_dir = files.normpath(out or files.join(workdir or ".", "eval"))
  cli.hold_output(out_dir, "--out")  # created and checked writable before any work; one writer
  check_output_dir(out_dir)
  unknown = set(cfg.metrics) - {"fd", "precision_recall", "is", "kid", "clip_score"}
  if unknown:
    fail(
      f"config.eval.metrics has unknown {sorted(unknown)}; choose from fd, precision_recall, is, "
      "kid, clip_score"
    )

  sets, captions = sample_sets.read_sample_sets(paths)
  made_from = sample_sets.trained_on(paths, sets)
  ref_images, ref_source = sample_sets.read_reference(config, cfg.reference, cfg.num_reference)
  if cfg.num_reference:
    ref_images = ref_images[: cfg.num_reference]
  for name, images in sets.items():
    extractors.check_images(images, f"sample set {name}")
    check_comparable(f"sample set {name}", images, ref_images)
  extractor = extractors.make_extractor(cfg)
  real = sample_sets.cached_features(
    config, extractor, ref_images, {**ref_source, "count": len(ref_images)}
  )
  real_stats = metrics.feature_statistics(real["features"])

  rows = {}
  for name, images in sets.items():
    print(
      f"evaluating {name}: {len(images)} samples"
      + (f" of a model trained on {made_from[name]}" if made_from.get(name) else "")
    )
    fake = extractor(images, what=f"{name} samples")
    if captions[name] and "clip_score" in cfg.metrics:
      if extractor.identity["name"] == "clip_image":
        fake["text_features"] = extractors.clip_text_features(cfg.weights, captions[name])
      else:
        print(f"note: {name} has captions; its CLIP score needs --config.eval.extractor=clip_image")
    rows[name] = compute_metrics(cfg, fake, real, real_stats)
  if cfg.baseline_part:
    n = max(len(im) for im in sets.values())
    base = sources.open_part(config.dataset, cfg.baseline_part)  # reads only the rows drawn
    if len(base) < n:
      fail(
        f"config.eval.baseline_part={cfg.baseline_part!r} has {len(base)} images, fewer than {n}"
      )
    idx = np.sort(np.random.default_rng(0).choice(len(base), n, replace=False))
    feats = sample_sets.cached_features(
      config,
      extractor,
      base.read_ids(base.ids[idx]),
      {**base.source, "subset": f"random {n}, seed 0"},
    )
    rows[f"real ({cfg.baseline_part} images)"] = compute_metrics(cfg, feats, real, real_stats)

  ref_label = f"{cfg.reference}, {len(ref_images)} images"
  md = table(rows, extractor.name, ref_label)
  result = {
    "made_by": MADE_BY,
    "extractor": extractor.identity,
    "reference": {**ref_source, "count": len(ref_images)},
    "sets": rows,
    "note": f"FD, IS and KID computed on {extractor.name} features: not comparable with Inception "
    "FID/IS"
    if extractor.identity["name"] != "inception_v3_fid"
    else "",
  }
  for name, text in (("metrics.json", json.dumps(result, indent=1)), ("metrics.md", md + "\n")):
    files.remove_own_temporaries(files.join(out_dir, name))  # of a run killed while writing it
    files.atomic_write_text(files.join(out_dir, name), text)
  files.remove_own_temporaries(files.join(out_dir, OUTPUTS[2]))
  figure = chart(rows, extractor.name, ref_label)
  files.atomic_write(files.join(out_dir, OUTPUTS[2]), lambda f: figure.savefig(f, format="png"))
  print(md)
  for name, r in rows.items():
    for w in r.get("warnings", []):
      print(f"note ({name}): {w}")
  print(f"wrote {files.join(out_dir, 'metrics.json')}, metrics.md and metrics.png")
  held, failed = check_expected(rows, cfg.expect)
  if failed:
    fail(
      f"outside this recipe's expected band (config.eval.expect): {'; '.join(failed)}. The model "
      "did not train as this config should: read the training log's warnings, the loss curve "
      f"(TensorBoard) and the sample PNGs before using it; the metrics are in {out_dir}"
    )
  if held:
    print(f"within this recipe's expected band (config.eval.expect): {'; '.join(held)}")
  return result


def main(argv):
  del argv
  evaluate(cli.CONFIG.value, _WORKDIR.value or "", _SAMPLES.value or (), _OUT.value or "")


if __name__ == "__main__":
  cli.run(main)
