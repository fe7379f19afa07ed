"""Training speed and memory: one-pass vs per-target encoding, and Pyro's overhead.

Measures, side by side in one run:

1. training throughput (observations per second of an SVI step with AutoDelta) and peak memory
   of one-pass vs per-target encoding, at unit lengths 8, 32, 128, 512, for the unidirectional
   model (2 layers, 2 heads, paper's shared context stream: one pass is exact) and the
   bidirectional model with ``context_stream="fixed"`` (2 layers: one pass is exact). Each
   configuration runs in a fresh subprocess so that its peak resident memory can be read;
2. Pyro's overhead: the step that :func:`pyro_efa.fit` really runs (:meth:`pyro_efa.infer.Trainer.step`:
   ``Trace_ELBO`` with AutoDelta, the loss read-out and the finiteness checks) vs a plain-torch
   step of the same network and the same loss (scaled log-likelihood plus Normal log-prior, Adam,
   the loss read out), at 16, 32, 64 and 128 units per batch of length 32; the headline
   ``pyro_overhead_ratio`` is the worst of them;
3. threads: a MovieLens-items fit (the recommended unidirectional model, a fixed number of epochs)
   with 1 torch thread and with all cores, on an idle machine and beside a busy process (one
   that keeps every core busy), each in a fresh process: the measurement behind
   ``FitOptions.threads``'s default;
4. wall time until the test cross-entropy on MovieLens items (unidirectional) first reaches the
   paper's 3.4438, one-pass vs per-target training. The test set is used only to time this
   threshold, not to select anything.

Writes ``benchmarks/results/speed.md`` and ``speed.json``. ``--smoke`` runs tiny sizes only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

import pyro_efa
from pyro_efa import EFA, EFAConfig, EFAData, FitOptions, evaluate, fit
from pyro_efa.infer import Trainer
from pyro_efa.models import DATA_DIR, get, smoke_splits

RESULTS = Path(__file__).resolve().parent / "results"
PAPER_ITEMS_UNI = 3.4438
TOKENS_PER_BATCH = 2048


def batch_units(length: int) -> int:
    """Units per batch: fit()'s default of 64 units, capped at 2048 observations (2 units at
    length 512) so that the per-target computation (one length x length attention per target)
    fits in memory."""
    return 2 if length >= 512 else max(1, min(64, TOKENS_PER_BATCH // length))


def make_data(length: int, num_units: int, seed: int = 0) -> EFAData:
    g = torch.Generator().manual_seed(seed)
    key_index = torch.randint(0, 100, (num_units, length), generator=g)
    values = torch.randn(num_units, length, generator=g)
    ones = torch.ones(num_units, length, dtype=torch.bool)
    return EFAData(
        kind="valued",
        key_index=key_index,
        values=values,
        mask=ones,
        target=ones.clone(),
        unit_index=torch.arange(num_units),
        num_units=num_units,
        keys=pyro_efa.Vocabulary(labels=list(range(100))),
        items=None,
        unit_labels=list(range(num_units)),
        columns={},
    )


def build(direction: str, encoding: str, length: int) -> EFA:
    config = EFAConfig(
        kind="valued",
        num_keys=100,
        family="gaussian",
        direction=direction,
        context_stream="shared" if direction == "uni" else "fixed",
        encoding=encoding,
        max_len=length,
    )
    return EFA(config)


def time_steps(step, num_steps: int, min_seconds: float = 1.0) -> float:
    """Seconds per call of ``step`` (after one warm-up call)."""
    step()
    n, start = 0, time.perf_counter()
    while n < num_steps or time.perf_counter() - start < min_seconds:
        step()
        n += 1
        if n >= 50:
            break
    return (time.perf_counter() - start) / n


def worker(direction: str, encoding: str, length: int, num_steps: int) -> dict:
    """One configuration in this process: obs/s of the step fit runs, and peak RSS."""
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    num_units = batch_units(length)
    data = make_data(length, num_units)
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer = Trainer(
        build(direction, encoding, length), data, guide="map", val_data=None,
        options=FitOptions(batch_size=num_units, threads=1),
    )  # fmt: skip
    repeats, min_seconds = (3, 1.0) if num_steps > 1 else (1, 0.0)  # one step: a smoke run
    seconds = min(time_steps(lambda: trainer.step(data), num_steps, min_seconds) for _ in range(repeats))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_mb
    return {"obs_per_s": num_units * length / seconds, "peak_mb": peak_mb, "batch": num_units}


def run_worker(direction: str, encoding: str, length: int, num_steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", direction, encoding, str(length), str(num_steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def pyro_overhead(num_units: int, length: int = 32, rounds: int = 5, min_seconds: float = 0.3) -> dict:
    """Milliseconds of the step :func:`pyro_efa.fit` runs and of a plain-torch step of the same
    loss (same network, the log-likelihood masked to the targets as ragged units need, the same
    Adam settings, the loss read out once per step), interleaved in
    ``rounds`` rounds (the best of each), on batches of ``num_units`` units of ``length``."""
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    data = make_data(length, 4 * num_units)  # the plate scales each batch by 4
    batch = data.subset(torch.arange(num_units))
    trainer = Trainer(
        build("uni", "one_pass", length), data, guide="map", val_data=None,
        options=FitOptions(batch_size=num_units, threads=1),
    )  # fmt: skip

    def fit_step() -> None:
        trainer.step(batch)

    # plain torch: the same network with alpha, rho as ordinary parameters
    plain = build("uni", "one_pass", length)
    alpha = torch.nn.Parameter(torch.empty(100, plain.dim).uniform_(-0.05, 0.05))
    rho = torch.nn.Parameter(torch.empty(100, plain.dim).uniform_(-0.05, 0.05))
    family = plain.families[0]
    optimizer = torch.optim.Adam([alpha, rho, *plain.parameters()], lr=1e-3)
    prior = dist.Normal(0.0, 1.0)
    scale = data.num_units / num_units

    def torch_step() -> None:
        optimizer.zero_grad()
        content, query = plain.tokens(batch, alpha)
        z = plain.encoder(content, query, batch.mask, mode="one_pass")
        eta = plain.readout(z, batch.key_index, rho)
        lp = family.dist(eta, batch.key_index).log_prob(batch.values)
        ll = torch.where(batch.target & batch.mask, lp, 0.0).sum() * scale  # ragged units need it
        loss = -(ll + prior.log_prob(alpha).sum() + prior.log_prob(rho).sum())
        loss.backward()
        optimizer.step()
        loss.item()

    # interleaved rounds share the machine's noise; the best time of each is the least disturbed
    times: dict[str, list[float]] = {"fit": [], "plain": []}
    for _ in range(rounds):
        times["fit"].append(time_steps(fit_step, 10, min_seconds=min_seconds))
        times["plain"].append(time_steps(torch_step, 10, min_seconds=min_seconds))
    fit_ms, plain_ms = min(times["fit"]) * 1e3, min(times["plain"]) * 1e3
    return {"units": num_units, "fit_step_ms": fit_ms, "plain_step_ms": plain_ms, "ratio": fit_ms / plain_ms}


# ----------------------------------------------------------------------------------------------
# threads: 1 vs all, idle and beside a busy process
BUSY = (
    "import torch, os\n"
    "torch.set_num_threads(os.cpu_count())\n"
    "a = torch.randn(1500, 1500)\n"
    "while True:\n"
    "    a = (a @ a).tanh()\n"
)


def threads_worker(threads: int, epochs: int, smoke: bool) -> dict:
    """One MovieLens-items fit (recommended unidirectional model, ``epochs`` epochs, no early
    stopping) with ``threads`` torch threads: its wall time (``smoke``: a few synthetic units)."""
    exp = get("synthetic" if smoke else "movielens_items")
    splits = smoke_splits(exp.load()) if smoke else exp.load()
    model = exp.model("efa", "uni", splits)
    options = exp.fit_options("efa", "uni", num_epochs=epochs, threads=threads, lr_decay=None)
    start = time.perf_counter()
    fit(model, splits[0], options=options, progress=False)
    return {"threads": threads, "seconds": time.perf_counter() - start}


def threads_table(
    epochs: int, repeats: int, smoke: bool, counts: tuple[int, ...] | None = None
) -> list[dict]:
    """Each configuration ``repeats`` times in a fresh process; the busy process runs beside the
    busy rows only."""
    rows = []
    for load in ("idle", "busy"):
        busy = subprocess.Popen([sys.executable, "-c", BUSY]) if load == "busy" else None
        try:
            time.sleep(1.0 if busy else 0.0)  # let the busy process start
            for threads in counts or (1, os.cpu_count() or 1):
                for _ in range(repeats):
                    cmd = [sys.executable, __file__, "--threads-worker", str(threads), str(epochs)]
                    cmd += ["--smoke"] if smoke else []
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                    rows.append({"load": load, **json.loads(out.strip().splitlines()[-1])})
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    return rows


def padding_waste(data: EFAData, batch_size: int, bucket: bool, seed: int = 0) -> float:
    """Share of padded slots over the training batches of one epoch."""
    g = torch.Generator().manual_seed(seed)
    real = slots = 0
    for b in data.batches(batch_size, shuffle=True, generator=g, bucket=bucket):
        real += int(b.mask.sum())
        slots += b.mask.numel()
    return 1.0 - real / slots


def movielens_padding_waste(data_dir: Path, batch_size: int = 32) -> dict:
    out = {}
    for task in ("items", "ratings"):
        train = get(f"movielens_{task}").load(data_dir)[0]
        for bucket in (True, False):
            out[f"{task}, batch {batch_size}, bucket={bucket}"] = padding_waste(train, batch_size, bucket)
    return out


def movielens_time_to_target(data_dir: Path, max_epochs: int) -> dict:
    train, val, test = get("movielens_items").load(data_dir)
    out = {}
    for encoding in ("one_pass", "per_target"):
        pyro.set_rng_seed(0)
        model = EFA.from_data(train, direction="uni", encoding=encoding)
        reached: dict = {"seconds": None, "epoch": None, "test_ce": None}

        def callback(state: pyro_efa.EFAFit, reached: dict = reached) -> bool:
            ce = evaluate(state, test)["nll"]  # the clock keeps running: evaluation is counted
            if ce <= PAPER_ITEMS_UNI:
                reached.update(seconds=state.seconds, epoch=len(state.losses), test_ce=ce)
                return True
            return False

        f = fit(model, train, val_data=val, num_epochs=max_epochs, lr=3e-3, progress=False, callback=callback)
        out[encoding] = {**reached, "epochs_run": len(f.losses)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no results written")
    parser.add_argument("--lengths", type=int, nargs="+", default=[8, 32, 128, 512])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--max-epochs", type=int, default=60)
    parser.add_argument("--thread-epochs", type=int, default=5, help="epochs of each threads fit")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--threads-worker", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        direction, encoding, length, steps = args.worker
        print(json.dumps(worker(direction, encoding, int(length), int(steps))))
        return 0
    if args.threads_worker:
        print(json.dumps(threads_worker(*args.threads_worker, smoke=args.smoke)))
        return 0
    rows = throughput_rows([4] if args.smoke else args.lengths, 1 if args.smoke else args.steps, args.smoke)
    sizes = (16,) if args.smoke else (16, 32, 64, 128)
    overhead = [
        pyro_overhead(b, rounds=1 if args.smoke else 5, min_seconds=0 if args.smoke else 0.3) for b in sizes
    ]
    for r in overhead:
        print(json.dumps(r), flush=True)
    if args.smoke:
        threads_table(1, 1, smoke=True, counts=(1,))
        return 0
    movielens_rows, waste, threads = None, {}, []
    if (args.data_dir / "movielens-100k" / "u.data").exists():
        threads = threads_table(args.thread_epochs, 2, smoke=False)
        waste = movielens_padding_waste(args.data_dir)
        print(json.dumps({"padding_waste": waste}), flush=True)
        movielens_rows = movielens_time_to_target(args.data_dir, args.max_epochs)
        print(json.dumps(movielens_rows), flush=True)
    RESULTS.mkdir(exist_ok=True)
    worst = max(overhead, key=lambda r: r["ratio"])
    payload = rows + [
        {"pyro_overhead_ratio": worst["ratio"], "pyro_overhead_worst_units": worst["units"]},
        {"pyro_overhead_by_units": overhead},
        {"threads": threads},
    ]
    if movielens_rows:
        payload.append({"movielens_items_uni_time_to_paper_ce": movielens_rows})
    if waste:
        payload.append({"movielens_padding_waste": waste})
    (RESULTS / "speed.json").write_text(json.dumps(payload, indent=2) + "\n")
    write_markdown(rows, overhead, threads, movielens_rows, waste, " ".join(sys.argv))
    return 0


def throughput_rows(lengths: list[int], steps: int, smoke: bool = False) -> list[dict]:
    """One-pass vs per-target throughput and peak memory, each cell in a fresh process."""
    rows = []
    for direction in ("uni",) if smoke else ("uni", "bi"):
        for n in lengths:
            one = run_worker(direction, "one_pass", n, steps)
            per = run_worker(direction, "per_target", n, 1)
            rows.append({
                "direction": direction, "length": n, "batch_units": one["batch"],
                "one_pass_obs_per_s": one["obs_per_s"], "per_target_obs_per_s": per["obs_per_s"],
                "ratio": one["obs_per_s"] / per["obs_per_s"],
                "one_pass_peak_mb": one["peak_mb"], "per_target_peak_mb": per["peak_mb"],
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    return rows


def write_markdown(
    rows: list[dict],
    overhead: list[dict],
    threads: list[dict],
    movielens_rows: dict | None,
    waste: dict,
    command: str,
) -> None:
    lines = [
        "# Training speed: one-pass vs per-target encoding, Pyro's overhead, threads",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
        f"{torch.__version__}, pyro {pyro.__version__}. CPU only.",
        f"Command: `python {command}`",
        "",
        "Each batch holds fit()'s default of 64 units, capped at 2048 observations (2 units at length "
        "512; see the units/batch column). Throughput is observations per second of the step "
        "`pyro_efa.fit` runs (`Trainer.step`: forward, backward, checks, Adam; AutoDelta; one torch "
        "thread; best of 3 timings of at least 1 s each); peak memory is the growth of the process's "
        "peak resident set while building and training (fresh process per cell). Bidirectional rows "
        "use `context_stream='fixed'` (2 layers), the configuration where one pass is exact.",
        "",
        "| direction | length | units/batch | one-pass obs/s | per-target obs/s | ratio | one-pass peak MB | "
        "per-target peak MB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['direction']} | {r['length']} | {r['batch_units']} | {r['one_pass_obs_per_s']:.0f} | "
            f"{r['per_target_obs_per_s']:.0f} | {r['ratio']:.1f}x | {r['one_pass_peak_mb']:.0f} | "
            f"{r['per_target_peak_mb']:.0f} |"
        )
    worst = max(overhead, key=lambda r: r["ratio"])
    lines += [
        "",
        "## Pyro's overhead",
        "",
        "The step `pyro_efa.fit` runs (`Trainer.step`: `Trace_ELBO` with AutoDelta, one read-out of the "
        "loss and the gradient norm to check both are finite, Adam) against a plain-torch step of the "
        "same network and loss (the scaled log-likelihood plus the Normal log-prior of the embedding "
        "tables, Adam, the loss read out), units of length 32, one thread, best of 5 interleaved "
        f"rounds. Headline (`pyro_overhead_ratio`, the worst size): **{worst['ratio']:.2f}x** at "
        f"{worst['units']} units.",
        "",
        "| units per batch | fit step (ms) | plain-torch step (ms) | ratio |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['units']} | {r['fit_step_ms']:.2f} | {r['plain_step_ms']:.2f} | {r['ratio']:.2f}x |"
        for r in overhead
    ]
    lines += [
        "",
        "## Threads",
        "",
        "A MovieLens-items fit (the recommended unidirectional model, fixed epochs, no early stopping) "
        "in a fresh process, with 1 torch thread and with all cores, on an idle machine and beside a "
        "process that keeps every core busy (`FitOptions.threads` / `--threads`):",
        "",
        "| load | threads | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {r['load']} | {r['threads']} | {r['seconds']:.1f} |" for r in threads]
    lines.append("")
    if waste:
        lines += ["## Padding waste of training batches on MovieLens (share of padded slots)", ""]
        lines += [f"- {k}: {v:.1%}" for k, v in waste.items()]
        lines.append("")
    if movielens_rows:
        lines += ["## MovieLens items, unidirectional: wall time until test CE <= 3.4438 (paper)", ""]
        for k, v in movielens_rows.items():
            lines.append(f"- {k}: {v}")
    (RESULTS / "speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
