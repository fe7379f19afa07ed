"""Units streamed from Parquet / CSV shards (:mod:`pyro_efa.streaming`): the same units as
:meth:`EFAData.from_pandas`, the same checks, and fits that use them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_efa import EFA, EFAData, fit
from pyro_efa.streaming import StreamingUnits

SMALL = dict(dim=4, num_layers=1, num_heads=1, head_dim=4)


def _table(num_units: int = 150, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for u in rng.permutation(num_units):
        for t, k in enumerate(rng.choice(6, size=int(rng.integers(1, 6)), replace=False)):
            rows.append((f"u{u}", int(k), 10 * t + int(rng.integers(0, 9)), float(rng.normal(k, 1.0))))
    df = pd.DataFrame(rows, columns=["user", "item", "t", "x"])
    return df.sample(frac=1.0, random_state=seed)  # rows of a unit scattered through the file


def _write(df: pd.DataFrame, path: Path) -> Path:
    if path.suffix == ".parquet":
        df.to_parquet(path, index=False)
    else:
        df.to_csv(path, index=False)
    return path


def _same(a: EFAData, b: EFAData) -> None:
    assert a.unit_labels == b.unit_labels and a.keys.labels == b.keys.labels
    for name in ("key_index", "values", "mask", "target"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_shards_hold_the_same_units_as_from_pandas(tmp_path: Path, suffix: str) -> None:
    df = _table()
    path = _write(df, tmp_path / f"table{suffix}")
    s = StreamingUnits.from_file(path, "user", "item", "x", order="t", chunk_rows=97, shard_rows=120)
    full = EFAData.from_pandas(df, "user", "item", "x", order="t")
    assert len(s.shards) > 3 and len(s) == len(full) and s.num_observations == full.num_observations
    assert s.max_len == full.max_len and s.keys.labels == full.keys.labels
    _same(s.to_memory(), full)
    # every unit in exactly one shard, with its global index and the global plate size
    seen = []
    for i in range(len(s.shards)):
        shard = s.shard(i)
        assert shard.num_units == len(full)
        seen += shard.unit_index.tolist()
        for k, label in enumerate(shard.unit_labels):
            u = full.unit_labels.index(label)
            n = int(full.lengths[u])
            assert torch.equal(shard.values[k, :n], full.values[u, :n])
    assert sorted(seen) == list(range(len(full)))
    # per-key moments over every shard, as EFA.from_data computes them in memory
    kwargs = s.model_overrides()
    model = EFA.from_data(full)
    np.testing.assert_allclose(kwargs["value_center"], model.value_center.numpy(), rtol=1e-5)
    np.testing.assert_allclose(kwargs["value_scale"], model.value_scale.numpy(), rtol=1e-4)


def test_split_by_unit_hash(tmp_path: Path) -> None:
    df = _table(400)
    path = _write(df, tmp_path / "t.parquet")
    parts = StreamingUnits.from_file(path, "user", "item", "x", order="t", fractions=(0.8, 0.1, 0.1), seed=3)
    labels = [set(p.to_memory().unit_labels) for p in parts]
    assert sum(len(x) for x in labels) == 400 and set.union(*labels) == set(df["user"])
    assert 0.7 < len(labels[0]) / 400 < 0.9
    again = StreamingUnits.from_file(path, "user", "item", "x", order="t", fractions=(0.8, 0.1, 0.1), seed=3)
    assert [set(p.to_memory().unit_labels) for p in again] == labels
    other = StreamingUnits.from_file(path, "user", "item", "x", order="t", fractions=(0.8, 0.1, 0.1), seed=4)
    assert [set(p.to_memory().unit_labels) for p in other] != labels


def test_one_shard_stream_fits_exactly_like_memory(tmp_path: Path) -> None:
    df = _table(80)
    s = StreamingUnits.from_file(_write(df, tmp_path / "t.parquet"), "user", "item", "x", order="t")
    assert len(s.shards) == 1
    full = EFAData.from_pandas(df, "user", "item", "x", order="t")
    fits = []
    for data in (full, s):
        torch.manual_seed(0)
        model = EFA.from_data(full, **SMALL)
        fits.append(fit(model, data, num_epochs=2, batch_size=16, progress=False))
    assert fits[0].losses == fits[1].losses
    for k, v in fits[0].model.state_dict().items():
        assert torch.equal(v, fits[1].model.state_dict()[k]), k


def test_streaming_fit_with_many_shards_and_resume(tmp_path: Path) -> None:
    df = _table(200)
    path = _write(df, tmp_path / "t.csv")
    train, val = StreamingUnits.from_file(
        path, "user", "item", "x", order="t", fractions=(0.8, 0.2), chunk_rows=64, shard_rows=150
    )
    assert len(train.shards) > 2

    def run(epochs: int, **kwargs) -> object:
        torch.manual_seed(0)
        model = EFA.from_data(train.sample(), **SMALL, **train.model_overrides())
        return fit(
            model, train, val_data=val.to_memory(), num_epochs=epochs, batch_size=16, progress=False, **kwargs
        )

    whole = run(3)
    assert all(np.isfinite(whole.losses)) and len(whole.val_nll) == 3
    run(1, checkpoint_dir=tmp_path / "ck", checkpoint_every=5)
    resumed = run(3, checkpoint_dir=tmp_path / "ck", checkpoint_every=5, resume=True)
    assert resumed.losses == whole.losses and resumed.val_nll == whole.val_nll


@pytest.mark.parametrize(
    "change, match",
    [
        pytest.param(lambda df: df.drop(columns="x"), r"\['x'\] not in the table", id="missing-column"),
        pytest.param(
            lambda df: df.assign(x=np.where(df.index == 7, np.nan, df["x"])), "'x' has 1 missing", id="nan"
        ),
        pytest.param(lambda df: df.assign(x="a"), "streamed tables take numbers", id="strings"),
        pytest.param(lambda df: df.iloc[:0], "empty", id="empty"),
        pytest.param(lambda df: df.assign(t=0), "several observations with 't'", id="ties"),
    ],
)
def test_bad_files_fail_like_from_pandas(tmp_path: Path, change, match: str) -> None:
    path = _write(change(_table(50)), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=match):
        StreamingUnits.from_file(path, "user", "item", "x", order="t", chunk_rows=30, shard_rows=60)


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        StreamingUnits.from_file(tmp_path / "nothing.csv", "u", "k", "x")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="could not read"):
        StreamingUnits.from_file(tmp_path / "empty.csv", "u", "k", "x")
