#!/usr/bin/env python3
"""Benchmark regmean-gpu against two PyTorch RegMean implementations.

    python benches/run_bench.py --workload clip4-small|clip8-small|clip8|gpt2-7-small|gpt2-7 \
        --device cpu|cuda [--repeat 3] [--threads 2] [--quick] [--bin target/release/regmean-gpu]

Synthetic pools are generated once with `regmean-gpu synth` and cached under
target/bench-pools/<workload>/.  For every repeat, the three implementations (regmean-gpu,
benches/pytorch_regmean.py --mode fusionbench, --mode skilled) run in turn, each as its own
subprocess with the same thread count, on a config written by this script
(`fusionbench_compat: true`, `shuffle: false`).  Prints a table of median phase times, the
speed-ups (baseline_time / regmean_time) and the largest relative difference
(max|a-b| / max|b| per tensor, worst tensor) of every output against the fusionbench output
and against the f64 reference (the last fusionbench run also solves its own sums in float64,
untimed); writes target/bench-results/<workload>-<device>-<date>.json; the LAST printed line is a
one-line JSON summary.

End-to-end time = wall time of the subprocess measured here (includes Python/torch import
and process start for the PyTorch scripts); the in-process total_s of each implementation is
reported as well, and the speed-up on it too.
"""

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
TORCH_SCRIPT = ROOT / "benches" / "pytorch_regmean.py"


def _shown(path):
    """A path as recorded in results: relative to the repository when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


WORKLOADS = {
    # name: (synth args, num_regmean_examples, batch_size, max_length)
    "clip8": (["--arch", "clip", "--models", "8", "--examples", "256"], 256, 32, 512),
    "clip8-small": (["--arch", "clip", "--models", "8", "--examples", "32"], 32, 32, 512),
    # --quick: half the models of clip8-small, so that all three run in a few minutes.
    "clip4-small": (["--arch", "clip", "--models", "4", "--examples", "32"], 32, 32, 512),
    "gpt2-7": (["--arch", "gpt2", "--models", "7", "--examples", "256",
                "--min-len", "16", "--max-len", "128"], 256, 32, 128),
    "gpt2-7-small": (["--arch", "gpt2", "--models", "7", "--examples", "32", "--layers", "4",
                      "--min-len", "16", "--max-len", "128"], 32, 32, 128),
}
IMPLS = ["regmean-gpu", "fusionbench", "skilled"]
PHASES = ["load", "forward_and_grams", "solve", "write"]


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def git_commit():
    """The checkout's commit, with "-dirty" when tracked files differ from it; None outside git.

    It names the source the harness ran from: the binary is whatever --bin points at, so a
    result is reproducible only if that binary was built from this checkout.
    """
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("-dirty" if dirty else "")


def ensure_pool(binary, workload, threads):
    synth_args, n_ex, bs, max_len = WORKLOADS[workload]
    pool = ROOT / "target" / "bench-pools" / workload
    marker = pool / ".bench-pool.json"
    want = {"synth": synth_args}
    ok = (pool / "merge.yaml").exists() and (pool / "base" / "model.safetensors").exists()
    if ok and marker.exists():
        ok = json.loads(marker.read_text()) == want
    if not ok:
        log(f"generating pool {pool.relative_to(ROOT)} (once) ...")
        if pool.exists():
            import shutil
            shutil.rmtree(pool)
        pool.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([str(binary), "synth", *synth_args, "--out", str(pool), "-q",
                        "--threads", str(threads)], check=True)
    marker.write_text(json.dumps(want))
    cfg = yaml.safe_load((pool / "merge.yaml").read_text())
    cfg["parameters"] = {
        "num_regmean_examples": n_ex,
        "batch_size": bs,
        "exclude_param_names_regex": [],
        "fusionbench_compat": True,
        "max_length": max_len,
        "seed": 0,
        "shuffle": False,
    }
    cfg["out_dtype"] = "float32"
    config = pool / "bench.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return pool, config


def run_one(impl, binary, config, out, device, threads, work, extra=()):
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_OFFLINE", "1")
    if impl == "regmean-gpu":
        report = work / f"{out.name}.report.json"
        cmd = [str(binary), "merge", str(config), str(out), "--force", "-q",
               "--threads", str(threads), "--report-json", str(report),
               "--device", device]
    else:
        cmd = [PY, str(TORCH_SCRIPT), "--mode", impl, "--config", str(config),
               "--out", str(out), "--device", device, "--threads", str(threads), *extra]
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        log(p.stdout[-3000:], p.stderr[-3000:])
        raise SystemExit(f"{impl} failed with exit code {p.returncode}: {' '.join(cmd)}")
    if impl == "regmean-gpu":
        r = json.loads(report.read_text())
        ph = r["phases_s"]
        known = ph["forward_and_grams"] + ph["solve"] + ph["write"]
        res = {
            # regmean-gpu reports no separate load phase: model loading happens inside
            # forward_and_grams; what is left of total_s is listed as "load" (startup, config,
            # base checkpoint and data opening).
            "load": max(r["total_s"] - known, 0.0),
            "forward_and_grams": ph["forward_and_grams"],
            "solve": ph["solve"],
            "write": ph["write"],
            "total_s": r["total_s"],
            "peak_rss_bytes": r.get("peak_rss_bytes"),
            "peak_device_bytes": r.get("peak_device_bytes"),
            "raw": r,
        }
    else:
        r = json.loads((out / "phases.json").read_text())
        res = {
            "load": r["load_s"],
            "forward_and_grams": r["forward_and_grams_s"],
            "solve": r["solve_s"],
            "write": r["write_s"],
            "total_s": r["total_s"],
            "peak_rss_bytes": r["peak_rss_bytes"],
            "peak_device_bytes": r["peak_device_bytes"],
            "raw": r,
        }
        # fusionbench's untimed f64 reference solve (--also-f64) is not its time.
        wall -= r.get("untimed_s", 0.0)
    res["wall_s"] = wall
    return res


def rel_diffs(candidate, reference):
    """{tensor: max|a-b| / max|b|} over the reference's tensors (float64)."""
    import torch
    from safetensors import safe_open

    out = {}
    with safe_open(str(candidate / "model.safetensors"), "pt") as fa, \
            safe_open(str(reference / "model.safetensors"), "pt") as fb:
        keys_a = set(fa.keys())
        for k in fb.keys():
            if k not in keys_a:
                out[k] = float("inf")
                continue
            a = fa.get_tensor(k).double()
            b = fb.get_tensor(k).double()
            if a.shape != b.shape:
                out[k] = float("inf")
                continue
            den = b.abs().max().item()
            num = (a - b).abs().max().item()
            out[k] = num / den if den > 0 else (0.0 if num == 0 else float("inf"))
    if not out:
        raise SystemExit(f"{reference} holds no tensors")
    return out


def gib(x):
    return "n/a" if x is None else f"{x / 2**30:.2f} GiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="clip8-small")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--quick", action="store_true", help="clip4-small, repeat 1")
    ap.add_argument("--bin", default=str(ROOT / "target" / "release" / "regmean-gpu"))
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    if args.quick:
        args.workload, args.repeat = "clip4-small", 1

    binary = Path(args.bin).resolve()
    if not binary.exists():
        raise SystemExit(f"{binary} not found: build it with `cargo build --release`")
    t_start = time.perf_counter()
    commit = git_commit()  # before the runs: the checkout may change while they go on
    pool, config = ensure_pool(binary, args.workload, args.threads)
    work = ROOT / "target" / "bench-work" / f"{args.workload}-{args.device}"
    work.mkdir(parents=True, exist_ok=True)

    runs = {i: [] for i in IMPLS}
    for rep in range(args.repeat):
        for impl in IMPLS:
            out = work / impl
            log(f"[{rep + 1}/{args.repeat}] {impl} ...")
            # The last fusionbench run also solves its sums in float64 (untimed): the
            # accuracy reference every output is compared with.
            extra = ("--also-f64", str(work / "f64-reference")) \
                if impl == "fusionbench" and rep == args.repeat - 1 else ()
            r = run_one(impl, binary, config, out, args.device, args.threads, work, extra)
            log(f"    wall {r['wall_s']:.2f} s, total {r['total_s']:.2f} s, "
                f"peak RSS {gib(r['peak_rss_bytes'])}")
            runs[impl].append(r)

    # accuracy: last repeat's outputs against fusionbench
    ref = work / "fusionbench"
    diffs = {}
    for impl in ("regmean-gpu", "skilled"):
        d = rel_diffs(work / impl, ref)
        worst = max(d, key=d.get)
        diffs[impl] = {
            "max_rel_diff": d[worst],
            "worst_tensor": worst,
            "above_tol": sorted([k for k, v in d.items() if v > args.tol]),
            "per_tensor": d,
        }
    # The arbiter: FusionBench's sums solved in float64 (written by the last fusionbench run).
    for impl in IMPLS:
        d = rel_diffs(work / impl, work / "f64-reference")
        worst = max(d, key=d.get)
        diffs.setdefault(impl, {})["vs_f64_reference"] = {
            "max_rel_diff": d[worst], "worst_tensor": worst,
            "above_tol": sorted([k for k, v in d.items() if v > args.tol])}
    d = rel_diffs(work / "regmean-gpu", work / "skilled")
    worst = max(d, key=d.get)
    diffs["regmean-gpu_vs_skilled"] = {"max_rel_diff": d[worst], "worst_tensor": worst,
                                       "above_tol": sorted([k for k, v in d.items() if v > args.tol])}

    med = {}
    for impl in IMPLS:
        rs = runs[impl]
        m = {p: statistics.median(r[p] for r in rs) for p in PHASES}
        m["total_s"] = statistics.median(r["total_s"] for r in rs)
        m["wall_s"] = statistics.median(r["wall_s"] for r in rs)
        m["peak_rss_bytes"] = max((r["peak_rss_bytes"] or 0) for r in rs) or None
        dev = [r["peak_device_bytes"] for r in rs if r["peak_device_bytes"] is not None]
        m["peak_device_bytes"] = max(dev) if dev else None
        med[impl] = m

    rg = med["regmean-gpu"]
    speed = {
        "speedup_vs_fusionbench": med["fusionbench"]["wall_s"] / rg["wall_s"],
        "speedup_vs_skilled": med["skilled"]["wall_s"] / rg["wall_s"],
        "speedup_vs_fusionbench_in_process": med["fusionbench"]["total_s"] / rg["total_s"],
        "speedup_vs_skilled_in_process": med["skilled"]["total_s"] / rg["total_s"],
    }

    # table
    date = _dt.datetime.now().strftime("%Y-%m-%d")
    print(f"\nRegMean benchmark: workload {args.workload}, device {args.device}, "
          f"threads {args.threads}, repeats {args.repeat}, {date}")
    print("median seconds per phase (regmean-gpu's 'load' = total - reported phases; "
          "its model loading is inside forward_and_grams)")
    hdr = f"{'implementation':<14}" + "".join(f"{p:>19}" for p in PHASES) + \
        f"{'total(in-proc)':>16}{'wall(e2e)':>11}{'peak RSS':>12}"
    if args.device == "cuda":
        hdr += f"{'peak device':>13}"
    hdr += f"{'max rel diff vs fb':>20}"
    print(hdr)
    print("-" * len(hdr))
    for impl in IMPLS:
        m = med[impl]
        line = f"{impl:<14}" + "".join(f"{m[p]:>19.2f}" for p in PHASES) + \
            f"{m['total_s']:>16.2f}{m['wall_s']:>11.2f}{gib(m['peak_rss_bytes']):>12}"
        if args.device == "cuda":
            line += f"{gib(m['peak_device_bytes']):>13}"
        dd = "(reference)" if impl == "fusionbench" else f"{diffs[impl]['max_rel_diff']:.2e}"
        line += f"{dd:>20}"
        print(line)
    print()
    print(f"speed-up = baseline_time / regmean_time (end-to-end wall): "
          f"vs fusionbench {speed['speedup_vs_fusionbench']:.2f}x, "
          f"vs skilled {speed['speedup_vs_skilled']:.2f}x "
          f"(in-process total: {speed['speedup_vs_fusionbench_in_process']:.2f}x, "
          f"{speed['speedup_vs_skilled_in_process']:.2f}x)")
    for impl in ("regmean-gpu", "skilled"):
        d = diffs[impl]
        print(f"{impl} vs fusionbench: worst {d['max_rel_diff']:.2e} ({d['worst_tensor']}); "
              f"{len(d['above_tol'])} tensors above {args.tol:g}"
              + (f": {', '.join(d['above_tol'])}" if d["above_tol"] else ""))
    d = diffs["regmean-gpu_vs_skilled"]
    print(f"regmean-gpu vs skilled: worst {d['max_rel_diff']:.2e} ({d['worst_tensor']}); "
          f"{len(d['above_tol'])} tensors above {args.tol:g}")
    for impl in IMPLS:
        d = diffs[impl]["vs_f64_reference"]
        print(f"{impl} vs the f64 reference (fusionbench's sums, float64 solve): worst "
              f"{d['max_rel_diff']:.2e} ({d['worst_tensor']}); {len(d['above_tol'])} tensors "
              f"above {args.tol:g}")

    try:
        import torch
        torch_version = torch.__version__
    except Exception:
        torch_version = None
    result = {
        "workload": args.workload,
        "device": args.device,
        "threads": args.threads,
        "repeat": args.repeat,
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                 "python": platform.python_version(), "torch": torch_version},
        "binary": _shown(binary),
        "commit": commit,
        "config": _shown(config),
        "median": med,
        "runs": runs,
        **speed,
        "accuracy": diffs,
        "tol": args.tol,
        "bench_wall_s": time.perf_counter() - t_start,
    }
    res_dir = ROOT / "target" / "bench-results"
    res_dir.mkdir(parents=True, exist_ok=True)
    path = res_dir / f"{args.workload}-{args.device}-{date}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"results: {_shown(path)}")
    summary = {
        "workload": args.workload,
        "device": args.device,
        "threads": args.threads,
        "speedup_vs_fusionbench": round(speed["speedup_vs_fusionbench"], 4),
        "speedup_vs_skilled": round(speed["speedup_vs_skilled"], 4),
        "max_rel_diff_vs_fusionbench": diffs["regmean-gpu"]["max_rel_diff"],
        "max_rel_diff_vs_f64_reference": diffs["regmean-gpu"]["vs_f64_reference"]["max_rel_diff"],
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
