"""The embedded default: a small SD-family teacher trained on Fashion-MNIST by ``wadi-distill teacher``
and the evaluation classifier, both shipped with the package (see ``PROVENANCE.md`` beside this file
for the commands and seeds that reproduce them)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent


def teacher_path() -> Path:
    """The embedded teacher's StableDiffusionPipeline folder (pixel space, no VAE)."""
    return HERE / "teacher"


def classifier_path() -> Path:
    return HERE / "classifier.safetensors"


def prompts_path() -> Path:
    """Training prompts for distilling the embedded teacher: every class with every caption template."""
    return HERE / "prompts.txt"
