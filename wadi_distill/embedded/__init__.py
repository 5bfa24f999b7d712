"""The embedded default: a small SD-family teacher trained on Fashion-MNIST by ``wadi-distill teacher``
and the evaluation classifier, both shipped with the package; the teacher's ``wadi_teacher.json`` and
the classifier's metadata record the commands and seeds that reproduce them.

Also here: the Fashion-MNIST reader and captions (:mod:`.datasets`), the CLIP BPE tokenizer
(:mod:`.tokenizer`), the autoencoder's training (:mod:`.vae_training`), the teacher's
(:mod:`.teacher_training`) and its ControlNet's (:mod:`.controlnet_training`)."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def teacher_path() -> Path:
    """The embedded teacher's StableDiffusionPipeline folder (a complete mini-SD: VAE, U-Net in its
    4×8×8 latents, CLIP text encoder and tokenizer, scheduler)."""
    return HERE / "teacher"


def classifier_path() -> Path:
    return HERE / "classifier.safetensors"


def prompts_path() -> Path:
    """Training prompts for distilling the embedded teacher: every class with every caption template."""
    return HERE / "prompts.txt"


def controlnet_path() -> Path:
    """The embedded teacher's ControlNet folder (``wadi-distill controlnet``: edge maps of Fashion-MNIST)."""
    return HERE / "controlnet"


def paths() -> dict[str, Path]:
    """The embedded files by name: teacher, classifier, prompts, controlnet."""
    return {"teacher": teacher_path(), "classifier": classifier_path(), "prompts": prompts_path(),
            "controlnet": controlnet_path()}


def provenance() -> str:
    """How the embedded teacher was made: its command, seed and device."""
    try:
        info = json.loads((teacher_path() / "wadi_teacher.json").read_text())
        return f"{info['command']} (seed {info['config']['seed']}, {info['device']})"
    except (OSError, ValueError, KeyError, TypeError):  # a damaged install: say so, the paths still print
        return "unknown (wadi_teacher.json is missing or damaged)"
