"""Task specifications: where a task's files are, which columns hold the texts and the label, and how it is scored.

A :class:`TaskSpec` describes one task (one head of the model). Its ``files`` map split names to paths relative
to the data directory; a path that is absolute or leads out of the data directory (``..``, or a symlink
resolving elsewhere) is refused, since specs may come from a downloaded model folder. Task, split and
evaluation names are safe file-name parts (:func:`check_safe_name`), so they may name output files.

Labeled splits are read with the spec's own columns; the splits named in ``test_splits`` are unlabeled (GLUE
test files) and are read with ``test_layout``, which gives an example id column instead of a label.

Columns are 0-based positions for TSV files (negative counts from the end: -1 is the last column), or header
names for TSV files with a header, or keys for JSONL files.

The GLUE specs follow the standard GLUE folder layout (``download_glue_data.py``)::

    <data_dir>/CoLA/{train,dev,test}.tsv      <data_dir>/MNLI/{train,dev_matched,dev_mismatched,
    <data_dir>/SST-2/...  MRPC/...  STS-B/...                  test_matched,test_mismatched}.tsv
    <data_dir>/QQP/...  QNLI/...  RTE/...  WNLI/...

A user task comes from a dict (or a JSON file of a list of dicts)::

    {"name": "reviews", "format": "jsonl", "text_columns": ["title", "body"], "label_column": "stars",
     "num_labels": 3, "labels": ["bad", "ok", "good"],
     "files": {"train": "reviews/train.jsonl", "dev": "reviews/dev.jsonl"}}
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping, Optional, Sequence, Tuple, Union

Column = Union[int, str]

#: Metric names a spec may give, and the keys ``compute_metrics`` returns for each.
METRIC_NAMES = {
    "accuracy": ("accuracy",),
    "mcc": ("mcc",),
    "f1_accuracy": ("f1", "accuracy"),
    "pearson_spearman": ("pearson", "spearman"),
}

FORMATS = ("tsv", "jsonl")

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SAFE_NAME_MAX = 100


def check_safe_name(kind: str, value) -> str:
    """``value`` if it is a safe file-name part (letters, digits, ``.``, ``_``, ``-``; starting with a letter or
    digit; no ``..``; at most 100 characters), else a ValueError naming ``kind`` (e.g. ``"task name"``).

    Task, split and evaluation names pass this check, so output files may be named after them."""
    if not isinstance(value, str):
        raise ValueError(f"{kind} must be a string, got {type(value).__name__} {value!r}")
    if not _SAFE_NAME.fullmatch(value) or ".." in value or len(value) > _SAFE_NAME_MAX:
        raise ValueError(f"{kind} {value!r} is not a safe name: use letters, digits, '.', '_' and '-', starting "
                         f"with a letter or digit, without '..', at most {_SAFE_NAME_MAX} characters")
    return value


def _check_relative_path(value, what, entry) -> str:
    """A spec's file entry: a non-empty relative path that stays inside the data directory (lexically; symlinks
    are checked when the path is resolved against a real directory, in :meth:`TaskSpec.path`)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what}: files[{entry!r}] must be a non-empty path string, got {value!r}")
    if "\0" in value:
        raise ValueError(f"{what}: files[{entry!r}] = {value!r} holds a NUL character")
    norm = os.path.normpath(value)
    if os.path.isabs(value) or norm == os.curdir or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        raise ValueError(f"{what}: files[{entry!r}] = {value!r} must be a file path relative to the data "
                         f"directory, inside it (no absolute path, no '..' leading out)")
    return value


def _check_type(value, types, what, expected):
    types = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):  # bool is an int, not here
        raise ValueError(f"{what} must be {expected}, got {type(value).__name__} {value!r}")
    return value


def _name_map(value, what, key_kind, value_kind) -> dict:
    """A mapping of safe names to safe names (``eval_splits``, ``test_splits``)."""
    _check_type(value, Mapping, what, "an object mapping names to split names")
    return {check_safe_name(f"{what}: {key_kind}", k): check_safe_name(f"{what}[{k!r}]: {value_kind}", v)
            for k, v in value.items()}


def _columns(value, what) -> Tuple[Column, ...]:
    if isinstance(value, (int, str)):
        cols = (value,)
    elif isinstance(value, (list, tuple)):
        cols = tuple(value)
    else:
        raise ValueError(f"{what}: text_columns must be a column or a list of 1 or 2 columns, got "
                         f"{type(value).__name__} {value!r}")
    if not 1 <= len(cols) <= 2:
        raise ValueError(f"{what}: 1 or 2 text columns, got {list(cols)}")
    return cols


def _check_column(col, fmt, header, what):
    if isinstance(col, bool) or not isinstance(col, (int, str)):
        raise ValueError(f"{what}: a column is an int position or a str name, got {col!r}")
    if fmt == "jsonl" and not isinstance(col, str):
        raise ValueError(f"{what}: JSONL columns are keys (str), got {col!r}")
    if fmt == "tsv" and isinstance(col, str) and not header:
        raise ValueError(f"{what}: TSV column {col!r} is named, which needs skip_header=True (a header line)")


@dataclass(frozen=True)
class TestLayout:
    """Columns of the unlabeled (test) splits, whose files differ from train/dev in GLUE.

    ``id_column`` holds the example id written to prediction files (GLUE: ``index``); ``None`` uses the
    line number. ``num_columns``: TSV rows must have exactly this many fields (``None``: as many as the header,
    or, without a header, at least enough for the columns used).
    """

    __test__ = False  # not a pytest test class, despite the name

    text_columns: Tuple[Column, ...]
    id_column: Optional[Column] = None
    skip_header: bool = True
    num_columns: Optional[int] = None

    def __post_init__(self):
        object.__setattr__(self, "text_columns", _columns(self.text_columns, "test_layout"))
        _check_type(self.skip_header, bool, "test_layout.skip_header", "true or false")
        if self.num_columns is not None and _check_type(self.num_columns, int, "test_layout.num_columns",
                                                        "an int >= 1 or null") < 1:
            raise ValueError(f"test_layout.num_columns must be an int >= 1 or null, got {self.num_columns!r}")

    @classmethod
    def from_dict(cls, d: Mapping, what: str = "test_layout") -> "TestLayout":
        _check_type(d, Mapping, what, "an object")
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ValueError(f"{what}: unknown test_layout keys {unknown}; allowed: {fields}")
        if "text_columns" not in d:
            raise ValueError(f"{what}: test_layout lacks ['text_columns']")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from None


@dataclass(frozen=True)
class TaskSpec:
    """One task: its files, columns, labels and metric.

    - ``text_columns``: 1 column (single sentence) or 2 (sentence pair).
    - ``label_column``: the label's column in the labeled splits.
    - ``num_labels``: number of classes; 1 means regression (float labels, MSE loss).
    - ``labels``: for classification, the label strings as they appear in the files; the i-th string is class
      id i. Defaults to ``"0" .. str(num_labels - 1)``. ``None`` for regression.
    - ``files``: split name -> path relative to the data directory.
    - ``format``: ``"tsv"`` (tab-separated, no quoting, as GLUE) or ``"jsonl"`` (one JSON object per line).
    - ``skip_header``: TSV only; the first line is a header (it also fixes the expected column count).
    - ``num_columns``: TSV only; every row must have exactly this many fields (``None``: as many as the header,
      or, without a header, at least enough for the columns used).
    - ``id_column``: optional example id column of the labeled splits (default: the line number).
    - ``metric``: a key of :data:`METRIC_NAMES`; default ``pearson_spearman`` for regression, else ``accuracy``.
    - ``eval_splits``: evaluation name -> labeled split (default ``{name: "dev"}``); MNLI has two.
    - ``test_splits``: prediction name -> unlabeled split (default ``{name: "test"}`` when there is a test file).
    - ``test_layout``: columns of the unlabeled splits (default: ``text_columns``, ``id_column``, same header).
    """

    name: str
    text_columns: Tuple[Column, ...]
    label_column: Column
    num_labels: int
    files: Mapping[str, str]
    labels: Optional[Tuple[str, ...]] = None
    format: str = "tsv"
    skip_header: bool = True
    num_columns: Optional[int] = None
    id_column: Optional[Column] = None
    metric: Optional[str] = None
    eval_splits: Optional[Mapping[str, str]] = None
    test_splits: Optional[Mapping[str, str]] = None
    test_layout: Optional[TestLayout] = None

    def __post_init__(self):
        set_ = object.__setattr__.__get__(self)  # frozen: normalize fields once, here
        if self.name is None or self.name == "":
            raise ValueError("a task needs a name")
        check_safe_name("task name", self.name)
        what = f"task {self.name!r}"
        if not isinstance(self.format, str) or self.format not in FORMATS:
            raise ValueError(f"{what}: format must be one of {FORMATS}, got {self.format!r}")
        set_("text_columns", _columns(self.text_columns, what))
        if isinstance(self.num_labels, bool) or not isinstance(self.num_labels, int) or self.num_labels < 1:
            raise ValueError(f"{what}: num_labels must be an int >= 1 (1 = regression), got {self.num_labels!r}")
        _check_type(self.skip_header, bool, f"{what}: skip_header", "true or false")
        if self.num_columns is not None and (
                _check_type(self.num_columns, int, f"{what}: num_columns", "an int >= 1 or null") < 1):
            raise ValueError(f"{what}: num_columns must be an int >= 1 or null, got {self.num_columns!r}")
        if self.num_labels == 1:
            if self.labels is not None:
                raise ValueError(f"{what}: a regression task (num_labels=1) has no label list")
        else:
            if self.labels is not None and not isinstance(self.labels, (list, tuple)):
                # a string would be read as its characters: "01" as ("0", "1")
                raise ValueError(f"{what}: labels must be a list of {self.num_labels} label strings, got "
                                 f"{type(self.labels).__name__} {self.labels!r}")
            labels = tuple(str(i) for i in range(self.num_labels)) if self.labels is None else tuple(self.labels)
            if not all(isinstance(x, str) for x in labels):
                raise ValueError(f"{what}: labels are the strings found in the files, got {list(labels)}")
            if len(labels) != self.num_labels or len(set(labels)) != len(labels):
                raise ValueError(f"{what}: labels must be {self.num_labels} distinct strings, got {list(labels)}")
            set_("labels", labels)
        if self.metric is not None and not isinstance(self.metric, str):
            raise ValueError(f"{what}: metric must be one of {sorted(METRIC_NAMES)}, got {self.metric!r}")
        metric = self.metric or ("pearson_spearman" if self.num_labels == 1 else "accuracy")
        if metric not in METRIC_NAMES:
            raise ValueError(f"{what}: metric must be one of {sorted(METRIC_NAMES)}, got {metric!r}")
        if (metric == "pearson_spearman") != (self.num_labels == 1):
            raise ValueError(f"{what}: metric {metric!r} does not fit num_labels={self.num_labels}")
        if metric in ("f1_accuracy", "mcc") and self.num_labels != 2:
            raise ValueError(f"{what}: metric {metric!r} needs 2 classes (positive class id 1)")
        set_("metric", metric)
        _check_type(self.files, Mapping, f"{what}: files", "an object mapping split names to paths")
        if not self.files:
            raise ValueError(f"{what}: files must map at least one split to a path")
        set_("files", MappingProxyType({check_safe_name(f"{what}: split name", k): _check_relative_path(v, what, k)
                                        for k, v in self.files.items()}))
        eval_splits = {self.name: "dev"} if self.eval_splits is None and "dev" in self.files else self.eval_splits
        test_splits = {self.name: "test"} if self.test_splits is None and "test" in self.files else self.test_splits
        set_("eval_splits", MappingProxyType(_name_map({} if eval_splits is None else eval_splits,
                                                       f"{what}: eval_splits", "evaluation name", "split name")))
        set_("test_splits", MappingProxyType(_name_map({} if test_splits is None else test_splits,
                                                       f"{what}: test_splits", "prediction name", "split name")))
        for kind, splits in (("eval_splits", self.eval_splits), ("test_splits", self.test_splits)):
            missing = [s for s in splits.values() if s not in self.files]
            if missing:
                raise ValueError(f"{what}: {kind} name splits {missing} that are not in files {list(self.files)}")
        both = set(self.eval_splits.values()) & set(self.test_splits.values())
        if both:
            raise ValueError(f"{what}: splits {sorted(both)} cannot be both labeled (eval) and unlabeled (test)")
        if self.test_layout is None:
            set_("test_layout", TestLayout(self.text_columns, self.id_column, self.skip_header, self.num_columns))
        elif isinstance(self.test_layout, Mapping):
            set_("test_layout", TestLayout.from_dict(self.test_layout, what))
        elif not isinstance(self.test_layout, TestLayout):
            raise ValueError(f"{what}: test_layout must be an object (a TestLayout), got {self.test_layout!r}")
        for col in (*self.text_columns, self.label_column, *([self.id_column] if self.id_column is not None else [])):
            _check_column(col, self.format, self.skip_header, what)
        t = self.test_layout
        for col in (*t.text_columns, *([t.id_column] if t.id_column is not None else [])):
            _check_column(col, self.format, t.skip_header, f"{what} (test_layout)")

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    def is_test_split(self, split: str) -> bool:
        """Whether ``split`` is read without labels (it is named in ``test_splits``)."""
        return split in self.test_splits.values()

    def path(self, data_dir, split: str) -> str:
        """The file of ``split`` under ``data_dir``. A ValueError if it resolves (symlinks followed) outside
        ``data_dir``: the spec may come from an untrusted tasks.json."""
        if split not in self.files:
            raise KeyError(f"task {self.name!r} has no split {split!r}; it has {list(self.files)}")
        rel = self.files[split]
        path = os.path.join(os.fspath(data_dir), rel)
        root, resolved = os.path.realpath(os.fspath(data_dir)), os.path.realpath(path)
        if os.path.isabs(rel) or resolved == root or os.path.commonpath([root, resolved]) != root:
            raise ValueError(f"task {self.name!r}: files[{split!r}] = {rel!r} resolves to {resolved!r}, outside "
                             f"the data directory {root!r}")
        return path

    @classmethod
    def from_dict(cls, d: Mapping) -> "TaskSpec":
        """A spec from a plain dict (e.g. parsed JSON); lists become tuples, unknown keys are an error."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a task spec is an object (dict), got {type(d).__name__} {d!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields, key=str)
        if unknown:
            raise ValueError(f"unknown task spec keys {unknown}; allowed: {sorted(fields)}")
        missing = [k for k in ("name", "text_columns", "label_column", "num_labels", "files") if k not in d]
        if missing:
            raise ValueError(f"task spec {d.get('name', '?')!r} lacks {missing}")
        return cls(**d)

    def to_dict(self) -> dict:
        """The inverse of :meth:`from_dict` (JSON-serializable)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, TestLayout):
                v = {k: (list(x) if isinstance(x, tuple) else x) for k, x in dataclasses.asdict(v).items()}
            elif isinstance(v, Mapping):
                v = dict(v)
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"duplicate keys {dup} in a JSON object")
    return dict(pairs)


def load_task_specs(path) -> list:
    """TaskSpecs from a JSON file holding a list of spec dicts (see :meth:`TaskSpec.from_dict`).

    Every error is a ValueError whose message starts with the file name (and, for invalid JSON, line:column)."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: invalid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    except ValueError as e:  # a duplicate key
        raise ValueError(f"{path}: {e}") from None
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of task specs (objects), got "
                         f"{json.dumps(data)[:80] if isinstance(data, list) else type(data).__name__}")
    specs = []
    for i, d in enumerate(data):
        if not isinstance(d, dict):
            raise ValueError(f"{path}: task spec #{i} is {type(d).__name__} {json.dumps(d)[:80]}, expected a JSON "
                             f"object")
        try:
            specs.append(TaskSpec.from_dict(d))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: task spec #{i}: {e}") from None
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{path}: task names {dup} appear more than once")
    return specs


def save_task_specs(specs: Sequence[TaskSpec], path) -> None:
    """Write specs as a JSON list that :func:`load_task_specs` reads back."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump([s.to_dict() for s in specs], f, indent=2)
        f.write("\n")


# ---------------------------------------------------------------------------------------------------------------
# GLUE. Column positions are those of the GLUE TSVs (as in transformers' glue processors). Test files carry an
# `index` (QQP: `id`) column first and no label.

def _glue(name, folder, text, label, labels, metric, test_text, skip_header=True, num_columns=None, extra=None):
    files = {"train": f"{folder}/train.tsv", "dev": f"{folder}/dev.tsv", "test": f"{folder}/test.tsv"}
    kw = dict(eval_splits=None, test_splits=None)
    if extra:
        files, kw = extra(folder)
    return TaskSpec(name=name, text_columns=text, label_column=label, num_labels=len(labels) if labels else 1,
                    labels=labels, files=files, format="tsv", skip_header=skip_header, num_columns=num_columns,
                    metric=metric, test_layout=TestLayout(test_text, id_column=0, skip_header=True), **kw)


def _mnli_files(folder):
    files = {"train": f"{folder}/train.tsv", "dev": f"{folder}/dev_matched.tsv",
             "dev_mismatched": f"{folder}/dev_mismatched.tsv", "test": f"{folder}/test_matched.tsv",
             "test_mismatched": f"{folder}/test_mismatched.tsv"}
    return files, dict(eval_splits={"mnli": "dev", "mnli-mm": "dev_mismatched"},
                       test_splits={"mnli": "test", "mnli-mm": "test_mismatched"})


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

#: The GLUE tasks by their (lower-case) names. AX, the diagnostic set, has no training data and is left out.
GLUE_TASKS: Mapping[str, TaskSpec] = MappingProxyType({s.name: s for s in (
    # CoLA train/dev: no header; source, label, original annotation, sentence. Test: index, sentence.
    _glue("cola", "CoLA", (3,), 1, _BINARY, "mcc", (1,), skip_header=False, num_columns=4),
    # sentence, label
    _glue("sst-2", "SST-2", (0,), 1, _BINARY, "accuracy", (1,)),
    # Quality, #1 ID, #2 ID, #1 String, #2 String. Test: index, #1 ID, #2 ID, #1 String, #2 String.
    _glue("mrpc", "MRPC", (3, 4), 0, _BINARY, "f1_accuracy", (3, 4)),
    # index genre filename year old_index source1 source2 sentence1 sentence2 score (test: no score)
    _glue("sts-b", "STS-B", (7, 8), 9, None, "pearson_spearman", (7, 8)),
    # id qid1 qid2 question1 question2 is_duplicate. Test: id, question1, question2.
    _glue("qqp", "QQP", (3, 4), 5, _BINARY, "f1_accuracy", (1, 2)),
    # index promptID pairID genre 4 parses sentence1 sentence2 label1 [label2..label5 in dev] gold_label: the
    # gold label is the last column (train has 12 columns, dev 16). Test: the first 10 columns.
    _glue("mnli", "MNLI", (8, 9), -1, ("contradiction", "entailment", "neutral"), "accuracy", (8, 9),
          extra=_mnli_files),
    # index question sentence label
    _glue("qnli", "QNLI", (1, 2), 3, _NLI2, "accuracy", (1, 2)),
    # index sentence1 sentence2 label
    _glue("rte", "RTE", (1, 2), 3, _NLI2, "accuracy", (1, 2)),
    _glue("wnli", "WNLI", (1, 2), 3, _BINARY, "accuracy", (1, 2)),
)})

#: GLUE leaderboard file name of each prediction name (``TaskSpec.test_splits`` keys).
GLUE_SUBMISSION_FILES: Mapping[str, str] = MappingProxyType({
    "cola": "CoLA.tsv", "sst-2": "SST-2.tsv", "mrpc": "MRPC.tsv", "sts-b": "STS-B.tsv", "qqp": "QQP.tsv",
    "mnli": "MNLI-m.tsv", "mnli-mm": "MNLI-mm.tsv", "qnli": "QNLI.tsv", "rte": "RTE.tsv", "wnli": "WNLI.tsv",
})

_ALIASES = {"sst2": "sst-2", "stsb": "sts-b", "sts": "sts-b", "mnli-m": "mnli"}


def glue_task(name: str) -> TaskSpec:
    """The GLUE spec by name, case-insensitive (``"CoLA"``, ``"STS-B"``/``"stsb"``, ``"mnli"``...).

    ``"mnli-mm"`` is MNLI's mismatched evaluation, not a task of its own: it returns the MNLI spec.
    """
    key = name.lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key == "mnli-mm":
        key = "mnli"
    if key not in GLUE_TASKS:
        raise KeyError(f"unknown GLUE task {name!r}; known: {sorted(GLUE_TASKS)} (and 'mnli-mm')")
    return GLUE_TASKS[key]
