"""Training steps/s under the distribution strategies and precisions of ``training.*``; prints one JSON object.

Every case runs in its own process (logical devices and precision need a fresh TensorFlow runtime) and
trains the model ``islkeras fit`` would build (``build_training_model``: same seed, same loss) on one
fixed in-memory global batch, so the figure is the step itself -- forward, backward, the strategy's
all-reduce and the optimizer update -- without the input pipeline. After ``--warmup`` steps (tracing)
``--steps`` steps are timed (from the end of one extra step, so ``fit``'s set-up is not counted);
``steps_per_s``, ``images_per_s`` (global batch x steps/s) and the median step time are reported, with
``loss_first``/``loss_last`` as a sanity check (the same seed and batch in every case).

A case is ``STRATEGY[:DEVICE,DEVICE...][@PRECISION]``:

* ``default`` -- one device (the first GPU if any, else the CPU), float32;
* ``mirrored:/cpu:0`` -- MirroredStrategy with one replica (the strategy's own overhead);
* ``mirrored:/cpu:0,/cpu:1`` -- two logical CPU devices sharing the same cores;
* ``mirrored:/gpu:0,/gpu:1`` / ``mirrored`` -- named GPUs / every local GPU;
* ``default@mixed_bfloat16``, ``default@mixed_float16`` -- Keras mixed precision.

Default cases: on a CPU-only machine the four above (1 vs 2 logical CPUs, bfloat16 vs float32); with GPUs:
``default``, ``mirrored`` (all GPUs), ``default@mixed_float16``, ``mirrored@mixed_float16``.

    python benchmarks/scale.py                                   # the default cases for this machine
    python benchmarks/scale.py --batch 8 --crop 128 --steps 20 --out scale.json
    python benchmarks/scale.py --case default --case "mirrored:/gpu:0,/gpu:1@mixed_float16" \\
        --arch unet_sm --backbone densenet121 --crop 256 --batch 16
    python benchmarks/scale.py --kind pix2pix --jit

On several CPU logical devices the replicas share the same cores, so no speed-up is possible: the
comparison shows the strategy's overhead and that the step stays correct (same loss scale), not scaling.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from _common import emit  # noqa: E402  (benchmarks/ is on sys.path)

PROJECT = Path(__file__).resolve().parents[1]
CPU_CASES = ["default", "mirrored:/cpu:0", "mirrored:/cpu:0,/cpu:1", "default@mixed_bfloat16"]
GPU_CASES = ["default", "mirrored", "default@mixed_float16", "mirrored@mixed_float16"]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", dest="cases", action="append", default=None, metavar="CASE",
                   help="STRATEGY[:DEVICES][@PRECISION]; repeatable (default: depends on the machine)")
    p.add_argument("--kind", default="l1", choices=["l1", "l2", "pix2pix", "perceptual"])
    p.add_argument("--arch", default="unet", choices=["unet", "unet_sm"])
    p.add_argument("--backbone", default="densenet121", help="with --arch unet_sm")
    p.add_argument("--filters", type=int, default=32, help="plain U-Net first-level filters")
    p.add_argument("--depth", type=int, default=4, help="plain U-Net depth")
    p.add_argument("--batch", type=int, default=8, help="global batch (split over the replicas)")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=1,
                   help="run every case this many times (interleaved), report the median")
    p.add_argument("--jit", action="store_true", help="training.jit_compile (XLA)")
    p.add_argument("--out", default=None, help="also write the JSON result here")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def parse_case(case: str) -> dict:
    rest, _, precision = case.partition("@")
    strategy, _, devs = rest.partition(":")
    if strategy not in ("default", "mirrored", "multiworker", "auto"):
        raise SystemExit(f"--case {case!r}: unknown strategy {strategy!r}")
    if precision not in ("", "float32", "mixed_float16", "mixed_bfloat16"):
        raise SystemExit(f"--case {case!r}: unknown precision {precision!r}")
    return {"strategy": strategy, "devices": [d for d in devs.split(",") if d] or None,
            "mixed_precision": None if precision in ("", "float32") else precision}


# ------------------------------------------------------------------------------------------- child
def child(args) -> dict:
    """One case in this (fresh) process: returns its measurement."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import islkeras  # noqa: F401  (tf-keras first)
    from islkeras.config import from_dict
    from islkeras.training import distribute as D

    case = parse_case(args._child)
    cfg = from_dict({
        "name": "scale",
        "data": {"root": ".", "channels": {"x": {"file": "x.tif"}, "y": {"file": "y.tif"}},
                 "inputs": ["x"], "targets": ["y"]},
        "model": {"architecture": args.arch, "backbone": args.backbone, "encoder_weights": None,
                  "unet_filters": args.filters, "unet_depth": args.depth},
        "loss": {"kind": args.kind, "vgg_weights": None, "patchgan_filters": 32},
        "training": {"batch_size": args.batch, "learning_rate": 1e-3, "jit_compile": args.jit, **case},
    }, base_dir=str(PROJECT))
    t = cfg.training
    strategy = D.get_strategy(t)  # before any TensorFlow op
    D.check_batch_size(t.batch_size, strategy)
    cfg = D.for_strategy(cfg, strategy)  # no XLA with several replicas
    t = cfg.training
    import numpy as np
    import tensorflow as tf

    from islkeras.training.fit import build_training_model

    tf.keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch, args.crop, args.crop, 1)).astype(np.float32)
    y = (0.7 * x + 0.3 * rng.standard_normal(x.shape)).astype(np.float32)
    with D.precision(t.mixed_precision):
        with strategy.scope():
            model, _ = build_training_model(cfg, 1, 1)
        ds = D.distribute_dataset(tf.data.Dataset.from_tensors((x, y)).repeat(), strategy, 1)

        times, losses = [], []

        class Timer(tf.keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                times.append(time.perf_counter())
                losses.append(float(logs["loss"]))

        t0 = time.perf_counter()
        model.fit(ds, steps_per_epoch=args.warmup, epochs=1, verbose=0)
        warm = time.perf_counter() - t0
        times.clear(), losses.clear()
        model.fit(ds, steps_per_epoch=args.steps + 1, epochs=1, verbose=0, callbacks=[Timer()])
    # from the end of the first timed step to the end of the last: fit's per-call set-up is left out
    steps = np.diff(times)
    total = times[-1] - times[0]
    return {
        "case": args._child, "strategy": D.describe(strategy), "replicas": strategy.num_replicas_in_sync,
        "precision": t.mixed_precision or "float32", "steps_per_s": len(steps) / total,
        "images_per_s": len(steps) * args.batch / total, "step_ms_median": 1000 * float(np.median(steps)),
        "warmup_s": warm, "loss_first": losses[0], "loss_last": losses[-1],
    }


# ------------------------------------------------------------------------------------------ parent
def machine() -> dict:
    info = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split()
        info["avx512_bf16"] = "avx512_bf16" in flags
        info["amx_bf16"] = "amx_bf16" in flags
    except (OSError, IndexError):
        pass
    try:
        info["loadavg_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    return info


def gpus_present() -> int:
    code = "import islkeras, tensorflow as tf; print(len(tf.config.list_physical_devices('GPU')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def run_case(case: str, argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv, "--_child", case]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {"case": case, "error": (p.stderr or p.stdout)[-2000:]}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args._child:
        print(json.dumps(child(args)))
        return
    n_gpu = gpus_present()
    cases = args.cases or (GPU_CASES if n_gpu else CPU_CASES)
    base = [a for a in argv if not a.startswith("--case") and a not in (args.cases or [])]
    results = {}
    all_runs = {case: [] for case in cases}
    for _ in range(args.repeats):  # interleaved, so a change in the machine's load spreads over all cases
        for case in cases:
            all_runs[case].append(run_case(case, base))
    for case in cases:
        runs = all_runs[case]
        ok = [r for r in runs if "error" not in r]
        if not ok:
            results[case] = runs[0]
            print(f"{case}: FAILED\n{runs[0]['error']}", file=sys.stderr)
            continue
        best = sorted(ok, key=lambda r: r["steps_per_s"])[len(ok) // 2]
        best["steps_per_s_runs"] = [round(r["steps_per_s"], 3) for r in ok]
        results[case] = best
        print(f"{case:40s} {best['steps_per_s']:7.2f} steps/s  {best['images_per_s']:8.1f} img/s  "
              f"({best['replicas']} replica(s), {best['precision']})", file=sys.stderr)
    out = {"benchmark": "scale", "machine": dict(machine(), gpus=n_gpu),
           "settings": {k: v for k, v in vars(args).items() if k not in ("cases", "_child", "out")},
           "cases": results}

    def ratio(a, b):
        if a in results and b in results and "steps_per_s" in results[a] and "steps_per_s" in results[b]:
            return round(results[a]["steps_per_s"] / results[b]["steps_per_s"], 3)
        return None

    out["ratios"] = {k: v for k, v in {
        "mirrored_2cpu_vs_default": ratio("mirrored:/cpu:0,/cpu:1", "default"),
        "mirrored_2cpu_vs_mirrored_1cpu": ratio("mirrored:/cpu:0,/cpu:1", "mirrored:/cpu:0"),
        "mirrored_1cpu_vs_default": ratio("mirrored:/cpu:0", "default"),
        "bfloat16_vs_float32": ratio("default@mixed_bfloat16", "default"),
        "mirrored_all_gpus_vs_default": ratio("mirrored", "default"),
        "float16_vs_float32": ratio("default@mixed_float16", "default"),
    }.items() if v is not None}
    emit(out, args.out, indent=1)


if __name__ == "__main__":
    main()
