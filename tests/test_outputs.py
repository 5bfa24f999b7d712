"""The output-path policy: an --out never is, contains or lies inside an input, never follows a link,
never replaces a folder the tool did not write, and appears only when complete."""

import pytest

from wadi_analysis.errors import UserError
from wadi_analysis.outputs import check_output, staged_folder


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "file.txt").write_text("a file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    return tmp_path


@pytest.mark.parametrize("out, folder, message", [
    ("input", True, "is the input"),
    ("input/model.safetensors", False, "lies inside the input"),
    ("input/sub", True, "lies inside the input"),
    (".", True, "contains the input"),
    ("link", True, "symbolic link"),
    ("file.txt/x", True, "is a file, not a folder"),
    ("file.txt", True, "a folder is needed"),
    ("mine", False, "a file is needed"),
])
def test_refused_outputs(tree, out, folder, message):
    with pytest.raises(UserError, match=message):
        check_output(tree / out, [tree / "input"], folder=folder)


def test_a_folder_is_replaced_only_when_empty_ours_or_overwrite(tree):
    with pytest.raises(UserError, match="--overwrite"):
        check_output(tree / "mine", folder=True, replace=True)
    assert check_output(tree / "mine", folder=True, replace=True, overwrite=True) == tree / "mine"
    assert check_output(tree / "mine", folder=True, replace=True, ours=lambda p: (p / "notes.txt").is_file())
    (tree / "empty").mkdir()
    assert check_output(tree / "empty", folder=True, replace=True)
    assert check_output(tree / "mine", folder=True)  # written into, not replaced


def test_staged_folder_appears_whole_or_not_at_all(tree):
    with pytest.raises(RuntimeError):
        with staged_folder(tree / "mine") as stage:
            (stage / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert [p.name for p in (tree / "mine").iterdir()] == ["notes.txt"]
    assert not list(tree.glob(".mine*"))
    with staged_folder(tree / "new") as stage:
        (stage / "done.txt").write_text("done")
        assert not (tree / "new").exists()
    assert (tree / "new" / "done.txt").read_text() == "done" and not list(tree.glob(".new*"))
