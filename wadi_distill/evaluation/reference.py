"""The benchmark's real data without the dataset: shipped in the package, so ``wadi-distill evaluate``
needs no Fashion-MNIST package on a fresh machine.

What :class:`~.benchmark.Benchmark` takes from real data, ``per_class`` images of every class:

* the **reference**: the evaluation classifier's features of ``test.balanced(per_class, seed=0)``. Only
  features: the metrics never see these images.
* the **real-vs-real draw**: ``train.balanced(per_class, seed=1)``: its features and predicted classes
  (the real-vs-real row) and its images, because the autoencoder row encodes and decodes them; they are
  kept as Fashion-MNIST stores them (28×28 uint8 pixels) and resized as the dataset reader resizes.

Features are float32, exactly what :func:`.classifier.embed` computes before its float64 cast, so the
metrics are the same as from the dataset (to float rounding, not merely to the shown precision). They
carry the digest of the classifier that made them (:func:`.classifier.classifier_digest`).

``balanced`` draws one permutation per class whatever ``per_class`` is, so a draw of k per class is the
first k of each class of a larger draw: the file, made at :data:`SHIPPED_PER_CLASS` per class (the
default), serves every ``per_class`` up to it. The rest is computed from the dataset as before: more per
class, another dataset, or another classifier (then only the features; the images still come from the
file); without the dataset it is refused, saying why and what to install.

Regenerate the file after retraining the embedded classifier (tests/test_reference_features.py fails
while it is stale): ``python -m wadi_distill.evaluation.reference`` (``--out FILE`` writes elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch

from wadi_analysis.errors import InvalidValue, UserError

from .. import embedded
from ..embedded import datasets
from .classifier import Classifier, classifier_digest, embed, load_classifier

SHIPPED_FILE = embedded.HERE / "reference_features.safetensors"
SHIPPED_PER_CLASS = 100   # Benchmark's default; smaller draws are prefixes of it
SHIPPED_DATASET = "fashion-mnist"
NATIVE_SIZE = 28          # Fashion-MNIST's images: the real draw is kept at this size, as the dataset stores it
REFERENCE_DRAW = ("test", 0)   # (split, seed) of the reference
REAL_DRAW = ("train", 1)       # (split, seed) of the real-vs-real images
COMMAND = "python -m wadi_distill.evaluation.reference"


def draw(split: datasets.ImageDataset, per_class: int, seed: int) -> tuple[datasets.ImageDataset, torch.Tensor]:
    """``split.balanced(per_class, seed)`` and the positions in ``split`` it took (balanced's own draw,
    run on the positions)."""
    positions = datasets.ImageDataset(split.name, torch.arange(len(split)), split.labels, split.classes)
    return split.balanced(per_class, seed), positions.balanced(per_class, seed).images


def make_reference(classifier: str | os.PathLike | None = None, out: str | os.PathLike | None = None) -> dict:
    """Write the shipped file (default: :data:`SHIPPED_FILE`, atomically) from the dataset and the
    classifier (default: the embedded one); returns its provenance.

    Tensors: ``reference_features`` (N, D) float32, ``reference_index``, ``reference_labels``; ``real_pixels``
    (N, 28, 28) uint8, ``real_index``, ``real_labels``, and the classifier's ``real_features`` (float32) and
    ``real_predictions`` of the images made from those pixels (N = 10 · per_class, class-major; index:
    positions in the split). Metadata ``provenance`` (JSON): the classifier's digest, dataset, classes,
    per_class, each draw's split and seed, count, feature dimension, native size and this command."""
    from safetensors.torch import save_file

    from wadi_analysis.atomic import atomic_write
    from wadi_analysis.outputs import check_output

    classifier = classifier or embedded.classifier_path()
    out = check_output(out or SHIPPED_FILE, [classifier], folder=False)
    model = load_classifier(classifier)
    (test_split, test_seed), (train_split, train_seed) = REFERENCE_DRAW, REAL_DRAW
    test, reference_index = draw(datasets.load(SHIPPED_DATASET, test_split, model.image_size),
                                 SHIPPED_PER_CLASS, test_seed)
    real, real_index = draw(datasets.load(SHIPPED_DATASET, train_split, NATIVE_SIZE), SHIPPED_PER_CLASS, train_seed)
    features, _ = embed(model, test.images)
    pixels = ((real.images[:, 0] + 1) * 127.5).round().to(torch.uint8)
    real_features, real_predictions = embed(model, real_images(pixels, model.image_size))
    tensors = {"reference_features": features.float(), "reference_index": reference_index,
               "reference_labels": test.labels, "real_pixels": pixels, "real_index": real_index,
               "real_labels": real.labels, "real_features": real_features.float(), "real_predictions": real_predictions}
    provenance = {"classifier_digest": classifier_digest(model), "dataset": SHIPPED_DATASET,
                  "classes": list(test.classes), "per_class": SHIPPED_PER_CLASS,
                  "reference": {"split": test_split, "seed": test_seed},
                  "real": {"split": train_split, "seed": train_seed}, "count": len(test),
                  "feature_dim": features.shape[1], "native_size": NATIVE_SIZE, "command": COMMAND}
    atomic_write(out, lambda path: save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"provenance": json.dumps(provenance)}))
    return provenance


def read_shipped(path: str | os.PathLike | None = None) -> tuple[dict, dict] | None:
    """(tensors, provenance) of the shipped file, or None when it is missing, unreadable or not this
    format (shapes agreeing with its provenance)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path or SHIPPED_FILE), "pt") as handle:
            provenance = json.loads((handle.metadata() or {})["provenance"])
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        if not isinstance(provenance["dataset"], str) or not isinstance(provenance["classifier_digest"], str):
            return None
        count, size = provenance["count"], provenance["native_size"]
        shapes = {"reference_features": (count, provenance["feature_dim"]), "reference_index": (count,),
                  "reference_labels": (count,), "real_pixels": (count, size, size), "real_index": (count,),
                  "real_labels": (count,), "real_features": (count, provenance["feature_dim"]),
                  "real_predictions": (count,)}
        if ({k: tuple(v.shape) for k, v in tensors.items()} != shapes
                or count != len(provenance["classes"]) * provenance["per_class"]):
            return None
    except Exception:  # a damaged install: the dataset, if present, still serves
        return None
    return tensors, provenance


def _prefix(per_class: int, shipped_per_class: int, classes: int) -> torch.Tensor:
    """Rows of the first ``per_class`` of every class in a class-major draw of ``shipped_per_class``."""
    return (torch.arange(classes)[:, None] * shipped_per_class + torch.arange(per_class)[None, :]).flatten()


def _why_not(shipped, dataset: str, per_class: int) -> str | None:
    """Why the shipped file cannot serve this draw (None when it can)."""
    if shipped is None:
        return f"the shipped reference file {SHIPPED_FILE} is missing or damaged"
    provenance = shipped[1]
    if dataset != provenance["dataset"]:
        return f"the shipped reference is {provenance['dataset']}'s, not {dataset}'s"
    if per_class > provenance["per_class"]:
        return f"the shipped reference covers --per-class up to {provenance['per_class']}, not {per_class}"
    return None


def _from_dataset(reason: str, dataset: str, split: str, size: int) -> datasets.ImageDataset:
    try:
        return datasets.load(dataset, split, size)
    except FileNotFoundError as error:
        raise UserError(f"{reason}, so the {dataset} {split} split is needed: {error}") from None


@dataclass
class RealData:
    """The benchmark's real data at ``per_class`` images of every class (class-major)."""

    reference: torch.Tensor         # (N, D) float64: the classifier's features of the reference images
    real: datasets.ImageDataset     # the real-vs-real images and labels
    real_features: torch.Tensor     # (N, D) float64: their features
    real_predictions: torch.Tensor  # (N,) int64: the classifier's class for each


def real_data(classifier: Classifier, per_class: int, dataset: str = SHIPPED_DATASET) -> RealData:
    """The benchmark's real data: from the shipped file where it serves (features only when it was made
    with this classifier), else from the dataset (``UserError`` naming why and what is missing)."""
    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1:
        raise InvalidValue(f"per_class must be a positive integer, not {per_class!r}")
    shipped = read_shipped()
    reason = _why_not(shipped, dataset, per_class)
    if reason is None:
        tensors, provenance = shipped
        rows = _prefix(per_class, provenance["per_class"], len(provenance["classes"]))
        images = real_images(tensors["real_pixels"][rows], classifier.image_size)
        real = datasets.ImageDataset(provenance["dataset"], images, tensors["real_labels"][rows],
                                     tuple(provenance["classes"]))
        if provenance["classifier_digest"] == classifier_digest(classifier):
            return RealData(tensors["reference_features"][rows].double(), real,
                            tensors["real_features"][rows].double(), tensors["real_predictions"][rows])
        reason = (f"the shipped reference features are those of the classifier with digest "
                  f"{provenance['classifier_digest'][:12]}, not this one's ({classifier_digest(classifier)[:12]}; "
                  f"after retraining the embedded classifier, regenerate them with `{COMMAND}`)")
    else:
        split, seed = REAL_DRAW
        real = _from_dataset(reason, dataset, split, classifier.image_size).balanced(per_class, seed)
    split, seed = REFERENCE_DRAW
    test = _from_dataset(reason, dataset, split, classifier.image_size)
    reference, _ = embed(classifier, test.balanced(per_class, seed).images)
    return RealData(reference, real, *embed(classifier, real.images))


def real_images(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """Images (N, 1, size, size) in [-1, 1] from uint8 pixels (N, H, W), as :func:`.datasets.fashion_mnist`
    makes them."""
    return datasets.resize(datasets.to_diffusion_range(pixels.numpy()), size).clamp(-1, 1)


def main(argv: list[str] | None = None) -> None:
    from wadi_analysis.cli_boundary import describe, say_error

    parser = argparse.ArgumentParser(prog=COMMAND, description="Write the benchmark's shipped real data "
                                     "(reference features, real-vs-real pixels) from Fashion-MNIST.")
    parser.add_argument("--classifier", help="classifier file (default: the embedded one)")
    parser.add_argument("--out", help=f"file to write (default: {SHIPPED_FILE})")
    args = parser.parse_args(argv)
    try:
        provenance = make_reference(args.classifier, args.out)
    except (UserError, OSError, ValueError) as error:
        say_error(describe(error))
        raise SystemExit(2) from None
    print(f"{provenance['count']} reference features ({provenance['feature_dim']}-d) and real images, "
          f"classifier {provenance['classifier_digest'][:12]}: {args.out or SHIPPED_FILE}")


if __name__ == "__main__":
    main()
