"""Big tables: building units in memory, and fitting from a file streamed shard by shard.

Measures, each in a fresh subprocess (so that its peak resident memory can be read):

1. :meth:`EFAData.from_pandas` on a generated long table of ``--rows`` rows (default 10 million):
   about ``rows / 10`` units of 1-30 observations (Poisson(9) + 1), unit ids random 63-bit
   integers (or strings with ``--string-ids``), 10,000 item keys, a float value, an integer
   time stamp giving the order, rows shuffled. Reported: wall time of ``from_pandas`` alone,
   resident memory before it (the table itself) and the peak. Targets: under 2 minutes and
   4 GB peak for 10 million rows.
2. a streamed fit: the same kind of table written to Parquet (``--stream-rows`` rows), read by
   :class:`~pyro_efa.streaming.StreamingUnits` in chunks of 1 million rows into shards of
   ``--shard-rows`` rows, and one epoch of :func:`pyro_efa.fit` over every unit (a small EFA:
   dimension 16, one layer; batches of ``--stream-batch`` units). Reported: time of the scan and
   of the epoch, and the peak resident memory of the process, which is bounded by the shard
   size, not by the file (compare with the peak of building the same table in memory).

Writes ``benchmarks/results/big_tables.md`` and ``big_tables.json``. ``--smoke`` runs tiny sizes.
This is a benchmark, not a timed test: run it alone on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def current_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 1e9


def make_table(rows: int, seed: int = 0, string_ids: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    lengths = rng.poisson(9, size=rows // 5 + 10) + 1
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), rows))]
    lengths = np.append(lengths, rows - lengths.sum()).astype(np.int64)
    lengths = lengths[lengths > 0]
    num_units = len(lengths)
    ids = rng.choice(2**62, size=num_units, replace=False).astype(np.int64)
    unit = np.repeat(ids, lengths)
    pos = np.arange(rows, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    perm = rng.permutation(rows)
    df = pd.DataFrame(
        {
            "user": unit[perm],
            "item": rng.integers(0, 10_000, rows)[perm],
            "t": (pos * 1000 + rng.integers(0, 999, rows))[perm],
            "x": rng.normal(size=rows),
        }
    )
    if string_ids:
        df["user"] = "user" + df["user"].astype(str)
        df["item"] = "item" + df["item"].astype(str)
    return df


# ------------------------------------------------------------------------------------------------
# children
def child_from_pandas(rows: int, string_ids: bool) -> dict:
    import torch

    from pyro_efa import EFAData

    torch.set_num_threads(1)
    df = make_table(rows, string_ids=string_ids)
    before = current_gb()
    start = time.perf_counter()
    data = EFAData.from_pandas(df, "user", "item", "x", order="t")
    seconds = time.perf_counter() - start
    return {
        "rows": rows,
        "string_ids": string_ids,
        "units": len(data),
        "max_len": data.max_len,
        "seconds": seconds,
        "rss_table_gb": before,
        "peak_rss_gb": peak_gb(),
    }


def child_stream(path: str, shard_rows: int, batch: int) -> dict:
    import torch

    from pyro_efa import EFA, fit
    from pyro_efa.streaming import StreamingUnits

    torch.set_num_threads(1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        data = StreamingUnits.from_file(
            path, "user", "item", "x", order="t", shard_rows=shard_rows, chunk_rows=1_000_000, workdir=work
        )
        scan = time.perf_counter() - start
        scan_peak = peak_gb()
        model = EFA.from_data(
            data.sample(), dim=16, num_layers=1, num_heads=1, head_dim=16, **data.model_overrides()
        )
        start = time.perf_counter()
        fitted = fit(model, data, num_epochs=1, batch_size=batch, lr=3e-3, progress=False)
        epoch = time.perf_counter() - start
    return {
        "rows": int(data.num_observations),
        "units": len(data),
        "shards": len(data.shards),
        "shard_rows": shard_rows,
        "batch_size": batch,
        "scan_seconds": scan,
        "epoch_seconds": epoch,
        "steps": -(-len(data) // batch),
        "loss": fitted.losses[-1],
        "scan_peak_rss_gb": scan_peak,
        "peak_rss_gb": peak_gb(),
    }


def run_child(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--string-ids", action="store_true", help="also measure string unit and key labels")
    p.add_argument("--stream-rows", type=int, default=10_000_000)
    p.add_argument("--shard-rows", type=int, default=1_000_000)
    p.add_argument("--stream-batch", type=int, default=1024)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (a test of the script)")
    p.add_argument("--out", default=str(RESULTS), help="results directory")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        what, *rest = args.child
        if what == "from_pandas":
            result = child_from_pandas(int(rest[0]), rest[1] == "1")
        else:
            result = child_stream(rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(result))
        return
    if args.smoke:
        args.rows, args.stream_rows, args.shard_rows, args.stream_batch = 20_000, 20_000, 5_000, 256
        args.out = "big_tables_smoke"  # under the working directory, not benchmarks/results

    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {platform.python_version()}",
        "from_pandas": [],
        "stream": None,
    }
    for string_ids in (False, True) if args.string_ids else (False,):
        r = run_child("from_pandas", str(args.rows), "1" if string_ids else "0")
        ids = "string" if string_ids else "integer"
        print(
            f"from_pandas: {r['rows']:,} rows, {r['units']:,} units ({ids} ids): {r['seconds']:.1f} s, "
            f"table {r['rss_table_gb']:.2f} GB, peak RSS {r['peak_rss_gb']:.2f} GB",
            flush=True,
        )
        results["from_pandas"].append(r)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "table.parquet"
        make_table(args.stream_rows, seed=1).to_parquet(path, index=False)
        size_mb = path.stat().st_size / 1e6
        memory = (
            run_child("from_pandas", str(args.stream_rows), "0") if args.stream_rows != args.rows else None
        )
        r = run_child("stream", str(path), str(args.shard_rows), str(args.stream_batch))
        r["file_mb"] = size_mb
        r["in_memory_peak_rss_gb"] = (memory or results["from_pandas"][0])["peak_rss_gb"]
        results["stream"] = r
        print(
            f"streamed fit: {r['rows']:,} rows ({size_mb:.0f} MB Parquet), {r['units']:,} units in "
            f"{r['shards']} shards: scan {r['scan_seconds']:.1f} s (peak {r['scan_peak_rss_gb']:.2f} GB), "
            f"one epoch of {r['steps']} steps {r['epoch_seconds']:.1f} s, peak RSS {r['peak_rss_gb']:.2f} GB "
            f"(building the same table in memory: {r['in_memory_peak_rss_gb']:.2f} GB)",
            flush=True,
        )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "big_tables.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# Big tables",
        "",
        f"Machine: {results['machine']}; one torch thread. Produced by `python benchmarks/big_tables.py`.",
        "",
        "## `EFAData.from_pandas` (targets: < 120 s, < 4 GB peak RSS for 10 million rows)",
        "",
        "| rows | units | ids | seconds | RSS of the table (GB) | peak RSS (GB) |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for r in results["from_pandas"]:
        lines.append(
            f"| {r['rows']:,} | {r['units']:,} | {'string' if r['string_ids'] else 'integer'} | "
            f"{r['seconds']:.1f} | {r['rss_table_gb']:.2f} | {r['peak_rss_gb']:.2f} |"
        )
    s = results["stream"]
    lines += [
        "",
        "## Streamed fit (`StreamingUnits` from Parquet, one epoch)",
        "",
        "| rows | file (MB) | units | shards | scan (s) | epoch (s) | steps | peak RSS (GB) | "
        "in-memory build peak (GB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {s['rows']:,} | {s['file_mb']:.0f} | {s['units']:,} | {s['shards']} | {s['scan_seconds']:.1f} | "
        f"{s['epoch_seconds']:.1f} | {s['steps']} | {s['peak_rss_gb']:.2f} | "
        f"{s['in_memory_peak_rss_gb']:.2f} |",
        "",
        f"Shards of about {s['shard_rows']:,} rows, batches of {s['batch_size']} units, EFA with dimension "
        "16 and one layer. The streamed fit's memory is bounded by the shard size (one shard as padded "
        "tensors plus one chunk being read), not by the file.",
    ]
    (out / "big_tables.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'big_tables.md'}")


if __name__ == "__main__":
    main()
