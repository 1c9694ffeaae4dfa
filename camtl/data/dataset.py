"""Reading task files into examples, tokenizing them, and the multi-task dataset and collator.

Files (see :class:`~camtl.data.tasks.TaskSpec` for the columns):

- TSV: UTF-8, one row per line, fields split on tabs with no quoting (GLUE quotes nothing: a ``"`` is text).
  A header line is skipped when ``skip_header``; it also fixes the column count every row must have.
- JSONL: UTF-8, one JSON object per line; text fields are strings, labels are strings or numbers.
- Lines that are empty are skipped (they hold no example). Any other row that cannot be read exactly raises
  :class:`DataFormatError` naming the file and line: bytes that are not UTF-8, a wrong column count, a missing
  key, an empty (or all-whitespace) text, an unknown class label, a regression label that is not a finite
  number, an example id that is empty or holds a tab or line break. Nothing is dropped or relabeled silently.
- A file with no example (only a header) reads as an empty list; :meth:`MultiTaskDataset.from_specs` (the
  training set) refuses a task without examples, evaluation sets may be empty (``len(dataset) == 0``).

Items of :class:`MultiTaskDataset`::

    {"input_ids": [int], "token_type_ids": [int], "attention_mask": [int], "label": int | float | None,
     "task_id": int}

:class:`DynamicPaddingCollator` turns a list of items into a batch::

    {"input_ids": LongTensor[B, L], "attention_mask": LongTensor[B, L], "token_type_ids": LongTensor[B, L],
     "task_id": LongTensor[B], "labels": FloatTensor[B]}   # labels absent for unlabeled (test) items

L is the batch's longest sequence (at most max_seq_length). ``labels`` is float32 for every task, because a
batch may mix classification and regression tasks: class ids are small integers, exact in float32, and the
model casts them per task (``labels[rows].long()`` for cross-entropy, as is for MSE).
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from camtl.data.tasks import TaskSpec


class DataFormatError(ValueError):
    """A task file row that cannot be read; the message starts with ``file:line:``."""

    def __init__(self, path, lineno, problem):
        self.path, self.lineno, self.problem = str(path), lineno, problem
        super().__init__(f"{path}:{lineno}: {problem}")


@dataclass(frozen=True)
class Example:
    """One example. ``label``: class id (int), regression value (float), or None in unlabeled splits.

    ``guid``: the id column's value where the layout has one (GLUE test files: ``index``), else
    ``"<task>-<split>-<line number>"``.
    """

    guid: str
    text_a: str
    text_b: Optional[str]
    label: Union[int, float, None]


# ---------------------------------------------------------------------------------------------------------------
# Reading

def _read_lines(path):
    """(1-based line number, line) without its line ending; splits on "\\n" only, so a stray "\\r" in a text
    never breaks a row. Decoded line by line, so that bytes that are not UTF-8 are reported with their line."""
    with open(path, "rb") as f:  # binary: iteration splits on b"\n" only
        for lineno, raw in enumerate(f, 1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # tolerate a BOM
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataFormatError(path, lineno, f"invalid UTF-8: byte {raw[e.start]:#04x} at column "
                                                    f"{e.start + 1}") from None
            yield lineno, line.rstrip("\n").rstrip("\r")


def _tsv_rows(path, skip_header, num_columns, columns):
    """Yield (lineno, getter) for the data rows; ``getter(col)`` returns a field by position or header name."""
    lines = _read_lines(path)
    header = None
    if skip_header:
        for lineno, line in lines:
            header = line.split("\t")
            break
        if header is None:
            raise DataFormatError(path, 1, "empty file: expected a header line")
    names = {}
    if header is not None:
        names = {name: i for i, name in enumerate(header)}
        for col in columns:
            if isinstance(col, str) and col not in names:
                raise DataFormatError(path, 1, f"column {col!r} is not in the header {header}")
    expected = num_columns if num_columns is not None else (len(header) if header is not None else None)
    positions = [names[c] if isinstance(c, str) else c for c in columns]
    # Without an exact count, a row needs enough fields for every position used (-1 needs one field).
    needed = max([p + 1 if p >= 0 else -p for p in positions], default=0)
    if expected is not None and needed > expected:
        raise DataFormatError(path, 1, f"the layout uses column positions {positions} but rows have "
                                       f"{expected} columns")
    for lineno, line in lines:
        if not line:
            continue
        fields = line.split("\t")
        if expected is not None and len(fields) != expected:
            raise DataFormatError(path, lineno, f"expected {expected} tab-separated columns, found {len(fields)}")
        if len(fields) < needed:
            raise DataFormatError(path, lineno, f"expected at least {needed} tab-separated columns, "
                                                f"found {len(fields)}")
        yield lineno, (lambda col, fields=fields: fields[names[col] if isinstance(col, str) else col])


def _jsonl_rows(path, columns):
    for lineno, line in _read_lines(path):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, lineno, f"invalid JSON: {e}") from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, lineno, f"expected a JSON object, found {type(obj).__name__}")
        missing = [c for c in columns if c not in obj]
        if missing:
            raise DataFormatError(path, lineno, f"missing keys {missing}")
        yield lineno, obj.__getitem__


def _text(value, path, lineno, col):
    if not isinstance(value, str):
        raise DataFormatError(path, lineno, f"text column {col!r} is {type(value).__name__}, expected a string")
    if not value.strip():  # it would train on the special tokens alone
        raise DataFormatError(path, lineno, f"text column {col!r} is empty ({value!r}); fix or remove the row")
    return value


def _guid(value, path, lineno, col):
    """An id column's value; it is written to prediction files, so it is a non-empty one-line TSV field."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataFormatError(path, lineno, f"id column {col!r} is {type(value).__name__}, expected a string or "
                                            f"an integer")
    guid = str(value).strip()
    if not guid or any(c in guid for c in "\t\n\r"):
        raise DataFormatError(path, lineno, f"id column {col!r} holds {value!r}: an id must be non-empty, without "
                                            f"tabs or line breaks")
    return guid


def _label(spec: TaskSpec, value, path, lineno):
    if spec.is_regression:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise DataFormatError(path, lineno, f"regression label {value!r} is not a number")
        try:
            x = float(value)
        except ValueError:
            raise DataFormatError(path, lineno, f"regression label {value!r} is not a number") from None
        if not math.isfinite(x):
            raise DataFormatError(path, lineno, f"regression label {value!r} is not finite")
        return x
    if isinstance(value, bool) or not isinstance(value, (str, int)):  # JSON 1 -> "1"; 1.0 or true is ambiguous
        raise DataFormatError(path, lineno, f"label {value!r} of {type(value).__name__} type; expected one of "
                                            f"{list(spec.labels)}")
    key = str(value).strip()  # surrounding spaces are formatting, not a different label
    try:
        return spec.labels.index(key)
    except ValueError:
        raise DataFormatError(path, lineno, f"unknown label {value!r} for task {spec.name!r}; expected one of "
                                            f"{list(spec.labels)}") from None


def read_examples(spec: TaskSpec, data_dir, split: str) -> List[Example]:
    """Read ``split`` of ``spec`` under ``data_dir``. Splits in ``spec.test_splits`` have no labels."""
    path = spec.path(data_dir, split)
    test = spec.is_test_split(split)
    if test:
        layout = spec.test_layout
        text_cols, label_col, id_col = layout.text_columns, None, layout.id_column
        skip_header, num_columns = layout.skip_header, layout.num_columns
    else:
        text_cols, label_col, id_col = spec.text_columns, spec.label_column, spec.id_column
        skip_header, num_columns = spec.skip_header, spec.num_columns
    columns = [*text_cols, *([label_col] if label_col is not None else []), *([id_col] if id_col is not None else [])]
    try:
        rows = (_tsv_rows(path, skip_header, num_columns, columns) if spec.format == "tsv"
                else _jsonl_rows(path, columns))
        examples = []
        for lineno, get in rows:
            texts = [_text(get(c), path, lineno, c) for c in text_cols]
            label = None if label_col is None else _label(spec, get(label_col), path, lineno)
            guid = (_guid(get(id_col), path, lineno, id_col) if id_col is not None
                    else f"{spec.name}-{split}-{lineno}")
            examples.append(Example(guid, texts[0], texts[1] if len(texts) == 2 else None, label))
    except FileNotFoundError:
        raise FileNotFoundError(f"task {spec.name!r}, split {split!r}: no file {path}") from None
    return examples


# ---------------------------------------------------------------------------------------------------------------
# Tokenization

@dataclass
class Encodings:
    """Token ids of many examples, stored flat (MNLI has 393k): example i is ``[offsets[i], offsets[i+1])``."""

    input_ids: np.ndarray  # int32 [total tokens]
    token_type_ids: np.ndarray  # int8 [total tokens]
    offsets: np.ndarray  # int64 [n + 1]

    def __len__(self):
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i):
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.token_type_ids[a:b]


def _positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _text_runs(special_mask) -> int:
    """How many runs of text (non-special) tokens a sequence has: 1 per text that kept a token."""
    mask = bytes([1, *special_mask])  # C-speed counting: a run starts where a special token is followed by text
    return mask.count(b"\x01\x00")


def encode_examples(examples: Sequence[Example], tokenizer, max_seq_length: int, chunk: int = 2048) -> Encodings:
    """Tokenize with the tokenizer's special tokens, truncated to ``max_seq_length`` (pairs: longest_first).

    ``max_seq_length`` must leave room for at least one token of each text beside the special tokens; an
    example whose text yields no token (say only characters the tokenizer drops) is an error."""
    max_seq_length = _positive_int(max_seq_length, "max_seq_length")
    chunk = _positive_int(chunk, "chunk")
    n = len(examples)
    ids: List[Optional[np.ndarray]] = [None] * n
    types: List[Optional[np.ndarray]] = [None] * n
    pair = np.array([e.text_b is not None for e in examples], dtype=bool)
    # Single sentences and pairs are tokenized in separate calls (a call takes all pairs or none).
    for is_pair in (False, True):
        idx = np.flatnonzero(pair == is_pair)
        if len(idx) == 0:
            continue
        num_texts = 2 if is_pair else 1
        needed = tokenizer.num_special_tokens_to_add(pair=is_pair) + num_texts
        if max_seq_length < needed:  # truncation would drop a whole text, or fail
            raise ValueError(f"max_seq_length={max_seq_length} is too small: a {'pair' if is_pair else 'single'} "
                             f"example needs {needed - num_texts} special tokens and 1 token per text, "
                             f"max_seq_length >= {needed}")
        for start in range(0, len(idx), chunk):
            part = idx[start:start + chunk]
            enc = tokenizer([examples[i].text_a for i in part],
                            [examples[i].text_b for i in part] if is_pair else None,
                            truncation="longest_first", max_length=max_seq_length, padding=False,
                            return_token_type_ids=True, return_attention_mask=False,
                            return_special_tokens_mask=True)
            tt = enc.get("token_type_ids")
            for j, i in enumerate(part):
                seq = enc["input_ids"][j]
                if len(seq) > max_seq_length:  # the tokenizer only logs when it cannot truncate enough
                    raise ValueError(f"example {examples[i].guid!r} has {len(seq)} tokens after truncation, more "
                                     f"than max_seq_length={max_seq_length} (too small for the special tokens?)")
                if _text_runs(enc["special_tokens_mask"][j]) < num_texts:
                    raise ValueError(f"example {examples[i].guid!r}: a text gives no token (only characters the "
                                     f"tokenizer drops?): {examples[i].text_a!r}, {examples[i].text_b!r}")
                ids[i] = np.asarray(seq, dtype=np.int32)
                types[i] = np.asarray(tt[j] if tt is not None else np.zeros(len(seq)), dtype=np.int8)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt, copy=False) if xs else np.zeros(0, dtype=dt))
    return Encodings(cat(ids, np.int32), cat(types, np.int8), offsets)


# ---------------------------------------------------------------------------------------------------------------
# Dataset

@dataclass
class TaskSplit:
    """One task's split, tokenized. ``name`` is its evaluation/prediction name (``"mnli-mm"``), ``task_id`` the
    head it uses (the spec's position among the trained tasks)."""

    name: str
    task_id: int
    spec: TaskSpec
    split: str
    examples: List[Example]
    encodings: Encodings

    @classmethod
    def load(cls, spec: TaskSpec, data_dir, split: str, tokenizer, max_seq_length: int, task_id: int,
             name: Optional[str] = None) -> "TaskSplit":
        examples = read_examples(spec, data_dir, split)
        return cls(name or spec.name, task_id, spec, split, examples,
                   encode_examples(examples, tokenizer, max_seq_length))


class MultiTaskDataset(torch.utils.data.Dataset):
    """Several tasks' examples concatenated, part after part.

    - ``task_names[k]``, ``task_ids[k]``: name and head id of part k;
    - ``task_indices[k]``: the dataset indices of part k's examples (for per-task samplers);
    - ``parts[k]``: the :class:`TaskSplit` (spec, examples, encodings).
    """

    def __init__(self, parts: Sequence[TaskSplit]):
        self.parts = list(parts)
        self.task_names = [p.name for p in self.parts]
        self.task_ids = [p.task_id for p in self.parts]
        self._starts = [0]
        for p in self.parts:
            self._starts.append(self._starts[-1] + len(p.examples))
        self.task_indices: List[List[int]] = [list(range(a, b)) for a, b in zip(self._starts, self._starts[1:])]

    @classmethod
    def from_specs(cls, specs: Sequence[TaskSpec], data_dir, split: str, tokenizer, max_seq_length: int):
        """``split`` of every spec; task ids are the specs' positions. A task with no example in ``split`` is a
        ValueError: its sampler would have nothing to draw (evaluation sets, from :func:`eval_datasets`, may be
        empty)."""
        if not specs:
            raise ValueError("no task specs given")
        parts = [TaskSplit.load(s, data_dir, split, tokenizer, max_seq_length, task_id=i)
                 for i, s in enumerate(specs)]
        for p in parts:
            if not p.examples:
                raise ValueError(f"task {p.spec.name!r}: {p.spec.path(data_dir, split)} has no example (split "
                                 f"{split!r})")
        return cls(parts)

    def __len__(self):
        return self._starts[-1]

    def locate(self, index: int):
        """(part k, index within part k) of a dataset index."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} examples")
        k = bisect.bisect_right(self._starts, index) - 1
        return k, index - self._starts[k]

    def lengths(self) -> np.ndarray:
        """Every item's token count, int64 [len(self)] (for batching by a token budget)."""
        parts = [p.encodings.lengths() for p in self.parts]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def example(self, index: int) -> Example:
        k, i = self.locate(index)
        return self.parts[k].examples[i]

    def __getitem__(self, index: int) -> Dict:
        k, i = self.locate(index)
        part = self.parts[k]
        ids, types = part.encodings.get(i)
        return {"input_ids": ids.tolist(), "token_type_ids": types.tolist(), "attention_mask": [1] * len(ids),
                "label": part.examples[i].label, "task_id": part.task_id}


def eval_datasets(specs: Sequence[TaskSpec], data_dir, tokenizer, max_seq_length: int,
                  test: bool = False) -> Dict[str, MultiTaskDataset]:
    """One single-task dataset per evaluation name (``spec.eval_splits``; with ``test``, ``spec.test_splits``),
    e.g. ``{"mnli": ..., "mnli-mm": ..., "rte": ...}``; task ids are the specs' positions."""
    out = {}
    for task_id, spec in enumerate(specs):
        for name, split in (spec.test_splits if test else spec.eval_splits).items():
            if name in out:
                raise ValueError(f"two evaluation sets are named {name!r}")
            out[name] = MultiTaskDataset([TaskSplit.load(spec, data_dir, split, tokenizer, max_seq_length,
                                                         task_id, name)])
    return out


def _with_labels(batch: Dict, items: Sequence[Dict]) -> Dict:
    """Adds the items' labels as float32 [S] (class ids and scores alike); none for unlabeled (test) items."""
    labels = [it.get("label") for it in items]
    has = [x is not None for x in labels]
    if any(has) and not all(has):
        raise ValueError("a batch mixes labeled and unlabeled items")
    if all(has):
        batch["labels"] = torch.tensor(labels, dtype=torch.float32)
    return batch


class DynamicPaddingCollator:
    """Pad a list of dataset items to the batch's longest sequence (never beyond ``max_seq_length``).

    ``pad_to_multiple_of`` rounds the length up (for tensor cores), still capped at ``max_seq_length``.
    An item longer than ``max_seq_length`` is an error: cutting it here would drop its final [SEP].
    See the module docstring for the batch's keys and why ``labels`` is float32.
    """

    def __init__(self, pad_token_id: int, max_seq_length: int, pad_to_multiple_of: Optional[int] = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None (the tokenizer has no pad token)")
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, (int, np.integer)) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be an int >= 0, got {pad_token_id!r}")
        self.pad_token_id = int(pad_token_id)
        self.max_seq_length = _positive_int(max_seq_length, "max_seq_length")
        self.pad_to_multiple_of = (None if pad_to_multiple_of is None
                                   else _positive_int(pad_to_multiple_of, "pad_to_multiple_of"))

    def __call__(self, items: Sequence[Dict]) -> Dict[str, torch.Tensor]:
        if not items:
            raise ValueError("empty batch")
        lengths = [len(it["input_ids"]) for it in items]
        for it, n in zip(items, lengths):
            if n == 0:  # a fully masked row: its attention has no key to attend to
                raise ValueError("an item has no tokens (empty input_ids)")
            if len(it["token_type_ids"]) != n or len(it["attention_mask"]) != n:
                raise ValueError(f"an item's input_ids, token_type_ids and attention_mask differ in length: "
                                 f"{n}, {len(it['token_type_ids'])}, {len(it['attention_mask'])}")
        longest = max(lengths)
        if longest > self.max_seq_length:
            raise ValueError(f"an item has {longest} tokens, more than max_seq_length={self.max_seq_length}")
        L = longest
        if self.pad_to_multiple_of:
            L = min(-(-L // self.pad_to_multiple_of) * self.pad_to_multiple_of, self.max_seq_length)
        B = len(items)
        input_ids = np.full((B, L), self.pad_token_id, dtype=np.int64)
        token_type_ids = np.zeros((B, L), dtype=np.int64)
        attention_mask = np.zeros((B, L), dtype=np.int64)
        for b, (it, n) in enumerate(zip(items, lengths)):
            input_ids[b, :n] = it["input_ids"]
            token_type_ids[b, :n] = it["token_type_ids"]
            attention_mask[b, :n] = it["attention_mask"]
        batch = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask),
                 "token_type_ids": torch.from_numpy(token_type_ids),
                 "task_id": torch.tensor([it["task_id"] for it in items], dtype=torch.long)}
        return _with_labels(batch, items)



class PackingCollator:
    """Pack a list of dataset items end to end into one row, without padding (DESIGN.md §8; as HF's
    ``DataCollatorWithFlattening``). With S items of N tokens in all, the batch is::

        {"input_ids": LongTensor[1, N], "token_type_ids": LongTensor[1, N],
         "position_ids": LongTensor[1, N],   # 0, 1, 2, ... restarting at each item
         "cu_seqlens": IntTensor[S+1],        # item s is tokens [cu_seqlens[s], cu_seqlens[s+1])
         "max_seqlen": int,                   # the longest item
         "task_id": LongTensor[S], "labels": FloatTensor[S]}   # labels absent for unlabeled (test) items

    There is no ``attention_mask``: an item's ``attention_mask``, when it has one, must be all ones (packing
    has no padding to mask). ``labels`` follows :class:`DynamicPaddingCollator` (float32, see the module
    docstring). An item longer than ``max_seq_length`` is an error, as in the padded collator.
    """

    def __init__(self, max_seq_length: int):
        self.max_seq_length = _positive_int(max_seq_length, "max_seq_length")

    def __call__(self, items: Sequence[Dict]) -> Dict[str, Union[torch.Tensor, int]]:
        if not items:
            raise ValueError("empty batch")
        lengths = np.array([len(it["input_ids"]) for it in items], dtype=np.int64)
        for s, (it, n) in enumerate(zip(items, lengths)):
            if n == 0:
                raise ValueError(f"item {s} has no tokens (empty input_ids)")
            if n > self.max_seq_length:
                raise ValueError(f"item {s} has {n} tokens, more than max_seq_length={self.max_seq_length}")
            if len(it["token_type_ids"]) != n:
                raise ValueError(f"item {s}: input_ids and token_type_ids differ in length: {n}, "
                                 f"{len(it['token_type_ids'])}")
            mask = it.get("attention_mask")
            if mask is not None and (len(mask) != n or not all(m == 1 for m in mask)):
                raise ValueError(f"item {s}: attention_mask must be {n} ones (packed items have no padding), "
                                 f"got {list(mask)}")
        cu_seqlens = np.zeros(len(items) + 1, dtype=np.int64)
        np.cumsum(lengths, out=cu_seqlens[1:])
        N = int(cu_seqlens[-1])
        position_ids = np.arange(N, dtype=np.int64) - np.repeat(cu_seqlens[:-1], lengths)
        input_ids = np.concatenate([np.asarray(it["input_ids"], dtype=np.int64) for it in items])
        token_type_ids = np.concatenate([np.asarray(it["token_type_ids"], dtype=np.int64) for it in items])
        batch = {"input_ids": torch.from_numpy(input_ids)[None],
                 "token_type_ids": torch.from_numpy(token_type_ids)[None],
                 "position_ids": torch.from_numpy(position_ids)[None],
                 "cu_seqlens": torch.from_numpy(cu_seqlens.astype(np.int32)), "max_seqlen": int(lengths.max()),
                 "task_id": torch.tensor([it["task_id"] for it in items], dtype=torch.long)}
        return _with_labels(batch, items)


def split_by_token_budget(items: Sequence[Dict], max_tokens_per_batch: int,
                          max_items: Optional[int] = None) -> List[List[Dict]]:
    """Consecutive runs of ``items``, in order, each holding at most ``max_tokens_per_batch`` tokens in all
    (for :class:`PackingCollator`: one packed batch per run) and, if given, at most ``max_items`` items.
    A run closes when the next item would not fit; an item longer than the budget alone is an error (it fits
    no batch)."""
    bounds = token_budget_bounds([len(it["input_ids"]) for it in items], max_tokens_per_batch, max_items)
    return [list(items[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def token_budget_bounds(lengths: Sequence[int], max_tokens_per_batch: int,
                        max_items: Optional[int] = None) -> List[int]:
    """Where :func:`split_by_token_budget` cuts items of these lengths: run k is ``[bounds[k], bounds[k+1])``."""
    budget = _positive_int(max_tokens_per_batch, "max_tokens_per_batch")
    cap = math.inf if max_items is None else _positive_int(max_items, "max_items")
    bounds = [0]
    tokens = 0
    for s, n in enumerate(lengths):
        if n > budget:
            raise ValueError(f"item {s} has {n} tokens, more than max_tokens_per_batch={budget}")
        if s > bounds[-1] and (tokens + n > budget or s - bounds[-1] >= cap):
            bounds.append(s)
            tokens = 0
        tokens += n
    if len(lengths):
        bounds.append(len(lengths))
    return bounds
