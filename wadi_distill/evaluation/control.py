"""Control fidelity: how well a generated image follows the edge map it was conditioned on.

The edge map is the one the embedded ControlNet is trained on (:func:`edge_map`): the Sobel gradient
magnitude of the grey image in [0, 1], thresholded. Fidelity is the edge F1 with a tolerance of one
pixel (the usual boundary-F1 convention, since edges of a 32-px image move by a pixel under any
resampling): precision is the share of the generated image's edge pixels within one pixel of a control
edge, recall the share of control edge pixels within one pixel of a generated edge,
``F1 = 2 P R / (P + R)``; and the IoU of the two maps without tolerance beside it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EDGE_THRESHOLD = 1.5  # Sobel magnitude in [0, 1] intensity units: a step of 0.375 (the kernel sums to 4)
TOLERANCE = 1         # pixels

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def grey(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) images in [-1, 1] (C = 1 or 3) -> (N, 1, H, W) grey in [0, 1]."""
    return ((images.float().mean(dim=1, keepdim=True) + 1) / 2).clamp(0, 1)


def sobel_magnitude(intensity: torch.Tensor) -> torch.Tensor:
    """|∇I| = sqrt(G_x² + G_y²) with the 3×3 Sobel kernels, replicate padding, for (N, 1, H, W)."""
    kernels = torch.stack([_SOBEL_X, _SOBEL_X.T]).unsqueeze(1).to(intensity)
    gradients = F.conv2d(F.pad(intensity, (1, 1, 1, 1), mode="replicate"), kernels)
    return gradients.pow(2).sum(dim=1, keepdim=True).sqrt()


def edge_map(images: torch.Tensor, threshold: float = EDGE_THRESHOLD) -> torch.Tensor:
    """Binary edges (N, 1, H, W) in {0, 1} of images in [-1, 1]: ``|∇I| > threshold`` on the grey image."""
    return (sobel_magnitude(grey(images)) > threshold).float()


def edge_image(edges: torch.Tensor):
    """Edge maps (N, 1, H, W) as uint8 RGB arrays (N, H, W, 3), white edges on black: a control image."""
    return (edges.expand(-1, 3, -1, -1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _near(edges: torch.Tensor, tolerance: int) -> torch.Tensor:
    """Pixels within ``tolerance`` (Chebyshev distance) of an edge pixel."""
    return F.max_pool2d(edges, 2 * tolerance + 1, stride=1, padding=tolerance) if tolerance else edges


def edge_scores(control: torch.Tensor, generated: torch.Tensor, tolerance: int = TOLERANCE) -> dict[str, float]:
    """Edge precision, recall, F1 (within ``tolerance`` px) and IoU of binary maps (N, 1, H, W), pooled
    over all images (so images with few edges weigh little)."""
    control, generated = control.float(), generated.float()
    matched_generated = (generated * _near(control, tolerance)).sum()
    matched_control = (control * _near(generated, tolerance)).sum()
    precision = float(matched_generated / generated.sum().clamp(min=1))
    recall = float(matched_control / control.sum().clamp(min=1))
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    union = ((control + generated) > 0).float().sum().clamp(min=1)
    return {"edge_precision": precision, "edge_recall": recall, "edge_f1": f1,
            "edge_iou": float((control * generated).sum() / union)}
