"""The hostile-input corpus of `wadi-analyze` (issue 12): every case is refused with one `error:` line.

Each case builds its files under its own folder and runs one command in-process; the contract
(:func:`tests.support.hostile.check_refused`) is exit 2, one sanitised line, nothing on stdout, no
file created, changed or deleted, no payload run. The inputs are tiny hand-made checkpoints, so the
whole corpus runs in seconds. After the refusals: what must keep working (links inside the named
folder, a skipped empty weight) and what reaches the terminal from tensor names.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from tests.support.hostile import MARKER, check_refused, snapshot
from wadi_analysis import compare
from wadi_analysis.cli import app

ESCAPES = "\x1b]0;owned\x07\x1b[2J"


def weights(seed: int = 0, rows: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"down_blocks.0.attentions.0.proj_in.weight": torch.randn(rows, 6, generator=generator),
            "down_blocks.0.resnets.0.conv1.weight": torch.randn(rows, 4, 3, 3, generator=generator),
            "down_blocks.0.resnets.0.conv1.bias": torch.randn(rows, generator=generator)}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Pristine inputs, copied into each case's folder: two checkpoints, model folders, a comparison."""
    root = tmp_path_factory.mktemp("base")
    save_file(weights(0), root / "t.safetensors")
    save_file(weights(1), root / "s.safetensors")
    for side in ("t", "s"):
        (root / f"{side}dir").mkdir()
        shutil.copy(root / f"{side}.safetensors", root / f"{side}dir" / "diffusion_pytorch_model.safetensors")
        (root / f"{side}dir" / "config.json").write_text("{}")
    compare(root / "t.safetensors", root / "s.safetensors").write(root / "cmp")
    return root


def raw_safetensors(path: Path, header, data: bytes = b"") -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def entry(dtype="F32", shape=(2, 2), offsets=(0, 16)):
    return {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape, "data_offsets": list(offsets)}


class Payload:
    """Writes the marker when unpickled: a pickle that runs code."""

    def __init__(self, root: Path) -> None:
        self.target = str(root / MARKER)

    def __reduce__(self):
        return (exec, (f"open({self.target!r}, 'w').write('ran')",))


def copy(base: Path, root: Path, *names: str) -> None:
    for name in names:
        source = base / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, root / name)


# --- builders: (base, root) -> args; each writes only under root -------------------------------------

def swap_out(out: str, student: str = "s.safetensors", extra=()):
    def build(base, root):
        copy(base, root, "t.safetensors", "s.safetensors", "sdir", "tdir")
        for make in extra:
            make(root)
        return ["swap", root / "t.safetensors", root / student, "--out", out if out.startswith("/") else root / out]
    return build


def mkdir(name):
    return lambda root: (root / name).mkdir(parents=True)


def touch(name, text="mine"):
    return lambda root: (root / name).write_text(text)


def link(name, target):
    return lambda root: (root / name).symlink_to(root / target)


def models_folder(root):
    (root / "models").mkdir()
    for name in ("t.safetensors", "s.safetensors"):
        shutil.copy(root / name, root / "models" / name)


def swap_in_models(base, root):
    copy(base, root, "t.safetensors", "s.safetensors")
    models_folder(root)
    return ["swap", root / "models" / "t.safetensors", root / "models" / "s.safetensors", "--out", root / "models"]


def plan_out(out: str, extra=()):
    def build(base, root):
        copy(base, root, "cmp")
        for make in extra:
            make(root)
        return ["plan", root / "cmp", "--out", out if out.startswith("/") else root / out]
    return build


def report_with(extra):
    def build(base, root):
        copy(base, root, "cmp")
        for make in extra:
            make(root)
        return ["report", root / "cmp", "--no-pdf"]
    return build


def example_pair(out: str, extra=()):
    def build(base, root):
        for make in extra:
            make(root)
        return ["example-pair", out if out.startswith("/") else root / out]
    return build


def compare_out(out: str, teacher="t.safetensors", extra=()):
    def build(base, root):
        copy(base, root, "t.safetensors", "s.safetensors", "tdir")
        for make in extra:
            make(root)
        return ["compare", root / teacher, root / "s.safetensors", "--out", out if out.startswith("/") else root / out]
    return build


OUTPUT_CASES = [
    ("swap-out-is-student", swap_out("s.safetensors"), "is the input"),
    ("swap-out-is-teacher", swap_out("t.safetensors"), "is the input"),
    ("swap-out-is-student-folder", swap_out("sdir", student="sdir"), "is the input"),
    ("swap-out-inside-student-folder", swap_out("sdir/hybrid", student="sdir"), "lies inside"),
    ("swap-out-over-student-weights", swap_out("sdir/diffusion_pytorch_model.safetensors", student="sdir"), "input"),
    ("swap-out-contains-inputs", swap_in_models, "contains"),
    ("swap-out-under-a-file", swap_out("note.txt/h.safetensors", extra=[touch("note.txt")]), "is a file"),
    ("swap-out-folder-for-a-file", swap_out("h.safetensors", extra=[mkdir("h.safetensors")]), "a file is needed"),
    ("swap-out-file-for-a-folder", swap_out("hybrid", student="sdir", extra=[touch("hybrid")]), "a folder is needed"),
    ("swap-out-symlink", swap_out("l.safetensors", extra=[touch("x.bin"), link("l.safetensors", "x.bin")]),
     "symbolic link"),
    ("swap-out-users-folder", swap_out("mine", student="sdir", extra=[mkdir("mine"), touch("mine/notes.txt")]),
     "--overwrite"),
    ("swap-out-proc-file", swap_out("/proc/wadi-hostile.safetensors"), "cannot write"),
    ("swap-out-proc-folder", swap_out("/proc/wadi-hostile", student="sdir"), "cannot write"),
    ("plan-out-is-layers-csv", plan_out("cmp/layers.csv"), "is the input"),
    ("plan-out-is-summary", plan_out("cmp/summary.json"), "is the input"),
    ("plan-out-is-the-comparison", plan_out("cmp"), "contains"),
    ("plan-out-under-a-file", plan_out("note.txt/plan.json", extra=[touch("note.txt")]), "is a file"),
    ("plan-out-a-folder", plan_out("plans", extra=[mkdir("plans")]), "a file is needed"),
    ("plan-out-symlink", plan_out("p.json", extra=[touch("x.json"), link("p.json", "x.json")]), "symbolic link"),
    ("plan-out-proc", plan_out("/proc/wadi-hostile/plan.json"), "cannot write"),
    ("report-html-is-a-folder", report_with([mkdir("cmp/report.html")]), "a file is needed"),
    ("report-html-is-a-symlink", report_with([touch("elsewhere.html"), link("cmp/report.html", "elsewhere.html")]),
     "symbolic link"),
    ("example-pair-out-a-file", example_pair("pair", [touch("pair")]), "a folder is needed"),
    ("example-pair-under-a-file", example_pair("note.txt/pair", [touch("note.txt")]), "is a file"),
    ("example-pair-users-folder", example_pair("mine", [mkdir("mine"), touch("mine/notes.txt")]), "--overwrite"),
    ("example-pair-symlink", example_pair("l", [mkdir("d"), link("l", "d")]), "symbolic link"),
    ("example-pair-proc", example_pair("/proc/wadi-hostile"), "cannot write"),
    ("compare-out-a-file", compare_out("t.safetensors"), "a folder is needed"),
    ("compare-out-inside-teacher-folder", compare_out("tdir/cmp", teacher="tdir"), "lies inside"),
    ("compare-out-is-teacher-folder", compare_out("tdir", teacher="tdir"), "lies inside"),
    ("compare-out-under-a-file", compare_out("note.txt/cmp", extra=[touch("note.txt")]), "is a file"),
    ("compare-out-symlink", compare_out("l", extra=[mkdir("d"), link("l", "d")]), "symbolic link"),
    ("compare-out-csv-is-a-folder", compare_out("out", extra=[mkdir("out/layers.csv")]), "a file is needed"),
    ("compare-out-proc", compare_out("/proc/wadi-hostile"), "cannot write"),
]


# --- readers ---------------------------------------------------------------------------------------

def info_of(make, name="x.safetensors"):
    """`info` on a file ``make(path, root)`` writes."""
    def build(base, root):
        make(root / name, root)
        return ["info", root / name]
    return build


def header(h, data=b"\0" * 16):
    return lambda path, root: raw_safetensors(path, h, data)


def torch_file(obj, **kwargs):
    return lambda path, root: torch.save(obj(root) if callable(obj) else obj, path, **kwargs)


def nested(depth):
    obj = {"w": torch.ones(2, 2)}
    for _ in range(depth):
        obj = {"state_dict": obj, "step": 1, "epoch": 2}
    return obj


def truncated_storage(path, root):
    torch.save({"w": torch.arange(16.0).reshape(4, 4), "v": torch.ones(4, 4)}, root / "whole.pt")
    with zipfile.ZipFile(root / "whole.pt") as whole, zipfile.ZipFile(path, "w") as cut:
        for info in whole.infolist():
            data = whole.read(info.filename)
            cut.writestr(info, data[:20] if info.filename.endswith("data/0") else data)
    (root / "whole.pt").unlink()


def deep_save(obj, path):
    """torch.save of an object nested deeper than the default recursion limit allows to pickle."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(20000)
    try:
        torch.save(obj, path)
    finally:
        sys.setrecursionlimit(limit)


def deep_lists(path, root):
    obj = [torch.ones(2)]
    for _ in range(3000):
        obj = [obj]
    deep_save({"state_dict": obj}, path)


def index_case(weight_map=None, metadata=None, raw=None, shard_link=False):
    def build(base, root):
        folder = root / "sharded"
        folder.mkdir()
        save_file(weights(0), folder / "a.safetensors")
        if shard_link:
            (root / "outside").mkdir()
            save_file(weights(0), root / "outside" / "b.safetensors")
            (folder / "b.safetensors").symlink_to(root / "outside" / "b.safetensors")
        index = {"weight_map": weight_map if weight_map is not None else {n: "a.safetensors" for n in weights(0)}}
        if metadata is not None:
            index["metadata"] = metadata
        path = folder / "model.safetensors.index.json"
        path.write_text(raw if raw is not None else json.dumps(index))
        return ["info", path]
    return build


def pipeline(model_index=None, unet_link=False, weights_link=False, component=None):
    def build(base, root):
        folder = root / "pipe"
        folder.mkdir()
        (folder / "model_index.json").write_text(model_index if model_index is not None
                                                 else json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
        if unet_link:
            copy(base, root, "tdir")
            (folder / "unet").symlink_to(root / "tdir")
        else:
            (folder / "unet").mkdir()
            (folder / "unet" / "config.json").write_text("{}")
            if weights_link:
                copy(base, root, "t.safetensors")
                (folder / "unet" / "diffusion_pytorch_model.safetensors").symlink_to(root / "t.safetensors")
            else:
                shutil.copy(base / "t.safetensors", folder / "unet" / "diffusion_pytorch_model.safetensors")
        return ["info", folder] + (["--component", component] if component else [])
    return build


def model_folder_weights_link(base, root):
    copy(base, root, "t.safetensors")
    (root / "m").mkdir()
    (root / "m" / "config.json").write_text("{}")
    (root / "m" / "diffusion_pytorch_model.safetensors").symlink_to(root / "t.safetensors")
    return ["info", root / "m"]


LDM = "model.diffusion_model."
RESNET = ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3")
# The smallest LDM U-Net diffusers' converter maps: one level of one resnet, the middle, two up resnets.
LDM_KEYS = ([f"{LDM}{k}.weight" for k in ("input_blocks.0.0", "time_embed.0", "time_embed.2", "out.0", "out.2")]
            + [f"{LDM}{block}.{r}.weight" for block in ("input_blocks.1.0", "middle_block.0", "middle_block.2",
                                                       "output_blocks.0.0", "output_blocks.1.0") for r in RESNET])


def ldm(extra_keys):
    def make(path, root):
        save_file({k: torch.ones(2, 2) for k in LDM_KEYS + [LDM + k for k in extra_keys]}, path)
    return make


READER_CASES = [
    ("st-header-100k-nested-arrays", info_of(header(b"[" * 100_000 + b"]" * 100_000)), "nests too deeply"),
    ("st-header-not-json", info_of(header(b"{not json")), "not json"),
    ("st-header-a-list", info_of(header([1, 2])), "not a mapping"),
    ("st-dtype-a-list", info_of(header({"w": entry(dtype=["F32"])})), "dtype"),
    ("st-dtype-unknown", info_of(header({"w": entry(dtype="F128")})), "dtype"),
    ("st-shape-2-63", info_of(header({"w": entry(shape=[0, 2 ** 63], offsets=(0, 0))})), "larger than any file"),
    ("st-shape-negative", info_of(header({"w": entry(shape=[-2, -2])})), "non-negative"),
    ("st-shape-float", info_of(header({"w": entry(shape=[2.0, 2])})), "non-negative integers"),
    ("st-shape-bool", info_of(header({"w": entry(shape=[True, 4])})), "non-negative integers"),
    ("st-shape-a-string", info_of(header({"w": entry(shape="2x2")})), "shape"),
    ("st-offsets-reversed", info_of(header({"w": entry(offsets=(16, 0))})), "data_offsets"),
    ("st-offsets-three", info_of(header({"w": entry(offsets=(0, 8, 16))})), "data_offsets"),
    ("st-metadata-a-list", info_of(header({"__metadata__": [1, 2], "w": entry()})), "__metadata__"),
    ("st-metadata-nested", info_of(header({"__metadata__": {"a": {"b": 1}}, "w": entry()})), "__metadata__"),
    ("st-entry-a-string", info_of(header({"w": "F32"})), "not a mapping"),
    ("st-truncated-data", info_of(header({"w": entry(shape=(4, 4), offsets=(0, 64))})), "truncated"),
    ("st-overlapping", info_of(header({"w": entry(), "v": entry(offsets=(8, 24))}, b"\0" * 24)), "overlap"),
    ("st-too-short", info_of(lambda path, root: path.write_bytes(b"abc")), "too short"),
    ("pt-sparse-coo", info_of(torch_file({"w": torch.eye(4).to_sparse(), "v": torch.ones(2, 2)}), "x.pt"),
     "only dense tensors"),
    ("pt-sparse-csr", info_of(torch_file(lambda root: {"w": torch.eye(4).to_sparse_csr()}), "x.pt"), "only dense"),
    ("pt-truncated-storage", info_of(truncated_storage, "x.pt"), "truncated"),
    ("pt-no-tensors", info_of(torch_file({"a": 1, "b": "x"}), "x.pt"), "no state dict"),
    ("pt-not-a-dict", info_of(torch_file([torch.ones(2, 2)]), "x.pt"), "no state dict"),
    ("bin-holds-text", info_of(lambda path, root: path.write_text("hello, not a checkpoint\n"), "x.bin"),
     "not a torch checkpoint"),
    ("bin-empty", info_of(lambda path, root: path.write_bytes(b""), "x.bin"), "not a torch checkpoint"),
    ("bin-random-pickle-bytes", info_of(lambda path, root: path.write_bytes(b"\x80\x02" + bytes(range(200, 256))), "x.bin"),
     "torch checkpoint"),
    ("bin-broken-zip", info_of(lambda path, root: path.write_bytes(b"PK\x03\x04" + b"\0" * 40), "x.bin"),
     "torch checkpoint"),
    ("ckpt-nested-3000-state-dicts", info_of(lambda path, root: deep_save(nested(3000), path), "x.ckpt"),
     "no state dict"),
    ("ckpt-nested-3000-lists", info_of(deep_lists, "x.ckpt"), "x.ckpt"),
    ("pt-payload", info_of(torch_file(lambda root: {"w": torch.ones(2, 2), "p": Payload(root)}), "x.pt"),
     "refused"),
    ("ckpt-payload-legacy-format", info_of(torch_file(lambda root: {"state_dict": Payload(root)},
                                                       _use_new_zipfile_serialization=False), "x.ckpt"), "refused"),
    ("suffixless-payload", info_of(torch_file(lambda root: Payload(root)), "weights"), "refused"),
    ("index-weight-map-ints", index_case(weight_map={"w": 5}), "not a plain file name"),
    ("index-weight-map-a-list", index_case(weight_map=["a.safetensors"]), "no weight_map"),
    ("index-weight-map-nested-path", index_case(weight_map={"w": "../a.safetensors"}), "not a plain file name"),
    ("index-weight-map-null-shard", index_case(weight_map={"w": None}), "not a plain file name"),
    ("index-metadata-a-list", index_case(metadata=[1]), "metadata"),
    ("index-not-json", index_case(raw="{"), "not json"),
    ("index-a-number", index_case(raw="123"), "no weight_map"),
    ("index-nested-deep", index_case(raw="[" * 100_000 + "]" * 100_000), "nests too deeply"),
    ("index-shard-missing", index_case(weight_map={"w": "gone.safetensors"}), "missing"),
    ("index-shard-link-out-of-folder", index_case(weight_map={n: "b.safetensors" for n in weights(0)},
                                                  shard_link=True), "symbolic link"),
    ("model-index-123", pipeline(model_index="123"), "not a pipeline index"),
    ("model-index-a-list", pipeline(model_index="[1, 2]"), "not a pipeline index"),
    ("model-index-not-json", pipeline(model_index="{"), "not json"),
    ("pipeline-unet-link-out-of-folder", pipeline(unet_link=True), "symbolic link"),
    ("pipeline-weights-link-out-of-folder", pipeline(weights_link=True), "symbolic link"),
    ("pipeline-component-escapes", pipeline(component="../pipe"), "not a component folder name"),
    ("model-folder-weights-link-out", model_folder_weights_link, "symbolic link"),
    ("ldm-label-emb", info_of(ldm(["label_emb.0.0.weight"])), "KeyError: 'label_emb.0.0.bias'"),
    ("ldm-downsampler-at-input-blocks-0", info_of(ldm(["input_blocks.0.0.op.weight"])), "downsampler"),
]


# --- LoRA students ---------------------------------------------------------------------------------

LORA_MODULE = "down_blocks.0.attentions.0.proj_in"


def lora(extra=None, metadata=None, down=(2, 6), up=(8, 2), name="lora.safetensors", scale=None):
    def build(base, root):
        copy(base, root, "t.safetensors")
        tensors = {f"{LORA_MODULE}.lora_A.weight": torch.randn(*down), f"{LORA_MODULE}.lora_B.weight": torch.randn(*up)}
        tensors.update(extra or {})
        save_file(tensors, root / name, metadata={"lora_adapter_metadata": json.dumps(metadata)} if metadata else None)
        return (["compare", root / "t.safetensors", "--student-lora", root / name, "--quiet"]
                + (["--lora-scale", scale] if scale else []))
    return build


def lora_path(make):
    def build(base, root):
        copy(base, root, "t.safetensors")
        path = make(root)
        return ["compare", root / "t.safetensors", "--student-lora", path, "--quiet"]
    return build


LORA_CASES = [
    ("lora-alpha-empty", lora({f"{LORA_MODULE}.alpha": torch.tensor([])}), "holds 0 values"),
    ("lora-alpha-two-values", lora({f"{LORA_MODULE}.alpha": torch.tensor([1.0, 2.0])}), "holds 2 values"),
    ("lora-alpha-nan", lora({f"{LORA_MODULE}.alpha": torch.tensor(float("nan"))}), "finite"),
    ("lora-alpha-pattern-bad-regex", lora(metadata={"alpha_pattern": {"proj_(in": 4}}), "regular expression"),
    ("lora-alpha-pattern-a-list", lora(metadata={"alpha_pattern": [4]}), "alpha_pattern"),
    ("lora-alpha-pattern-string-alpha", lora(metadata={"alpha_pattern": {"proj_in": "four"}}), "finite number"),
    ("lora-alpha-a-string", lora(metadata={"lora_alpha": "abc"}), "lora_alpha"),
    ("lora-alpha-true", lora(metadata={"lora_alpha": True}), "lora_alpha"),
    ("lora-B-zero-rows", lora(up=(0, 2)), "empty"),
    ("lora-rank-zero", lora(down=(0, 6), up=(8, 0)), "rank 0"),
    ("lora-factors-mismatch", lora(up=(8, 3)), "do not fit"),
    ("lora-factors-3d", lora(down=(2, 6, 1)), "do not fit"),
    ("lora-scale-nan", lora(scale="nan"), "finite"),
    ("lora-scale-inf", lora(scale="inf"), "finite"),
    ("lora-a-folder", lora_path(lambda root: (root / "loras").mkdir() or root / "loras"), "folder without"),
    ("lora-missing-suffixless", lora_path(lambda root: root / "no-such-lora"), "does not exist"),
    ("lora-text-file", lora_path(lambda root: (root / "l.bin").write_text("text") and root / "l.bin"),
     "not a torch checkpoint"),
    ("lora-kohya-block-not-a-number", lora_path(lambda root: save_file(
        {f"lora_unet_output_blocks_x_1_proj_in.{k}.weight": torch.ones(2, 6) for k in ("lora_down", "lora_up")},
        root / "k.safetensors") or root / "k.safetensors"), "not those of an SD U-Net"),
    ("lora-kohya-only-alpha", lora_path(lambda root: save_file(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0)}, root / "k.safetensors")
        or root / "k.safetensors"), "no lora_down"),
    ("lora-int-factors", lora(extra={f"{LORA_MODULE}.lora_A.weight": torch.ones(2, 6, dtype=torch.int32)}),
     "not floating point"),
    ("lora-bias-terms", lora(extra={f"{LORA_MODULE}.lora_A.bias": torch.ones(2)}), "bias"),
    ("lora-matches-no-weight", lora(extra={"mid_block.x.lora_A.weight": torch.ones(2, 6),
                                           "mid_block.x.lora_B.weight": torch.ones(8, 2)}), "match no weight"),
    ("lora-payload", lora_path(lambda root: torch.save({"x.lora_A.weight": Payload(root)}, root / "l.bin")
                               or root / "l.bin"), "refused"),
]


# --- comparison folders (plan, report) ------------------------------------------------------------

def tampered(command, file, change, options=()):
    """``command`` on a copy of the comparison whose ``file`` is rewritten by ``change(text)``."""
    def build(base, root):
        copy(base, root, "cmp")
        path = root / "cmp" / file
        text = change(path.read_text())
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        out = ["--out", root / "plan.json"] if command == "plan" else ["--no-pdf"]
        return [command, root / "cmp", *out, *options]
    return build


def csv_cell(column, value):
    def change(text):
        lines = text.splitlines()
        index = lines[0].split(",").index(column)
        cells = lines[1].split(",")
        cells[index] = value
        return "\n".join([lines[0], ",".join(cells), *lines[2:]]) + "\n"
    return change


def drop_column(column):
    def change(text):
        rows = [line.split(",") for line in text.splitlines()]
        index = rows[0].index(column)
        return "\n".join(",".join(r[:index] + r[index + 1:]) for r in rows) + "\n"
    return change


def summary_teacher(value):
    def change(text):
        summary = json.loads(text)
        summary["teacher"] = value
        return json.dumps(summary)
    return change


def plan_options(*options):
    return tampered("plan", "summary.json", lambda text: text, options)


def report_swaps(text, name="swaps.csv"):
    def build(base, root):
        copy(base, root, "cmp")
        if text is not None:
            (root / name).write_text(text)
        return ["report", root / "cmp", "--no-pdf", "--swaps", root / name]
    return build


COMPARISON_CASES = [
    *[(f"{command}-summary-{label}", tampered(command, "summary.json", lambda text, v=value: v), expect)
      for command in ("plan", "report")
      for label, value, expect in (("a-list", "[1, 2]", "JSON object"), ("null", "null", "JSON object"),
                                   ("not-json", "{", "not JSON"), ("a-string", '"x"', "JSON object"))],
    ("plan-summary-teacher-a-list", tampered("plan", "summary.json", summary_teacher([1])), "teacher"),
    ("plan-summary-n-params-a-string", tampered("plan", "summary.json", summary_teacher({"n_params": "many"})),
     "n_params"),
    ("plan-summary-n-params-negative", tampered("plan", "summary.json", summary_teacher({"n_params": -5})),
     "n_params"),
    ("report-summary-teacher-a-string", tampered("report", "summary.json", summary_teacher("x")), "teacher"),
    *[(f"{command}-{label}", tampered(command, "layers.csv", change), expect)
      for command in ("plan", "report")
      for label, change, expect in (
          ("numel-a-string", csv_cell("numel", "abc"), "not a number"),
          ("direction-a-string", csv_cell("direction_change_mean", "lots"), "not a number"),
          ("rows-true", csv_cell("rows", "True"), "not a number"),
          ("no-shape-column", drop_column("shape"), "no column shape"),
          ("no-name-column", drop_column("name"), "no column name"),
          ("empty-layers", lambda text: "", "empty"),
          ("duplicate-layer", lambda text: text + text.splitlines()[1] + "\n", "twice"),
          ("negative-direction", csv_cell("direction_change_mean", "-1"), "no comparison writes"),
          ("infinite-norm", csv_cell("norm_change_std", "-inf"), "no comparison writes"),
          ("numel-1e308", csv_cell("numel", "1e308"), "whole number"),
          ("rows-fractional", csv_cell("rows", "2.5"), "whole number"))],
    ("plan-shape-malformed", tampered("plan", "layers.csv", csv_cell("shape", "8xA")), "not a shape"),
    ("plan-shape-zero", tampered("plan", "layers.csv", csv_cell("shape", "0x6")), "not a shape"),
    ("plan-layers-not-utf8", tampered("plan", "layers.csv", lambda text: b"name,shape\n\xff\xfe,8x6\n"), "layers.csv"),
    ("plan-numeric-names", tampered("plan", "layers.csv", lambda text: "\n".join(
        [text.splitlines()[0]] + [f"{i}" + line[line.index(","):] for i, line in enumerate(text.splitlines()[1:])])),
     "no layer"),
    ("plan-budget-zero", plan_options("--budget", "0"), "--budget"),
    ("plan-budget-inf", plan_options("--budget", "inf"), "--budget"),
    ("plan-budget-nan", plan_options("--budget", "nan"), "--budget"),
    ("plan-budget-too-small", plan_options("--budget", "1e-9"), "too small"),
    ("plan-max-rank-below-multiple", plan_options("--max-rank", "4", "--rank-multiple", "8"), "--max-rank"),
    ("plan-unknown-preset", plan_options("--preset", "nope"), "unknown preset"),
    ("plan-unknown-kind", plan_options("--kind", "attention"), "no layer"),
    ("plan-not-a-folder", lambda base, root: ["plan", root / "nothing", "--out", root / "p.json"], "not a comparison"),
    ("report-swaps-missing", report_swaps(None), "do not exist"),
    ("report-swaps-empty", report_swaps(""), "empty"),
    ("report-swaps-a-folder", report_swaps(None, name="cmp"), "is not a file"),
    ("report-of-an-empty-folder", lambda base, root: (root / "e").mkdir() or ["report", root / "e"], "layers.csv missing"),
]

def as_student(build):
    """The reader case ``build`` with its file as the student of a comparison (the teacher is sound)."""
    def compare_build(base, root):
        args = build(base, root)
        copy(base, root, "t.safetensors")
        return ["compare", root / "t.safetensors", *args[1:], "--quiet"]
    return compare_build


COMPARE_READER_CASES = [(f"compare-{i}", as_student(b), e) for i, b, e in READER_CASES
                        if i.startswith(("st-dtype", "st-shape-2", "pt-", "bin-", "index-shard-link", "pipeline-unet",
                                         "ldm-label", "ckpt-payload"))]
OPTION_CASES = [
    ("variant-with-a-path", lambda base, root: copy(base, root, "tdir") or ["info", root / "tdir", "--variant", "../x"],
     "not a variant name"),
    ("component-with-a-path", lambda base, root: copy(base, root, "tdir") or
     ["info", root / "tdir", "--component", "../tdir"], "tdir"),
    ("swap-teacher-missing", lambda base, root: copy(base, root, "s.safetensors") or
     ["swap", root / "nope.safetensors", root / "s.safetensors", "--out", root / "h.safetensors"], "does not exist"),
    ("swap-nothing-in-common", lambda base, root: (save_file({"x.weight": torch.ones(2, 2)}, root / "x.safetensors"),
                                                  copy(base, root, "s.safetensors"))
     and ["swap", root / "x.safetensors", root / "s.safetensors", "--out", root / "h.safetensors"], "no common"),
]

CASES = OUTPUT_CASES + READER_CASES + COMPARE_READER_CASES + LORA_CASES + COMPARISON_CASES + OPTION_CASES


@pytest.mark.parametrize("build, expect", [pytest.param(b, e, id=i) for i, b, e in CASES])
def test_refused(base, tmp_path, build, expect):
    root = tmp_path / "case"
    root.mkdir()
    args = [str(a) for a in build(base, root)]
    before = snapshot(root)
    result = CliRunner().invoke(app, args)
    check_refused(result, root, before, expect)


def test_the_corpus_is_large():
    assert len(CASES) >= 60 and len({i for i, _, _ in CASES}) == len(CASES)


# --- what keeps working, and what reaches the terminal -----------------------------------------------

def run_ok(args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.stderr[-600:]
    return result


def test_links_inside_the_named_folder_are_followed(base, tmp_path):
    folder = tmp_path / "pipe"
    (folder / "weights").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    copy(base, folder / "weights", "tdir")
    (folder / "unet").symlink_to(folder / "weights" / "tdir")  # a link, but inside the named folder
    assert "n_tensors: 3" in run_ok(["info", folder]).stdout
    (tmp_path / "named.safetensors").symlink_to(base / "t.safetensors")  # the named path itself may be a link
    assert "n_tensors: 3" in run_ok(["info", tmp_path / "named.safetensors"]).stdout


def test_a_hugging_face_cache_snapshot_is_read(base, tmp_path):
    repo = tmp_path / "hub" / "models--org--model"
    (repo / "blobs").mkdir(parents=True)
    shutil.copy(base / "t.safetensors", repo / "blobs" / "0123abcd")
    (repo / "blobs" / "4567ef").write_text("{}")
    snapshot_folder = repo / "snapshots" / "rev1" / "unet"
    snapshot_folder.mkdir(parents=True)
    (snapshot_folder / "diffusion_pytorch_model.safetensors").symlink_to("../../../blobs/0123abcd")
    (snapshot_folder / "config.json").symlink_to("../../../blobs/4567ef")
    assert "n_tensors: 3" in run_ok(["info", snapshot_folder]).stdout


def test_an_empty_weight_is_skipped_and_counted(tmp_path):
    teacher, student = weights(0), weights(1)
    teacher["mid_block.attentions.0.proj_in.weight"] = student["mid_block.attentions.0.proj_in.weight"] = torch.ones(0, 4)
    save_file(teacher, tmp_path / "t.safetensors")
    save_file(student, tmp_path / "s.safetensors")
    summary = json.loads(run_ok(["compare", tmp_path / "t.safetensors", tmp_path / "s.safetensors", "--json"]).stdout)
    assert summary["n_layers"] == 2 and summary["n_skipped_empty"] == 1
    result = run_ok(["swap", tmp_path / "t.safetensors", tmp_path / "s.safetensors", "--out", tmp_path / "h.safetensors"])
    assert "2 hybrid weights" in " ".join(result.stdout.split())


def test_swap_replaces_a_folder_it_wrote_and_overwrite_replaces_any(base, tmp_path):
    copy(base, tmp_path, "t.safetensors", "sdir")
    args = ["swap", tmp_path / "t.safetensors", tmp_path / "sdir", "--out", tmp_path / "hybrid"]
    run_ok(args)
    run_ok(args)  # its own earlier output: replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    run_ok(args[:-1] + [tmp_path / "mine", "--overwrite"])
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert not list(tmp_path.glob(".*"))  # no staging debris


def hostile_names(tmp_path):
    """A teacher/student pair whose tensor names hold terminal escapes and rich markup."""
    bad = f"down_blocks.0.{ESCAPES}[/][bold red]x.weight"
    teacher = {**weights(0), bad: torch.randn(4, 6), f"up_blocks.0.{ESCAPES}.weight": torch.randn(4, 6)}
    student = {**weights(0), bad: -teacher[bad], f"up_blocks.0.{ESCAPES}.weight": torch.randn(5, 6)}  # the largest change
    save_file(teacher, tmp_path / "t.safetensors")
    save_file(student, tmp_path / "s.safetensors")
    return tmp_path / "t.safetensors", tmp_path / "s.safetensors"


@pytest.mark.parametrize("command", ["compare", "compare-progress", "swap", "info", "compare-out"])
def test_escape_sequences_in_names_never_reach_the_terminal(tmp_path, command):
    teacher, student = hostile_names(tmp_path)
    args = {"compare": ["compare", teacher, student, "--quiet"], "compare-progress": ["compare", teacher, student],
            "swap": ["swap", teacher, student, "--out", tmp_path / f"h{ESCAPES}.safetensors"],
            "info": ["info", teacher], "compare-out": ["compare", teacher, student, "--out", tmp_path / f"o{ESCAPES}"]}
    result = run_ok(args[command])
    for stream in (result.stdout, result.stderr):
        assert "\x1b" not in stream and "\x07" not in stream
    if command == "compare":
        shown = "".join(result.stdout.split())
        assert "\\x1b]0;owned\\x07" in shown  # shown, escaped, as text
        assert "[/][boldred]x.weight" in shown  # brackets are text, not markup


def test_the_html_report_escapes_injected_names(tmp_path):
    names = [f"down_blocks.0.<script>alert(1)</script>.weight", "mid_block.<img src=x onerror=alert(1)>.weight"]
    teacher = {name: torch.randn(4, 6) for name in names}
    student = {name: t + 0.1 * torch.randn(4, 6) for name, t in teacher.items()}
    compare(teacher, student).write(tmp_path / "cmp")
    run_ok(["report", tmp_path / "cmp", "--no-pdf"])
    text = (tmp_path / "cmp" / "report.html").read_text()
    assert "<script>alert" not in text and "<img src=x" not in text and "&lt;script&gt;alert(1)" in text


def test_a_non_finite_layer_gets_no_spectrum(tmp_path):
    teacher, student = weights(0), weights(1)
    student["down_blocks.0.attentions.0.proj_in.weight"][0, 0] = float("nan")
    save_file(teacher, tmp_path / "t.safetensors")
    save_file(student, tmp_path / "s.safetensors")
    summary = json.loads(run_ok(["compare", tmp_path / "t.safetensors", tmp_path / "s.safetensors", "--json",
                                 "--spectrum", "--lorad-fit"]).stdout)
    assert summary["nonfinite_layers"] == ["down_blocks.0.attentions.0.proj_in.weight"]
    assert summary["residual_energy_top30_mean"] is not None  # from the finite layer
