"""How commands write: atomically, and only over what they wrote (``padst_compiler.outputs``)."""

import os

import pytest

from padst_compiler import outputs
from padst_compiler.outputs import MARKER, PathError


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), outputs.atomic_open(path) as file:
        file.write("half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]


def test_a_written_file_has_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        path = outputs.write_json(tmp_path / "a.json", {"x": 1})
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644 and outputs.read_json(path) == {"x": 1}


@pytest.mark.parametrize("make,message", [
    (lambda path: path.write_text('{"rows": [1, '), "is not valid JSON (Expecting value, line 1 column 14)"),
    (lambda path: path.write_bytes(b"\xff{}"), "is not a UTF-8 text file"),
    (lambda path: path.mkdir(), "is a directory, not a file"),
    (lambda path: None, "no such file"),
])
def test_reading_a_bad_file_names_it_in_one_line(make, message, tmp_path):
    path = tmp_path / "in.json"
    make(path)
    with pytest.raises(PathError, match="in.json") as error:
        outputs.read_json(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_json_result_is_told_by_its_keys():
    recognise = outputs.json_with_keys(["rows", "tokens"])
    assert recognise('{"tokens": 1, "rows": []}') and recognise('[{"tokens": 1, "rows": []}]')
    assert not any(map(recognise, ['{"tokens": 1}', '{"tokens": 1, "rows": [], "mine": 0}', "[]", "[1]", '{"tok']))


def test_an_output_file_is_refused_unless_it_is_missing_or_an_earlier_result(tmp_path):
    ours = outputs.json_with_keys(["rows"])
    outputs.check_file(tmp_path / "new.json", "a result", ours)
    (tmp_path / "earlier.json").write_text('{"rows": []}')
    outputs.check_file(tmp_path / "earlier.json", "a result", ours)
    (tmp_path / "mine.json").write_text('{"mine": []}')
    with pytest.raises(PathError, match="mine.json exists and is not a result"):
        outputs.check_file(tmp_path / "mine.json", "a result", ours)
    with pytest.raises(PathError, match="is a directory"):
        outputs.check_file(tmp_path, "a result", ours)


def test_a_new_or_empty_folder_is_claimed_and_marked(tmp_path):
    new = outputs.claim_directory(tmp_path / "a" / "b", "padst demo", ["results.json"])
    assert (new / MARKER).read_text() == "padst demo\n"
    (tmp_path / "empty").mkdir()
    outputs.claim_directory(tmp_path / "empty", "padst demo", ["results.json"])
    assert os.listdir(tmp_path / "empty") == [MARKER]
    (new / "results.json").write_text("{}")
    (new / ".results.json.0123abcd.padst-tmp").write_text("{")  # a killed write's leftover
    assert outputs.claim_directory(new, "padst demo", ["results.json"]) == new


@pytest.mark.parametrize("files,message", [
    ({MARKER: "padst demo\n", "results.json": "{}", "mine.txt": ""}, "holds mine.txt, which padst demo does not"),
    ({MARKER: "padst bench accuracy\n"}, "was written by 'padst bench accuracy', not by padst demo"),
    ({"results.json": "{}"}, "is not empty and was not written by padst demo"),
])
def test_a_folder_holding_what_the_command_did_not_write_is_refused_untouched(files, message, tmp_path):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    with pytest.raises(PathError, match=message):
        outputs.claim_directory(tmp_path, "padst demo", ["results.json"])
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before


def test_a_folder_from_before_markers_is_adopted_when_the_command_recognises_it(tmp_path):
    (tmp_path / "runs.jsonl").write_text("")
    outputs.claim_directory(tmp_path, "padst bench accuracy", ["runs.jsonl"], adopt=lambda names: "runs.jsonl" in names)
    assert os.listdir(tmp_path) == ["runs.jsonl"]  # adopted as it is, not marked
