"""Hostile input: generated tables (hypothesis) through :meth:`EFAData.from_pandas`, :func:`fit`
and the command line. Each ends in a clear ``ValueError`` raised by pyro_efa (naming the column
or value) or in correct units / a finite fit; never in an exception from inside torch or pandas."""

from __future__ import annotations

import io
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pyro_efa import EFA, EFAData, fit
from pyro_efa.cli import main

SMALL = dict(dim=4, num_layers=1, num_heads=1, head_dim=4)
# generated values may be, e.g., 999999.94 and 1e6: float32 rounding warnings are expected there
pytestmark = pytest.mark.filterwarnings("ignore::pyro_efa.data.PrecisionWarning")
SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def _raised_by_us(error: BaseException) -> bool:
    """Whether the innermost frame of ``error``'s traceback is pyro_efa code."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and "pyro_efa" in frames[-1].filename


def _clear_error(error: BaseException) -> None:
    assert isinstance(error, ValueError), repr(error)
    assert _raised_by_us(error), "".join(traceback.format_exception(error))
    text = str(error)
    assert "Traceback" not in text and "Tensor" not in text and len(text) < 600, text


# ----------------------------------------------------------------------------------------------
# a reference implementation of from_pandas (one Python loop, obviously right) for the oracle test


def _reference(df: pd.DataFrame, unit: str, key: str, value: str, order: str | None) -> dict:
    units = sorted(set(df[unit].tolist()))
    keys = sorted(set(df[key].tolist()))
    rows: dict = {u: [] for u in units}
    for i, (u, k, x) in enumerate(zip(df[unit].tolist(), df[key].tolist(), df[value].tolist(), strict=True)):
        rows[u].append((df[order].iloc[i] if order else 0, i, keys.index(k), x))
    width = max(len(r) for r in rows.values())
    key_index = np.zeros((len(units), width), dtype=np.int64)
    values = np.zeros((len(units), width))
    mask = np.zeros((len(units), width), dtype=bool)
    for a, u in enumerate(units):
        for p, (_, _, k, x) in enumerate(sorted(rows[u], key=lambda r: (r[0], r[1]))):
            key_index[a, p], values[a, p], mask[a, p] = k, x, True
    return {"units": units, "keys": keys, "key_index": key_index, "values": values, "mask": mask}


unit_ids = st.one_of(
    st.integers(-(2**63), 2**63 - 1),  # huge and negative ids
    st.integers(0, 5),  # few units, many observations each
    st.text("abcxyz", min_size=1, max_size=3),
)
key_ids = st.one_of(st.integers(-3, 3), st.sampled_from(["a", "b", "c", "d"]), st.integers(-(2**62), 2**62))
finite = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def tables(draw, allow_bad_values: bool = False) -> tuple[pd.DataFrame, bool]:
    n = draw(st.integers(1, 30))
    units = draw(st.lists(unit_ids, min_size=1, max_size=6, unique=True))
    # one type per column, as a real column has
    units = [u for u in units if type(u) is type(units[0])]
    keys = draw(st.lists(key_ids, min_size=1, max_size=5, unique=True))
    keys = [k for k in keys if type(k) is type(keys[0])]
    values = st.one_of(finite, st.sampled_from([np.nan, np.inf, -np.inf])) if allow_bad_values else finite
    df = pd.DataFrame(
        {
            "u": draw(st.lists(st.sampled_from(units), min_size=n, max_size=n)),
            "k": draw(st.lists(st.sampled_from(keys), min_size=n, max_size=n)),  # repeated keys allowed
            "t": draw(st.lists(st.integers(-(2**40), 2**40) | st.integers(0, 3), min_size=n, max_size=n)),
            "x": draw(st.lists(values, min_size=n, max_size=n)),
        }
    )
    return df, bool(np.isfinite(df["x"]).all())


@SETTINGS
@given(table=tables(allow_bad_values=True), use_order=st.booleans(), ties=st.sampled_from(["error", "keep"]))
def test_from_pandas_matches_a_reference_or_fails_clearly(table, use_order: bool, ties: str) -> None:
    df, ok = table
    order = "t" if use_order else None
    try:
        data = EFAData.from_pandas(df, "u", "k", "x", order=order, ties=ties)
    except ValueError as e:
        _clear_error(e)
        text = str(e)
        tied = use_order and ties == "error" and df.duplicated(["u", "t"]).any()
        if "'t' =" in text:
            assert tied, text
        else:
            assert not ok and "'x'" in text and ("NaN/inf" in text or "missing value" in text), text
        return
    assert ok
    if use_order and ties == "error":
        assert not df.duplicated(["u", "t"]).any()
    ref = _reference(df, "u", "k", "x", order)
    assert data.unit_labels == ref["units"] and data.keys.labels == ref["keys"]
    assert torch.equal(data.mask, torch.from_numpy(ref["mask"]))
    assert torch.equal(data.key_index, torch.from_numpy(ref["key_index"]))
    expected = torch.from_numpy(ref["values"]).to(data.values.dtype)
    assert torch.equal(data.values, expected)
    assert data.num_units == len(ref["units"]) and data.num_observations == len(df)


@SETTINGS
@given(table=tables(), seed=st.integers(0, 2**16))
def test_row_order_does_not_matter_with_an_order_column(table, seed: int) -> None:
    df, _ = table
    df = df.drop_duplicates(["u", "t"])
    a = EFAData.from_pandas(df, "u", "k", "x", order="t")
    b = EFAData.from_pandas(df.sample(frac=1.0, random_state=seed), "u", "k", "x", order="t")
    for name in ("key_index", "values", "mask", "target"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


BAD_TABLES = [
    pytest.param(lambda df: df.drop(columns="x"), r"\['x'\] not in the table", id="missing-column"),
    pytest.param(lambda df: df.iloc[:0], "empty", id="empty"),
    pytest.param(lambda df: df.assign(x=pd.Timestamp("2020-01-01")), "'x' must be numeric", id="datetimes"),
    pytest.param(lambda df: df.assign(x=df["x"] + 1j), "complex", id="complex"),
    pytest.param(
        lambda df: df.assign(x=np.where(df.index == 2, 1e39, df["x"])), "beyond the range", id="huge"
    ),
    pytest.param(
        lambda df: df.assign(x=np.where(df.index == 1, np.nan, df["x"])),
        "missing value.*missing='drop'",
        id="nan",
    ),
    pytest.param(
        lambda df: df.assign(u=df["u"].where(df.index != 3)), "'u' has a missing value", id="nan-unit"
    ),
    pytest.param(lambda df: df.assign(k=[[1]] * len(df)), "cannot be labels", id="unhashable-key"),
    pytest.param(lambda df: df.assign(u=[{1: 2}] * len(df)), "cannot be labels", id="unhashable-unit"),
    pytest.param(lambda df: df.assign(t=df["t"].astype(str)), "'t' must be numeric", id="string-order"),
    pytest.param(lambda df: df.assign(t=1), "several observations with 't'", id="repeated-order"),
    pytest.param(lambda df: pd.concat([df, df[["x"]]], axis=1), "more than once", id="duplicate-column"),
    pytest.param(lambda df: df.assign(c=df["x"] > 0, ctx=1), "boolean", id="context-not-bool"),
]


@pytest.mark.parametrize("change, match", BAD_TABLES)
def test_bad_tables_fail_clearly(change, match: str) -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {"u": np.repeat([5, 7, 9], 4), "k": np.tile([1, 2, 3, 4], 3), "t": np.tile([3, 1, 2, 0], 3)}
    ).assign(x=rng.normal(size=12))
    df = change(df)
    context = "ctx" if "ctx" in df.columns else None
    with pytest.raises(ValueError, match=match) as info:
        EFAData.from_pandas(df, "u", "k", "x", order="t", context=context)
    _clear_error(info.value)


def test_mixed_type_unit_labels_sort_numbers_first() -> None:
    df = pd.DataFrame({"u": ["b", 3, "a", 3, -1], "k": [1, 2, 1, 1, 2], "x": [1.0, 2.0, 3.0, 4.0, 5.0]})
    data = EFAData.from_pandas(df, "u", "k", "x")
    assert data.unit_labels == [-1, 3, "a", "b"]
    assert data.values.tolist() == [[5.0, 0.0], [2.0, 4.0], [3.0, 0.0], [1.0, 0.0]]


def test_inf_coordinates_fail_clearly() -> None:
    df = pd.DataFrame({"u": [1, 1], "lat": [1.0, np.inf], "lon": [2.0, 3.0], "x": [1.0, 2.0]})
    with pytest.raises(ValueError, match="'lat' has inf"):
        EFAData.from_pandas(df, "u", ["lat", "lon"], "x")


# ----------------------------------------------------------------------------------------------
# families that do not fit the values, and fits of awkward but valid data


@pytest.mark.parametrize(
    "family, values, match",
    [
        ("poisson", [1.0, -2.0, 3.0], "value -2.0 .* not valid for the poisson family"),
        ("poisson", [1.0, 2.5, 3.0], "value 2.5 .* poisson"),
        ("bernoulli", [0.0, 1.0, 2.0], "value 2.0 .* bernoulli"),
        ("gamma", [1.0, 0.0, 3.0], "value 0.0 .* gamma"),
        ("binomial", [1.0, 2.0, 9.0], "value 9.0 .* binomial"),
    ],
)
def test_family_that_does_not_fit_the_values(family: str, values: list[float], match: str) -> None:
    df = pd.DataFrame({"u": [1, 1, 2], "k": ["a", "b", "a"], "x": values})
    data = EFAData.from_pandas(df, "u", "k", "x")
    options = {"binomial": {"total_count": 5}} if family == "binomial" else None
    model = EFA.from_data(data, family=family, family_options=options, **SMALL)
    with pytest.raises(ValueError, match=match) as info:
        fit(model, data, num_epochs=1, progress=False)
    _clear_error(info.value)
    assert "column 'x'" in str(info.value)


@settings(max_examples=15, deadline=None)
@given(table=tables(), direction=st.sampled_from(["uni", "bi"]))
def test_awkward_valid_tables_fit(table, direction: str) -> None:
    """Units of one observation, repeated keys within a unit, unsorted rows, huge ids: a fit that
    runs and stays finite."""
    df, _ = table
    data = EFAData.from_pandas(df, "u", "k", "x", order="t", ties="keep")
    model = EFA.from_data(data, direction=direction, **SMALL)
    f = fit(model, data, num_epochs=2, batch_size=4, progress=False)
    assert all(np.isfinite(f.losses))


# ----------------------------------------------------------------------------------------------
# the command line on generated files


def _cli(args: list[str]) -> tuple[int, str, str]:
    """Run the CLI in this process. ``main`` returns 2 only for the library's own refusals
    (``pyro_efa.InputError``, a ValueError) and operating-system errors; any other exception (from
    torch, pandas, Pyro) propagates here and fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


CLI_ARGS = ["--epochs", "1", "--dim", "4", "--layers", "1", "--heads", "1", "--no-progress", "--force"]


@st.composite
def cli_tables(draw) -> pd.DataFrame:
    big_ints = st.integers(-(2**63), 2**63 - 1)
    ids = draw(
        st.lists(big_ints, min_size=12, max_size=20, unique=True)
        | st.lists(st.text("abc", min_size=4, max_size=6), min_size=12, max_size=20, unique=True)
    )
    sizes = draw(st.lists(st.integers(1, 4), min_size=len(ids), max_size=len(ids)))
    n = sum(sizes)
    values = st.one_of(finite, st.just(np.nan)) if draw(st.booleans()) else finite
    df = pd.DataFrame(
        {
            "u": np.repeat(np.array(ids, dtype=object), sizes),
            "k": draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=n, max_size=n)),
            "t": draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)),
            "x": draw(st.lists(values, min_size=n, max_size=n)),
        }
    ).sample(frac=1.0, random_state=draw(st.integers(0, 100)))
    mutation = draw(
        st.sampled_from(["none", "drop-x", "strings", "negative-counts", "fractions", "bools", "one-row"])
    )
    if mutation == "drop-x":
        df = df.drop(columns="x")
    elif mutation == "strings":
        df["x"] = draw(st.lists(st.text("ab1.", max_size=3), min_size=n, max_size=n))
    elif mutation == "negative-counts":
        df["x"] = -np.abs(np.round(df["x"])) - 1
    elif mutation == "fractions":
        df["x"] = np.abs(df["x"]) + 0.5
    elif mutation == "bools":
        df["x"] = df["x"] > 0
    elif mutation == "one-row":
        df = df.iloc[:1]
    return df


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    df=cli_tables(),
    family=st.sampled_from(["gaussian", "poisson", "bernoulli", "gamma"]),
    fmt=st.sampled_from(["csv", "parquet"]),
    order=st.booleans(),
)
def test_cli_fit_on_generated_files(
    tmp_path: Path, df: pd.DataFrame, family: str, fmt: str, order: bool
) -> None:
    path = tmp_path / f"table.{fmt}"
    if fmt == "csv":
        df.to_csv(path, index=False)
    else:
        df.columns = [str(c) for c in df.columns]
        df.to_parquet(path, index=False)
    args = ["fit", str(path), "--unit", "u", "--key", "k", "--value", "x", "--family", family]
    args += (["--order", "t", "--ties", "keep"] if order else []) + [
        "--out",
        str(tmp_path / "fit"),
        *CLI_ARGS,
    ]
    code, _, err = _cli(args)
    event("fitted" if code == 0 else " ".join(err.strip().splitlines()[-1].split()[2:6]))
    if code == 0:
        assert (tmp_path / "fit" / "config.json").is_file()
        return
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if not line.startswith("pyro-efa: warning: ")]
    assert len(lines) == 1 and lines[0].startswith("pyro-efa: error: "), err
    for word in ("Traceback", "Tensor", "torch", "Trace Shapes", "size mismatch"):
        assert word not in lines[0], lines[0]


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "could not read"),
        ("u,k,x\n", "empty"),
        ("u,k\n1,2\n", "'x'"),
        ("\x00\x01\x02garbage", "could not read|not in the table"),
    ],
)
def test_cli_degenerate_files(tmp_path: Path, content: str, match: str) -> None:
    path = tmp_path / "table.csv"
    path.write_text(content)
    code, _, err = _cli(
        ["fit", str(path), "--unit", "u", "--key", "k", "--value", "x", "--out", str(tmp_path / "o")]
    )
    assert code == 2
    assert err.startswith("pyro-efa: error: ") and len(err.strip().splitlines()) == 1, err
    assert pytest.importorskip("re").search(match, err), err


def test_numbers_written_as_text_are_numbers() -> None:
    """An object column of numbers (or numbers written as text) holds numbers, not class labels."""
    df = pd.DataFrame({"u": [1, 1, 2, 2], "k": ["a", "b", "a", "b"], "x": [1.5, 2.0, 3.0, 4.25]})
    for column in (df["x"].astype(object), df["x"].astype(str)):
        data = EFAData.from_pandas(df.assign(x=column), "u", "k", "x")
        assert not data.classes
        assert sorted(data.values[data.mask].tolist()) == [1.5, 2.0, 3.0, 4.25]
