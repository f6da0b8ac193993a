"""ADC, simulation-guided pruning and LoRITa on digits, measured side by side in one run.

    PYTHONPATH=. python benchmarks/bench_auto_compress.py [--quick] [--out RESULTS.md]

Per method and model: FLOPs and params after slimming (or factorising), test accuracy, and the measured
speedup over the dense model on onnxruntime and LiteRT (1 thread, interleaved dense/slim pairs, median of
the per-pair ratios). Claims checked at the end:
  1. ADC at a 4x FLOPs budget is at least as accurate as uniform per-space ratios at the same budget;
  2. ADC with a latency budget on onnxruntime meets it on onnxruntime's measured latency;
  3. simulation-guided pruning is at least as accurate as iterative magnitude pruning (same sparsity);
  4. LoRITa cuts an MLP's and a small ViT's FLOPs by >= 2x within 1.5 points of the dense accuracy
     (LoRITa training + a short fine-tune of the thin model; the dense model trains as many epochs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from slimship.compress import LoopOptions, compress, train_loop
from slimship.compress.adc import measure_latency_ms
from slimship.compress.lorita import factorize
from slimship.data import Batches, digits_loaders, evaluate_accuracy
from slimship.models import digits_mlp, digits_vit, lenet5, small_resnet
from slimship.runtimes import measure_speedup
from slimship.runtimes.alignment import measure_alignment
from slimship.runtimes.targets import get_target
from slimship.slimming.api import count_flops, count_params, slim

ROWS: list[dict] = []


#: batch of the latency-budget part (see there)
LATENCY_BATCH = 16


def export(model, x, path: Path) -> None:
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        if path.suffix == ".onnx":
            torch.onnx.export(model.eval(), (x,), str(path), dynamo=True, verbose=False)
        else:
            import litert_torch

            litert_torch.convert(model.eval(), (x,)).export(str(path))


def speedup(dense, slim_model, x, fmt: str, runs: int) -> float:
    """Median of per-pair latency ratios dense/slim, pairs interleaved on `mobile-1t` (1 thread, core 0)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"dense.{fmt}", Path(tmp) / f"slim.{fmt}"]
        export(dense, x, paths[0])
        export(slim_model, x, paths[1])
        sp, _ = measure_speedup(*paths, [x.numpy()], get_target("mobile-1t"), warmup=10, runs=runs)
    return sp.median


def reshuffled(train: Batches, seed: int) -> Batches:
    """The same training examples in another per-epoch order (`seed`)."""
    return Batches(train.x, train.y, train.batch_size, shuffle=True, seed=seed)


def train_dense(factory, train, epochs: int):
    model = factory()
    train_loop(
        model,
        train,
        LoopOptions(epochs=epochs, seed=0),
        optimizer=torch.optim.Adam(model.parameters(), 2e-3),
        desc=f"dense {factory.__name__}",
    )
    return model.eval()


def record(name, method, dense, small, test, x, runs, extra=""):
    row = {
        "model": name,
        "method": method,
        "flops": count_flops(small, (x,)),
        "flops_ratio": count_flops(dense, (x,)) / count_flops(small, (x,)),
        "params": count_params(small),
        "acc": evaluate_accuracy(small, test),
        "ort": speedup(dense, small, x, "onnx", runs),
        "litert": speedup(dense, small, x, "tflite", runs),
        "extra": extra,
    }
    ROWS.append(row)
    print(
        f"{name:>13} {method:>22} FLOPs {row['flops']:>9} ({row['flops_ratio']:.2f}x) "
        f"params {row['params']:>7}"
        f" acc {row['acc']:6.2f}  ort {row['ort']:.2f}x  litert {row['litert']:.2f}x  {extra}",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--parts", default="adc,prune,latency,lorita", help="comma list of parts to run")
    parser.add_argument("--trials", type=int, default=None, help="data orders per pruning method")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/RESULTS_auto_compress.md"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    q = args.quick
    epochs, episodes, runs = (8, 100, 60) if q else (15, 250, 200)
    trials = args.trials or (1 if q else 3)
    ft = 3 if q else 5  # ADC fine-tune epochs (also the per-candidate selection fine-tune)
    lorita_ft = 3  # LoRITa thin-model fine-tune epochs (the dense baseline trains as many more)
    train, test = digits_loaders(64, 0)
    x2 = next(iter(test))[0][:2]  # example inputs (batch 2 keeps the batch dimension dynamic)
    x1 = x2[:1]
    t0 = time.time()
    claims = {}
    parts = set(args.parts.split(","))
    print(f"dense {epochs} epochs; ADC {episodes} episodes; {runs} timing pairs; 1 thread")

    cnns = (("lenet5", lenet5), ("small_resnet", small_resnet)) if parts & {"adc", "prune", "latency"} else ()
    for name, factory in cnns:
        dense = train_dense(factory, train, epochs)
        record(name, "dense", dense, dense, test, x1, runs)
        accs = {}
        for search in ("uniform", "ddpg") if "adc" in parts else ():
            r = compress(
                "adc",
                dense,
                (x2,),
                train,
                target_flops_kept=0.25,
                search=search,
                episodes=episodes,
                warmup_episodes=episodes // 4,
                finetune_epochs=ft,
                top_k=5,
                select_epochs=ft,  # candidates compared on the validation split after the same fine-tune
            )
            s = slim(r.model, (x2,)).model
            chosen = next((c for c in r.info["selection"] if c["chosen"]), None)
            note = "" if chosen is None else f"chosen: episode {chosen['episode']} (0 = uniform)"
            accs[search] = record(name, f"adc-flops0.25-{search}", dense, s, test, x1, runs, note)["acc"]
        if accs:
            claims[f"ADC >= uniform at 4x FLOPs ({name})"] = (
                accs["ddpg"] >= accs["uniform"],
                f"{accs['ddpg']:.2f} vs {accs['uniform']:.2f}",
            )
        accs = {}
        for method in ("magnitude", "simguided") if "prune" in parts else ():
            # one trial per training-data order (the methods draw nothing at random): the claim compares
            # the mean test accuracy over the trials; the row's speedups are those of trial 0's model
            trial_accs, row = [], None
            for trial in range(trials):
                r = compress(
                    method,
                    dense,
                    (x2,),
                    reshuffled(train, trial),
                    target=0.6,
                    prune_steps=3 if q else 5,
                    epochs_per_step=1 if q else 2,
                    finetune_epochs=2,
                )
                s = slim(r.model, (x2,)).model
                if row is None:
                    note = f"group sparsity {r.info['group_sparsity']:.3f}"
                    row = record(name, f"{method}-0.6", dense, s, test, x1, runs, note)
                    trial_accs.append(row["acc"])
                else:
                    trial_accs.append(evaluate_accuracy(s, test))
            accs[method] = statistics.mean(trial_accs)
            row["acc"] = accs[method]
            row["extra"] += f"; mean of {trials} data orders: " + ", ".join(f"{a:.2f}" for a in trial_accs)
        if accs:
            claims[f"simguided >= magnitude at sparsity 0.6 ({name}, mean of {trials})"] = (
                accs["simguided"] >= accs["magnitude"],
                f"{accs['simguided']:.2f} vs {accs['magnitude']:.2f}",
            )
        if name == "small_resnet" and "latency" in parts:
            # a batch of 16: at batch 1 this 9 MFLOP model runs in about 0.1 ms, mostly fixed per-node cost,
            # so channel counts barely move its latency. Each latency is the smallest of 5 medians of `runs`
            # runs (other load on the machine only adds time).
            xb = torch.cat([x for x, _ in test])[:LATENCY_BATCH]
            dense_ms = measure_latency_ms(dense, (xb,), "onnxruntime", 1, runs, repeats=5)
            # the channel multiple onnxruntime's kernels favour on this host, measured (8 on AVX2)
            multiple = measure_alignment(get_target("mobile-1t"), op="conv", fmt="onnx").multiple
            budget = 0.6 * dense_ms
            r = compress(
                "adc",
                dense,
                (xb,),
                train,
                target_latency_ms=budget,
                target_runtime="onnxruntime",
                episodes=episodes,
                warmup_episodes=episodes // 4,
                finetune_epochs=ft,
                top_k=5,
                select_epochs=ft,
                latency_fractions=(0.5,) if q else (0.25, 0.5, 0.75),
                latency_runs=runs,
                latency_multiple=multiple,
            )
            s = slim(r.model, (x2,)).model  # dynamic batch: evaluated on test batches
            sb = slim(r.model, (xb,)).model  # the batch the search measured
            measured = measure_latency_ms(sb, (xb,), "onnxruntime", 1, runs, repeats=5)
            record(
                name,
                "adc-latency0.6-ort",
                dense,
                s,
                test,
                x1,
                runs,
                f"budget {budget:.4f} ms, measured {measured:.4f} ms (dense {dense_ms:.4f}); in the search: "
                f"predicted {r.info['predicted_latency_ms']:.4f}, "
                f"measured {r.info['measured_latency_ms']:.4f} after "
                f"{len(r.info['latency_checks'])} check(s), channel multiple {multiple}",
            )
            claims["ADC latency budget met on onnxruntime (small_resnet)"] = (
                measured <= budget,
                f"measured {measured:.4f} ms vs budget {budget:.4f} ms",
            )

    for name, factory in (
        (("digits_mlp", digits_mlp), ("digits_vit", digits_vit)) if "lorita" in parts else ()
    ):
        ep = epochs if name == "digits_mlp" else 2 * epochs
        dense = train_dense(factory, train, ep + lorita_ft)  # the same epoch budget as LoRITa + fine-tune
        d = record(name, "dense", dense, dense, test, x1, runs, f"{ep + lorita_ft} epochs")
        r = compress("lorita", factory(), (x2,), train, epochs=ep, depth=3, weight_decay=1e-3)
        # the first energy (descending) that reaches 2x FLOPs: chosen on FLOPs only, never on test accuracy
        for energy in (0.95, 0.9, 0.85, 0.8, 0.75):
            f = factorize(r.model, (x2,), energy=energy, min_saving=0.25)
            if f.flops_ratio >= 2:
                break
        acc_truncated = evaluate_accuracy(f.model, test)
        f = factorize(
            r.model, (x2,), energy=energy, min_saving=0.25, train=train, finetune_epochs=lorita_ft, seed=0
        )
        row = record(
            name,
            f"lorita-energy{energy}",
            dense,
            f.model,
            test,
            x1,
            runs,
            f"{ep} + {lorita_ft} fine-tune epochs; max layer rel err "
            f"{max(lay.rel_truncation_error for lay in f.layers):.3f}; "
            f"acc before fine-tune {acc_truncated:.2f}",
        )
        claims[f"LoRITa >= 2x FLOPs within 1.5 pts ({name})"] = (
            row["flops_ratio"] >= 2 and row["acc"] >= d["acc"] - 1.5,
            f"{row['flops_ratio']:.2f}x, {row['acc']:.2f} vs dense {d['acc']:.2f}",
        )

    print(f"\nclaims ({time.time() - t0:.0f} s):")
    for claim, (ok, detail) in claims.items():
        print(f"  [{'PASS' if ok else 'FAIL'}] {claim}: {detail}")
    lines = [
        "# Auto-compression benchmark (ADC, simulation-guided pruning, LoRITa)",
        "",
        f"`PYTHONPATH=. python benchmarks/bench_auto_compress.py{' --quick' if q else ''} "
        f"--parts {args.parts}` — digits "
        f"(seed 0 split), dense {epochs} epochs, ADC {episodes} episodes, speedups: median of {runs} "
        "interleaved pairs, 1 thread.",
        "",
        "| model | method | FLOPs | FLOPs ratio | params | test acc % | ORT speedup | LiteRT speedup "
        "| note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in ROWS:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['flops']} | {r['flops_ratio']:.2f}x | {r['params']} | "
            f"{r['acc']:.2f} | {r['ort']:.2f}x | {r['litert']:.2f}x | {r['extra']} |"
        )
    lines += ["", "## Claims", ""] + [
        f"- **{'PASS' if ok else 'FAIL'}** {c}: {d}" for c, (ok, d) in claims.items()
    ]
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
