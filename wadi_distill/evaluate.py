"""``wadi-distill evaluate``: sample a fixed prompt set with a fixed seed and score the samples in the
evaluation classifier's feature space, each metric next to its real-vs-real value at the same count.

Sources: a teacher pipeline folder (N-step DDIM with classifier-free guidance), a run folder or an
exported one-step model (one step, as distilled). Real reference: ``per_class`` test-split images of
every class; the real-vs-real row compares an equally sized, disjoint set of training images with the
same reference, which is the floor (or ceiling) a perfect generator would reach at this sample count.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import datasets, metrics
from .classifier import Classifier, embed, load_classifier


@dataclass
class Scores:
    frechet_distance: float
    kid: float
    kid_std: float
    precision: float
    recall: float
    prompt_accuracy: float


def is_teacher_folder(source: str | os.PathLike) -> bool:
    source = Path(source)
    return (source / "model_index.json").is_file() and not (source / "checkpoints").is_dir()


def sample_noise(teacher, count: int, seed: int, start: int = 0) -> torch.Tensor:
    """x_T for samples ``start .. start+count-1``: sample i is drawn from seed ``seed + i`` alone, so it is
    the same whatever the batch size or the number of samples."""
    shape = (teacher.latent_channels, teacher.sample_size, teacher.sample_size)
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed + start + i))
                        for i in range(count)])


@torch.no_grad()
def generate_batches(source: str | os.PathLike, prompts: list[str], seed: int = 0, steps: int = 25,
                     guidance_scale: float = 1.5, batch: int = 250, decoded: bool = False):
    """Batches of (samples, prompts): teachers with ``steps``-step DDIM at ``guidance_scale``, one-step
    generators (runs, exports) in one step. Samples are model-space tensors (pixels in [-1, 1] for the
    embedded teacher), or with ``decoded`` uint8 RGB images (N, 3, H, W) from the teacher's VAE."""
    from .backbones import load_teacher
    from .distill import one_step
    from .sample import decode, load_one_step
    from .sampling import ddim

    if is_teacher_folder(source):
        teacher, vsd = load_teacher(source), None
    else:
        teacher, vsd = load_one_step(source)
    model = teacher.denoiser.eval()
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
        yield samples, chunk_prompts


def generate(source: str | os.PathLike, prompts: list[str], seed: int = 0, steps: int = 25,
             guidance_scale: float = 1.5, batch: int = 250) -> torch.Tensor:
    """All samples (N, C, S, S) for ``prompts`` (see :func:`generate_batches`), float32."""
    return torch.cat([samples.float() for samples, _ in generate_batches(source, prompts, seed, steps,
                                                                         guidance_scale, batch)])


def score(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor,
          kid_subset: int = 1000) -> Scores:
    """All metrics of ``images`` (meant to show class ``labels``) against the reference features."""
    features, predicted = embed(classifier, images)
    kid, kid_std = metrics.kernel_inception_distance(features, reference, subset_size=kid_subset)
    precision, recall = metrics.precision_recall(reference, features)
    return Scores(metrics.frechet_distance(features, reference), kid, kid_std, precision, recall,
                  (predicted == labels).float().mean().item())


def evaluate(source: str | os.PathLike, classifier: str | os.PathLike | Classifier | None = None,
             per_class: int = 100, seed: int = 0, steps: int = 25, guidance_scale: float = 1.5,
             dataset: str = "fashion-mnist") -> dict:
    """Scores of ``source`` and of real data at the same sample count, as a JSON-ready dict."""
    from . import embedded

    if not isinstance(classifier, Classifier):
        classifier = load_classifier(classifier or embedded.classifier_path())
    size = classifier.image_size
    test, train = datasets.load(dataset, "test", size), datasets.load(dataset, "train", size)
    reference_set = test.balanced(per_class, seed=0)
    reference, _ = embed(classifier, reference_set.images)
    prompts, labels = datasets.evaluation_prompts(test.classes, per_class)
    images = generate(source, prompts, seed, steps, guidance_scale)
    real = train.balanced(per_class, seed=1)
    teacher_like = is_teacher_folder(source)
    return {
        "source": str(source),
        "sampler": f"DDIM {steps} steps, guidance {guidance_scale}" if teacher_like else "one step",
        "samples": len(prompts), "seed": seed,
        "scores": asdict(score(classifier, images, labels, reference)),
        "real_vs_real": asdict(score(classifier, real.images, real.labels, reference)),
    }


def summary_line(result: dict) -> str:
    """One terminal line: each metric with its real-vs-real value in parentheses."""
    scores, real = result["scores"], result["real_vs_real"]
    parts = [("FD", "frechet_distance", ".3f"), ("KID", "kid", ".5f"), ("precision", "precision", ".3f"),
             ("recall", "recall", ".3f"), ("prompt accuracy", "prompt_accuracy", ".3f")]
    return " · ".join(f"{label} {scores[key]:{fmt}} (real {real[key]:{fmt}})" for label, key, fmt in parts)
