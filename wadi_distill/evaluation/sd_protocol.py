"""The standard metrics for SD-scale runs, for users who have the weights: FID with a local Inception
and CLIP score with a local CLIP model, both computed by torchmetrics (``pip install 'wadi[metrics]'``;
FID's Inception also needs ``torch-fidelity``). Nothing is downloaded: Inception comes from a weights
file (``pt_inception-2015-12-05-6726825d.pth``, torch-fidelity's), CLIP from a local folder.

Protocol for SD runs (what the README documents): 30,000 COCO-2014 validation captions (one caption per
image, chosen with seed 0), one sample per caption at 512 px, noise seed ``seed`` for the whole draw;
samples are converted to uint8 and handed to torchmetrics at 512 px, whose Inception resizes them to
299 px (bilinear, torch-fidelity's rule) and whose CLIP processor to 224 px. The reference statistics
(mean, covariance, count of Inception pool features) are computed once from the COCO-2014 validation
images, centre-cropped and resized to 512 px with PIL's bicubic filter, by :func:`reference_statistics`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch


def _fid_metric(inception: str | os.PathLike | None, feature_extractor: torch.nn.Module | None):
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature_extractor is not None:  # a stand-in (tests) or any nn.Module with .num_features
        metric = FrechetInceptionDistance(feature=feature_extractor, normalize=False)
    elif inception is not None:
        if not Path(inception).is_file():
            raise FileNotFoundError(f"Inception weights {inception} not found")
        metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(inception), normalize=False)
    else:
        raise ValueError("FID needs --inception WEIGHTS.pth (or a feature extractor)")
    metric.set_dtype(torch.float64)
    return metric


class _ProjectedCLIP(torch.nn.Module):
    """A CLIPModel whose ``get_*_features`` return the projected embeddings as tensors: transformers 5
    returns output objects there, which torchmetrics (1.9) would try to normalise as tensors."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(output):
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def _clip_metric(clip: str | os.PathLike):
    """torchmetrics' CLIPScore over a CLIP model folder read with local_files_only."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    if not Path(clip, "config.json").is_file():
        raise FileNotFoundError(f"{clip} is not a local CLIP model folder (config.json missing)")
    return CLIPScore(model_name_or_path=lambda: (_ProjectedCLIP(CLIPModel.from_pretrained(clip, local_files_only=True)),
                                                 CLIPProcessor.from_pretrained(clip, local_files_only=True)))


def images_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (N, C, H, W) -> uint8 RGB (grey repeated), as metrics take them."""
    images = images.float().clamp(-1, 1)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return ((images + 1) * 127.5).round().to(torch.uint8)


def load_reference_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return data["mu"].astype(np.float64), data["sigma"].astype(np.float64), int(data["count"])
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{path} is not a reference-statistics file (npz with mu, sigma, count): {exc}") from None


def _set_real_statistics(metric, mu: np.ndarray, sigma: np.ndarray, count: int) -> None:
    """Load precomputed real statistics into torchmetrics' FID state (sums of x and of x xᵀ)."""
    mu_t, sigma_t = torch.from_numpy(mu), torch.from_numpy(sigma)
    if metric.real_features_sum.shape != mu_t.shape:
        raise ValueError(f"reference statistics have {mu_t.numel()} features, the extractor {metric.real_features_sum.numel()}")
    metric.real_features_sum = (mu_t * count).to(metric.real_features_sum)
    metric.real_features_cov_sum = (sigma_t * (count - 1) + count * torch.outer(mu_t, mu_t)).to(metric.real_features_cov_sum)
    metric.real_features_num_samples = torch.tensor(count, device=metric.real_features_num_samples.device)


def reference_statistics(batches, out: str | os.PathLike, inception=None, feature_extractor=None) -> dict:
    """Mean, covariance and count of the extractor's features over uint8 image batches; saved as npz."""
    metric = _fid_metric(inception, feature_extractor)
    for batch in batches:
        metric.update(batch, real=True)
    count = int(metric.real_features_num_samples)
    mu = (metric.real_features_sum / count).cpu().numpy()
    cov_sum = metric.real_features_cov_sum.cpu().double().numpy()
    sigma = (cov_sum - count * np.outer(mu, mu)) / (count - 1)
    from wadi_analysis.atomic import atomic_write

    def write(tmp):
        with open(tmp, "wb") as handle:  # a handle: np.savez would append ".npz" to the temporary name
            np.savez(handle, mu=mu, sigma=sigma, count=count)

    atomic_write(out, write)
    return {"count": count, "features": mu.shape[0]}


def folder_reference_statistics(images: str | os.PathLike, out: str | os.PathLike, inception: str | os.PathLike,
                                size: int = 512, limit: int | None = None) -> dict:
    """:func:`reference_statistics` of an image folder (:func:`image_folder_batches`: sorted by name,
    centre-cropped, resized to ``size`` with PIL's bicubic filter, the first ``limit`` only)."""
    from wadi_analysis.errors import UserError

    if not Path(images).is_dir():
        raise UserError(f"{images} is not a folder")
    return reference_statistics(image_folder_batches(images, size, limit=limit), out, inception=inception)


def evaluate_sd(batches, *, reference: str | os.PathLike | None = None, inception=None, clip=None,
                feature_extractor=None) -> dict:
    """FID against the reference statistics and/or CLIP score over ``batches`` of (uint8 images, prompts)."""
    fid = _fid_metric(inception, feature_extractor) if reference is not None else None
    if fid is not None:
        _set_real_statistics(fid, *load_reference_statistics(reference))
    clip_score = _clip_metric(clip) if clip is not None else None
    if fid is None and clip_score is None:
        raise ValueError("nothing to compute: give reference statistics (FID) and/or a CLIP model")
    count = 0
    for images, prompts in batches:
        count += len(images)
        if fid is not None:
            fid.update(images, real=False)
        if clip_score is not None:
            clip_score.update(images, list(prompts))
    result = {"samples": count}
    if fid is not None:
        result["fid"] = float(fid.compute())
    if clip_score is not None:
        # torchmetrics reports 100·cos; the paper's table uses cos (0.31 for SD1.5)
        result["clip_score"] = float(clip_score.compute()) / 100
    return result


def image_folder_batches(folder: str | os.PathLike, size: int = 512, batch: int = 64, limit: int | None = None):
    """uint8 (N, 3, size, size) batches of the JPEG/PNG images in ``folder`` (sorted by name), each
    centre-cropped to a square and resized with PIL's bicubic filter."""
    from PIL import Image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:limit]
    if not files:
        raise ValueError(f"{folder} holds no .jpg/.png images")
    for start in range(0, len(files), batch):
        images = []
        for path in files[start: start + batch]:
            with Image.open(path) as image:
                image = image.convert("RGB")
                side = min(image.size)
                left, top = (image.width - side) // 2, (image.height - side) // 2
                image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
                images.append(torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1))
        yield torch.stack(images)
