"""Fig 1a of the reproduction report: rounding is not drawn as a measured norm change, both orders are shown,
and close labels stay apart."""

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.text import Text

from wadi_distill.experiments.report import fig_1a

ANALYSIS = pd.DataFrame([
    # model, 1 - cos (%), norm change (%), angle (deg), norms at rounding
    ("full", 0.0088, 0.109, 0.64, False),
    ("lora", 0.97, 1.46, 5.03, False),
    ("lorad-r8", 0.1986, 3.6e-7, 2.19, True),   # a rounding-level "norm change": no measurement
    ("lorad-r32", 0.1962, 3.5e-7, 2.17, True),  # nearly the same point as r8: the labels must not collide
    ("dora-frozen", 0.84, 2.9e-6, 4.44, True),
], columns=["model", "direction_change_mean", "norm_change_mean", "angle_deg_mean", "norms_preserved_at_rounding"])


def _points(ax) -> np.ndarray:
    return np.concatenate([c.get_offsets() for c in ax.collections]) if ax.collections else np.zeros((0, 2))


def test_norms_at_rounding_stand_apart_and_both_orders_are_drawn():
    fig = fig_1a(ANALYSIS)
    strip, second_order, strip_first, first_order = fig.axes
    # the measured students alone sit on the log norm axis, at their norm change; the others in the strip
    for ax, column in ((second_order, "direction_change_mean"), (first_order, None)):
        assert ax.get_xscale() == "log"
        assert sorted(_points(ax)[:, 0]) == sorted([0.109, 1.46])
    assert sorted(_points(strip)[:, 1]) == sorted([0.1986, 0.1962, 0.84])
    assert _points(strip)[:, 0].tolist() == [0, 0, 0]
    # first order: the angle in radians, in % like the norm change (full: 0.64 deg = 1.117 %)
    assert np.isclose(sorted(_points(first_order)[:, 1])[0], np.deg2rad(0.64) * 100)
    assert "rounding" in strip.get_xticklabels()[0].get_text()


def test_close_labels_do_not_overlap():
    fig = fig_1a(ANALYSIS)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # texts have their positions once drawn
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the text, not its leader line
        for i, a in enumerate(boxes):
            assert not any(a.overlaps(b) for b in boxes[i + 1:]), [t.get_text() for t in ax.texts]
