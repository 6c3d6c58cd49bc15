"""Crops/s of the cached training pipeline without and with the robustness augmentation (aiseg, JSON).

Compare with what the U-Net consumes (benchmarks/pipeline.py: unet crops/s); run from the project folder."""
import time, json, sys
from islkeras.config import load_config
from islkeras.data.pipeline import make_dataset
from islkeras.data.records import ensure_records
out = {}
for name in ("aiseg_nuclei_l1", "aiseg_nuclei_robust"):
    cfg = load_config(f"experiments/{name}.json", overrides={"data.records": "/tmp/augbench_rec"})
    m = ensure_records(cfg)
    ds = make_dataset(cfg, "train", True, m)
    it = iter(ds); [next(it) for _ in range(20)]
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < 8:
        next(it); n += 1
    out[name] = round(n * cfg.training.batch_size / (time.perf_counter() - t0), 1)
out["robust_over_l1"] = round(out["aiseg_nuclei_robust"] / out["aiseg_nuclei_l1"], 3)
print(json.dumps({"cached_crops_per_s": out}))
