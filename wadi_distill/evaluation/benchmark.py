"""``wadi-distill evaluate``: sample a fixed prompt set with a fixed seed and score the samples in the
evaluation classifier's feature space, each metric next to its real-vs-real value at the same count.

Sources: a teacher pipeline folder (N-step DDIM with classifier-free guidance), a run folder or an
exported one-step model (one step, as distilled). Real reference: ``per_class`` test-split images of
every class; the real-vs-real row compares an equally sized, disjoint set of training images with the
same reference, which is the floor (or ceiling) a perfect generator would reach at this sample count.
With a VAE, the autoencoder row scores those training images encoded and decoded: the floor of any
generator in that latent space.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from ..embedded import datasets
from ..runs import load_sampler
from . import metrics
from .classifier import Classifier, embed, load_classifier


@dataclass
class Scores:
    frechet_distance: float
    kid: float
    kid_std: float
    precision: float
    recall: float
    prompt_accuracy: float


def sample_noise(teacher, count: int, seed: int, start: int = 0) -> torch.Tensor:
    """x_T for samples ``start .. start+count-1``: sample i is drawn from seed ``seed + i`` alone, so it is
    the same whatever the batch size or the number of samples."""
    shape = (teacher.latent_channels, teacher.sample_size, teacher.sample_size)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + start + i))
                        for i in range(count)])


@torch.no_grad()
def sample_model(teacher, model, prompts: list[str], vsd=None, seed: int = 0, steps: int = 25,
                 guidance_scale: float = 1.5, batch: int = 250, decoded: bool = False):
    """Batches of (samples, prompts) from ``model``: one step when ``vsd`` is given (a generator), else
    ``steps``-step DDIM at ``guidance_scale`` (a teacher). Samples are float images in [-1, 1] (N, C, H, W)
    through the teacher's VAE, or with ``decoded`` uint8 RGB images (N, 3, H, W)."""
    from ..distill import one_step
    from ..sampling import ddim, decode, to_pixels

    was_training = model.training
    model.eval()
    null = teacher.encode([""])
    for start in range(0, len(prompts), batch):
        chunk_prompts = prompts[start: start + batch]
        conditioning = teacher.encode(chunk_prompts)
        noise = sample_noise(teacher, len(chunk_prompts), seed, start)
        if vsd is None:
            samples = ddim(teacher, model, noise, conditioning, null, steps, guidance_scale)
        else:
            samples = one_step(teacher, model, noise, conditioning, vsd)
        if decoded:
            samples = torch.from_numpy(decode(teacher, samples)).permute(0, 3, 1, 2)
        else:
            samples = to_pixels(teacher, samples)
        yield samples, chunk_prompts
    model.train(was_training)


def generate_batches(source: str | os.PathLike, prompts: list[str], seed: int = 0, steps: int = 25,
                     guidance_scale: float = 1.5, batch: int = 250, decoded: bool = False):
    """:func:`sample_model` for a teacher folder (DDIM), a run or an export (one step)."""
    teacher, model, vsd = load_sampler(source)
    yield from sample_model(teacher, model, prompts, vsd, seed, steps, guidance_scale, batch, decoded)


def score(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor,
          kid_subset: int = 1000) -> Scores:
    """All metrics of ``images`` (meant to show class ``labels``) against the reference features."""
    features, predicted = embed(classifier, images)
    kid, kid_std = metrics.kernel_inception_distance(features, reference, subset_size=kid_subset)
    precision, recall = metrics.precision_recall(reference, features)
    return Scores(metrics.frechet_distance(features, reference), kid, kid_std, precision, recall,
                  (predicted == labels).float().mean().item())


class Benchmark:
    """The fixed evaluation set: prompts "a photo of a {class}" × ``per_class``, the real reference
    features (test split) and the real-vs-real scores (as many training images), computed once."""

    def __init__(self, classifier: str | os.PathLike | Classifier | None = None, per_class: int = 100,
                 dataset: str = "fashion-mnist"):
        from .. import embedded

        if not isinstance(classifier, Classifier):
            classifier = load_classifier(classifier or embedded.classifier_path())
        self.classifier, self.per_class = classifier, per_class
        test, train = datasets.load(dataset, "test", classifier.image_size), datasets.load(dataset, "train", classifier.image_size)
        self.reference, _ = embed(classifier, test.balanced(per_class, seed=0).images)
        self.prompts, self.labels = datasets.evaluation_prompts(test.classes, per_class)
        self.real = train.balanced(per_class, seed=1)
        self.real_vs_real = asdict(score(classifier, self.real.images, self.real.labels, self.reference))

    def score(self, images: torch.Tensor) -> dict:
        return asdict(score(self.classifier, images, self.labels, self.reference))

    def reconstruction(self, vae) -> dict:
        """Scores of the real-vs-real row's images encoded and decoded by ``vae`` (x ↦ D(E(x))): the floor
        the autoencoder imposes on any generator in its latent space."""
        from ..embedded.vae_training import reconstruct

        images = reconstruct(vae, self.real.images.to(vae.dtype)).float()
        return asdict(score(self.classifier, images, self.real.labels, self.reference))

    def evaluate_model(self, teacher, model, vsd=None, seed: int = 0, steps: int = 25,
                       guidance_scale: float = 1.5) -> dict:
        """Scores of samples of ``model`` (see :func:`sample_model`) with the real-vs-real values."""
        images = torch.cat([s.float() for s, _ in sample_model(teacher, model, self.prompts, vsd, seed, steps,
                                                                guidance_scale)])
        return {"sampler": "one step" if vsd is not None else f"DDIM {steps} steps, guidance {guidance_scale}",
                "samples": len(self.prompts), "seed": seed, "scores": self.score(images),
                "real_vs_real": self.real_vs_real}


def evaluate(source: str | os.PathLike, classifier: str | os.PathLike | Classifier | Benchmark | None = None,
             per_class: int = 100, seed: int = 0, steps: int = 25, guidance_scale: float = 1.5,
             dataset: str = "fashion-mnist") -> dict:
    """Scores of ``source`` (teacher folder, run or export) and of real data at the same sample count,
    as a JSON-ready dict."""
    benchmark = classifier if isinstance(classifier, Benchmark) else Benchmark(classifier, per_class, dataset)
    teacher, model, vsd = load_sampler(source)
    result = {"source": str(source), **benchmark.evaluate_model(teacher, model, vsd, seed, steps, guidance_scale)}
    vae = getattr(teacher.pipeline, "vae", None)
    if vae is not None:
        result["autoencoder"] = benchmark.reconstruction(vae)
    return result


def summary_line(result: dict) -> str:
    """One terminal line: each metric with its real-vs-real value in parentheses."""
    scores, real = result["scores"], result["real_vs_real"]
    parts = [("FD", "frechet_distance", ".3f"), ("KID", "kid", ".5f"), ("precision", "precision", ".3f"),
             ("recall", "recall", ".3f"), ("prompt accuracy", "prompt_accuracy", ".3f")]
    line = " · ".join(f"{label} {scores[key]:{fmt}} (real {real[key]:{fmt}})" for label, key, fmt in parts)
    if "autoencoder" in result:
        line += f" · VAE reconstruction FD {result['autoencoder']['frechet_distance']:.3f}"
    return line
