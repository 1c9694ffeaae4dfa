"""camtl.data against bad and hostile input: task spec paths and names, tasks.json validation, reader errors
naming file:line, and sizes that are too small for tokenization or collation."""

import json
import os
import re

import pytest

from camtl.data import (GLUE_TASKS, DataFormatError, DynamicPaddingCollator, Example, MultiTaskDataset, TaskSpec,
                        check_safe_name, encode_examples, eval_datasets, load_task_specs, read_examples, toy)
from test_data import tokenizer, write  # noqa: F401  (tokenizer: a fixture)


BASE = {"name": "x", "text_columns": [0], "label_column": 1, "num_labels": 2, "files": {"train": "x/train.tsv"}}
JSONL = {"name": "j", "format": "jsonl", "text_columns": ["a", "b"], "label_column": "y", "num_labels": 1,
         "id_column": "id", "files": {"train": "j/train.jsonl"}}


# ---------------------------------------------------------------------------------------------------------------
# 1. Paths and names from a spec: relative, inside the data directory, safe to name files.

@pytest.mark.parametrize("entry", ["/etc/passwd", "../../x.tsv", "x/../../y.tsv", "..", ".", "", "a/\0.tsv"])
def test_spec_refuses_paths_outside_the_data_dir(entry):
    with pytest.raises(ValueError, match=re.escape(f"task 'x': files['train'] = {entry!r}") + "|"
                       + re.escape(f"task 'x': files['train'] must be a non-empty")):
        TaskSpec.from_dict({**BASE, "files": {"train": entry}})
    # Paths that stay inside are fine, written any way.
    assert TaskSpec.from_dict({**BASE, "files": {"train": "x/../x/./train.tsv"}}).files["train"] == \
        "x/../x/./train.tsv"


def test_tasks_json_with_a_hostile_path_names_the_file(tmp_path):
    path = tmp_path / "tasks.json"
    path.write_text(json.dumps([{**BASE, "files": {"train": "/etc/passwd"}}]))
    with pytest.raises(ValueError, match=re.escape(f"{path}: task spec #0: task 'x': files['train'] = "
                                                   f"'/etc/passwd' must be a file path relative to the data")):
        load_task_specs(path)


def test_path_refuses_a_symlink_leading_out_of_the_data_dir(tmp_path):
    outside = tmp_path / "outside"
    write(outside, "train.tsv", "s\tl\nsecret\t1\n")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.symlink(outside, data_dir / "x")
    spec = TaskSpec.from_dict(BASE)
    root = os.path.realpath(data_dir)
    with pytest.raises(ValueError, match=re.escape(f"task 'x': files['train'] = 'x/train.tsv' resolves to "
                                                   f"{str(outside / 'train.tsv')!r}, outside the data directory "
                                                   f"{root!r}")):
        read_examples(spec, data_dir, "train")
    # A symlink that stays inside the data directory is followed.
    os.remove(data_dir / "x")
    write(data_dir, "real/train.tsv", "s\tl\nfine\t1\n")
    os.symlink(data_dir / "real", data_dir / "x")
    assert [(e.text_a, e.label) for e in read_examples(spec, data_dir, "train")] == [("fine", 1)]


def test_path_checks_even_a_spec_changed_after_validation(tmp_path):
    spec = TaskSpec.from_dict(BASE)
    object.__setattr__(spec, "files", {"train": "/etc/passwd"})  # past __post_init__
    with pytest.raises(ValueError, match=re.escape("outside the data directory")):
        spec.path(tmp_path, "train")
    object.__setattr__(spec, "files", {"train": "../x.tsv"})
    with pytest.raises(ValueError, match=re.escape(f"outside the data directory {os.path.realpath(tmp_path)!r}")):
        spec.path(tmp_path, "train")


def test_check_safe_name():
    for good in ["cola", "sts-b", "mnli-mm", "same-subject", "SST-2", "dev_mismatched", "a.b", "7"]:
        assert check_safe_name("task name", good) == good
    for bad in ["", "../x", "a/b", "a\\b", ".hidden", "-x", "a..b", "x y", "x\n", "é", "a" * 101]:
        with pytest.raises(ValueError, match=re.escape(f"task name {bad!r} is not a safe name")):
            check_safe_name("task name", bad)
    with pytest.raises(ValueError, match="split name must be a string, got int 5"):
        check_safe_name("split name", 5)
    for spec in list(GLUE_TASKS.values()) + toy.specs():
        check_safe_name("task name", spec.name)


@pytest.mark.parametrize("change,message", [
    ({"name": "../../pwn"}, "task name '../../pwn' is not a safe name"),
    ({"name": "a/b"}, "task name 'a/b' is not a safe name"),
    ({"name": 3}, "task name must be a string, got int 3"),
    ({"files": {"../t": "x/train.tsv"}}, "task 'x': split name '../t' is not a safe name"),
    ({"files": {"train": "x/train.tsv", "test": "x/test.tsv"}, "test_splits": {"../../out": "test"}},
     "task 'x': test_splits: prediction name '../../out' is not a safe name"),
    ({"files": {"train": "x/train.tsv", "dev": "x/dev.tsv"}, "eval_splits": {"ok": "dev/x"}},
     "task 'x': eval_splits['ok']: split name 'dev/x' is not a safe name"),
    ({"files": {"train": "x/train.tsv", "dev": "x/dev.tsv"}, "eval_splits": {"a b": "dev"}},
     "task 'x': eval_splits: evaluation name 'a b' is not a safe name"),
])
def test_spec_names_must_be_safe(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        TaskSpec.from_dict({**BASE, **change})


# ---------------------------------------------------------------------------------------------------------------
# 2. tasks.json: every error names the file.

@pytest.mark.parametrize("text,message", [
    ('[{"name": "x",\n  "num_labels": 2,]', ":2:19: invalid JSON: "),
    ("[1]", ": task spec #0 is int 1, expected a JSON object"),
    ('{"name": "x"}', ": expected a non-empty JSON list of task specs (objects), got dict"),
    ("[]", ": expected a non-empty JSON list"),
    (json.dumps([{**BASE, "files": "x/train.tsv"}]), ": task spec #0: task 'x': files must be an object mapping"),
    (json.dumps([{**BASE, "files": ["x/train.tsv"]}]), ": task spec #0: task 'x': files must be an object"),
    (json.dumps([{**BASE, "colums": [0]}]), ": task spec #0: unknown task spec keys ['colums']"),
    (json.dumps([{k: v for k, v in BASE.items() if k != "label_column"}]), ": task spec #0: task spec 'x' lacks "
                                                                           "['label_column']"),
    (json.dumps([{**BASE, "labels": "01"}]), ": task spec #0: task 'x': labels must be a list of 2 label "
                                             "strings, got str '01'"),
    (json.dumps([{**BASE, "labels": ["1", "1"]}]), "task 'x': labels must be 2 distinct strings"),
    (json.dumps([{**BASE, "labels": [0, 1]}]), "task 'x': labels are the strings found in the files"),
    (json.dumps([{**BASE, "skip_header": "false"}]), "task 'x': skip_header must be true or false, got str"),
    (json.dumps([{**BASE, "num_columns": "4"}]), "task 'x': num_columns must be an int >= 1 or null, got str"),
    (json.dumps([{**BASE, "num_columns": 0}]), "task 'x': num_columns must be an int >= 1 or null, got 0"),
    (json.dumps([{**BASE, "num_labels": 2.0}]), "task 'x': num_labels must be an int >= 1"),
    (json.dumps([{**BASE, "metric": ["accuracy"]}]), "task 'x': metric must be one of"),
    (json.dumps([{**BASE, "format": ["tsv"]}]), "task 'x': format must be one of"),
    (json.dumps([{**BASE, "text_columns": {"a": 0}}]), "task 'x': text_columns must be a column or a list"),
    (json.dumps([{**BASE, "eval_splits": ["train"]}]), "task 'x': eval_splits must be an object mapping"),
    (json.dumps([{**BASE, "test_layout": {"text_columns": [0], "idcol": 0}}]),
     "task 'x': unknown test_layout keys ['idcol']"),
    (json.dumps([{**BASE, "test_layout": {"text_columns": [0], "skip_header": 1}}]),
     "task 'x': test_layout.skip_header must be true or false, got int 1"),
    (json.dumps([{**BASE, "test_layout": [0]}]), "task 'x': test_layout must be an object"),
    ('[{"name": "x", "name": "y"}]', ": duplicate keys ['name'] in a JSON object"),
    (json.dumps([BASE, BASE]), ": task names ['x'] appear more than once"),
])
def test_tasks_json_errors_name_the_file(tmp_path, text, message):
    path = tmp_path / "tasks.json"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_task_specs(path)
    assert str(info.value).startswith(str(path)), str(info.value)
    assert message in str(info.value)


def test_tasks_json_invalid_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "tasks.json"
    path.write_bytes(b'[{"name": "x",\n "labels": ["caf\xe9"]}]')
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: invalid UTF-8 (byte 0xe9")):
        load_task_specs(path)


def test_labels_given_as_a_string_raise_in_python_too():
    with pytest.raises(ValueError, match=re.escape("labels must be a list of 2 label strings, got str '01'")):
        TaskSpec(name="x", text_columns=(0,), label_column=1, num_labels=2, files={"train": "t.tsv"}, labels="01")


# ---------------------------------------------------------------------------------------------------------------
# 3. Readers: errors name file:line.

def _raises_at(spec, root, split, path, lineno, message):
    with pytest.raises(DataFormatError, match=re.escape(message)) as info:
        read_examples(spec, root, split)
    assert (info.value.path, info.value.lineno) == (path, lineno)
    assert str(info.value).startswith(f"{path}:{lineno}: ")


def test_invalid_utf8_names_file_and_line(tmp_path):
    spec = TaskSpec.from_dict(BASE)
    path = write(tmp_path, "x/train.tsv", b"s\tl\ngood\t1\nbad \xff here\t0\n")
    _raises_at(spec, tmp_path, "train", path, 3, "invalid UTF-8: byte 0xff at column 5")
    path = write(tmp_path, "j/train.jsonl", b'{"a": "x", "b": "y", "y": 1, "id": 1}\n\n{"a": "\xc3(", "b": "y"}\n')
    _raises_at(TaskSpec.from_dict(JSONL), tmp_path, "train", path, 3, "invalid UTF-8: byte 0xc3 at column 8")
    # A byte-order mark is still tolerated, and non-ASCII UTF-8 reads as is.
    write(tmp_path, "x/train.tsv", "\ufeffs\tl\ncafé\t1\n")
    assert [(e.text_a, e.label) for e in read_examples(spec, tmp_path, "train")] == [("café", 1)]


@pytest.mark.parametrize("content,lineno,message", [
    ("s\tl\nfine\t1\n\t0\n", 3, "text column 0 is empty ('')"),
    ("s\tl\n  \t0\n", 2, "text column 0 is empty ('  ')"),
])
def test_empty_texts_raise_in_tsv(tmp_path, content, lineno, message):
    path = write(tmp_path, "x/train.tsv", content)
    _raises_at(TaskSpec.from_dict(BASE), tmp_path, "train", path, lineno, message)


@pytest.mark.parametrize("line,message", [
    ('{"a": "", "b": "y", "y": 1, "id": 2}', "text column 'a' is empty ('')"),
    ('{"a": "x", "b": " \\t", "y": 1, "id": 2}', "text column 'b' is empty (' \\t')"),
    ('{"a": "x", "b": "y", "y": NaN, "id": 2}', "regression label nan is not finite"),
    ('{"a": "x", "b": "y", "y": "inf", "id": 2}', "regression label 'inf' is not finite"),
    ('{"a": "x", "b": "y", "y": -Infinity, "id": 2}', "regression label -inf is not finite"),
    ('{"a": "x", "b": "y", "y": "3,5", "id": 2}', "regression label '3,5' is not a number"),
    ('{"a": "x", "b": "y", "y": null, "id": 2}', "regression label None is not a number"),
    ('{"a": "x", "b": "y", "y": 1, "id": "a\\tb"}', "id column 'id' holds 'a\\tb'"),
    ('{"a": "x", "b": "y", "y": 1, "id": ""}', "id column 'id' holds ''"),
    ('{"a": "x", "b": "y", "y": 1, "id": [2]}', "id column 'id' is list"),
])
def test_bad_jsonl_values_raise_with_file_and_line(tmp_path, line, message):
    path = write(tmp_path, "j/train.jsonl", '{"a": "x", "b": "y", "y": 1.5, "id": 1}\n' + line + "\n")
    _raises_at(TaskSpec.from_dict(JSONL), tmp_path, "train", path, 2, message)


def test_unknown_class_labels_raise_with_file_and_line(tmp_path):
    spec = TaskSpec.from_dict({**JSONL, "num_labels": 2, "labels": ["neg", "pos"], "id_column": None})
    path = write(tmp_path, "j/train.jsonl", '{"a": "x", "b": "y", "y": "pos"}\n{"a": "x", "b": "y", "y": 1}\n')
    _raises_at(spec, tmp_path, "train", path, 2, "unknown label 1 for task 'j'; expected one of ['neg', 'pos']")
    path = write(tmp_path, "x/train.tsv", "s\tl\nfine\t1\nfine\t2\n")
    _raises_at(TaskSpec.from_dict(BASE), tmp_path, "train", path, 3, "unknown label '2' for task 'x'")


def test_a_header_only_file_is_empty_and_training_refuses_it(tmp_path, tokenizer):
    spec = TaskSpec.from_dict({**BASE, "files": {"train": "x/train.tsv", "dev": "x/dev.tsv"}})
    write(tmp_path, "x/train.tsv", "s\tl\n")
    write(tmp_path, "x/dev.tsv", "s\tl\n\n")
    assert read_examples(spec, tmp_path, "train") == [] == read_examples(spec, tmp_path, "dev")
    with pytest.raises(ValueError, match=re.escape(f"task 'x': {os.path.join(tmp_path, 'x/train.tsv')} has no "
                                                   f"example (split 'train')")):
        MultiTaskDataset.from_specs([spec], tmp_path, "train", tokenizer, 16)
    assert len(eval_datasets([spec], tmp_path, tokenizer, 16)["x"]) == 0  # evaluation reports it


# ---------------------------------------------------------------------------------------------------------------
# 4. Sizes: max_seq_length, chunk, collator arguments and items.

@pytest.mark.parametrize("max_len,pair,message", [
    (0, False, "max_seq_length must be an int >= 1, got 0"),
    (-3, True, "max_seq_length must be an int >= 1, got -3"),
    (True, False, "max_seq_length must be an int >= 1, got True"),
    (16.0, False, "max_seq_length must be an int >= 1, got 16.0"),
    (2, False, "max_seq_length=2 is too small: a single example needs 2 special tokens and 1 token per text, "
               "max_seq_length >= 3"),
    (4, True, "max_seq_length=4 is too small: a pair example needs 3 special tokens and 1 token per text, "
              "max_seq_length >= 5"),
])
def test_encode_refuses_a_max_seq_length_without_room_for_text(tokenizer, max_len, pair, message):
    example = Example("e", "the cat sat on the mat", "a dog ran" if pair else None, 0)
    with pytest.raises(ValueError, match=re.escape(message)):
        encode_examples([example], tokenizer, max_len)


def test_encode_at_the_smallest_lengths_keeps_a_token_of_each_text(tokenizer):
    enc = encode_examples([Example("s", "the cat sat", None, 0)], tokenizer, 3)
    assert enc.get(0)[0].tolist() == [tokenizer.cls_token_id, tokenizer.convert_tokens_to_ids("the"),
                                      tokenizer.sep_token_id]
    ids, types = encode_examples([Example("p", "the cat sat", "a dog ran", 0)], tokenizer, 5).get(0)
    assert ids.tolist() == [tokenizer.cls_token_id, tokenizer.convert_tokens_to_ids("the"), tokenizer.sep_token_id,
                            tokenizer.convert_tokens_to_ids("a"), tokenizer.sep_token_id]
    assert types.tolist() == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="chunk must be an int >= 1, got 0"):
        encode_examples([Example("s", "the cat sat", None, 0)], tokenizer, 8, chunk=0)


@pytest.mark.parametrize("text_a,text_b", [("\u200b", None), ("the cat", "\u200b\u200b")])
def test_a_text_without_tokens_raises(tokenizer, text_a, text_b):
    # Zero-width spaces are not whitespace to str.strip, but the tokenizer drops them.
    with pytest.raises(ValueError, match=re.escape("example 'z': a text gives no token")):
        encode_examples([Example("ok", "the dog", text_b and "a cat", 1), Example("z", text_a, text_b, 0)],
                        tokenizer, 16)


def _item(n):
    return {"input_ids": list(range(3, 3 + n)), "token_type_ids": [0] * n, "attention_mask": [1] * n, "label": 1,
            "task_id": 0}


@pytest.mark.parametrize("kwargs,message", [
    ({"max_seq_length": 0}, "max_seq_length must be an int >= 1, got 0"),
    ({"max_seq_length": -8}, "max_seq_length must be an int >= 1, got -8"),
    ({"pad_to_multiple_of": 0}, "pad_to_multiple_of must be an int >= 1, got 0"),
    ({"pad_to_multiple_of": -4}, "pad_to_multiple_of must be an int >= 1, got -4"),
    ({"pad_token_id": -1}, "pad_token_id must be an int >= 0, got -1"),
    ({"pad_token_id": 1.5}, "pad_token_id must be an int >= 0, got 1.5"),
])
def test_collator_refuses_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DynamicPaddingCollator(**{"pad_token_id": 0, "max_seq_length": 8, **kwargs})


def test_collator_refuses_empty_and_ragged_items():
    collate = DynamicPaddingCollator(0, 8)
    with pytest.raises(ValueError, match=re.escape("an item has no tokens")):
        collate([_item(3), _item(0)])
    ragged = {**_item(4), "attention_mask": [1] * 3}
    with pytest.raises(ValueError, match=re.escape("differ in length: 4, 4, 3")):
        collate([_item(3), ragged])
