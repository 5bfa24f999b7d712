"""The evaluation classifier: a small CNN trained on the dataset's training split, frozen and shipped.

It stands in for Inception (its 128-d penultimate features carry the Fréchet distance, KID and
precision/recall) and for CLIP (its agreement with the prompt's class is the prompt accuracy).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from wadi_analysis.errors import InvalidValue

from ..embedded import datasets


class Classifier(nn.Module):
    """conv-conv-pool ×2 → 128-d features → class logits, for 1×S×S images in [-1, 1]."""

    def __init__(self, num_classes: int = 10, image_size: int = 16, width: int = 32, features: int = 128):
        super().__init__()
        self.image_size = image_size
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * width, 2 * width, 3, padding=1),
            nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * width * (image_size // 4) ** 2, features),
        )
        self.head = nn.Linear(features, num_classes)
        # features are rescaled to unit RMS on the training split, so KID's polynomial kernel
        # (x·y/D + 1)³ sees O(1) inner products, as it does with Inception's pool features
        self.register_buffer("feature_scale", torch.ones(()))
        self.config = {"num_classes": num_classes, "image_size": image_size, "width": width, "features": features}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (before the ReLU, so no dimension is dead), float32, rescaled."""
        return self.body(images.float()) * self.feature_scale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.body(images.float())))

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`features` and :meth:`forward` from one pass through the body."""
        hidden = self.body(images.float())
        return hidden * self.feature_scale, self.head(F.relu(hidden))


def classifier_digest(classifier: Classifier) -> str:
    """SHA-256 of the network: its config, then every state tensor (name, dtype, shape, bytes) in name
    order. The same for a file and for the network loaded from it; any changed weight changes it."""
    sha = hashlib.sha256(json.dumps(classifier.config, sort_keys=True).encode())
    for name, tensor in sorted(classifier.state_dict().items()):
        sha.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        sha.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


@torch.no_grad()
def embed(classifier: Classifier, images: torch.Tensor, batch: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, predicted class) of images (N, 1, S, S) in [-1, 1], resized to the classifier's size."""
    classifier.eval()
    images = datasets.resize(images.float().clamp(-1, 1), classifier.image_size)
    features, predictions = [], []
    for chunk in images.split(batch):
        chunk_features, logits = classifier.features_and_logits(chunk)
        features.append(chunk_features)
        predictions.append(logits.argmax(1))
    return torch.cat(features).double(), torch.cat(predictions)


def train_classifier(dataset: str = "fashion-mnist", image_size: int = 16, epochs: int = 4, batch_size: int = 256,
                     seed: int = 0, log=print) -> tuple[Classifier, float]:
    """Train on the training split (random ±1-pixel shifts); returns it and its test-split accuracy."""
    torch.manual_seed(seed)
    train, test = datasets.load(dataset, "train", image_size), datasets.load(dataset, "test", image_size)
    classifier = Classifier(len(train.classes), image_size)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=2e-3, weight_decay=1e-4)
    rng = torch.Generator().manual_seed(seed)
    steps = epochs * (len(train) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    for step in range(steps):
        index = torch.randint(0, len(train), (batch_size,), generator=rng)
        shift = torch.randint(-1, 2, (2,), generator=rng).tolist()
        images = torch.roll(train.images[index], shifts=shift, dims=(2, 3))
        loss = F.cross_entropy(classifier(images), train.labels[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 200 == 0:
            log(f"classifier step {step + 1}/{steps}  loss {loss.item():.3f}")
    set_feature_scale(classifier, train.balanced(500, seed=seed).images)
    accuracy = (embed(classifier, test.images)[1] == test.labels).float().mean().item()
    return classifier, accuracy


@torch.no_grad()
def set_feature_scale(classifier: Classifier, images: torch.Tensor) -> None:
    """Scale features to unit root-mean-square on ``images`` (training images)."""
    classifier.feature_scale.fill_(1.0)
    features, _ = embed(classifier, images)
    classifier.feature_scale.fill_(1.0 / features.pow(2).mean().sqrt().item())


def save_classifier(classifier: Classifier, path: str | Path, info: dict) -> None:
    metadata = {"config": json.dumps(classifier.config), "info": json.dumps(info)}
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, str(path), metadata=metadata)


def make_classifier(out: str | Path, epochs: int = 4, seed: int = 0, dataset: str = "fashion-mnist",
                    image_size: int = 32, log=print) -> float:
    """Train the evaluation classifier and write it to ``out`` (atomically) with its provenance: test
    accuracy, the command that remakes it, dataset and image size. Returns the test accuracy."""
    from wadi_analysis.atomic import atomic_write
    from wadi_analysis.outputs import check_output

    check_output(out, folder=False)  # before minutes of training
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4 or image_size % 4:
        raise InvalidValue(f"--image-size must be a positive multiple of 4, not {image_size!r}")
    model, accuracy = train_classifier(dataset=dataset, image_size=image_size, epochs=epochs, seed=seed, log=log)
    command = f"wadi-distill classifier --epochs {epochs} --seed {seed} --image-size {image_size}"
    info = {"test_accuracy": accuracy, "command": command,
            "dataset": dataset, "image_size": model.image_size}
    atomic_write(Path(out), lambda path: save_classifier(model, path, info))
    return accuracy


def load_classifier(path: str | Path) -> Classifier:
    """The classifier of ``path`` (written by :func:`make_classifier`), checked: a safetensors file whose
    ``config`` metadata is the network's shape and whose tensors are exactly that network's."""
    from safetensors import safe_open

    from wadi_analysis.checkpoint import metadata_json
    from wadi_analysis.errors import UserError

    try:
        with safe_open(str(path), "pt") as handle:
            metadata = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}
    except FileNotFoundError:
        raise UserError(f"classifier {path} does not exist") from None
    except Exception:  # safetensors' own error, OSError or ValueError: a damaged or foreign file
        raise UserError(f"classifier {path} is not a readable safetensors file") from None
    config = metadata_json(metadata, "config", f"classifier {path}", UserError,
                           hint=" (write it with `wadi-distill classifier`)")
    fields = ("num_classes", "image_size", "width", "features")
    if (not isinstance(config, dict) or set(config) - set(fields)
            or any(not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 4096 for v in config.values())
            or config.get("image_size", 16) % 4):
        raise UserError(f"classifier {path}: its 'config' metadata must give positive integer {', '.join(fields)} "
                        "(image_size a multiple of 4)")
    classifier = Classifier(**config)
    expected = classifier.state_dict()
    if state.keys() != expected.keys() or any(state[k].shape != expected[k].shape for k in expected):
        raise UserError(f"classifier {path}: its tensors are not those of the network its 'config' describes")
    if any(not t.is_floating_point() or not torch.isfinite(t).all() for t in state.values()):
        raise UserError(f"classifier {path} holds non-float, NaN or infinite weights")
    classifier.load_state_dict(state)
    return classifier.eval().requires_grad_(False)
