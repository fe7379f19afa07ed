"""Long-format tables to padded unit tensors.

A data set is a collection of independent *units* (a user's history, a basket, a day). Each row of
the long table is one *observation* of a unit: a **key** (what the observation is about), a
**value** (what is modelled) and an optional **order**. :class:`EFAData` holds the units as padded
``(num_units, max_len)`` tensors with masks, the key vocabulary, and the index of each unit in the
data set it was cut from, so that minibatches scale the likelihood correctly.

Two kinds of data:

- ``"valued"``: keys are labels (a movie id, a city) or tuples of numbers (coordinates); values are
  numbers (ratings, counts, temperatures, 0/1, class indices).
- ``"items"``: item sequences (baskets, watch histories). The value *is* the item (a categorical
  over the item vocabulary) and the key is the position in the unit.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from .errors import InputError

__all__ = [
    "EFAData",
    "PrecisionWarning",
    "Vocabulary",
    "data_schema",
    "format_value",
    "key_moments",
    "label_sort_key",
    "schema_from_json",
    "schema_to_json",
]

OOV_LABEL = "<oov>"


@dataclasses.dataclass
class Vocabulary:
    """Labels of a discrete vocabulary, and optional numeric features of each label.

    :ivar list labels: one label per index (a scalar, or a tuple for multi-column keys).
    :ivar ~torch.Tensor features: ``(len(labels), num_features)`` numbers of each label, or None.
    :ivar bool oov: whether the last index is an explicit out-of-vocabulary row.
    """

    labels: list[Any]
    features: torch.Tensor | None = None
    oov: bool = False

    def __post_init__(self) -> None:
        self._index = {label: i for i, label in enumerate(self.labels)}

    def __len__(self) -> int:
        return len(self.labels)

    def lookup(self, labels: Sequence[Hashable], column: str) -> np.ndarray:
        """Indices of ``labels``; unknown labels map to the OOV row or raise ``ValueError``."""
        codes = pd.Series(list(labels), dtype=object).map(self._index)
        missing = codes.isna().to_numpy()
        if missing.any():
            if not self.oov:
                unknown = pd.unique(np.asarray(list(labels), dtype=object)[missing])
                raise InputError(
                    f"column {column!r}: {len(unknown)} value(s) not in the fitted vocabulary, "
                    f"e.g. {unknown[:5].tolist()}; refit, drop these rows, or build the data with "
                    "oov=True to map them to an explicit out-of-vocabulary row"
                )
            codes[missing] = len(self.labels) - 1
        return codes.to_numpy(dtype=np.int64, copy=True)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (labels as lists)."""
        labels = [_label_json(x) for x in self.labels]
        feats = None if self.features is None else self.features.tolist()
        return {"labels": labels, "features": feats, "oov": self.oov}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Vocabulary:
        """The vocabulary written by :meth:`to_dict`."""
        labels = [tuple(x) if isinstance(x, list) else x for x in d["labels"]]
        feats = None if d["features"] is None else torch.tensor(d["features"], dtype=torch.float64)
        return cls(labels=labels, features=feats, oov=bool(d["oov"]))


def format_value(x: float, dtype: torch.dtype) -> str:
    """A stored value as its data would show it: float32 values with 7 significant digits (2.7,
    not 2.700000047683716), float64 with 16, integers without a decimal part."""
    x = float(x)
    if x.is_integer() and abs(x) < 2**53:
        return str(int(x)) + ".0"
    digits = 7 if dtype == torch.float32 else 16
    return f"{x:.{digits}g}"


def data_schema(data: Any) -> dict[str, Any]:
    """What a fit keeps of its training data: its kind, column names and vocabularies (keys,
    items, and the classes of keys with class labels)."""
    return {
        "kind": data.kind,
        "columns": data.columns,
        "keys": data.keys,
        "items": data.items,
        "classes": dict(getattr(data, "classes", {}) or {}),
    }


def schema_to_json(schema: dict[str, Any]) -> dict[str, Any]:
    """:func:`data_schema` as JSON-serialisable values."""
    items = schema["items"]
    classes = [[_label_json(k), v.to_dict()] for k, v in schema.get("classes", {}).items()]
    return {
        **schema,
        "keys": schema["keys"].to_dict(),
        "items": None if items is None else items.to_dict(),
        "classes": classes,
    }


def schema_from_json(d: dict[str, Any]) -> dict[str, Any]:
    """The schema written by :func:`schema_to_json`."""
    items = d["items"]
    classes = {_label_from_json(k): Vocabulary.from_dict(v) for k, v in d.get("classes", [])}
    return {
        "kind": d["kind"],
        "columns": d["columns"],
        "keys": Vocabulary.from_dict(d["keys"]),
        "items": None if items is None else Vocabulary.from_dict(items),
        "classes": classes,
    }


def _label_json(x: Any) -> Any:
    return [_json_scalar(v) for v in x] if isinstance(x, tuple) else _json_scalar(x)


def _label_from_json(x: Any) -> Any:
    return tuple(x) if isinstance(x, list) else x


def _json_scalar(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else x


@dataclasses.dataclass
class EFAData:
    """Units as padded tensors.

    Shapes: ``U`` units, ``L`` the longest unit.

    :ivar str kind: ``"valued"`` or ``"items"``.
    :ivar ~torch.Tensor key_index: ``(U, L)`` long, index into :attr:`keys` (0 for items data).
    :ivar ~torch.Tensor values: ``(U, L)`` float; item indices for items data.
    :ivar ~torch.Tensor mask: ``(U, L)`` bool, True for real (non-padding) observations.
    :ivar ~torch.Tensor target: ``(U, L)`` bool, True for modelled observations (not context-only).
    :ivar ~torch.Tensor unit_index: ``(U,)`` long, index of each unit in the full data set.
    :ivar int num_units: number of units of the full data set (the plate size).
    :ivar Vocabulary keys: key vocabulary (one dummy key for items data).
    :ivar Vocabulary items: item vocabulary (items data only).
    :ivar list unit_labels: the original unit identifiers.
    :ivar dict columns: the column names the data came from.
    :ivar dict classes: for keys whose values are class labels (strings, a pandas Categorical),
        key label to the :class:`Vocabulary` of its classes; ``values`` hold the class codes.
    :ivar dict missing: with ``missing="drop"``, how many observations of each key were left out
        (key label to count; ``"<units>"``: the labels of units that had nothing else).
    """

    kind: str
    key_index: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    target: torch.Tensor
    unit_index: torch.Tensor
    num_units: int
    keys: Vocabulary
    items: Vocabulary | None
    unit_labels: list[Any]
    columns: dict[str, Any]
    classes: dict[Any, Vocabulary] = dataclasses.field(default_factory=dict)
    missing: dict[Any, Any] = dataclasses.field(default_factory=dict)

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_pandas(
        cls,
        df: pd.DataFrame,
        unit: str,
        key: str | Sequence[str] | None = None,
        value: str | None = None,
        order: str | None = None,
        context: str | None = None,
        *,
        keys: Vocabulary | None = None,
        items: Vocabulary | None = None,
        classes: Mapping[Any, Vocabulary] | None = None,
        oov: bool = False,
        ties: str = "error",
        missing: str = "error",
        na_values: Sequence[Any] | None = None,
    ) -> EFAData:
        """Build units from a long-format table, one row per observation.

        :param ~pandas.DataFrame df: the table.
        :param str unit: column identifying the unit (user, basket, day).
        :param key: key column, or several numeric columns (coordinates, a lag) forming one key.
        :param str value: value column: numbers, or class labels of a categorical key (strings, a
            pandas Categorical; an object column may hold numbers for some keys and labels for
            others). Omit it for item sequences: the ``key`` column then holds the items and the
            key of each observation is its position.
        :param str order: column giving the order of observations within a unit (time stamps,
            ranks). Without it the row order of ``df`` is kept.
        :param str context: optional boolean column; True marks context-only observations, which
            feed other observations' contexts but are not modelled.
        :param Vocabulary keys: a fitted key vocabulary (at predict time); new keys are an error
            unless it has an OOV row.
        :param Vocabulary items: a fitted item vocabulary (items data at predict time).
        :param dict classes: fitted class vocabularies by key label (at predict time).
        :param bool oov: when building a new vocabulary, add an explicit out-of-vocabulary row.
        :param str ties: ``"error"`` (default) rejects two observations of one unit with the same
            ``order`` value; ``"keep"`` keeps their row order.
        :param str missing: ``"error"`` (default) refuses a missing value (NaN, or one of
            ``na_values``); ``"drop"`` leaves the observation out of its unit (it is never used as
            a value) and counts it in :attr:`missing`.
        :param na_values: values of the value column that mean "not observed" (e.g. ``[-99]``;
            the name of pandas' ``read_csv`` option).
        :raises ValueError: for a missing column, an empty table, NaN / inf / non-numeric values,
            duplicate order values (with ``ties="error"``), or keys not in ``keys``.
        """
        key_cols = [key] if isinstance(key, str) else list(key or [])
        columns: dict[str, Any] = {
            "unit": unit, "key": key_cols, "value": value, "order": order, "context": context,
        }  # fmt: skip
        _check_table(df, columns, ties)
        kind = "valued" if value is not None else "items"
        left_out: dict[Any, Any] = {}
        if value is not None:
            df, left_out = leave_out_missing(df, columns, missing, na_values)
        # Vectorised throughout (no per-row Python objects, no copy of the table): 10 million rows
        # take seconds. Units are numbered in sorted label order, rows ordered within each unit.
        unit_codes, unit_labels = _factorize_sorted(df[unit], unit)
        perm, codes = _order_rows(df, unit, unit_codes, unit_labels, order, ties)
        del unit_codes
        item_vocab = None
        if kind == "items":
            vals, key_codes, keys, item_vocab = _encode_items(df, key_cols[0], keys, items, oov)
        else:
            assert value is not None
            key_codes, keys = _encode_keys(df, key_cols, keys, oov)
            vals, classes = _encode_values(df, value, unit, key_codes, keys, classes)
        is_target = None if context is None else ~_context_column(df, context)
        return cls._padded(
            kind, codes, perm, key_codes, vals, is_target, len(unit_labels),
            keys=keys, items=item_vocab, unit_labels=list(unit_labels), columns=columns,
            classes=dict(classes or {}) if kind == "valued" else {}, missing=left_out,
        )  # fmt: skip

    @classmethod
    def _padded(
        cls,
        kind: str,
        codes: np.ndarray,
        perm: np.ndarray,
        key_codes: np.ndarray,
        vals: np.ndarray,
        is_target: np.ndarray | None,
        num_units: int,
        **fields: Any,
    ) -> EFAData:
        # rows (in table order) to padded (units, positions) tensors; ``codes`` are the unit codes
        # of the rows in the order ``perm`` that sorts them by unit and order
        lengths = np.bincount(codes, minlength=num_units)
        starts = np.cumsum(lengths) - lengths
        pos = np.arange(len(codes), dtype=np.int64) - starts[codes]
        shape = (num_units, int(lengths.max()))
        dtype = torch.get_default_dtype()
        np_dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(dtype, np.float64)
        key_index = np.zeros(shape, dtype=np.int64)
        values = np.zeros(shape, dtype=np_dtype)
        mask = np.zeros(shape, dtype=bool)
        key_index[codes, pos] = key_codes[perm]
        values[codes, pos] = vals[perm]  # float64 -> default dtype, rounded to nearest
        mask[codes, pos] = True
        target = mask.copy()
        if is_target is not None:
            target[codes, pos] = is_target[perm]
        return cls(
            kind=kind,
            key_index=torch.from_numpy(key_index),
            values=torch.from_numpy(values).to(dtype),
            mask=torch.from_numpy(mask),
            target=torch.from_numpy(target),
            unit_index=torch.arange(num_units),
            num_units=num_units,
            **fields,
        )

    # ------------------------------------------------------------------------------------------
    @property
    def lengths(self) -> torch.Tensor:
        """Number of observations of each unit, ``(U,)``."""
        return self.mask.sum(-1)

    @property
    def max_len(self) -> int:
        """Length of the longest unit (the padded width ``L``)."""
        return self.mask.size(-1)

    @property
    def num_observations(self) -> int:
        """Number of modelled observations."""
        return int(self.target.sum())

    def __len__(self) -> int:
        return self.key_index.size(0)

    def __repr__(self) -> str:
        return (
            f"EFAData(kind={self.kind!r}, units={len(self)}, observations={int(self.mask.sum())}, "
            f"targets={self.num_observations}, keys={len(self.keys)}, max_len={self.max_len}"
            + (f", items={len(self.items)})" if self.items is not None else ")")
        )

    def subset(self, index: torch.Tensor | Sequence[int], reindex: bool = False) -> EFAData:
        """Units at positions ``index`` (trimmed to their longest unit).

        :param bool reindex: make the subset a data set of its own (``num_units = len(index)``);
            by default it stays a minibatch of this data set, for plate scaling.
        """
        index = torch.as_tensor(index, dtype=torch.long)
        mask = self.mask[index]
        width = int(mask.sum(-1).max()) if len(index) else 0
        return dataclasses.replace(
            self,
            key_index=self.key_index[index, :width],
            values=self.values[index, :width],
            mask=mask[:, :width],
            target=self.target[index, :width],
            unit_index=torch.arange(len(index)) if reindex else self.unit_index[index],
            num_units=len(index) if reindex else self.num_units,
            unit_labels=[self.unit_labels[i] for i in index.tolist()],
        )

    def split(self, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0) -> tuple[EFAData, ...]:
        """Split by unit into independent data sets of the given fractions (seeded).

        Sizes are rounded down except the last, which takes the rest.
        """
        total = float(sum(fractions))
        if any(f < 0 for f in fractions) or total <= 0:
            raise InputError(f"fractions must be non-negative with a positive sum, got {fractions}")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        sizes = [int(len(self) * f / total) for f in fractions[:-1]]
        sizes.append(len(self) - sum(sizes))
        parts = torch.split(perm, sizes)
        return tuple(self.subset(p.sort().values, reindex=True) for p in parts)

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        bucket: bool = True,
    ) -> Iterator[EFAData]:
        """Minibatches of units (views of this data set, for plate subsampling).

        With ``bucket=True`` units of similar length share a batch (less padding): units are
        sorted by length within random chunks of ``50 * batch_size`` units, cut into batches, and
        the batches visited in random order.
        """
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        if bucket:
            lengths = self.lengths[order]
            chunk = 50 * batch_size
            pieces = []
            for start in range(0, n, chunk):
                sub = order[start : start + chunk]
                pieces.append(sub[torch.argsort(lengths[start : start + chunk], stable=True)])
            order = torch.cat(pieces) if pieces else order
        batches = list(torch.split(order, batch_size))
        if shuffle and bucket:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
        for b in batches:
            yield self.subset(b)

    def key_sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Count, sum and sum of squares of each key's values (every observation, context-only
        ones included), float64 arrays with one entry per key: what :func:`key_moments` needs,
        and what shards of a streamed table add up."""
        keys = self.key_index[self.mask].numpy()
        x = self.values[self.mask].double().numpy()
        num_keys = len(self.keys)
        n = np.bincount(keys, minlength=num_keys).astype(np.float64)
        s1 = np.bincount(keys, weights=x, minlength=num_keys)
        s2 = np.bincount(keys, weights=x * x, minlength=num_keys)
        return n, s1, s2

    def conform(self, schema: Mapping[str, Any]) -> EFAData:
        """This data in the vocabularies of ``schema`` (a fit's :attr:`~pyro_efa.EFAFit.schema`):
        key indices, item indices and class codes re-mapped by label, so that data built on its
        own (another key set, another row order) means what the fit's training data meant.

        :raises ValueError: for a label the vocabularies do not hold (a key, item or class unseen
            in training; unseen keys and items go to the out-of-vocabulary row of a vocabulary
            built with ``oov=True``), naming the column and the labels.
        """
        if schema["kind"] != self.kind:
            raise InputError(f"the fit is for {schema['kind']!r} data, got {self.kind!r} data")
        out = self
        keys, items, classes = schema["keys"], schema["items"], schema.get("classes", {})
        if self.keys is not keys and self.keys.labels != keys.labels:
            column = ", ".join(self.columns.get("key") or ["key"])
            index = torch.as_tensor(keys.lookup(self.keys.labels, column))
            out = dataclasses.replace(
                out, key_index=torch.where(self.mask, index[self.key_index], 0), keys=keys
            )
        if self.kind == "items" and self.items is not items and self.items.labels != items.labels:
            column = (self.columns.get("key") or ["item"])[0]
            index = torch.as_tensor(items.lookup(self.items.labels, column), dtype=self.values.dtype)
            values = torch.where(self.mask, index[self.values.long()], 0.0)
            out = dataclasses.replace(out, values=values, items=items)
        if self.classes or classes:
            out = out._conform_classes(classes)
        return out

    def _conform_classes(self, classes: Mapping[Any, Vocabulary]) -> EFAData:
        # class codes of each key with class labels, in the fit's class vocabulary of that key
        values = self.values.clone()
        for label, vocab in self.classes.items():
            if label not in classes:
                raise InputError(
                    f"key {label!r} holds class labels, but the fit learned numbers for it; build the "
                    "data as the training data was built"
                )
            fitted = classes[label]
            if vocab is fitted or vocab.labels == fitted.labels:
                continue
            index = torch.as_tensor(
                fitted.lookup(vocab.labels, f"{self.columns.get('value')} (key {label!r})")
            )
            k = self.keys.labels.index(label)
            rows = self.mask & (self.key_index == k)
            values[rows] = index[self.values[rows].long()].to(values.dtype)
        return dataclasses.replace(self, values=values, classes={**self.classes, **classes})

    def unseen_in(self, train: EFAData) -> pd.DataFrame:
        """What this data's modelled observations hold that no modelled observation of ``train``
        does: keys, items, and classes of keys with class labels. Their embeddings and intercepts
        are never trained, so their predictions rest on the prior and initial values alone.

        :returns: one row per label: ``what`` (``"key"``, ``"item"`` or ``"class"``), ``key`` (for
            a class: its key), ``label``, ``unit`` (the first unit holding it) and ``count`` (its
            modelled observations here); empty when there is none.
        """
        mine, theirs = (d.to_pandas() for d in (self.conform(data_schema(train)), train))
        mine, theirs = mine[mine["target"]], theirs[theirs["target"]]
        parts = [("key", mine.assign(label=mine["key"], key=None), set(theirs["key"]))]
        if self.kind == "items":
            parts.append(("item", mine.assign(label=mine["value"], key=None), set(theirs["value"])))
        for key in self.classes:
            rows = mine[[k == key for k in mine["key"]]]
            known = set(theirs["value"][[k == key for k in theirs["key"]]])
            parts.append(("class", rows.assign(label=rows["value"]), known))
        found = [
            pd.DataFrame({"what": what, "key": [rows["key"].iloc[0]], "label": [label],
                          "unit": [rows["unit"].iloc[0]], "count": [len(rows)]})
            for what, table, known in parts
            for label, rows in table.groupby("label", sort=False)
            if label not in known
        ]  # fmt: skip
        columns = ["what", "key", "label", "unit", "count"]
        return pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=columns)

    def value_moments(self) -> tuple[list[float], list[float]]:
        """Mean and standard deviation of each key's values, from :func:`key_moments`."""
        return key_moments(*self.key_sums())

    def to(self, device: torch.device | str) -> EFAData:
        """A copy with tensors on ``device``."""
        return dataclasses.replace(
            self,
            key_index=self.key_index.to(device),
            values=self.values.to(device),
            mask=self.mask.to(device),
            target=self.target.to(device),
            unit_index=self.unit_index.to(device),
        )

    def to_pandas(self) -> pd.DataFrame:
        """The observations as a long table: unit, position, key, value, target."""
        u, p = torch.nonzero(self.mask, as_tuple=True)
        out = pd.DataFrame(
            {
                "unit": [self.unit_labels[i] for i in u.tolist()],
                "position": p.numpy(),
                "key": [self.keys.labels[i] for i in self.key_index[u, p].tolist()],
                "value": self.values[u, p].numpy(),
                "target": self.target[u, p].numpy(),
            }
        )
        if self.items is not None:
            out["value"] = [self.items.labels[int(i)] for i in out["value"]]
        return self.class_labels(out) if self.classes else out

    def class_labels(self, table: pd.DataFrame, columns: Sequence[str] = ("value",)) -> pd.DataFrame:
        """``table`` (with a ``key`` column of key labels) with the class codes in ``columns``
        turned into class labels for the keys that have a class vocabulary."""
        table = table.copy()
        for column in columns:
            labelled = table[column].astype(object)
            for key, vocab in self.classes.items():
                rows = np.array([k == key for k in table["key"]], dtype=bool)
                labelled[rows] = [vocab.labels[int(c)] for c in table.loc[rows, column]]
            table[column] = labelled
        return table


def _check_table(df: pd.DataFrame, columns: dict[str, Any], ties: str) -> None:
    """The checks of :meth:`EFAData.from_pandas` that need no conversion of the values."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame, got {type(df).__name__}")
    key_cols = columns["key"]
    if not key_cols:
        raise InputError("a key column is required (for item sequences: the item column)")
    if ties not in ("error", "keep"):
        raise InputError(f"ties must be 'error' or 'keep', got {ties!r}")
    needed = [columns["unit"], *key_cols] + [
        c for c in (columns["value"], columns["order"], columns["context"]) if c is not None
    ]
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise InputError(f"column(s) {missing} not in the table; it has {list(df.columns)}")
    if len(df) == 0:
        raise InputError("the table is empty: no observations to build units from")
    if columns["value"] is None and len(key_cols) != 1:
        raise InputError("item sequences take exactly one item column as key")
    for c in (columns["unit"], *key_cols):
        if df[c].isna().any():
            row = df.index[df[c].isna().to_numpy()][0]
            raise InputError(f"column {c!r} has a missing value (row {_json_scalar(row)!r})")
    duplicated = sorted({c for c in needed if isinstance(df[c], pd.DataFrame)}, key=str)
    if duplicated:
        raise InputError(f"column name(s) {duplicated} appear more than once in the table")


def _order_rows(
    df: pd.DataFrame,
    unit: str,
    unit_codes: np.ndarray,
    unit_labels: pd.Index,
    order: str | None,
    ties: str,
) -> tuple[np.ndarray, np.ndarray]:
    """The permutation sorting the rows by unit (then ``order``, stable) and the unit code of each
    sorted row; with ``ties="error"`` two rows of a unit with the same order value are refused."""
    if order is None:
        perm = np.argsort(unit_codes, kind="stable")
        return perm, unit_codes[perm]
    _check_numeric(df, order, unit)
    order_values = _sortable(df[order])
    perm = np.lexsort((order_values, unit_codes))  # stable: ties keep the row order
    codes = unit_codes[perm]
    if ties == "error":
        ordered = order_values[perm]
        dup = (codes[1:] == codes[:-1]) & (ordered[1:] == ordered[:-1])
        if dup.any():
            i = int(np.argmax(dup))
            raise InputError(
                f"unit {_json_scalar(unit_labels[codes[i]])!r} has several observations with "
                f"{order!r} = {_json_scalar(ordered[i])!r}; their order is ambiguous (pass "
                "ties='keep' to keep the row order, or drop duplicates)"
            )
    return perm, codes


def _encode_items(
    df: pd.DataFrame, item_col: str, keys: Vocabulary | None, items: Vocabulary | None, oov: bool
) -> tuple[np.ndarray, np.ndarray, Vocabulary, Vocabulary]:
    """Item sequences: the item index of each row as its value, key 0 (the position) for all."""
    row_codes, uniques = _factorize_rows(df, [item_col])
    if items is None:
        labels = sorted(uniques[item_col].tolist(), key=label_sort_key)
        if oov:
            labels.append(OOV_LABEL)
        items = Vocabulary(labels=labels, oov=oov)
    vals = items.lookup(uniques[item_col].tolist(), item_col)[row_codes].astype(np.float64)
    return vals, np.zeros(len(df), dtype=np.int64), keys or Vocabulary(labels=["position"]), items


def leave_out_missing(
    df: pd.DataFrame,
    columns: dict[str, Any],
    missing: str,
    na_values: Sequence[Any] | None,
    allow_empty: bool = False,
) -> tuple[pd.DataFrame, dict[Any, Any]]:
    """The table without its rows of missing values (NaN, or one of ``na_values``) with
    ``missing="drop"``, and what was left out: the count per key, and under ``"<units>"`` the
    units left without observations; with ``missing="error"`` such a row is refused. A table whose
    every value is missing is an error unless ``allow_empty`` (one chunk of a streamed table)."""
    if missing not in ("error", "drop"):
        raise InputError(f"missing must be 'error' or 'drop', got {missing!r}")
    value, unit, key_cols = columns["value"], columns["unit"], columns["key"]
    gone = df[value].isna().to_numpy()
    if na_values is not None:
        gone = gone | df[value].isin(list(na_values)).to_numpy()
    if not gone.any():
        return df, {}
    i = int(np.flatnonzero(gone)[0])
    where = f"first in unit {_json_scalar(df[unit].iloc[i])!r}, key {_json_scalar(df[key_cols[0]].iloc[i])!r}"
    if missing == "error":
        raise InputError(
            f"column {value!r} has {int(gone.sum())} missing value(s) (NaN"
            + (f" or one of {list(na_values)}" if na_values is not None else "")
            + f"), {where}; pass missing='drop' to leave them out (na_values=[...] marks sentinel "
            "values such as -99 as missing), or impute them"
        )
    kept = df[~gone]
    if len(kept) == 0 and not allow_empty:
        raise InputError(f"column {value!r}: every value is missing ({len(df)} rows)")
    dropped = df[gone]
    labels = (
        dropped[key_cols[0]].tolist()
        if len(key_cols) == 1
        else list(dropped[key_cols].itertuples(index=False, name=None))
    )
    summary: dict[Any, Any] = {}
    for label in labels:
        label = _json_scalar(label) if not isinstance(label, tuple) else tuple(map(_json_scalar, label))
        summary[label] = summary.get(label, 0) + 1
    empty = sorted(set(pd.unique(dropped[unit])) - set(pd.unique(kept[unit])), key=label_sort_key)
    if empty:
        summary["<units>"] = [_json_scalar(u) for u in empty]
    return kept, summary


def _encode_values(
    df: pd.DataFrame,
    value: str,
    unit: str,
    key_codes: np.ndarray,
    keys: Vocabulary,
    classes: Mapping[Any, Vocabulary] | None,
) -> tuple[np.ndarray, dict[Any, Vocabulary]]:
    """The value of each row as a float64: numbers as they are, class labels (strings, a pandas
    Categorical) as codes in a vocabulary per key (``classes``, or built from the table)."""
    series = df[value]
    if isinstance(series.dtype, pd.CategoricalDtype):
        labels_of = np.ones(len(df), dtype=bool)  # a Categorical holds labels, for every key
    elif pd.api.types.is_object_dtype(series) or pd.api.types.is_string_dtype(series):
        numbers = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        class_keys = np.unique(key_codes[np.isnan(numbers)])  # keys with a value that is no number
        labels_of = np.isin(key_codes, class_keys)
    else:
        return _numeric_values(df, value, unit), dict(classes or {})
    vals = np.zeros(len(df))
    if not labels_of.all():
        vals[~labels_of] = _numeric_values(df[~labels_of].astype({value: np.float64}), value, unit)
    given = dict(classes or {})
    built: dict[Any, Vocabulary] = {}
    column = series.astype(object).to_numpy()
    for code in np.unique(key_codes[labels_of]).tolist():
        rows = labels_of & (key_codes == code)
        label = keys.labels[code]
        vocab = given.get(label) or Vocabulary(
            labels=sorted(pd.unique(column[rows]).tolist(), key=label_sort_key)
        )
        vals[rows] = vocab.lookup(column[rows].tolist(), f"{value} (key {label!r})")
        built[label] = vocab
    return vals, {**given, **built}


def _numeric_values(df: pd.DataFrame, value: str, unit: str) -> np.ndarray:
    """The value column as float64, refused when non-numeric, NaN / inf or beyond the default
    dtype's range, with a warning when storing it rounds it much."""
    vals = _check_numeric(df, value, unit)
    dtype = torch.get_default_dtype()
    limit = torch.finfo(dtype).max
    huge = np.abs(vals) > limit
    if huge.any():
        i = int(np.flatnonzero(huge)[0])
        raise InputError(
            f"column {value!r} has {int(huge.sum())} value(s) beyond the range of {dtype} "
            f"(+-{limit:.3g}), first in unit {_json_scalar(df[unit].iloc[i])!r} (value "
            f"{vals[i]!r}); rescale them or use torch.set_default_dtype(torch.float64)"
        )
    _warn_precision(vals, value, dtype)
    return vals


def _encode_keys(
    df: pd.DataFrame, key_cols: list[str], keys: Vocabulary | None, oov: bool
) -> tuple[np.ndarray, Vocabulary]:
    """The key index of each row, in ``keys`` or a vocabulary built from the table."""
    row_codes, uniques = _factorize_rows(df, key_cols)
    if len(key_cols) > 1:  # coordinates: features of a key MLP, so they must be finite
        for c in key_cols:
            u = uniques[c]
            if pd.api.types.is_numeric_dtype(u) and not np.isfinite(u.to_numpy(np.float64)).all():
                raise InputError(f"key column {c!r} has inf values; multi-column keys must be finite")
    if keys is None:
        keys = _build_key_vocab(uniques, key_cols, oov)
    labels_in = (
        uniques[key_cols[0]].tolist()
        if len(key_cols) == 1
        else list(uniques.itertuples(index=False, name=None))
    )
    return keys.lookup(labels_in, ", ".join(key_cols))[row_codes], keys


def _context_column(df: pd.DataFrame, context: str) -> np.ndarray:
    col = df[context]
    if not pd.api.types.is_bool_dtype(col) or col.isna().any():
        raise InputError(
            f"context column {context!r} must be boolean without missing values (True = context only)"
        )
    return col.to_numpy(dtype=bool)


def key_moments(n: np.ndarray, s1: np.ndarray, s2: np.ndarray) -> tuple[list[float], list[float]]:
    """Mean and standard deviation of each key's values from their count ``n``, sum ``s1`` and
    sum of squares ``s2`` (float64 arrays, one entry per key). Keys with fewer than two values, or
    no spread, get the pooled moments of all keys; a standard deviation is at least 1e-6."""
    total = max(float(n.sum()), 1.0)
    pooled_mean = float(s1.sum()) / total
    pooled_std = max(math.sqrt(max(float(s2.sum()) / total - pooled_mean**2, 0.0)), 1e-6)
    mean = s1 / np.maximum(n, 1)
    std = np.sqrt(np.maximum(s2 / np.maximum(n, 1) - mean**2, 0.0))
    few = n < 2
    mean = np.where(few, pooled_mean, mean)
    std = np.where(few | (std < 1e-6), pooled_std, std)
    return mean.tolist(), np.maximum(std, 1e-6).tolist()


def label_sort_key(x: Any) -> tuple[str, Any]:
    """Sorts labels of mixed types deterministically (numbers before strings)."""
    return (type(x).__name__, x)


class PrecisionWarning(UserWarning):
    """Values that the default float dtype stores with a rounding error large against their spread."""


def _warn_precision(x: np.ndarray, column: str, dtype: torch.dtype) -> None:
    """Warn when storing ``x`` in ``dtype`` rounds it by more than 1% of its spread (values near
    1e8 that vary by a few units, in float32)."""
    if dtype != torch.float32 or len(x) < 2:
        return
    spread = float(np.std(x))
    step = float(np.spacing(np.float32(np.abs(x).max())))
    if spread > 0 and step > 0.01 * spread:
        warnings.warn(
            f"column {column!r}: values up to {float(np.abs(x).max()):.6g} are stored in float32 with a "
            f"spacing of {step:.3g}, more than 1% of their standard deviation ({spread:.3g}); subtract "
            "a constant from the column first, or use torch.set_default_dtype(torch.float64)",
            PrecisionWarning,
            stacklevel=3,
        )


def _factorize_sorted(series: pd.Series, column: str) -> tuple[np.ndarray, pd.Index]:
    """Codes of ``series`` numbered in sorted label order (mixed types: numbers before strings)."""
    try:
        codes, labels = pd.factorize(series, sort=True)
    except TypeError:  # labels of several types that do not compare, e.g. 3 and "a"
        try:
            codes, labels = pd.factorize(series)
        except TypeError as e:
            raise InputError(f"column {column!r} holds values that cannot be labels ({e})") from e
        order = sorted(range(len(labels)), key=lambda i: label_sort_key(labels[i]))
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        codes, labels = rank[codes], labels[order]
    return np.asarray(codes, dtype=np.int64), labels


def _factorize_rows(df: pd.DataFrame, cols: list[str]) -> tuple[np.ndarray, pd.DataFrame]:
    """Code of each row's value(s) in ``cols`` and the table of distinct values (their dtypes
    kept), without building a Python object per row."""
    try:
        if len(cols) == 1:
            codes, uniques = pd.factorize(df[cols[0]])
            table = pd.DataFrame({cols[0]: uniques})
        else:
            codes, uniques = pd.MultiIndex.from_frame(df[cols]).factorize()
            table = uniques.to_frame(index=False)
            table.columns = cols
    except TypeError as e:  # unhashable values such as lists
        raise InputError(f"column(s) {cols} hold values that cannot be labels ({e})") from e
    return np.asarray(codes, dtype=np.int64), table


def _sortable(series: pd.Series) -> np.ndarray:
    """The column as a NumPy array that sorts like the column (integers stay exact)."""
    if isinstance(series.dtype, np.dtype):
        return series.to_numpy()
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


def _check_numeric(df: pd.DataFrame, column: str, unit: str) -> np.ndarray:
    series = df[column]
    if not (pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series)):
        raise InputError(f"column {column!r} must be numeric, got dtype {series.dtype}")
    if pd.api.types.is_complex_dtype(series):
        raise InputError(f"column {column!r} holds complex numbers; it must be real")
    x = series.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(x)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"column {column!r} has {int(bad.sum())} NaN/inf value(s), first in unit "
            f"{_json_scalar(df[unit].iloc[i])!r} (value {_json_scalar(x[i])!r}); drop or impute them"
        )
    return x


def _build_key_vocab(df: pd.DataFrame, key_cols: list[str], oov: bool) -> Vocabulary:
    numeric = all(pd.api.types.is_numeric_dtype(df[c]) for c in key_cols)
    if len(key_cols) == 1:
        labels = sorted(pd.unique(df[key_cols[0]]).tolist(), key=label_sort_key)
        feats = [[float(x)] for x in labels] if numeric else None
    else:
        if not numeric:
            bad = [c for c in key_cols if not pd.api.types.is_numeric_dtype(df[c])]
            raise InputError(f"multi-column keys must be numeric; non-numeric: {bad}")
        labels = sorted(set(df[key_cols].itertuples(index=False, name=None)))
        feats = [list(map(float, x)) for x in labels]
    if oov:
        labels.append(OOV_LABEL)
        if feats is not None:
            feats.append([0.0] * len(feats[0]))
    features = None if feats is None else torch.tensor(feats, dtype=torch.float64)
    return Vocabulary(labels=labels, features=features, oov=oov)
