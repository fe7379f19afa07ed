"""Units streamed from disk: fitting data that does not fit in memory.

:meth:`StreamingUnits.from_file` reads a long table (Parquet, or CSV / TSV) in chunks of rows
and never holds more than one chunk and one shard in memory:

1. **scan**: every chunk is checked like :meth:`EFAData.from_pandas` (columns, missing values,
   dtypes, NaN / inf), its keys (or items) are collected, and its rows are appended to one of
   ``K`` shard files (Parquet, in a temporary directory) chosen by a hash of the unit label, so
   that all rows of a unit land in the same shard, whatever the order of the file. With
   ``fractions`` the hash also assigns each unit to a part (train / validation / test).
2. **index**: each shard is built into units once (ordering, ties, vocabulary look-up) to count
   its units and observations and to gather the per-key value moments a model needs.

:func:`pyro_efa.fit` accepts a :class:`StreamingUnits` wherever it takes training data: an epoch
visits the shards in a random order (the fit's seeded generator) and the units of each shard in
random minibatches; plate scaling uses the global number of units, so the gradient is that of
the whole data set. Resuming from a checkpoint replays the same shard and batch order.

Peak memory is about that of :meth:`EFAData.from_pandas` on one shard (``shard_rows`` rows,
2 million by default) plus one chunk, independent of the size of the file.

Example::

    train, val, test = StreamingUnits.from_file(
        "ratings.parquet", unit="user", key="movie", value="rating", order="t",
        fractions=(0.8, 0.1, 0.1), seed=0,
    )
    model = EFA.from_data(train.sample(), family="gaussian", **train.model_overrides())
    fitted = fit(model, train, val_data=val.to_memory())
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .data import OOV_LABEL, EFAData, Vocabulary, key_moments, label_sort_key, leave_out_missing
from .errors import InputError

__all__ = ["StreamingUnits", "unit_hash"]

_PARQUET = (".parquet", ".pq")


def _pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow is installed with the dev extras
        raise ImportError("streaming units from files needs pyarrow (pip install pyarrow)") from e
    return pa, pq


def _chunks(path: Path, columns: list[str], chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The needed columns of the file, ``chunk_rows`` rows at a time."""
    if not path.is_file():
        raise InputError(f"data file '{path}' not found")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _PARQUET:
        _, pq = _pyarrow()
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:
            raise InputError(f"could not read '{path}' as Parquet ({e})") from e
        names = pf.schema_arrow.names
        missing = [c for c in columns if c not in names]
        if missing:
            raise InputError(f"column(s) {missing} not in the table; it has {names}")
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=columns):
            yield batch.to_pandas()
        return
    sep = "\t" if ".tsv" in suffixes else ","
    try:
        header = pd.read_csv(path, sep=sep, nrows=0).columns.tolist()
    except (ValueError, UnicodeDecodeError) as e:  # pandas' EmptyDataError included
        raise InputError(f"could not read '{path}': {e}") from e
    missing = [c for c in columns if c not in header]
    if missing:
        raise InputError(f"column(s) {missing} not in the table; it has {header}")
    try:
        yield from pd.read_csv(path, sep=sep, usecols=columns, chunksize=chunk_rows)
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"could not read '{path}': {e}") from e


def unit_hash(labels: pd.Series, seed: int) -> np.ndarray:
    """A hash of each unit label in [0, 1), the same for equal labels in any chunk."""
    h = pd.util.hash_pandas_object(labels, index=False, hash_key=f"pyro_efa{seed:08d}"[:16]).to_numpy()
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


@dataclasses.dataclass
class _Shard:
    path: Path
    units: int
    observations: int  # modelled
    max_len: int
    offset: int = 0


class StreamingUnits:
    """The units of one part of a table on disk, read shard by shard (see the module docs).

    Build it with :meth:`from_file`. It has the attributes of :class:`EFAData` that
    :func:`pyro_efa.fit` reads (``kind``, ``keys``, ``items``, ``columns``, ``num_units``,
    ``num_observations``, ``len()``, :meth:`batches`), plus :meth:`sample` (one shard in
    memory), :meth:`model_overrides` (sizes and value moments over all shards) and
    :meth:`to_memory`.
    """

    def __init__(
        self,
        shards: list[_Shard],
        *,
        kind: str,
        keys: Vocabulary,
        items: Vocabulary | None,
        columns: dict[str, Any],
        ties: str,
        moments: tuple[np.ndarray, np.ndarray, np.ndarray],
        workdir: Path,
        owner: Any = None,
        missing: dict[Any, int] | None = None,
    ) -> None:
        self.shards = shards
        self.kind = kind
        self.keys = keys
        self.items = items
        self.columns = columns
        self.ties = ties
        #: with ``missing="drop"``: how many observations of each key the whole file left out
        self.missing = dict(missing or {})
        self._moments = moments
        self.workdir = workdir
        self._owner = owner  # keeps the temporary directory alive while a part is in use
        offset = 0
        for s in shards:
            s.offset = offset
            offset += s.units
        self.num_units = offset
        self._check: Callable[[EFAData], None] | None = None

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_file(
        cls,
        path: str | Path,
        unit: str,
        key: str | Sequence[str] | None = None,
        value: str | None = None,
        order: str | None = None,
        context: str | None = None,
        *,
        fractions: Sequence[float] | None = None,
        seed: int = 0,
        chunk_rows: int = 1_000_000,
        shard_rows: int = 2_000_000,
        keys: Vocabulary | None = None,
        items: Vocabulary | None = None,
        oov: bool = False,
        ties: str = "error",
        missing: str = "error",
        na_values: Sequence[Any] | None = None,
        workdir: str | Path | None = None,
    ) -> StreamingUnits | tuple[StreamingUnits, ...]:
        """Scan ``path`` (Parquet for a ``.parquet`` / ``.pq`` suffix, else CSV; TSV for
        ``.tsv``) into unit shards.

        The column arguments, ``keys``, ``items``, ``oov``, ``ties``, ``missing`` and
        ``na_values`` are those of :meth:`EFAData.from_pandas`, with the same checks and error
        messages (missing values are left out as each chunk is read; :attr:`missing` counts them
        per key over the whole file).

        :param fractions: split the units into parts of these fractions (by a seeded hash of
            the unit label, so about, not exactly, these fractions); returns one
            :class:`StreamingUnits` per part. Without it: one object with every unit.
        :param int chunk_rows: rows read at a time.
        :param int shard_rows: about how many rows each shard holds (the memory bound).
        :param workdir: where the shard files go (default: a temporary directory removed when
            the objects are garbage collected).
        """
        path = Path(path)
        key_cols = [key] if isinstance(key, str) else list(key or [])
        if not key_cols:
            raise InputError("a key column is required (for item sequences: the item column)")
        if chunk_rows < 1 or shard_rows < 1:
            raise InputError("chunk_rows and shard_rows must be positive")
        parts = [1.0] if fractions is None else [float(f) for f in fractions]
        if any(f < 0 for f in parts) or sum(parts) <= 0:
            raise InputError(f"fractions must be non-negative with a positive sum, got {fractions}")
        columns = {"unit": unit, "key": key_cols, "value": value, "order": order, "context": context}
        owned = workdir is None
        root = Path(tempfile.mkdtemp(prefix="pyro_efa_shards_")) if owned else Path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        scan = _Scan(path, columns, root, parts, seed, shard_rows, keys=keys, items=items, oov=oov)
        distinct = scan.run(chunk_rows, missing, na_values)
        if distinct is None:
            shutil.rmtree(root, ignore_errors=True) if owned else None
            what = "every value is missing" if scan.left_out else "the table is empty"
            raise InputError(f"{what}: no observations to build units from")
        keys, item_vocab = _vocabularies(distinct, columns, keys, items, oov)
        owner = _TempDir(root) if owned else None
        out = []
        for p in range(len(parts)):
            shards, sums = [], [np.zeros(len(keys)) for _ in range(3)]
            for f in sorted(root.glob(f"part{p}-shard*.parquet")):
                d = _build(f, columns, keys, item_vocab, ties)
                shards.append(_Shard(f, len(d), d.num_observations, d.max_len))
                if d.kind == "valued":  # per-key moments of every observation (context included)
                    sums = [a + b for a, b in zip(sums, d.key_sums(), strict=True)]
            out.append(
                cls(
                    shards,
                    kind=scan.kind,
                    keys=keys,
                    items=item_vocab,
                    columns=columns,
                    ties=ties,
                    moments=tuple(sums),
                    workdir=root,
                    owner=owner,
                    missing=scan.left_out,
                )  # fmt: skip
            )
        return out[0] if fractions is None else tuple(out)

    # ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.num_units

    def __repr__(self) -> str:
        return (
            f"StreamingUnits(kind={self.kind!r}, units={self.num_units}, targets={self.num_observations}, "
            f"keys={len(self.keys)}, shards={len(self.shards)}, max_len={self.max_len})"
        )

    @property
    def num_observations(self) -> int:
        """Number of modelled observations."""
        return sum(s.observations for s in self.shards)

    @property
    def max_len(self) -> int:
        """Length of the longest unit over every shard."""
        return max((s.max_len for s in self.shards), default=0)

    def check_with(self, check: Callable[[EFAData], None] | None) -> None:
        """Run ``check`` (e.g. a model's ``validate``) on every shard when it is read."""
        self._check = check

    def shard(self, i: int) -> EFAData:
        """Shard ``i`` as a minibatch-able :class:`EFAData` (global unit indices and plate size)."""
        s = self.shards[i]
        d = _build(s.path, self.columns, self.keys, self.items, self.ties)
        if self._check is not None:
            self._check(d)
        return dataclasses.replace(d, unit_index=d.unit_index + s.offset, num_units=self.num_units)

    def sample(self) -> EFAData:
        """The first shard, as a data set of its own (to size a model and start its intercepts)."""
        if not self.shards:
            raise InputError("this part holds no units")
        return _build(self.shards[0].path, self.columns, self.keys, self.items, self.ties)

    def to_memory(self) -> EFAData:
        """Every unit of this part in one :class:`EFAData` (for validation and test parts)."""
        if not self.shards:
            raise InputError("this part holds no units")
        _, pq = _pyarrow()
        df = pd.concat([pq.read_table(s.path).to_pandas() for s in self.shards], ignore_index=True)
        return EFAData.from_pandas(df, **self.columns, keys=self.keys, items=self.items, ties=self.ties)

    def model_overrides(self) -> dict[str, Any]:
        """Fields of :class:`~pyro_efa.EFAConfig` computed over every shard (``max_len``, and the
        per-key ``value_center`` / ``value_scale`` of valued data, :func:`~pyro_efa.data.key_moments`),
        to pass to :meth:`EFA.from_data` with :meth:`sample`."""
        out: dict[str, Any] = {"max_len": max(self.max_len, 1)}
        if self.kind == "valued":
            out["value_center"], out["value_scale"] = key_moments(*self._moments)
        return out

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        bucket: bool = True,
    ) -> Iterator[EFAData]:
        """Minibatches of units, shard by shard (shards in random order with ``shuffle``)."""
        # one shard: no draw, so that a single-shard stream batches exactly like EFAData.batches
        many = shuffle and len(self.shards) > 1
        order = (
            torch.randperm(len(self.shards), generator=generator) if many else torch.arange(len(self.shards))
        )
        for i in order.tolist():
            yield from self.shard(i).batches(batch_size, shuffle=shuffle, generator=generator, bucket=bucket)


class _Scan:
    """The scan of :meth:`StreamingUnits.from_file`: every chunk checked like
    :meth:`EFAData.from_pandas` and its rows appended to the shard file of their part and unit
    hash; :meth:`run` returns the distinct keys (or items) of the whole file, or None when the
    file holds no row."""

    def __init__(
        self,
        path: Path,
        columns: dict[str, Any],
        root: Path,
        parts: list[float],
        seed: int,
        shard_rows: int,
        **lookup: Any,
    ) -> None:
        self.path, self.columns, self.root, self.seed, self.lookup = path, columns, root, seed, lookup
        self.kind = "valued" if columns["value"] is not None else "items"
        self.bounds = np.cumsum(parts) / sum(parts)
        _, pq = _pyarrow()
        # the number of shards per part: known for Parquet, estimated from the size for CSV
        suffixes = [s.lower() for s in path.suffixes]
        if path.is_file() and suffixes and suffixes[-1] in _PARQUET:
            total = pq.ParquetFile(path).metadata.num_rows
        else:
            total = max(1, path.stat().st_size // 20) if path.is_file() else 1  # ~20 bytes a row
        self.num_shards = max(1, math.ceil(total / shard_rows))
        self.writers: dict[tuple[int, int], Any] = {}
        self.schema: Any = None
        self.left_out: dict[Any, int] = {}

    def run(self, chunk_rows: int, missing: str, na_values: Sequence[Any] | None) -> pd.DataFrame | None:
        c = self.columns
        needed = list(
            dict.fromkeys([c["unit"], *c["key"]] + [c[k] for k in ("value", "order", "context") if c[k]])
        )
        found: list[pd.DataFrame] = []
        try:
            for chunk in _chunks(self.path, needed, chunk_rows):
                if len(chunk) == 0:
                    continue
                value = c["value"]
                if value is not None and not (
                    pd.api.types.is_numeric_dtype(chunk[value]) or pd.api.types.is_bool_dtype(chunk[value])
                ):
                    raise InputError(
                        f"column {value!r}: streamed tables take numbers (got dtype {chunk[value].dtype}); "
                        "class labels need the whole table at once: read it with EFAData.from_pandas"
                    )
                if value is not None:  # missing values left out (or refused) before any other check
                    chunk, left = leave_out_missing(chunk, c, missing, na_values, allow_empty=True)
                    for k, n in left.items():
                        if k != "<units>":  # a unit may have rows in other chunks
                            self.left_out[k] = self.left_out.get(k, 0) + n
                    if len(chunk) == 0:
                        continue
                    chunk = chunk.copy() if left else chunk
                # every check of from_pandas, on this chunk (ties are checked per shard later)
                EFAData.from_pandas(chunk, **c, **self.lookup, ties="keep")
                found.append(chunk[c["key"]].drop_duplicates())
                self._write(chunk)
        finally:
            for w in self.writers.values():
                w.close()
        return pd.concat(found, ignore_index=True).drop_duplicates() if found else None

    def _write(self, chunk: pd.DataFrame) -> None:
        pa, pq = _pyarrow()
        h = unit_hash(chunk[self.columns["unit"]], self.seed)
        num_parts = len(self.bounds)
        part = np.searchsorted(self.bounds, h, side="right").clip(max=num_parts - 1)
        shard = (h * self.num_shards * num_parts).astype(np.int64) % self.num_shards
        value = self.columns["value"]
        if value is not None:
            chunk[value] = chunk[value].astype(np.float64)  # counts in one chunk, 2.5 in another
        try:
            table = pa.Table.from_pandas(chunk, preserve_index=False)
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise InputError(f"a column of '{self.path}' mixes types ({e}); make its type uniform") from e
        if self.schema is None:
            self.schema = table.schema
        else:
            try:
                table = table.cast(self.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
                raise InputError(
                    f"a column changes type between chunks of '{self.path}' ({e}); make its type "
                    "uniform (e.g. all unit labels strings)"
                ) from e
        for (p, s), idx in pd.Series(np.arange(len(chunk))).groupby([part, shard]).groups.items():
            w = self.writers.get((p, s))
            if w is None:
                w = self.writers[(p, s)] = pq.ParquetWriter(
                    self.root / f"part{p}-shard{s:05d}.parquet", self.schema
                )
            w.write_table(table.take(pa.array(np.asarray(idx))))


def _vocabularies(
    distinct: pd.DataFrame,
    columns: dict[str, Any],
    keys: Vocabulary | None,
    items: Vocabulary | None,
    oov: bool,
) -> tuple[Vocabulary, Vocabulary | None]:
    """The key (and item) vocabularies of the whole file, from its distinct keys."""
    key_cols = columns["key"]
    if columns["value"] is None:
        if items is None:
            labels = sorted(distinct[key_cols[0]].tolist(), key=label_sort_key)
            if oov:
                labels.append(OOV_LABEL)
            items = Vocabulary(labels=labels, oov=oov)
        return keys or Vocabulary(labels=["position"]), items
    if keys is None:
        keys = EFAData.from_pandas(
            distinct.assign(__u=0, __x=0.0), "__u", key_cols, "__x", oov=oov, ties="keep"
        ).keys
    return keys, None


def _build(
    path: Path, columns: dict[str, Any], keys: Vocabulary, items: Vocabulary | None, ties: str
) -> EFAData:
    _, pq = _pyarrow()
    df = pq.read_table(path).to_pandas()
    return EFAData.from_pandas(df, **columns, keys=keys, items=items, ties=ties)


class _TempDir:
    """Removes a directory when the last object that holds it is garbage collected."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(path), True)
