"""The report knows LoRaD: norms at rounding are said so (no ratio), constant heatmap columns stay neutral,
figures keep their labels apart, every PDF page has one size, layer names are whole, the top 10 rotations."""

from __future__ import annotations

import re
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from tests.test_report import NAMES, SWAPS, state_dict, tool, with_spectrum
from wadi_analysis import compare
from wadi_analysis.decompose import rows
from wadi_analysis.examples import planted_student
from wadi_analysis.report import make_figures, write_report
from wadi_analysis.report.figures import fig_heatmap, fig_low_rank
from wadi_analysis.report.pdf import PAGE, PDF_COLUMNS, wrap
from wadi_analysis.report.tables import AT_ROUNDING, headline_rows, norms_preserved
from wadi_analysis.summary import RATIO_KEYS, TOP_ROTATION_LAYERS
from wadi_distill.lorad.rotation import PairRotation


def lorad_student(teacher: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Every row rotated exactly by LoRaD's pair rotation: norms equal up to float rounding."""
    generator = torch.Generator().manual_seed(seed)
    student = {}
    for name, weight in teacher.items():
        flat = rows(weight).float()
        angles = 0.05 * torch.randn(flat.shape[0], flat.shape[1] // 2, generator=generator)
        student[name] = PairRotation.apply(flat, angles).reshape(weight.shape).to(weight.dtype)
    return student


@pytest.fixture(scope="module")
def pair():
    teacher = state_dict(NAMES)
    return teacher, lorad_student(teacher), planted_student(teacher, seed=3)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_lorad_norms_are_at_rounding_and_get_no_ratio(pair, dtype):
    teacher = {n: t.to(dtype) for n, t in pair[0].items()}
    summary = compare(teacher, lorad_student(teacher)).summary
    assert summary["norms_preserved_at_rounding"] and summary["n_layers_norms_at_rounding"] == len(NAMES)
    assert all(summary[key] is None for key in RATIO_KEYS)
    assert 0 < summary["norm_change_mean"] and summary["tangential_change_mean"] > 1  # it did rotate
    assert summary["rotation_share_mean"] > 99
    ratios = [row for row in headline_rows(summary) if "ratio" in row[0]]
    assert len(ratios) == 2 and all(cell == AT_ROUNDING for row in ratios for cell in row[1:])


def test_a_normal_student_keeps_its_ratios(pair):
    teacher, _, planted = pair
    summary = compare(teacher, planted).summary
    assert not summary["norms_preserved_at_rounding"] and summary["n_layers_norms_at_rounding"] == 0
    assert all(summary[key] > 0 for key in RATIO_KEYS)
    ratios = [row for row in headline_rows(summary) if "ratio" in row[0]]
    assert all(cell.endswith("×") for row in ratios for cell in row[1:])
    assert not any(AT_ROUNDING in cell for row in headline_rows(summary) for cell in row)


def test_an_older_summary_is_judged_from_the_table(pair):
    teacher, lorad, planted = pair
    for student, expected in ((lorad, True), (planted, False)):
        result = compare(teacher, student)
        older = {k: v for k, v in result.summary.items() if k != "norms_preserved_at_rounding"}
        older_layers = result.layers.drop(columns=["norm_rounding_level"])  # level recomputed from the dtypes
        assert norms_preserved(older, older_layers) is expected


def test_top_rotation_layers_are_the_ten_largest_in_order(pair):
    teacher, _, planted = pair
    result = compare(teacher, planted)
    top = result.summary["top_rotation_layers"]
    assert len(top) == TOP_ROTATION_LAYERS < len(result.layers)
    expected = result.layers.sort_values("direction_change_mean", ascending=False)["name"].head(10).tolist()
    assert [item["name"] for item in top] == expected
    values = [item["direction_change_mean"] for item in top]
    assert values == sorted(values, reverse=True) and values[0] == result.summary["max_layer_direction_change_mean"]


def _pdf_page_sizes(path) -> list[str]:
    info = subprocess.run([tool("pdfinfo", "poppler-utils"), "-f", "1", "-l", "999", str(path)],
                          capture_output=True, text=True, check=True).stdout
    return re.findall(r"^Page\s+\d+ size:\s+(.*)$", info, re.M)


def test_lorad_report_says_so_everywhere(pair, tmp_path):
    teacher, lorad, _ = pair
    long_name = "up_blocks.1." + ".".join(f"very_long_module_name_{i}" for i in range(6)) + ".weight"
    teacher = {**teacher, long_name: state_dict(["x"], seed=5)["x"]}
    result = compare(teacher, {**lorad, long_name: lorad_student({long_name: teacher[long_name]})[long_name]},
                     spectrum=True, fit=True)
    paths = write_report(tmp_path, result.layers, result.summary, swaps=SWAPS)
    html = paths["html"].read_text()
    assert AT_ROUNDING in html and "× the norm change" not in html
    assert 'id="top-rotation"' in html and html.count("<tr>", html.index('id="top-rotation"'),
                                                       html.index('id="counts"')) == 1 + TOP_ROTATION_LAYERS
    sizes = _pdf_page_sizes(paths["pdf"])
    assert len(sizes) == 1 + len(make_figures(result.layers, result.summary, SWAPS)) + 1
    assert set(sizes) == {f"{PAGE[0] * 72:g} x {PAGE[1] * 72:g} pts (A4)"}  # one page size throughout
    text = subprocess.run([tool("pdftotext", "poppler-utils"), str(paths["pdf"]), "-"],
                          capture_output=True, text=True, check=True).stdout
    assert AT_ROUNDING in text
    table = text[text.index("Layers (1/"):]
    width = next(w for c, _, w in PDF_COLUMNS if c == "name") - 1
    assert len(wrap(long_name, width)) > 1  # this one wraps
    for name in result.layers["name"]:  # every name whole, in its lines
        assert all(piece in table for piece in wrap(name, width)), name


def test_a_normal_report_keeps_the_ratio(pair, tmp_path):
    teacher, _, planted = pair
    result = compare(teacher, planted)
    html = write_report(tmp_path, result.layers, result.summary, pdf=False)["html"].read_text()
    assert "× the norm change" in html and "first order: the angle is" in html and AT_ROUNDING not in html


def test_heatmap_leaves_constant_columns_and_rounding_neutral(pair):
    teacher, lorad, _ = pair
    layers = with_spectrum(compare(teacher, lorad).layers, teacher, lorad)
    layers["lorad_fit"] = 100.0 - np.linspace(0, 1e-10, len(layers))  # LoRaD fit: "100 - 100"
    fig = fig_heatmap(layers)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels()]
    column = {label.split("\n")[0]: j for j, label in enumerate(labels)}
    scaled, neutral = (image.get_array() for image in ax.images)
    for name in ("lorad_fit", "norm_change_mean"):
        j = column[name]
        assert np.ma.getmaskarray(scaled)[:, j].all() and not np.ma.getmaskarray(neutral)[:, j].any(), name
    assert "constant" in labels[column["lorad_fit"]] and "at rounding" in labels[column["norm_change_mean"]]
    j = column["direction_change_mean"]  # a real measurement is colour-scaled over the whole range
    assert not np.ma.getmaskarray(scaled)[:, j].any() and scaled[:, j].min() == 0 and scaled[:, j].max() == 1


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_fig1b_labels_are_readable():
    rng = np.random.default_rng(0)
    n = 30
    layers = pd.DataFrame({"name": [f"l{i}.weight" for i in range(n)], "status": "ok",
                           "numel": rng.choice([40960, 102400, 163840, 409600, 655360], n),
                           "residual_energy_top30": rng.uniform(80, 99, n), "residual_energy_top10": rng.uniform(40, 60, n),
                           "residual_energy_top50": rng.uniform(99, 100, n), "lorad_fit": 100 - rng.uniform(0, 1e-10, n)})
    fig = fig_low_rank(layers, {})
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    size_axis, curve_axis, fit_axis = fig.axes[:3]
    assert size_axis.get_xscale() == "log"
    boxes = [t.get_window_extent(renderer) for t in size_axis.get_xticklabels(which="both")
             if t.get_visible() and t.get_text()]
    assert len(boxes) >= 2 and not any(_overlaps(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert fit_axis.xaxis.get_offset_text().get_text() == ""  # no "1e-10+1e1" over the unit
    note = next(t for t in curve_axis.texts if "at 30 % rank" in t.get_text())
    point = curve_axis.transData.transform(note.xy)
    box = note.get_window_extent(renderer)
    assert not (box.x0 <= point[0] <= box.x1 and box.y0 <= point[1] <= box.y1)  # beside its marker, not on it


@pytest.mark.parametrize("text, width", [("a.b.c", 80), ("down_blocks.0.attentions.0.weight", 12), ("x" * 30, 8), ("", 5)])
def test_wrap_keeps_every_character(text, width):
    lines = wrap(text, width)
    assert "".join(lines) == text and all(len(line) <= width for line in lines)
