"""Command-line interface: ``pyro-efa demo | fit | evaluate | predict``.

- ``pyro-efa demo``: the synthetic ratings experiment of the paper (data generated in code):
  EFA and the EFE baseline, unidirectional and bidirectional, with their held-out test MSE.
- ``pyro-efa fit data.csv --unit U --key K [--value V] ... --out DIR``: read a long table (CSV, or
  Parquet for a ``.parquet`` suffix), split it by unit into train / validation / test (seeded),
  fit with early stopping on validation, and save the fit, ``split.json`` (which units went
  where) and ``metrics.json`` (held-out test metrics) to ``DIR``. Options for larger fits:
  ``--checkpoint-every K`` / ``--resume`` (atomic checkpoints in ``DIR/checkpoint``; a resumed
  fit on the CPU is bit-identical to an uninterrupted one), ``--device cuda``, ``--dtype
  float64``, and ``--stream`` (the training units are read from disk shard by shard, see
  :mod:`pyro_efa.streaming`; the split is by a seeded hash of the unit label).
- Data-parallel: ``torchrun --nproc_per_node N -m pyro_efa fit data.csv ... --batch-size B``
  trains with a *global* batch of ``N x B`` units (each process takes ``B``; see
  :mod:`pyro_efa.distributed`); only rank 0 prints and writes ``DIR``.
- ``pyro-efa evaluate DIR data.csv``: reload the fit, rebuild the data with the fit's columns and
  vocabularies, and print the metrics of the test units (or of all units).
- ``pyro-efa predict DIR data.csv [--out predictions.csv]``: per-observation predictions.

Errors a user can cause (a missing file or column, bad values, an unknown family, a directory
without a fit) print one line ``pyro-efa: error: ...`` to stderr and return exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import numbers
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pandas as pd
import pyro
import torch
from tqdm import tqdm

from . import __version__, datasets, distributed
from .checkpoint import CHECKPOINT_NAME
from .config import EFAConfig, FitOptions
from .data import EFAData
from .errors import InputError
from .families import FAMILIES
from .guides import GUIDES
from .infer import fit
from .model import EFA
from .predictive import evaluate, predict
from .results import EFAFit
from .serialization import load, save
from .streaming import StreamingUnits

__all__ = ["build_parser", "main"]

PROG = "pyro-efa"
SPLIT_FORMAT = "pyro_efa.split/1"
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class CLIError(InputError):
    """An error the user can fix; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are raised (and printed as one line by :func:`main`)."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see '{self.prog} --help')")


# ------------------------------------------------------------------------------------------------
# small helpers
def _one_line(error: BaseException) -> str:
    if isinstance(error, OSError) and error.filename is not None:
        text = f"{error.strerror or 'not found'}: {error.filename}"
    else:
        text = str(error) or type(error).__name__
    text = text.split(" Trace Shapes:")[0]  # Pyro appends the shapes of every site
    text = " ".join(text.split())
    return text if len(text) <= 600 else text[:597] + "..."


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _data_file(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise CLIError(f"data file '{path}' not found")
    if p.is_dir():
        raise CLIError(f"data file '{path}' is a directory, expected a CSV or Parquet file")
    return p


def _read_table(path: str) -> pd.DataFrame:
    """A CSV (TSV for ``.tsv``) or Parquet file as a DataFrame."""
    p = _data_file(path)
    suffixes = [s.lower() for s in p.suffixes]
    try:
        if suffixes and suffixes[-1] in (".parquet", ".pq"):
            return pd.read_parquet(p)
        sep = "\t" if ".tsv" in suffixes else ","
        return pd.read_csv(p, sep=sep)
    except ImportError as e:
        raise CLIError(f"reading '{path}' needs an optional package ({e}); install pyarrow") from e
    except (ValueError, UnicodeDecodeError) as e:  # pandas' EmptyDataError and ParserError included
        raise CLIError(f"could not read '{path}': {_one_line(e)}") from e


def _family_name(name: str, option: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key not in FAMILIES:
        raise CLIError(f"{option}: unknown family {name!r}; known families: {', '.join(sorted(FAMILIES))}")
    return key


def _parse_scalar(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _label_matches(text: str, label: Any) -> bool:
    """Whether a label written on the command line (``1``, ``a``, ``40.7:-74.0``) names ``label``."""
    if isinstance(label, tuple):
        parts = text.split(":")
        return len(parts) == len(label) and all(
            _label_matches(p, x) for p, x in zip(parts, label, strict=True)
        )
    if str(label) == text:
        return True
    if isinstance(label, numbers.Number) and not isinstance(label, bool):
        try:
            return float(text) == float(label)  # type: ignore[arg-type]
        except ValueError:
            return False
    return False


def _json_label(label: Any) -> Any:
    if hasattr(label, "item") and not isinstance(label, (str, bytes)):
        try:
            label = label.item()
        except (TypeError, ValueError):
            pass
    if label is None or isinstance(label, (str, bool, int)):
        return label
    if isinstance(label, float) and math.isfinite(label):
        return label
    return str(label)


def _label_key(label: Any) -> str:
    """Units are matched between ``fit`` and ``evaluate`` through their text form."""
    return str(_json_label(label))


#: per-key metrics are printed for at most this many keys (all of them are in the JSON)
PRINT_KEYS = 30


def _metric_lines(metrics: dict[str, Any]) -> list[str]:
    """The pooled metrics, then a table per observed site (mixed types) and per key (few keys)."""
    names = {
        "nll": "NLL per observation",
        "nll_no_base": "NLL without log h(x)",
        "mse": "MSE",
        "accuracy": "accuracy",
    }
    names.update({m: m for m in metrics if m.startswith(("recall@", "ndcg@"))})
    lines = [f"  {label:<22} {metrics[key]:.6f}" for key, label in names.items() if key in metrics]
    per_site, per_key = metrics.get("per_site", []), metrics.get("per_key", [])
    if len(per_site) > 1:
        lines += ["per observed site:", _table(per_site, "site")]
    if 1 < len(per_key) <= PRINT_KEYS:
        lines += ["per key:", _table(per_key, "key")]
    elif per_key:
        lines.append(f"per key: {len(per_key)} keys (all in the JSON: per_key)")
    return lines


def _table(records: list[dict[str, Any]], label: str) -> str:
    table = pd.DataFrame(records).drop(columns=["nll_no_base"], errors="ignore")
    table = table.rename(columns={"num_observations": "n"})
    table[label] = table[label].map(lambda x: str(_json_label(x)))
    text = table.to_string(index=False, float_format=lambda x: f"{x:.4f}", na_rep="")
    return "  " + text.replace("\n", "\n  ")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------
# demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from .models import synthetic  # the experiment of the paper, as models/synthetic.py runs it

    n = args.num_users
    if n < 8:
        raise CLIError(f"--num-users must be at least 8, got {n}")
    if args.num_epochs < 1:
        raise CLIError(f"--num-epochs must be positive, got {args.num_epochs}")
    progress = not args.no_progress
    exp = synthetic.EXPERIMENT
    splits = synthetic.load(num_users=n)
    train, val, test = splits
    truth = datasets.synthetic_ratings(n, seed=42)
    held_out = truth[truth["user"].isin(test.unit_labels)]
    oracle = float(((held_out["rating"] - held_out["mu"]) ** 2).mean())
    print(
        f"synthetic ratings: {n} users x 5 movies (data seed 42); train {len(train)} users, "
        f"validation {len(val)}, test {len(test)}; Gaussian, guide map, the recommended models and fit "
        f"options of models/synthetic.py, at most {args.num_epochs} epochs, seed {args.seed}",
        flush=True,
    )
    specs = [("EFA", "uni"), ("EFA", "bi"), ("EFE", "uni"), ("EFE", "bi")]
    rows = []
    bar = tqdm(specs, desc="demo", disable=not progress, leave=False)
    for name, direction in bar:
        bar.set_description(f"{name} {direction}")
        model = exp.model(name.lower(), direction, splits)
        options = exp.fit_options(name.lower(), direction, num_epochs=args.num_epochs, seed=args.seed)
        fitted = fit(model, train, guide="map", val_data=val, options=options, progress=progress)
        m = evaluate(fitted, test)
        rows.append(
            (name, direction, m["mse"], m["nll"], len(fitted.losses), fitted.best_epoch, fitted.seconds)
        )
    bar.close()
    header = (
        f"{'model':<6} {'direction':<9} {'test MSE':>9} {'test NLL':>9} {'epochs':>6} {'best':>5} "
        f"{'seconds':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, direction, mse, nll, epochs, best, seconds in rows:
        print(f"{name:<6} {direction:<9} {mse:>9.4f} {nll:>9.4f} {epochs:>6d} {best:>5d} {seconds:>8.1f}")
    print(
        f"Bayes-optimal test MSE: 1.0 in both directions (the rating noise variance; "
        f"the true means score {oracle:.4f} on these {len(test)} test users)"
    )
    return 0


# ------------------------------------------------------------------------------------------------
# fit
def _check_out_dir(out: Path, force: bool, checkpoint_dir: Path) -> None:
    """``--out`` may be new, empty, hold a previous fit, or hold only the checkpoint directory of
    an interrupted fit (what ``--resume`` continues); anything else needs ``--force``."""
    if out.exists() and not out.is_dir():
        raise CLIError(f"--out '{out}' exists and is not a directory")
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise CLIError(f"--checkpoint-dir '{checkpoint_dir}' exists and is not a directory")
    if not out.is_dir() or force or (out / "config.json").is_file():
        return
    entries = list(out.iterdir())
    if all(e.is_dir() and e.resolve() == checkpoint_dir.resolve() for e in entries):
        return  # empty, or only the checkpoint of an interrupted fit
    raise CLIError(
        f"--out '{out}' is not empty and holds no previous fit (no config.json) or checkpoint; "
        "choose a new directory, or pass --force to write into it"
    )


def _parse_device(text: str | None) -> str | None:
    """``--device``: None (the default), ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine."""
    if text is None:
        return None
    name = text.strip().lower()
    if name == "cpu":
        return name
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise CLIError(f"--device: expected cpu, cuda or cuda:N, got {text!r}")
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
        raise CLIError(f"--device {text}: CUDA is not available ({why}); use --device cpu")
    count = torch.cuda.device_count()
    if match.group(1) is not None and int(match.group(1)) >= count:
        raise CLIError(f"--device {text}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return name


def _parse_family_map(text: str) -> list[tuple[str, str]]:
    entries = []
    for item in text.split(","):
        if not item.strip():
            continue
        label, sep, family = item.rpartition("=")
        if not sep or not label.strip():
            raise CLIError(f"--family-map: expected KEY=FAMILY entries separated by commas, got {item!r}")
        entries.append((label.strip(), _family_name(family, "--family-map")))
    if not entries:
        raise CLIError("--family-map is empty")
    return entries


def _parse_family_options(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    options: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        family, dot, option = name.partition(".")
        if not sep or not dot or not option.strip():
            raise CLIError(f"--family-option: expected FAMILY.OPTION=VALUE, got {item!r}")
        family = _family_name(family, "--family-option")
        options.setdefault(family, {})[option.strip()] = _parse_scalar(value)
    return options


def _resolve_family(args: argparse.Namespace, data: EFAData) -> str | dict[Any, str] | None:
    """The ``family`` argument of :meth:`EFA.from_data`: a name, a per-key mapping, or None."""
    default = None if args.family is None else _family_name(args.family, "--family")
    if data.kind == "items":
        if args.family_map is not None:
            raise CLIError("--family-map needs --value: item sequences (no --value) are categorical")
        if default not in (None, "categorical"):
            raise CLIError(
                f"without --value the key column '{data.columns['key'][0]}' holds the items of a "
                f"categorical sequence; --family {args.family} needs --value COLUMN"
            )
        return None
    if args.family_map is None:
        return default or "gaussian"
    mapping: dict[Any, str] = {}
    key_name = ", ".join(data.columns["key"])
    for text, family in _parse_family_map(args.family_map):
        hits = [label for label in data.keys.labels if _label_matches(text, label)]
        if not hits:
            examples = [_json_label(x) for x in data.keys.labels[:5]]
            raise CLIError(
                f"--family-map: key {text!r} is not a value of column '{key_name}' (e.g. {examples})"
            )
        for label in hits:
            mapping[label] = family
    missing = [label for label in data.keys.labels if label not in mapping]
    if missing:
        if default is None:
            shown = [_json_label(x) for x in missing[:5]]
            raise CLIError(
                f"--family-map gives no family for {len(missing)} key(s) of column '{key_name}', "
                f"e.g. {shown}; add them, or pass --family for the others"
            )
        mapping.update((label, default) for label in missing)
    return mapping


# the command-line flag of each configuration field, for errors raised by the configurations
FLAGS = {
    "num_epochs": "--epochs", "batch_size": "--batch-size", "lr": "--lr", "lr_decay": "--lr-decay",
    "lr_patience": "--lr-patience", "patience": "--patience", "seed": "--seed", "threads": "--threads",
    "checkpoint_every": "--checkpoint-every", "dim": "--dim", "num_layers": "--layers",
    "num_heads": "--heads", "direction": "--direction", "family_options": "--family-option",
    "context_stream": "--context-stream",
}  # fmt: skip


# library messages name Python arguments; under the CLI they name its flags
SPELLINGS = {
    "ties='keep'": "--ties keep", "missing='drop'": "--missing drop",
    "na_values=[...]": "--na-values VALUE ...", "context_stream='fixed'": "--context-stream fixed",
    "context_stream='shared'": "--context-stream shared",
}  # fmt: skip


def _with_flags(text: str) -> str:
    for python, flag in SPELLINGS.items():
        text = text.replace(python, flag)
    return text


def _cli_error(e: ValueError) -> CLIError:
    """A configuration's error, with its field named by the command-line flag."""
    text = str(e)
    for field, flag in sorted(FLAGS.items(), key=lambda kv: -len(kv[0])):  # lr_decay before lr
        if text.startswith(field):
            return CLIError(flag + text[len(field) :])
    return CLIError(text)


def _check_fit_args(args: argparse.Namespace) -> tuple[dict[str, dict[str, Any]], FitOptions, str | None]:
    """Every check of the options that needs no data (the same answer in every process)."""
    if args.family is not None:
        _family_name(args.family, "--family")
    if args.family_map is not None:
        _parse_family_map(args.family_map)
    family_options = _parse_family_options(args.family_option or [])
    if any(f < 0 for f in args.split) or not math.isclose(sum(args.split), 1.0, abs_tol=1e-6):
        raise CLIError(
            f"--split takes three non-negative fractions summing to 1, got {' '.join(map(str, args.split))} "
            f"(sum {sum(args.split):g})"
        )
    if args.na_values and args.missing != "drop":
        raise CLIError("--na-values marks values as missing: pass --missing drop to leave them out")
    try:
        EFAConfig(
            dim=args.dim, num_layers=args.layers, num_heads=args.heads, family_options=family_options,
            context_stream=args.context_stream,
        )  # fmt: skip
        options = FitOptions(
            num_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, lr_decay=args.lr_decay,
            lr_patience=args.lr_patience, patience=args.patience, seed=args.seed, threads=args.threads,
            checkpoint_every=args.checkpoint_every,
        )  # fmt: skip
    except ValueError as e:
        raise _cli_error(e) from e
    for flag in ("shard_rows", "chunk_rows"):
        value = getattr(args, flag)
        if value is not None and not args.stream:
            raise CLIError(f"--{flag.replace('_', '-')} needs --stream")
        if value is not None and value < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    return family_options, options, _parse_device(args.device)


def _cmd_fit(args: argparse.Namespace) -> int:
    family_options, options, device = _check_fit_args(args)
    old_dtype = torch.get_default_dtype()
    # a no-op in a plain run; under torchrun: join the process group (gloo for --device cpu)
    distributed.init_from_env(backend="gloo" if device == "cpu" else None)
    try:
        torch.set_default_dtype(DTYPES[args.dtype])  # before the table is read
        code = _fit(args, family_options, options, device)
        distributed.cleanup()  # waits for every process
        return code
    finally:
        torch.set_default_dtype(old_dtype)
        distributed.cleanup(wait=False)  # after an error (a no-op once left)


def _reading(args: argparse.Namespace) -> dict[str, Any]:
    """How rows become observations, as :meth:`EFAData.from_pandas` takes it (kept in split.json
    so that ``evaluate`` and ``predict`` read the file the same way)."""
    na_values = None
    if args.na_values:  # each as written and as a number: '-99' in a text column, -99 in a numeric one
        na_values = list(dict.fromkeys([*args.na_values, *map(_parse_scalar, args.na_values)]))
    return {"ties": args.ties, "missing": args.missing, "na_values": na_values}


def _split_in_memory(args: argparse.Namespace) -> tuple[EFAData, EFAData, EFAData, str, EFAData]:
    df = _read_table(args.data)
    data = EFAData.from_pandas(
        df, unit=args.unit, key=args.key, value=args.value, order=args.order, context=args.context,
        **_reading(args),
    )  # fmt: skip
    train, val, test = data.split(args.split, seed=args.seed)
    described = f"data: {data!r} from '{args.data}'" + _describe_missing(data.missing)
    return train, val, test, described, data


def _describe_missing(missing: dict[Any, Any]) -> str:
    if not missing:
        return ""
    units = missing.get("<units>", [])
    counts = {k: v for k, v in missing.items() if k != "<units>"}
    shown = ", ".join(f"{_json_label(k)}: {v}" for k, v in list(counts.items())[:10])
    more = f", ... ({len(counts)} keys)" if len(counts) > 10 else ""
    text = f"; left out {sum(counts.values())} missing value(s) (per key {shown}{more})"
    if units:
        text += f"; {len(units)} unit(s) had only missing values and are left out, e.g. {units[:3]}"
    return text


def _split_streamed(
    args: argparse.Namespace,
) -> tuple[StreamingUnits, EFAData | None, EFAData | None, str, None]:
    """The training part streamed from shards on disk; validation and test parts in memory
    (None when empty)."""
    _data_file(args.data)
    sizes = {k: getattr(args, k) for k in ("chunk_rows", "shard_rows") if getattr(args, k) is not None}
    train, val, test = StreamingUnits.from_file(
        args.data, args.unit, args.key, args.value, args.order, args.context, fractions=args.split,
        seed=args.seed, **_reading(args), **sizes,
    )  # fmt: skip
    val_mem = val.to_memory() if len(val) else None
    test_mem = test.to_memory() if len(test) else None
    shard_rows = args.shard_rows or 2_000_000
    text = f"data: streamed from '{args.data}' in shards of about {shard_rows} rows; train part {train!r}"
    return train, val_mem, test_mem, text + _describe_missing(train.missing), None


def _say(text: str) -> None:
    if distributed.is_main():
        print(text, flush=True)


def _fit(
    args: argparse.Namespace,
    family_options: dict[str, dict[str, Any]],
    options: FitOptions,
    device: str | None,
) -> int:
    """``pyro-efa fit`` in steps: the data and its split, the model, the fit, the files."""
    world = distributed.world_size()
    if world > 1 and device is not None and device.startswith("cuda"):
        if ":" in device:
            raise CLIError(
                f"--device {device} under torchrun: each process uses GPU LOCAL_RANK; pass --device cuda"
            )
        device = f"cuda:{distributed.local_rank()}"
    out = Path(args.out)
    checkpoint_dir = Path(args.checkpoint_dir) if args.checkpoint_dir is not None else out / "checkpoint"
    _check_out_dir(out, args.force, checkpoint_dir)
    train, val, test, described, whole = _split_streamed(args) if args.stream else _split_in_memory(args)
    use_val = _check_parts(args, train, val, test)
    model = _build_model(args, train, (train, val, test), family_options)
    _say(described)
    _check_table(model, whole, train, {"validation": val, "test": test})
    how = "unit hash" if args.stream else "unit"
    counts = [len(part) if part is not None else 0 for part in (train, val, test)]
    _say(
        f"split by {how} (seed {args.seed}): {counts[0]} train, {counts[1]} validation, "
        f"{counts[2]} test units"
    )
    if world > 1:
        _say(
            f"data parallel: {world} processes x --batch-size {args.batch_size} = global batch "
            f"{world * args.batch_size} units ({distributed.describe()})"
        )
    _announce_checkpoint(args, checkpoint_dir / CHECKPOINT_NAME)
    try:
        fitted = fit(
            model, train, guide=args.guide, val_data=val if use_val else None, options=options,
            progress=not args.no_progress and distributed.is_main(),
            checkpoint_dir=checkpoint_dir if args.checkpoint_every or args.resume else None,
            resume=args.resume, device=device,
        )  # fmt: skip
    except (ValueError, FloatingPointError) as e:
        if "nan" not in str(e).lower() and not isinstance(e, FloatingPointError):
            raise
        raise CLIError(f"training diverged (lower --lr, now {args.lr}): {_one_line(e)}") from e
    if not distributed.is_main():
        return 0
    assert test is not None
    metrics = evaluate(fitted, test)
    replacing = (out / "config.json").is_file()
    save(fitted, out)
    _write_split(args, out, train, val, test)
    _write_json(out / "metrics.json", _fit_summary(args, fitted, metrics, counts, device, world))
    parallel = f", {world} processes (global batch {args.batch_size * world})" if world > 1 else ""
    print(
        f"fit: {'EFE' if args.efe else 'EFA'} {args.direction}, guide {args.guide}, {len(fitted.losses)} "
        f"epochs (best {fitted.best_epoch}), {fitted.seconds:.1f} s{parallel}"
    )
    print(f"{'replaced the fit in' if replacing else 'saved to'} '{out}' (with split.json, metrics.json)")
    print(f"test metrics ({len(test)} units, {metrics['num_observations']} observations):")
    print("\n".join(_metric_lines(metrics)))
    return 0


def _check_parts(args: argparse.Namespace, train: Any, val: EFAData | None, test: EFAData | None) -> bool:
    """Refuse empty train / test parts; whether there are validation units."""
    for part, name in ((train, "train"), (test, "test")):
        if part is None or len(part) == 0 or part.num_observations == 0:
            raise CLIError(
                f"the {name} split is empty (--split {' '.join(map(str, args.split))}); "
                "use more units or larger fractions"
            )
    use_val = val is not None and len(val) > 0 and val.num_observations > 0
    if not use_val and args.lr_decay is not None:
        raise CLIError("--lr-decay reacts to the validation NLL, but the split has no validation units")
    if not use_val and distributed.is_main():
        _warn("no validation units: no early stopping, all --epochs run and the last state is kept")
    return use_val


def _check_table(model: EFA, whole: EFAData | None, train: Any, held_out: dict[str, EFAData | None]) -> None:
    """Every unit of the table checked against the model before the first epoch: an invalid
    value in any part is an error counted over the whole table (over each held-out part for a
    streamed table, whose training shards are checked as they are read); keys, items and classes
    that only held-out units hold are named."""
    parts = [whole] if whole is not None else [p for p in held_out.values() if p is not None]
    for part in parts:
        model.validate(part)
    if isinstance(train, StreamingUnits) or not distributed.is_main():
        return
    for name, part in held_out.items():
        unseen = part.unseen_in(train) if part is not None and len(part) else ()
        if len(unseen):
            shown = "; ".join(
                f"{r.what} {_json_label(r.label)!r}"
                + (f" of key {_json_label(r.key)!r}" if r.what == "class" else "")
                + f" ({r.count} observation(s), first in unit {_json_label(r.unit)!r})"
                for r in unseen.head(5).itertuples()
            )
            more = f"; {len(unseen) - 5} more" if len(unseen) > 5 else ""
            _warn(
                f"{len(unseen)} label(s) occur only in {name} units, never among the training "
                f"observations, so their embeddings and intercepts are never trained: {shown}{more}"
            )


def _build_model(
    args: argparse.Namespace, train: Any, parts: tuple[Any, ...], family_options: dict[str, dict[str, Any]]
) -> EFA:
    """The model of the options, sized for the training units (and every unit of the table)."""
    family = _resolve_family(args, train)  # the parts share the vocabularies of the whole table
    fields: dict[str, Any] = {
        "direction": args.direction,
        "dim": args.dim,
        "context_stream": args.context_stream,
    }
    if isinstance(train, StreamingUnits):
        fields.update(train.model_overrides())  # value moments over every shard
    fields["max_len"] = max(max(part.max_len for part in parts if part is not None), 1)  # held-out units too
    if args.no_standardize:
        fields["standardize"] = False
    if family is not None:
        fields["family"] = family
    if family_options:
        families = [family] if isinstance(family, str) else list((family or {}).values())
        used = set(families) if train.kind == "valued" else {"categorical"}
        unused = sorted(set(family_options) - used)
        if unused and distributed.is_main():
            _warn(f"--family-option for {', '.join(unused)}, which no key uses: ignored")
        fields["family_options"] = {k: v for k, v in family_options.items() if k in used}
    if args.efe:
        config = EFAConfig.efe(train.kind, **fields)
    else:
        config = EFAConfig(num_layers=args.layers, num_heads=args.heads, **fields)
    sample = train.sample() if isinstance(train, StreamingUnits) else train
    pyro.set_rng_seed(args.seed)  # the network's initial weights (fit draws them again from the seed)
    return EFA.from_data(sample, config)


def _announce_checkpoint(args: argparse.Namespace, checkpoint_file: Path) -> None:
    if args.resume:
        if checkpoint_file.is_file():
            _say(f"resuming from '{checkpoint_file}'")
        elif distributed.is_main():
            _warn(f"--resume: no checkpoint at '{checkpoint_file}'; starting a new fit")
    elif args.checkpoint_every and checkpoint_file.is_file() and distributed.is_main():
        _warn(
            f"'{checkpoint_file}' holds the checkpoint of an earlier fit; starting a new fit that "
            "overwrites it (pass --resume to continue that fit instead)"
        )


def _write_split(args: argparse.Namespace, out: Path, train: Any, val: EFAData | None, test: EFAData) -> None:
    """``split.json``: which units went where (for a streamed fit, the hash rule of the training
    units and the held-out units listed)."""
    split: dict[str, Any] = {
        "format": SPLIT_FORMAT,
        "data": str(args.data),
        "unit_column": train.columns["unit"],
        "seed": args.seed,
        "fractions": list(args.split),
        **_reading(args),
    }
    held_out = {
        name: [] if part is None else [_json_label(x) for x in part.unit_labels]
        for name, part in (("validation", val), ("test", test))
    }
    if isinstance(train, StreamingUnits):
        # the training units are not listed (there may be millions): the hash rule says which
        bounds = (np.cumsum(args.split) / sum(args.split)).tolist()
        split["assignment"] = {
            "method": "hash",
            "rule": "a unit goes to part p (0 train, 1 validation, 2 test) when bounds[p-1] <= "
            "h < bounds[p] (bounds[-1] = 0), h = pyro_efa.streaming.unit_hash(label, seed) in "
            "[0, 1), computed on the unit column as read from the file",
            "bounds": bounds,
        }
        split["train"] = {"units": len(train), "listed": False}
    else:
        split["train"] = [_json_label(x) for x in train.unit_labels]
    split.update(held_out)
    _write_json(out / "split.json", split)


def _fit_summary(
    args: argparse.Namespace,
    fitted: EFAFit,
    metrics: dict[str, Any],
    counts: list[int],
    device: str | None,
    world: int,
) -> dict[str, Any]:
    return {
        "test": metrics,
        "model": "EFE" if args.efe else "EFA",
        "direction": args.direction,
        "guide": args.guide,
        "epochs": len(fitted.losses),
        "best_epoch": fitted.best_epoch,
        "seconds": fitted.seconds,
        "best_validation_nll": min(fitted.val_nll) if fitted.val_nll else None,
        "units": dict(zip(("train", "validation", "test"), counts, strict=True)),
        "dtype": args.dtype,
        "device": device or "cpu",
        "processes": world,
        "batch_size": args.batch_size,
        "global_batch_size": args.batch_size * world,
        "threads": args.threads,
        "stream": bool(args.stream),
    }


# ------------------------------------------------------------------------------------------------
# evaluate / predict
def _saved_dtype(fit_dir: str) -> torch.dtype | None:
    """The floating dtype of a saved fit's parameters (None when unreadable: :func:`load` then
    reports why)."""
    try:
        state = torch.load(Path(fit_dir) / "params.pt", weights_only=True, map_location="cpu", mmap=True)
        for tensor in state["model"].values():
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                return tensor.dtype
    except Exception:  # noqa: BLE001 - any damage is reported by load()
        return None
    return None


@contextlib.contextmanager
def _dtype_of_fit(fit_dir: str) -> Iterator[None]:
    """Rebuild the data and the model in the dtype the fit was trained in (``--dtype``)."""
    dtype = _saved_dtype(fit_dir)
    old = torch.get_default_dtype()
    if dtype in DTYPES.values():
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _load_fit_and_data(fit_dir: str, data_path: str, units: str) -> tuple[EFAFit, EFAData]:
    fitted = load(fit_dir)
    split_path = Path(fit_dir) / "split.json"
    split: dict[str, Any] | None = None
    if split_path.is_file():
        try:
            split = json.loads(split_path.read_text())
        except json.JSONDecodeError as e:
            raise CLIError(f"'{split_path}' is not valid JSON ({e})") from e
        if not isinstance(split, dict) or split.get("format") != SPLIT_FORMAT:
            raise CLIError(f"'{split_path}' is not a {SPLIT_FORMAT} file")
    elif units == "test":
        raise CLIError(
            f"'{fit_dir}' has no split.json (the fit was not made by '{PROG} fit'), so its test units "
            "are unknown; pass --units all"
        )
    columns = dict(fitted.schema["columns"])
    df = _read_table(data_path)
    unit_col = columns["unit"]
    if unit_col not in df.columns:
        raise CLIError(
            f"column '{unit_col}' (the fit's unit column) not in '{data_path}'; it has {list(df.columns)}"
        )
    if units == "test":
        assert split is not None
        wanted = {_label_key(x) for x in split["test"]}
        df = df[df[unit_col].map(_label_key).isin(wanted)]
        found = df[unit_col].nunique()
        if found == 0:
            raise CLIError(
                f"none of the fit's {len(wanted)} test units (column '{unit_col}') is in '{data_path}'; "
                "pass --units all to use every unit of this file"
            )
        if found < len(wanted):
            _warn(f"only {found} of the fit's {len(wanted)} test units are in '{data_path}'")
    reading = (
        {k: split[k] for k in ("ties", "missing", "na_values") if k in split} if split is not None else {}
    )
    data = EFAData.from_pandas(
        df, **columns, keys=fitted.schema["keys"], items=fitted.schema["items"], **reading
    )
    return fitted, data


def _cmd_evaluate(args: argparse.Namespace) -> int:
    if args.num_samples < 0:
        raise CLIError(f"--num-samples must be non-negative, got {args.num_samples}")
    with _dtype_of_fit(args.fit_dir):
        fitted, data = _load_fit_and_data(args.fit_dir, args.data, args.units)
        metrics = evaluate(fitted, data, num_samples=args.num_samples)
    if args.json:
        print(json.dumps(metrics, indent=2, default=str))
        return 0
    print(f"{args.units} metrics ({len(data)} units, {metrics['num_observations']} observations):")
    print("\n".join(_metric_lines(metrics)))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    if args.out is not None:
        out = Path(args.out)
        if out.is_dir():
            raise CLIError(f"--out '{out}' is a directory, expected a file name")
        if out.exists() and not args.force:
            raise CLIError(f"--out '{out}' exists; pass --force to overwrite it")
        if not out.parent.is_dir():
            raise CLIError(f"--out '{out}': directory '{out.parent}' does not exist")
    if args.head < 0:
        raise CLIError(f"--head must be non-negative, got {args.head}")
    with _dtype_of_fit(args.fit_dir):
        fitted, data = _load_fit_and_data(args.fit_dir, args.data, args.units)
        table = predict(fitted, data)
    if args.out is None:
        print(table.head(args.head).to_string(index=False))
        if len(table) > args.head:
            print(f"... {len(table)} rows in all (pass --out FILE to write them)")
        return 0
    if out.suffix.lower() in (".parquet", ".pq"):
        table.to_parquet(out, index=False)
    else:
        table.to_csv(out, index=False, sep="\t" if out.suffix.lower() == ".tsv" else ",")
    print(f"wrote {len(table)} predictions ({len(data)} units) to '{out}'")
    return 0


# ------------------------------------------------------------------------------------------------
# the parser
def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``pyro-efa`` command line (its subcommands demo, fit, evaluate, predict)."""
    parser = _Parser(
        prog=PROG,
        description="Exponential family attention (EFA) as a Pyro model: fit, evaluate, predict.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    _add_demo(sub)
    _add_fit(sub)
    _add_evaluate_predict(sub)
    return parser


def _add_demo(sub: Any) -> None:
    demo = sub.add_parser(
        "demo",
        help="the paper's synthetic ratings experiment (EFA vs EFE, uni and bi)",
        description="Generate the synthetic ratings data of the paper (numpy seed 42), train on the "
        "first 75% of users (25% of them for early stopping) and report the test MSE of the last "
        "25% for EFA and the EFE baseline, unidirectional and bidirectional.",
    )
    demo.add_argument("--num-users", type=int, default=10_000, help="number of users (default 10000)")
    demo.add_argument("--num-epochs", type=int, default=100, help="most epochs per fit (default 100)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the validation split and the fits")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(handler=_cmd_demo)


def _add_fit(sub: Any) -> None:
    f = sub.add_parser(
        "fit",
        help="fit EFA to a long table (CSV or Parquet) and save the fit",
        description="Fit EFA to a long table, one row per observation. The table is split by unit "
        "into train / validation / test (seeded); training stops early on the validation NLL. "
        "The fit, split.json (the units of each split) and metrics.json (test metrics) are "
        "written to --out. Data-parallel: 'torchrun --nproc_per_node N -m pyro_efa fit ... "
        "--batch-size B' trains with a global batch of N x B units; rank 0 writes --out.",
    )
    f.add_argument("data", help="CSV file (Parquet for a .parquet suffix)")
    f.add_argument("--unit", required=True, help="column identifying the unit (user, basket, day)")
    f.add_argument(
        "--key",
        required=True,
        action="append",
        help="key column (repeat for multi-column numeric keys); without --value: the item column",
    )
    f.add_argument("--value", help="value column; omit it for item sequences")
    f.add_argument("--order", help="column ordering the observations of a unit (default: row order)")
    f.add_argument("--context", help="boolean column, True for context-only observations")
    f.add_argument(
        "--family",
        help=f"family of the values: one of {', '.join(sorted(FAMILIES))} (default gaussian; "
        "categorical for item sequences); with --family-map: the family of unmapped keys",
    )
    f.add_argument(
        "--family-map",
        metavar="KEY=FAMILY,...",
        help="a family per key (mixed types), e.g. 'temp=gaussian,rain=bernoulli'; multi-column "
        "keys are written with ':', e.g. '40.7:-74.0=gaussian'",
    )
    f.add_argument(
        "--family-option",
        action="append",
        metavar="FAMILY.OPTION=VALUE",
        help="a family option, e.g. binomial.total_count=10 or gaussian.per_key=true (repeatable)",
    )
    f.add_argument("--direction", choices=("uni", "bi"), default="uni", help="uni (causal) or bi")
    f.add_argument(
        "--context-stream",
        choices=("shared", "fixed"),
        default="shared",
        help="shared (default, the paper's: context tokens attend to each other, so a bidirectional "
        "model encodes each unit once per target) or fixed (context tokens are not updated: one pass "
        "per unit, much faster for --direction bi; see README)",
    )
    f.add_argument("--out", required=True, help="directory to save the fit in")
    f.add_argument("--force", action="store_true", help="write into a non-empty --out without a fit")
    f.add_argument("--efe", action="store_true", help="the EFE baseline (--layers and --heads ignored)")
    f.add_argument("--guide", choices=tuple(GUIDES), default="map", help="a guide by name (default map)")
    f.add_argument("--dim", type=int, default=32, help="embedding width (default 32)")
    f.add_argument("--layers", type=int, default=2, help="attention layers (default 2)")
    f.add_argument("--heads", type=int, default=2, help="heads per layer (default 2)")
    _add_training(f)
    g = f.add_argument_group("checkpoints")
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        metavar="K",
        help="write a checkpoint every K optimizer steps (default 0: none)",
    )
    g.add_argument("--checkpoint-dir", metavar="DIR", help="where checkpoints go (default OUT/checkpoint)")
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint (same data and options); without one, start a new fit",
    )
    st = f.add_argument_group("streaming (data larger than memory)")
    st.add_argument(
        "--stream",
        action="store_true",
        help="read the training units from disk shard by shard; the split is by a seeded hash of "
        "the unit label (about, not exactly, --split), validation and test units are held in memory",
    )
    st.add_argument("--shard-rows", type=int, metavar="N", help="rows per shard (default 2000000)")
    st.add_argument("--chunk-rows", type=int, metavar="N", help="rows read at a time (default 1000000)")
    f.set_defaults(handler=_cmd_fit)


def _add_training(f: argparse.ArgumentParser) -> None:
    """The training options of ``pyro-efa fit`` (the fields of :class:`~pyro_efa.FitOptions`)."""
    f.add_argument("--epochs", type=int, default=100, help="most epochs (default 100)")
    f.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="units per step and process (default 64); 'torchrun --nproc_per_node N -m pyro_efa fit "
        "...' trains with a global batch of N x B units",
    )
    f.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    f.add_argument("--patience", type=int, default=5, help="early stopping patience (default 5)")
    f.add_argument(
        "--lr-decay", type=float, metavar="FACTOR",
        help="multiply the learning rate by FACTOR in (0, 1) when the validation NLL stalls (default: off)",
    )  # fmt: skip
    f.add_argument(
        "--lr-patience", type=int, default=2, help="epochs without improvement before each decay (default 2)"
    )
    f.add_argument("--seed", type=int, default=0, help="seed of the split and the fit (default 0)")
    f.add_argument(
        "--split",
        type=float,
        nargs=3,
        default=(0.8, 0.1, 0.1),
        metavar=("TRAIN", "VAL", "TEST"),
        help="unit fractions (default 0.8 0.1 0.1)",
    )
    f.add_argument("--ties", choices=("error", "keep"), default="error", help="equal --order values")
    f.add_argument(
        "--missing",
        choices=("error", "drop"),
        default="error",
        help="missing values (empty cells, NaN, --na-values): error (default), or drop: leave the "
        "observation out of its unit",
    )
    f.add_argument(
        "--na-values",
        nargs="+",
        metavar="VALUE",
        help="values of --value that mean 'not observed', e.g. -99 (as in pandas.read_csv)",
    )
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.add_argument(
        "--no-standardize",
        action="store_true",
        help="Gaussian keys predict on the raw value scale (default: on each key's standardised scale)",
    )
    f.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="floating-point type of the data and the model (default float32)",
    )
    f.add_argument(
        "--device",
        metavar="DEVICE",
        help="cpu, cuda or cuda:N (default: cpu; under torchrun with CUDA: GPU LOCAL_RANK)",
    )
    f.add_argument(
        "--threads",
        type=int,
        default=FitOptions.threads,
        help=f"torch threads while fitting (default {FitOptions.threads}: chosen by measurement, see "
        "benchmarks/results/speed.md; more threads help little on small models and slow a fit down "
        "badly beside other busy processes)",
    )


def _add_evaluate_predict(sub: Any) -> None:
    units_help = "test: the fit's test units (from split.json, default); all: every unit of the file"
    e = sub.add_parser(
        "evaluate",
        help="held-out metrics of a saved fit",
        description="Reload a fit, rebuild the data with its columns and vocabularies, and print "
        "its metrics (by default on the units the fit recorded as test units).",
    )
    e.add_argument("fit_dir", help="directory written by 'pyro-efa fit'")
    e.add_argument("data", help="CSV or Parquet file with the fit's columns")
    e.add_argument("--units", choices=("test", "all"), default="test", help=units_help)
    e.add_argument("--num-samples", type=int, default=0, help="posterior draws for the NLL (0: plug-in)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.set_defaults(handler=_cmd_evaluate)

    p = sub.add_parser(
        "predict",
        help="per-observation predictions of a saved fit",
        description="One row per modelled observation: unit, position, key, value, prediction "
        "(the predictive mean, or the most likely class with its probability) and log-likelihood.",
    )
    p.add_argument("fit_dir", help="directory written by 'pyro-efa fit'")
    p.add_argument("data", help="CSV or Parquet file with the fit's columns")
    p.add_argument("--units", choices=("test", "all"), default="test", help=units_help)
    p.add_argument("--out", help="write all predictions here (CSV, or Parquet for .parquet)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--head", type=int, default=10, help="rows printed without --out (default 10)")
    p.set_defaults(handler=_cmd_predict)


def main(argv: list[str] | None = None) -> int:
    """Run the ``pyro-efa`` command line; returns the exit code.

    Input the library refuses (:class:`~pyro_efa.InputError`: data, options, files) and
    operating-system errors (a file that cannot be read or written) print one line
    ``pyro-efa: error: ...`` and return 2. Any other exception is a bug of pyro_efa and is raised
    with its traceback.
    """
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # --help and --version
            return e.code if isinstance(e.code, int) else 0
        return int(args.handler(args))
    except (InputError, OSError) as e:
        print(f"{PROG}: error: {_with_flags(_one_line(e))}", file=sys.stderr)
        return 2
