"""Training speed and memory: one-pass vs per-target encoding, and Pyro's overhead.

Measures, side by side in one run:

1. training throughput (observations per second of an SVI step with AutoDelta) and peak memory
   of one-pass vs per-target encoding, at unit lengths 8, 32, 128, 512, for the unidirectional
   model (2 layers, 2 heads, paper's shared context stream: one pass is exact) and the
   bidirectional model with ``context_stream="fixed"`` (2 layers: one pass is exact). Each
   configuration runs in a fresh subprocess so that its peak resident memory can be read;
2. Pyro's overhead: an SVI step (``Trace_ELBO`` with AutoDelta) vs a plain-torch step of the same
   network and the same loss (log-likelihood plus Normal log-prior);
3. wall time until the test cross-entropy on MovieLens items (unidirectional) first reaches the
   paper's 3.4438, one-pass vs per-target training. The test set is used only to time this
   threshold, not to select anything.

Writes ``benchmarks/results/speed.md`` and ``speed.json``. ``--smoke`` runs tiny sizes only.
"""

from __future__ import annotations

import argparse
import json
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
from pyro_efa import EFA, EFAData, evaluate, fit
from pyro_efa.infer import make_guide

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
    return EFA(
        kind="valued",
        num_keys=100,
        family="gaussian",
        direction=direction,
        context_stream="shared" if direction == "uni" else "fixed",
        encoding=encoding,
        max_len=length,
    )


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
    """One configuration in this process: obs/s of an SVI step and peak RSS."""
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    num_units = batch_units(length)
    data = make_data(length, num_units)
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model = build(direction, encoding, length)
    loss_fn = pyro.infer.Trace_ELBO()(model, make_guide(model, "map"))
    loss_fn(data)
    opt = torch.optim.Adam(loss_fn.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        loss_fn(data).backward()
        opt.step()

    seconds = min(time_steps(step, num_steps) for _ in range(3))  # best of 3: less noise
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_mb
    return {"obs_per_s": num_units * length / seconds, "peak_mb": peak_mb, "batch": num_units}


def run_worker(direction: str, encoding: str, length: int, num_steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", direction, encoding, str(length), str(num_steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def pyro_overhead(num_steps: int, num_units: int) -> float:
    """Seconds of an SVI step / seconds of a plain-torch step, same network and loss, on
    ``num_units`` units of length 32."""
    torch.set_num_threads(1)
    pyro.set_rng_seed(0)
    data = make_data(32, num_units)
    model = build("uni", "one_pass", 32)
    loss_fn = pyro.infer.Trace_ELBO()(model, make_guide(model, "map"))
    loss_fn(data)
    opt = torch.optim.Adam(loss_fn.parameters(), lr=1e-3)

    def svi_step() -> None:
        opt.zero_grad()
        loss_fn(data).backward()
        opt.step()

    # plain torch: the same network with alpha, rho as ordinary parameters
    plain = build("uni", "one_pass", 32)
    alpha = torch.nn.Parameter(torch.empty(100, plain.dim).uniform_(-0.05, 0.05))
    rho = torch.nn.Parameter(torch.empty(100, plain.dim).uniform_(-0.05, 0.05))
    family = plain.families[0]
    params = [alpha, rho, *(p for p in plain.parameters())]
    popt = torch.optim.Adam(params, lr=1e-3)
    prior = dist.Normal(0.0, 1.0)

    def torch_step() -> None:
        popt.zero_grad()
        content, query = plain.tokens(data, alpha)
        z = plain.encoder(content, query, data.mask, mode="one_pass")
        eta = plain.readout(z, data.key_index, rho)
        ll = family.dist(eta, data.key_index).log_prob(data.values).sum()
        loss = -(ll + prior.log_prob(alpha).sum() + prior.log_prob(rho).sum())
        loss.backward()
        popt.step()

    # interleave to share the machine's noise
    svi, plain_t = [], []
    for _ in range(3):
        svi.append(time_steps(svi_step, num_steps))
        plain_t.append(time_steps(torch_step, num_steps))
    return min(svi) / min(plain_t)


def padding_waste(data: EFAData, batch_size: int, bucket: bool, seed: int = 0) -> float:
    """Share of padded slots over the training batches of one epoch."""
    g = torch.Generator().manual_seed(seed)
    real = slots = 0
    for b in data.batches(batch_size, shuffle=True, generator=g, bucket=bucket):
        real += int(b.mask.sum())
        slots += b.mask.numel()
    return 1.0 - real / slots


def movielens_padding_waste(data_dir: Path, batch_size: int = 32) -> dict:
    movielens = _import_models_module("movielens")
    out = {}
    for task, loader in (("items", movielens.load_items), ("ratings", movielens.load_ratings)):
        train = loader(data_dir)[0]
        for bucket in (True, False):
            out[f"{task}, batch {batch_size}, bucket={bucket}"] = padding_waste(train, batch_size, bucket)
    return out


def _import_models_module(name: str):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    return __import__(name)


def movielens_time_to_target(data_dir: Path, max_epochs: int) -> dict:
    movielens = _import_models_module("movielens")
    train, val, test = movielens.load_items(data_dir)
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
    parser.add_argument(
        "--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument("--max-epochs", type=int, default=60)
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        direction, encoding, length, steps = args.worker
        print(json.dumps(worker(direction, encoding, int(length), int(steps))))
        return 0
    lengths = [4] if args.smoke else args.lengths
    rows = []
    for direction in ("uni", "bi"):
        for n in lengths:
            one = run_worker(direction, "one_pass", n, 1 if args.smoke else args.steps)
            per = run_worker(direction, "per_target", n, 1 if args.smoke else 1)
            rows.append({
                "direction": direction, "length": n, "batch_units": one["batch"],
                "one_pass_obs_per_s": one["obs_per_s"], "per_target_obs_per_s": per["obs_per_s"],
                "ratio": one["obs_per_s"] / per["obs_per_s"],
                "one_pass_peak_mb": one["peak_mb"], "per_target_peak_mb": per["peak_mb"],
            })  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    overhead = {b: pyro_overhead(2 if args.smoke else 20, b) for b in (32, 128)}
    print(f"pyro overhead ratio by units per batch: {overhead}", flush=True)
    movielens_rows, waste = None, {}
    if (args.data_dir / "movielens-100k" / "u.data").exists():
        waste = movielens_padding_waste(args.data_dir)
        print(json.dumps({"padding_waste": waste}), flush=True)
        if not args.smoke:
            movielens_rows = movielens_time_to_target(args.data_dir, args.max_epochs)
            print(json.dumps(movielens_rows), flush=True)
    if args.smoke:
        return 0
    RESULTS.mkdir(exist_ok=True)
    payload = rows + [{"pyro_overhead_ratio": overhead[128], "pyro_overhead_ratio_by_batch_units": overhead}]
    if movielens_rows:
        payload.append({"movielens_items_uni_time_to_paper_ce": movielens_rows})
    if waste:
        payload.append({"movielens_padding_waste": waste})
    (RESULTS / "speed.json").write_text(json.dumps(payload, indent=2) + "\n")
    write_markdown(rows, overhead, movielens_rows, waste, " ".join(sys.argv))
    return 0


def write_markdown(
    rows: list[dict], overhead: dict[int, float], movielens_rows: dict | None, waste: dict, command: str
) -> None:
    lines = [
        "# Training speed: one-pass vs per-target encoding",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s) "
        f"per process (1 used), torch {torch.__version__}, pyro {pyro.__version__}. CPU only.",
        f"Command: `python {command}`",
        "",
        "Each batch holds fit()'s default of 64 units, capped at 2048 observations (2 units at length "
        "512; see the units/batch column). Throughput is observations per second of one SVI training "
        "step (forward and backward, AutoDelta; best of 3 timings of at least 1 s each); peak "
        "memory is the growth of the process's peak resident set while building and training "
        "(fresh process per cell). Bidirectional rows use `context_stream='fixed'` (2 layers), the "
        "configuration where one pass is exact.",
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
    lines += [
        "",
        "Pyro overhead (SVI step with AutoDelta / plain-torch step of the same loss, best of 3, length 32):",
    ]
    lines += [f"- {b} units per batch: {r:.2f}x" for b, r in overhead.items()]
    lines.append("")
    if waste:
        lines += ["Padding waste of training batches on MovieLens (share of padded slots):", ""]
        lines += [f"- {k}: {v:.1%}" for k, v in waste.items()]
        lines.append("")
    if movielens_rows:
        lines += ["MovieLens items, unidirectional: wall time until test CE <= 3.4438 (paper):", ""]
        for k, v in movielens_rows.items():
            lines.append(f"- {k}: {v}")
    (RESULTS / "speed.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
