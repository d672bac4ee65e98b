"""adaptools.jsonio (the one JSON reader for untrusted files) and adaptools.names (plain file names)."""
from __future__ import annotations

import json
import os
import threading

import pytest

from adaptools import AdapterFormatError, BaseMismatchError
from adaptools.jsonio import (
    MAX_JSON_DEPTH,
    boolean,
    check_fields,
    finite_number,
    json_depth,
    mapping_of,
    parse_json,
    positive_int,
    positive_number,
    read_json_object,
    string_or_strings,
)
from adaptools.names import plain_name


def parse(text):
    return parse_json(text, "x.json", AdapterFormatError)


@pytest.mark.parametrize("text, depth", [
    ("{}", 1), ("[[1], {\"a\": [2]}]", 3), ('"[[[["', 0), ('["\\"[[[", "\\\\", [1]]', 2),
    ('{"a\\\\": [[]]}', 3), ("1", 0),
])
def test_depth_counts_brackets_outside_strings(text, depth):
    assert json_depth(text) == depth
    json.loads(text)  # the cases are valid JSON


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"a":' * 5000 + "1" + "}" * 5000, "[" * 100_000])
def test_deep_nesting_is_a_typed_error_not_a_recursion_error(text):
    with pytest.raises(AdapterFormatError, match=f"nested more than {MAX_JSON_DEPTH} levels deep"):
        parse(text)


def test_nesting_up_to_the_cap_and_brackets_in_strings_are_fine():
    assert parse("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH) == eval("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)
    text = json.dumps({"s": "[" * 10_000, "t": 'quote " and backslash \\ ' + "{" * 500})
    assert parse(text) == json.loads(text)


@pytest.mark.parametrize("text, fragment", [
    ('{"a": NaN}', "NaN is not a JSON number"),
    ('[Infinity]', "Infinity is not a JSON number"),
    ('[-Infinity]', "-Infinity is not a JSON number"),
    ('[1e400]', "the number 1e400 is out of range"),
    ('[-1.5e999]', "out of range"),
    ("[" + "9" * 5000 + "]", "not valid JSON"),
    ('["\\ud800"]', "lone surrogate"),
    ('{"\\udfff": 1}', "lone surrogate"),
    ('{"a": 1', "not valid JSON"),
])
def test_refused_json(text, fragment):
    with pytest.raises(AdapterFormatError, match=fragment):
        parse(text)


def test_accepted_json_keeps_numbers_and_unicode():
    assert parse('{"a": 1.5, "b": -0.0, "c": 10, "e": "\\ud83d\\ude00 é"}') == {"a": 1.5, "b": -0.0, "c": 10, "e": "😀 é"}
    assert parse(b'{"x": "\xc3\xa9"}') == {"x": "é"}


def test_bytes_must_be_utf8():
    with pytest.raises(AdapterFormatError, match="not UTF-8"):
        parse(b'{"x": "\xff"}')


def test_read_json_object_refuses_folders_pipes_missing_and_large_files(tmp_path, monkeypatch):
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(BaseMismatchError, match="is a folder"):
        read_json_object(tmp_path / "dir.json", BaseMismatchError)
    with pytest.raises(BaseMismatchError, match="cannot be read"):
        read_json_object(tmp_path / "missing.json", BaseMismatchError)
    os.mkfifo(tmp_path / "fifo.json")
    outcome = []
    reader = threading.Thread(target=lambda: outcome.append(pytest.raises(BaseMismatchError, read_json_object,
                                                                        tmp_path / "fifo.json", BaseMismatchError)))
    reader.start()
    reader.join(10)
    assert not reader.is_alive() and "not a regular file" in str(outcome[0].value)  # refused, never blocked
    (tmp_path / "big.json").write_text(json.dumps({"a": "x" * 200}))
    monkeypatch.setattr("adaptools.jsonio.MAX_JSON_BYTES", 100)
    with pytest.raises(BaseMismatchError, match="larger than adaptools' limit"):
        read_json_object(tmp_path / "big.json", BaseMismatchError)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(BaseMismatchError, match="does not hold a JSON object"):
        read_json_object(tmp_path / "list.json", BaseMismatchError)


@pytest.mark.parametrize("check, good, bad", [
    (positive_int, [1, 8, 2**40], [0, -1, True, False, 8.0, 8.5, "8", None, [8]]),
    (finite_number, [0, -2, 1.5, 16], [True, "16", None, float("nan"), float("inf")]),
    (positive_number, [0.5, 2], [0, -1, True, float("inf")]),
    (boolean, [True, False], ["yes", "true", 1, 0, None]),
    (string_or_strings, ["q_proj", [], ["q_proj", "v_proj"]], [5, None, ["q_proj", 5], {"q": 1}]),
    (mapping_of(positive_int), [{}, {"q": 2}], [[], {"q": 0}, {"q": "2"}, None]),
])
def test_field_checks(check, good, bad):
    for value in good:
        assert check(value, "k", "c.json", AdapterFormatError) == value
    for value in bad:
        with pytest.raises(AdapterFormatError, match=r"'c.json': .*k.* must be"):
            check(value, "k", "c.json", AdapterFormatError)


def test_check_fields_names_the_key_and_allows_null_where_asked():
    checks = {"r": positive_int, "target_modules": string_or_strings}
    check_fields({"r": 4, "target_modules": None, "other": object()}, checks, "c.json", AdapterFormatError,
                 nullable=("target_modules",))
    with pytest.raises(AdapterFormatError, match="'r' must be a positive integer, got None"):
        check_fields({"r": None}, checks, "c.json", AdapterFormatError, nullable=("target_modules",))


@pytest.mark.parametrize("name", ["model.safetensors", "model-00001-of-00002.safetensors", "a..b", ".hidden", "é ü"])
def test_plain_names(name):
    assert plain_name(name, "shard", BaseMismatchError) == name


@pytest.mark.parametrize("name, why", [
    ("../victim/x.safetensors", "path separator"), ("/etc/passwd", "path separator"), ("a/b", "path separator"),
    ("..\\x.safetensors", "path separator"), ("..", "names a folder"), (".", "names a folder"), ("", "empty"),
    ("a\x00b", "control character"), ("a\nb", "control character"), ("C:x.safetensors", "drive or root"),
    ("\ud800.safetensors", "not valid Unicode"),
])
def test_names_that_are_paths_are_refused(name, why):
    with pytest.raises(BaseMismatchError, match=why):
        plain_name(name, "shard", BaseMismatchError)


@pytest.mark.parametrize("value", [5, None, ["a"], {"a": 1}])
def test_a_name_must_be_a_string(value):
    with pytest.raises(BaseMismatchError, match="must be a file name"):
        plain_name(value, "shard", BaseMismatchError)
