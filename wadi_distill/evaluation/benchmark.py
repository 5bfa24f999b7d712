"""``wadi-distill evaluate``: sample a fixed prompt set with a fixed seed and score the samples in the
evaluation classifier's feature space, each metric next to its real-vs-real value at the same count.

Sources: a teacher pipeline folder (N-step DDIM with classifier-free guidance), a run folder or an
exported one-step model (one step, as distilled). Real reference: ``per_class`` test-split images of
every class; the real-vs-real row compares an equally sized, disjoint set of training images with the
same reference, which is the floor (or ceiling) a perfect generator would reach at this sample count.
With a VAE, the autoencoder row scores those training images encoded and decoded: the floor of any
generator in that latent space. Both come shipped with the package up to the default ``per_class``
(:mod:`.reference`), so no dataset is needed for them.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from ..embedded import datasets
from ..runs import load_sampler
from . import metrics
from .classifier import Classifier, embed, load_classifier
from .reference import SHIPPED_DATASET, real_data


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


@contextmanager
def sampling_progress(total: int, enabled: bool = True):
    """``advance(count)`` for a rich progress bar over ``total`` samples on stderr, as `run` shows its
    steps (on a terminal it redraws; elsewhere rich prints its final state once); a no-op when disabled.
    When the body raises, the bar is taken away, so the error stays the one line the CLI prints."""
    if not enabled:
        yield lambda count: None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    with Progress(TextColumn("[bold]sampling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True)) as bar:
        task = bar.add_task("samples", total=total)
        try:
            yield lambda count: bar.advance(task, count)
        except BaseException:
            bar.live.transient = True  # a terminal erases it
            bar.console.quiet = not bar.console.is_terminal  # elsewhere nothing is printed
            raise


def counted(batches, advance):
    """The (samples, prompts) batches unchanged, calling ``advance(len(prompts))`` as each is made."""
    for samples, prompts in batches:
        advance(len(prompts))
        yield samples, prompts


def score(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor,
          kid_subset: int | None = None) -> Scores:
    """All metrics of ``images`` (meant to show class ``labels``) against the reference features; KID
    over subsets of ``kid_subset`` (default :func:`.metrics.kid_subset_size` of the sample count)."""
    return score_features(*embed(classifier, images), labels, reference, kid_subset)


def score_features(features: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor,
                   kid_subset: int | None = None) -> Scores:
    """:func:`score` of images already embedded: their features and predicted classes."""
    kid, kid_std = metrics.kernel_inception_distance(features, reference, subset_size=kid_subset)
    precision, recall = metrics.precision_recall(reference, features)
    return Scores(metrics.frechet_distance(features, reference), kid, kid_std, precision, recall,
                  (predicted == labels).float().mean().item())


class Benchmark:
    """The fixed evaluation set: prompts "a photo of a {class}" × ``per_class``, the real reference
    features (test split) and the real-vs-real scores (as many training images), computed once; KID over
    subsets of ``kid_subset`` samples (default: :func:`.metrics.kid_subset_size`)."""

    def __init__(self, classifier: str | os.PathLike | Classifier | None = None, per_class: int = 100,
                 dataset: str = SHIPPED_DATASET, kid_subset: int | None = None):
        from .. import embedded

        if not isinstance(classifier, Classifier):
            classifier = load_classifier(classifier or embedded.classifier_path())
        self.classifier, self.per_class, self.kid_subset = classifier, per_class, kid_subset
        real = real_data(classifier, per_class, dataset)
        self.reference, self.real = real.reference, real.real
        self.prompts, self.labels = datasets.evaluation_prompts(self.real.classes, per_class)
        if kid_subset is not None:  # before minutes of sampling
            metrics.check_kid_subset(kid_subset, len(self.labels))
        self.real_vs_real = asdict(score_features(real.real_features, real.real_predictions, self.real.labels,
                                                  self.reference, kid_subset))

    def score(self, images: torch.Tensor) -> dict:
        return asdict(score(self.classifier, images, self.labels, self.reference, self.kid_subset))

    def reconstruction(self, vae) -> dict:
        """Scores of the real-vs-real row's images encoded and decoded by ``vae`` (x ↦ D(E(x))): the floor
        the autoencoder imposes on any generator in its latent space."""
        from ..embedded.vae_training import reconstruct

        images = reconstruct(vae, self.real.images.to(vae.dtype)).float()
        return asdict(score(self.classifier, images, self.real.labels, self.reference, self.kid_subset))

    def evaluate_model(self, teacher, model, vsd=None, seed: int = 0, steps: int = 25,
                       guidance_scale: float = 1.5, progress: bool = False) -> dict:
        """Scores of samples of ``model`` (see :func:`sample_model`) with the real-vs-real values; with
        ``progress``, a bar over the samples (:func:`sampling_progress`)."""
        with sampling_progress(len(self.prompts), progress) as advance:
            batches = sample_model(teacher, model, self.prompts, vsd, seed, steps, guidance_scale)
            images = torch.cat([s.float() for s, _ in counted(batches, advance)])
        # DDIM on a flow teacher is the flow's Euler sampler (sampling.ddim): named as its users know it
        sampler = "Euler" if teacher.prediction_type == "flow" else "DDIM"
        return {"sampler": "one step" if vsd is not None else f"{sampler} {steps} steps, guidance {guidance_scale}",
                "samples": len(self.prompts), "seed": seed, "kid_subset": metrics.kid_subset_size(len(self.prompts))
                if self.kid_subset is None else self.kid_subset, "scores": self.score(images),
                "real_vs_real": self.real_vs_real}


def evaluate(source: str | os.PathLike, classifier: str | os.PathLike | Classifier | Benchmark | None = None,
             per_class: int = 100, seed: int = 0, steps: int = 25, guidance_scale: float = 1.5,
             dataset: str = SHIPPED_DATASET, kid_subset: int | None = None, progress: bool = False) -> dict:
    """Scores of ``source`` (teacher folder, run or export) and of real data at the same sample count,
    as a JSON-ready dict (``kid_subset``: see :class:`Benchmark`, whose own applies when one is given as
    ``classifier``; ``progress``: a bar on stderr)."""
    benchmark = (classifier if isinstance(classifier, Benchmark)
                 else Benchmark(classifier, per_class, dataset, kid_subset))
    teacher, model, vsd = load_sampler(source)
    result = {"source": str(source), **benchmark.evaluate_model(teacher, model, vsd, seed, steps, guidance_scale,
                                                                progress)}
    vae = getattr(teacher.pipeline, "vae", None)
    if vae is not None:
        result["autoencoder"] = benchmark.reconstruction(vae)
    return result


def _shown(values: dict, key: str, fmt: str) -> str:
    """One metric's value; KID with its standard deviation over subsets."""
    return f"{values[key]:{fmt}}" + (f" ± {values['kid_std']:{fmt}}" if key == "kid" else "")


def summary_line(result: dict) -> str:
    """One terminal line: each metric with its real-vs-real value in parentheses."""
    scores, real = result["scores"], result["real_vs_real"]
    parts = [("FD", "frechet_distance", ".3f"), ("KID", "kid", ".5f"), ("precision", "precision", ".3f"),
             ("recall", "recall", ".3f"), ("prompt accuracy", "prompt_accuracy", ".3f")]
    line = " · ".join(f"{label} {_shown(scores, key, fmt)} (real {_shown(real, key, fmt)})" for label, key, fmt in parts)
    if "autoencoder" in result:
        line += f" · VAE reconstruction FD {result['autoencoder']['frechet_distance']:.3f}"
    return line
