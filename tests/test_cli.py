"""`wadi-analyze compare`: outputs, options, and one clear line for every bad input."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from wadi_analysis.cli import app

REQUIRED_COLUMNS = ["name", "kind", "block", "role", "shape", "numel", "rows", "norm_change_mean", "norm_change_std",
                    "direction_change_mean", "direction_change_std", "angle_deg_mean"]
REQUIRED_SUMMARY = ["n_layers", "norm_change_mean", "norm_change_std", "direction_change_mean", "direction_change_std",
                    "direction_to_norm_mean_ratio", "direction_to_norm_std_ratio", "missing_in_teacher",
                    "missing_in_student", "shape_mismatches"]
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_compare_writes_table_and_summary(formats, tmp_path):
    out = tmp_path / "out"
    result = run("compare", formats["teacher"]["diffusers_folder"], formats["student"]["ldm_single"], "--out", out)
    assert result.exit_code == 0, result.output
    layers = pd.read_csv(out / "layers.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert set(REQUIRED_COLUMNS) <= set(layers.columns) and set(REQUIRED_SUMMARY) <= set(summary)
    assert summary["n_layers"] == len(layers) == 281
    assert summary["direction_to_norm_mean_ratio"] > 5
    assert "direction" in result.output and "layers analysed" in result.output
    assert not list(out.glob(".*.tmp"))


def test_json_output_is_machine_readable(formats):
    result = run("compare", formats["teacher"]["single"], formats["student"]["single"], "--json")
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["n_layers"] == 281 and summary["command"].startswith("wadi-analyze compare")


def test_selection_by_glob_and_kind(formats):
    teacher, student = formats["teacher"]["single"], formats["student"]["single"]
    attn2 = json.loads(run("compare", teacher, student, "--json", "--include", "*attn2*").stdout)
    assert attn2["n_layers"] == 16 * 4  # SD1.5 layout: 16 transformer blocks x q, k, v, out
    conv = json.loads(run("compare", teacher, student, "--json", "--kind", "conv").stdout)
    linear = json.loads(run("compare", teacher, student, "--json", "--kind", "linear").stdout)
    assert conv["n_layers"] + linear["n_layers"] == 281
    no_up = json.loads(run("compare", teacher, student, "--json", "--exclude", "up_blocks.*").stdout)
    assert no_up["n_deselected"] > 0 and no_up["n_layers"] + no_up["n_deselected"] == 281


def test_shape_mismatch_missing_keys_and_nonfinite_are_reported_not_fatal(tiny_pair, tmp_path):
    teacher, student = dict(tiny_pair[0]), dict(tiny_pair[1])
    student["conv_in.weight"] = torch.zeros(8, 4, 3, 3)
    student["extra.weight"] = torch.ones(2, 2)
    del student["conv_out.weight"]
    nan_layer = "down_blocks.0.resnets.0.conv1.weight"
    student[nan_layer] = student[nan_layer].clone()
    student[nan_layer][0, 0, 0, 0] = float("nan")
    save_file(teacher, tmp_path / "t.safetensors")
    save_file(student, tmp_path / "s.safetensors")
    result = run("compare", tmp_path / "t.safetensors", tmp_path / "s.safetensors", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["shape_mismatches"] == [{"name": "conv_in.weight", "teacher_shape": [32, 4, 3, 3],
                                            "student_shape": [8, 4, 3, 3]}]
    assert summary["missing_in_teacher"] == ["extra.weight"] and summary["missing_in_student"] == ["conv_out.weight"]
    assert summary["nonfinite_layers"] == [nan_layer]
    layers = pd.read_csv(tmp_path / "o" / "layers.csv").set_index("name")
    assert layers.loc[nan_layer, "status"] == "nonfinite" and layers.loc[nan_layer, "nonfinite_rows"] == 1
    assert summary["n_layers_in_means"] == summary["n_layers"] - 1


class Malicious:
    """Unpickling this runs a shell command: weights_only must refuse it before it runs."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


BAD_INPUTS = ["missing file", "not a checkpoint", "truncated", "corrupt header", "pickle refused", "empty folder",
              "pipeline without denoiser", "missing shard", "no common weights"]


def bad_inputs(tmp_path: Path, formats) -> dict[str, Path]:
    good = formats["teacher"]["single"]
    cases = {"missing file": tmp_path / "nope.safetensors"}
    cases["not a checkpoint"] = tmp_path / "notes.safetensors"
    cases["not a checkpoint"].write_text("just some text, definitely not tensors\n" * 10)
    raw = good.read_bytes()
    cases["truncated"] = tmp_path / "truncated.safetensors"
    cases["truncated"].write_bytes(raw[: len(raw) // 2])
    cases["corrupt header"] = tmp_path / "corrupt.safetensors"
    cases["corrupt header"].write_bytes(raw[:8] + b"{garbage" + raw[16:])
    cases["pickle refused"] = tmp_path / "evil.bin"
    torch.save({"weight": Malicious(tmp_path / "PWNED")}, cases["pickle refused"])
    cases["empty folder"] = tmp_path / "empty"
    cases["empty folder"].mkdir()
    (cases["empty folder"] / "README.txt").write_text("nothing here")
    cases["pipeline without denoiser"] = tmp_path / "pipe"
    cases["pipeline without denoiser"].mkdir()
    (cases["pipeline without denoiser"] / "model_index.json").write_text('{"vae": ["diffusers", "AutoencoderKL"]}')
    sharded = formats["teacher"]["sharded_folder"]
    cases["missing shard"] = tmp_path / "sharded"
    shutil.copytree(sharded, cases["missing shard"])
    next(cases["missing shard"].glob("*-00002-*.safetensors")).unlink()
    cases["no common weights"] = tmp_path / "other.safetensors"
    save_file({"something.else.weight": torch.ones(3, 3)}, cases["no common weights"])
    return cases


@pytest.fixture(scope="module")
def bad_input_folder(formats, tmp_path_factory):
    """(folder, {case: path}): every bad input written once for all cases."""
    folder = tmp_path_factory.mktemp("bad_inputs")
    cases = bad_inputs(folder, formats)
    assert list(cases) == BAD_INPUTS  # every case written is a test case
    return folder, cases


@pytest.mark.parametrize("side", ["teacher", "student"])
@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c.replace(" ", "-") for c in BAD_INPUTS])
def test_every_bad_input_gives_one_error_line(formats, bad_input_folder, tmp_path, case, side):
    good = formats["student"]["single"]
    folder, paths = bad_input_folder
    out = tmp_path / f"out-{case.replace(' ', '-')}"
    args = (paths[case], good) if side == "teacher" else (good, paths[case])
    result = run("compare", *args, "--out", out)
    assert result.exit_code == 2, (case, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, result.stderr)
    assert "Traceback" not in result.output
    assert not out.exists(), case
    assert not (folder / "PWNED").exists()


def test_console_script_refuses_pickle_without_running_it(formats, tmp_path):
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": Malicious(tmp_path / "PWNED")}, evil)
    script = Path(sys.executable).with_name("wadi-analyze")
    proc = subprocess.run([str(script), "compare", str(evil), str(formats["student"]["single"]), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "refused" in proc.stderr
    assert proc.stdout == "" and not (tmp_path / "PWNED").exists() and not (tmp_path / "o").exists()


def test_info_and_example_pair(tmp_path):
    result = run("example-pair", tmp_path / "ex")
    assert result.exit_code == 0
    info = run("info", tmp_path / "ex" / "teacher")
    with safe_open(tmp_path / "ex" / "teacher" / "diffusion_pytorch_model.safetensors", "pt") as reference:
        assert info.exit_code == 0 and f"n_tensors: {len(list(reference.keys()))}" in info.output
    result = run("compare", tmp_path / "ex" / "teacher", tmp_path / "ex" / "student", "--out", tmp_path / "c", "-q")
    layers = pd.read_csv(tmp_path / "c" / "layers.csv").set_index("name")
    planted = pd.read_csv(tmp_path / "ex" / "planted.csv").set_index("name")
    for column in ("direction_change_mean", "norm_change_mean", "angle_deg_mean"):
        difference = (layers.loc[planted.index, column] - planted[column]).abs()
        assert difference.max() < 1e-3, column


@pytest.mark.parametrize("option", [["--precision", "float16"], ["--ema", "nobody"]])
def test_bad_options_exit_2(formats, option):
    result = run("compare", formats["teacher"]["single"], formats["student"]["single"], *option)
    assert result.exit_code == 2
