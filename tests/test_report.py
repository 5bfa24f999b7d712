"""The report layer: figures, self-contained HTML (checked in headless Chromium), multi-page PDF (poppler).

Chromium and poppler-utils are required, not optional: a missing tool fails the test with the
command that installs it (CI: ``apt-get install -y chromium poppler-utils``).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import struct
import subprocess
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from wadi_analysis import compare
from wadi_analysis.compare import summarize
from wadi_analysis.examples import planted_student
from wadi_analysis.report import make_figures, page_count, read_layers, write_report
from wadi_analysis.report.pdf import MAX_TABLE_ROWS, ROWS_PER_PAGE

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0"]
SWAPS = pd.DataFrame({"hybrid": ["student", "norm from teacher", "direction from teacher"],
                      "fid": [9.4, 10.1, 250.7], "clip": [0.31, 0.31, 0.18]})
XSS = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>']


def tool(name: str, package: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
    if path is None:
        pytest.fail(f"{name} is not installed; the report tests need it: apt-get install -y {package}")
    return path


def chromium(url: str, tmp_path, *args: str, timeout: int = 90) -> tuple[str, list[str]]:
    """Run headless Chromium on ``url``; returns (stdout, console lines). A hang (e.g. a blocking alert()) fails."""
    profile = tmp_path / f"chromium-profile-{len(list(tmp_path.glob('chromium-profile-*')))}"
    command = [tool("chromium", "chromium"), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, url]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail(f"chromium did not finish on {url} in {timeout} s (a JavaScript dialog such as alert() blocks it)")
    assert process.returncode == 0, err[-2000:]
    return out, [line for line in err.splitlines() if ":CONSOLE" in line]


class Dom(HTMLParser):
    """Elements of a dumped DOM: every tag with its attributes, in order."""

    def __init__(self, text: str):
        super().__init__()
        self.elements: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))

    def all(self, tag: str) -> list[dict]:
        return [attrs for t, attrs in self.elements if t == tag]

    def layer_rows(self) -> list[dict]:
        return [a for a in self.all("tr") if "data-i" in a]


def state_dict(names: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {n: torch.randn((16, 8, 3, 3) if "conv" in n else (12, 16), generator=generator) for n in names}


NAMES = [f"{block}.{part}.weight" for block in ("down_blocks.0", "mid_block", "up_blocks.1")
         for part in ("attentions.0.transformer_blocks.0.attn1.to_q", "attentions.0.transformer_blocks.0.attn2.to_k",
                      "attentions.0.transformer_blocks.0.ff.net.2", "resnets.0.conv1", "resnets.0.time_emb_proj")]


def with_spectrum(layers: pd.DataFrame, teacher, student) -> pd.DataFrame:
    """Add the optional spectrum columns, computed here from the residuals (energy in the top 30 %)."""
    energy, rank_rel = [], []
    for name in layers["name"]:
        s = torch.linalg.svdvals((student[name] - teacher[name]).reshape(student[name].shape[0], -1).double()) ** 2
        k = max(1, math.ceil(0.3 * len(s)))
        energy.append(float(100 * s[:k].sum() / s.sum()))
        rank_rel.append(int((torch.cumsum(s, 0) / s.sum() < 0.9).sum() + 1) / len(s))
    return layers.assign(residual_energy_top30=energy, residual_rank_rel_90=rank_rel, lorad_fit=80.0)


@pytest.fixture(scope="module")
def planted():
    teacher = state_dict(NAMES)
    student, _ = planted_student(teacher, seed=3)
    result = compare(teacher, student)
    result.summary["command"] = "wadi-analyze compare teacher student --out out"
    return with_spectrum(result.layers, teacher, student), result.summary


@pytest.fixture(scope="module")
def report(planted, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    layers, summary = planted
    return out, write_report(out, layers, summary, swaps=SWAPS), layers


def test_figures_follow_the_available_columns(planted):
    layers, summary = planted
    full = make_figures(layers, summary, SWAPS)
    assert list(full) == ["fig1a_mean_std", "fig1b_low_rank", "by_block_group", "distributions", "heatmap", "swaps"]
    assert all(isinstance(f, Figure) for f in full.values())
    core = make_figures(layers.drop(columns=["residual_energy_top30", "residual_rank_rel_90", "lorad_fit"]), summary)
    assert list(core) == ["fig1a_mean_std", "by_block_group", "distributions", "heatmap"]
    # Direction changes planted at ~8° dwarf the 0.2 % norm jitter: the spread calls for log axes.
    assert full["fig1a_mean_std"].axes[0].get_xscale() == "log"


def test_html_renders_in_chromium(report, tmp_path):
    out, paths, layers = report
    text = paths["html"].read_text()
    assert "http://" not in text and "https://" not in text  # self-contained: no CDN, no external URL
    dom_text, console = chromium(paths["html"].as_uri(), tmp_path, "--dump-dom")
    assert console == []  # no JavaScript error, no CSP violation, no console output at all
    dom = Dom(dom_text)
    assert dom.all("body")[0].get("data-report-ready") == "1"  # the script ran to its end
    assert len(dom.layer_rows()) == len(layers) and not any("hidden" in r for r in dom.layer_rows())
    images = [i for i in dom.all("img") if i.get("src", "").startswith("data:image/png;base64,")]
    assert len(images) == len(dom.all("img")) == 6
    shot = tmp_path / "report.png"
    chromium(paths["html"].as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1400,2000")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", data[16:24]) == (1400, 2000)
    assert len(data) > 50_000  # a rendered page, not a blank one


def test_sorting_and_filtering_in_chromium(report, tmp_path):
    out, paths, layers = report
    url = paths["html"].as_uri() + "#sort=direction_change_mean&dir=desc&filter=ATTN2%20up_"
    dom_text, console = chromium(url, tmp_path, "--dump-dom")
    assert console == []
    rows = Dom(dom_text).layer_rows()
    expected = layers.sort_values("direction_change_mean", ascending=False, kind="stable")
    assert [int(r["data-i"]) for r in rows] == list(expected.index)
    shown = [int(r["data-i"]) for r in rows if "hidden" not in r]
    searched = layers[["name", "block", "role", "group", "kind"]].apply(" ".join, axis=1).str.lower()
    wanted = [i for i in expected.index if "attn2" in searched[i] and "up_" in searched[i]]  # every word, any case
    assert shown == wanted and 0 < len(shown) < len(layers)
    assert f"{len(shown)} of {len(layers)} layers shown" in dom_text


def test_console_check_catches_errors(tmp_path):
    """Negative control: the console capture used above does see script errors."""
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><script>var x = ;</script><script>missing()</script></body></html>")
    _, console = chromium(page.as_uri(), tmp_path, "--dump-dom")
    assert any("SyntaxError" in line for line in console) and any("ReferenceError" in line for line in console)


def pdf_pages(path, tmp_path) -> int:
    info = subprocess.run([tool("pdfinfo", "poppler-utils"), str(path)], capture_output=True, text=True, check=True)
    pages = int(re.search(r"^Pages:\s+(\d+)", info.stdout, re.M).group(1))
    prefix = tmp_path / f"{path.stem}-page"
    subprocess.run([tool("pdftoppm", "poppler-utils"), "-png", "-r", "20", str(path), str(prefix)], check=True)
    images = sorted(tmp_path.glob(f"{path.stem}-page*.png"))
    assert len(images) == pages and all(p.stat().st_size > 100 for p in images)
    return pages


def test_pdf_page_count(report, tmp_path):
    out, paths, layers = report
    expected = 1 + 6 + math.ceil(min(len(layers), MAX_TABLE_ROWS) / ROWS_PER_PAGE)
    assert pdf_pages(paths["pdf"], tmp_path) == expected == page_count(6, len(layers))


def test_malicious_names_are_inert(tmp_path):
    names = [f"down_blocks.0.{XSS[0]}.weight", f"mid_block.{XSS[1]}.weight", "up_blocks.0.$\\frac{1}{0}$.weight"]
    teacher = state_dict(names)
    result = compare(teacher, planted_student(teacher)[0])
    result.summary.update(command=f"wadi-analyze compare '{XSS[0]}' --out '{XSS[1]}'",
                          missing_in_student=[XSS[0]], versions={XSS[1]: XSS[0]})
    result.summary["teacher"]["path"] = f"/models/{XSS[1]}"
    swaps = SWAPS.assign(hybrid=[XSS[0], XSS[1], "student"])
    paths = write_report(tmp_path / "out", result.layers, result.summary, swaps=swaps)
    text = paths["html"].read_text()
    for payload in XSS + ["<img src=x", "<script>alert"]:
        assert payload not in text
    assert text.count("<img ") == 5  # the figures only (no spectrum columns: no Fig. 1b)
    assert text.count("<script") == text.count("</script>") == 1
    dom_text, console = chromium(paths["html"].as_uri(), tmp_path, "--dump-dom")  # an alert() would hang it
    assert console == []
    dom = Dom(dom_text)
    assert len(dom.all("script")) == 1 and dom.all("body")[0].get("data-report-ready") == "1"
    assert not any(i.get("src") == "x" or "onerror" in i for i in dom.all("img"))
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom_text  # shown as text, not run
    assert pdf_pages(paths["pdf"], tmp_path) == page_count(5, 3)
    pdf_text = subprocess.run([tool("pdftotext", "poppler-utils"), str(paths["pdf"]), "-"],
                              capture_output=True, text=True, check=True).stdout
    assert "$\\frac{1}{0}$" in pdf_text  # drawn verbatim, never parsed as mathtext


def edge_case(case: str):
    names = NAMES[:1] if case == "single" else NAMES[:4]
    teacher = state_dict(names)
    student = {n: t.clone() for n, t in teacher.items()}
    if case == "nan_layer":
        student = planted_student(teacher)[0]
        student[names[1]] = torch.full_like(teacher[names[1]], float("nan"))
    elif case == "single":
        student = planted_student(teacher)[0]
    return compare(teacher, student)


@pytest.mark.parametrize("case", ["identical", "nan_layer", "single"])
def test_edge_cases(case, tmp_path):
    result = edge_case(case)
    figures = make_figures(result.layers, result.summary)
    if case == "identical":
        assert (result.layers["status"] == "identical").all()
        assert figures["fig1a_mean_std"].axes[0].get_xscale() == "linear"  # zeros never meet a log axis
    paths = write_report(tmp_path / "out", result.layers, result.summary)
    text = paths["html"].read_text()
    if case == "nan_layer":
        assert 'class="nonfinite"' in text and "Layers with non-finite values" in text
    dom_text, console = chromium(paths["html"].as_uri(), tmp_path, "--dump-dom")
    assert console == [] and len(Dom(dom_text).layer_rows()) == len(result.layers)
    assert pdf_pages(paths["pdf"], tmp_path) == page_count(len(figures), len(result.layers))


def synthetic_layers(n: int, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """An SD-sized table without a checkpoint: lognormal direction (~2 %) and norm (~0.1 %) changes."""
    rng = np.random.default_rng(seed)
    blocks = [f"down_blocks.{i}" for i in range(4)] + ["mid_block"] + [f"up_blocks.{i}" for i in range(4)]
    groups = ["attn1", "attn2", "ff", "resnet", "proj"]
    direction, norm = rng.lognormal(np.log(2.2), 0.7, n), rng.lognormal(np.log(0.1), 0.8, n)
    layers = pd.DataFrame({
        "name": [f"{blocks[i % 9]}.layer{i}.{groups[i % 5]}.weight" for i in range(n)], "kind": "linear",
        "block": [blocks[i % 9] for i in range(n)], "role": [groups[i % 5] for i in range(n)],
        "group": [groups[i % 5] for i in range(n)], "shape": "320x320", "numel": 102400, "rows": 320,
        "dtype": "float16", "student_dtype": "float16", "norm_change_mean": norm, "norm_change_std": 2 * norm,
        "norm_change_max": 8 * norm, "direction_change_mean": direction, "direction_change_std": direction,
        "direction_change_max": 5 * direction, "angle_deg_mean": np.degrees(np.arccos(1 - direction / 100)),
        "angle_deg_std": 1.0, "angle_deg_max": 20.0, "frobenius_change": 3 * direction, "valid_rows": 320,
        "zero_norm_rows": 0, "nonfinite_rows": 0, "status": "ok"})
    return layers, summarize(layers)


def test_many_layers_are_aggregated_and_capped(tmp_path):
    layers, summary = synthetic_layers(300)
    figures = make_figures(layers, summary)
    assert len(figures["heatmap"].axes[0].get_yticks()) == 45  # 9 blocks x 5 groups, not 300 rows
    paths = write_report(tmp_path, layers, summary, html=False)
    assert set(paths) == {"pdf"} and not (tmp_path / "report.html").exists()
    assert pdf_pages(paths["pdf"], tmp_path) == 1 + len(figures) + MAX_TABLE_ROWS // ROWS_PER_PAGE


def test_defaults_read_the_compare_folder(tmp_path):
    teacher = state_dict(NAMES[:3])
    compare(teacher, planted_student(teacher)[0]).write(tmp_path)
    SWAPS.to_csv(tmp_path / "swaps.csv", index=False)
    first = write_report(tmp_path)
    assert 'id="fig-swaps"' in first["html"].read_text()
    before = {p: p.read_bytes() for p in first.values()}
    second = write_report(tmp_path)
    assert {p: p.read_bytes() for p in second.values()} == before  # deterministic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.csv", "report.html", "report.pdf",
                                                           "summary.json", "swaps.csv"]  # no temp files left


def test_read_layers_keeps_text_verbatim(tmp_path):
    (tmp_path / "layers.csv").write_text("name,block,role,status,norm_change_mean\nNA,null,None,ok,\n")
    layers = read_layers(tmp_path / "layers.csv")
    assert layers.loc[0, ["name", "block", "role"]].tolist() == ["NA", "null", "None"]
    assert np.isnan(layers.loc[0, "norm_change_mean"])


@pytest.mark.slow
def test_sd15_sized_report_is_fast(tmp_path):
    import time
    layers, summary = synthetic_layers(700)
    start = time.perf_counter()
    write_report(tmp_path, layers, summary, swaps=SWAPS)
    assert time.perf_counter() - start < 20
