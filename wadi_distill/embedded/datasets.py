"""Image datasets that install from a package registry, with captions made from their class names.

* Fashion-MNIST (70k, 28×28, MIT): Debian's ``dataset-fashion-mnist`` puts the gzipped IDX files in
  ``/usr/share/datasets/fashion-mnist/``; ``WADI_FASHION_MNIST`` points elsewhere.

Images come back as float32 tensors (N, 1, size, size) in [-1, 1] (the diffusion range), labels as int64.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from wadi_analysis.errors import InvalidValue

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("t-shirt", "pair of trousers", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot")
# Caption templates; evaluation uses the first one only, so its prompts are fixed and reproducible.
TEMPLATES = ("a photo of a {}", "a picture of a {}", "a {}", "{}", "an image of a {}",
             "a black and white photo of a {}", "a small photo of a {}", "a product photo of a {}")


@dataclass
class ImageDataset:
    name: str
    images: torch.Tensor   # (N, 1, size, size) float32 in [-1, 1]
    labels: torch.Tensor   # (N,) int64
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index) -> ImageDataset:
        return ImageDataset(self.name, self.images[index], self.labels[index], self.classes)

    def balanced(self, per_class: int, seed: int = 0) -> ImageDataset:
        """``per_class`` images of every class, drawn without replacement with a fixed seed."""
        generator = torch.Generator().manual_seed(seed)
        picks = []
        for label in range(len(self.classes)):
            members = torch.nonzero(self.labels == label).flatten()
            if len(members) < per_class:
                raise ValueError(f"{self.name} has only {len(members)} images of class {self.classes[label]!r}")
            picks.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
        return self.subset(torch.cat(picks))


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """A gzipped IDX file (the MNIST format) of ``ndim`` dimensions: magic, dimensions, then unsigned bytes."""
    data = _gunzip(path)
    if len(data) < 4:
        raise InvalidValue(f"{path} is too short to be an IDX file ({len(data)} bytes)")
    zero, dtype_code, dims = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise InvalidValue(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()}, expected 000008..)")
    if dims != ndim:
        raise InvalidValue(f"{path} has {dims} dimensions; {ndim} expected")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise InvalidValue(f"{path}: its IDX header is truncated")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(shape):
        raise InvalidValue(f"{path} holds {len(data) - header} bytes of data, but its header says "
                           f"{'x'.join(map(str, shape))} = {math.prod(shape)} (truncated or not this file's)")
    if shape[0] == 0:
        raise InvalidValue(f"{path} holds no items")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _gunzip(path: Path) -> bytes:
    """The decompressed bytes of a gzip file, or a message naming the file and what is wrong with it."""
    try:
        with gzip.open(path, "rb") as handle:
            return handle.read()
    except gzip.BadGzipFile:
        raise InvalidValue(f"{path} is not a gzip file (or its checksum fails)") from None
    except (EOFError, zlib.error):
        raise InvalidValue(f"{path} is a truncated or corrupt gzip file") from None


def _check_pair(images_file: Path, images: np.ndarray, labels_file: Path, labels: np.ndarray, classes) -> None:
    """Images and labels belong together: one label per image, each naming one of ``classes``."""
    if len(images) != len(labels):
        raise InvalidValue(f"{images_file} holds {len(images)} images but {labels_file} {len(labels)} labels")
    if labels.max() >= len(classes):
        raise InvalidValue(f"{labels_file} holds label {labels.max()}; the dataset has {len(classes)} classes")
    if images.shape[1] < 1 or images.shape[2] < 1:
        raise InvalidValue(f"{images_file} holds images of {images.shape[1]}x{images.shape[2]} pixels")


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased area-style resize of (N, 1, H, W) images."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def to_diffusion_range(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.astype(np.float32)).unsqueeze(1) / 127.5 - 1.0


def fashion_mnist(split: str = "train", size: int = 16, root: str | os.PathLike | None = None) -> ImageDataset:
    """Fashion-MNIST ``train`` (60k) or ``test`` (10k) split, resized to ``size``."""
    root = Path(root or os.environ.get("WADI_FASHION_MNIST") or FASHION_MNIST_DIR)
    prefix = {"train": "train", "test": "t10k"}[split]
    images_file, labels_file = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images_file.is_file() or not labels_file.is_file():
        raise FileNotFoundError(f"Fashion-MNIST not found in {root} (apt-get install dataset-fashion-mnist, "
                                "or set WADI_FASHION_MNIST)")
    pixels, label_values = _read_idx(images_file, 3), _read_idx(labels_file, 1)
    _check_pair(images_file, pixels, labels_file, label_values, FASHION_CLASSES)
    images = resize(to_diffusion_range(pixels), size)
    labels = torch.from_numpy(label_values.astype(np.int64))
    return ImageDataset("fashion-mnist", images.clamp(-1, 1), labels, FASHION_CLASSES)


def load(name: str, split: str = "train", size: int = 16) -> ImageDataset:
    if name == "fashion-mnist":
        return fashion_mnist(split, size)
    raise ValueError(f"unknown dataset {name!r} (fashion-mnist)")


def caption(classes: tuple[str, ...], label: int, template: int = 0) -> str:
    return TEMPLATES[template].format(classes[label])


def class_of_prompt(prompt: str, classes: tuple[str, ...]) -> int | None:
    """The class a prompt names (the longest class name found in it), or None."""
    text = prompt.lower()
    found = [(len(name), index) for index, name in enumerate(classes) if name in text]
    return max(found)[1] if found else None


def evaluation_prompts(classes: tuple[str, ...], per_class: int) -> tuple[list[str], torch.Tensor]:
    """The fixed evaluation prompt set: the first template, ``per_class`` times per class, class-major."""
    prompts = [caption(classes, label) for label in range(len(classes)) for _ in range(per_class)]
    labels = torch.arange(len(classes)).repeat_interleave(per_class)
    return prompts, labels
