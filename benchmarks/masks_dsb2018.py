"""Evaluate nucleus masks on ../shared/data/dsb2018-nuclei (and the stardist fixture); print JSON.

Metrics per image, averaged over images: instance AP at IoU 0.5 (TP / (TP + FP + FN), Data Science Bowl /
cellpose definition, :func:`islkeras.segmentation.metrics.average_precision`) and pixel Jaccard of the predicted
foreground vs ``labels > 0`` (:func:`islkeras.segmentation.metrics.iou_binary`). The classical defaults were tuned
on the even-indexed half of fields.csv, so the odd-indexed ("holdout") half is reported separately.

    python benchmarks/masks_dsb2018.py                                  # classical only (~5 s)
    python benchmarks/masks_dsb2018.py --cellpose-model nuclei.cpmodel  # + a cellpose model file
    python benchmarks/masks_dsb2018.py --cellpose-model nuclei          # + pretrained (needs internet)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from islkeras.segmentation.classical import ClassicalParams  # noqa: E402
from islkeras.segmentation.mask_io import MasksError  # noqa: E402
from islkeras.segmentation.masks import make_segmenter  # noqa: E402
from islkeras.segmentation.metrics import average_precision, iou_binary  # noqa: E402
from islkeras.utils import shared_data_dir  # noqa: E402


def load_dsb(root: Path, limit: int | None = None):
    import pandas as pd
    import tifffile

    ids = pd.read_csv(root / "fields.csv")["id"].tolist()
    if limit:
        ids = ids[:limit]
    return [(i, tifffile.imread(root / i / "image.tif"), tifffile.imread(root / i / "labels.tif")) for i in ids]


def evaluate(segment, items) -> dict:
    t0 = time.time()
    rows = []
    for k, (name, img, true) in enumerate(items):
        pred = segment(img)
        r = average_precision(true, pred, 0.5)
        rows.append({"id": name, "index": k, "ap50": r.ap, "jaccard": iou_binary(pred > 0, true > 0),
                     "n_true": r.n_true, "n_pred": r.n_pred})
    seconds = time.time() - t0

    def mean(key, sel):
        v = [r[key] for r in rows if sel(r)]
        return round(float(np.mean(v)), 4) if v else None

    out = {
        "n_images": len(rows),
        "ap50_mean": mean("ap50", lambda r: True),
        "pixel_jaccard_mean": mean("jaccard", lambda r: True),
        "seconds": round(seconds, 2),
    }
    if len(rows) > 1:
        out["tune_half"] = {"ap50_mean": mean("ap50", lambda r: r["index"] % 2 == 0),
                            "pixel_jaccard_mean": mean("jaccard", lambda r: r["index"] % 2 == 0)}
        out["holdout_half"] = {"ap50_mean": mean("ap50", lambda r: r["index"] % 2 == 1),
                               "pixel_jaccard_mean": mean("jaccard", lambda r: r["index"] % 2 == 1)}
    return out, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="shared data root (default: islkeras.utils.shared_data_dir())")
    ap.add_argument("--cellpose-model", default=None,
                    help="also evaluate cellpose with this model file ('nuclei' = pretrained, needs internet)")
    ap.add_argument("--diameter", type=float, default=None, help="cellpose diameter (px); default: the model's")
    ap.add_argument("--no-classical", action="store_true", help="skip the classical method")
    ap.add_argument("--limit", type=int, default=None, help="only the first N dsb2018 images")
    ap.add_argument("--per-image", action="store_true", help="include per-image rows in the JSON")
    args = ap.parse_args(argv)

    root = args.data or shared_data_dir()
    dsb = root / "dsb2018-nuclei"
    if not (dsb / "fields.csv").is_file():
        print(f"error: {dsb}/fields.csv not found (set ISLKERAS_DATA or --data)", file=sys.stderr)
        return 2
    import tifffile

    datasets = {"dsb2018-nuclei": load_dsb(dsb, args.limit)}
    sd = root / "stardist-nuclei"
    if (sd / "img2d.tif").is_file():
        datasets["stardist-nuclei"] = [("img2d", tifffile.imread(sd / "img2d.tif"), tifffile.imread(sd / "mask2d.tif"))]

    methods = {}
    if not args.no_classical:
        methods["classical"] = (make_segmenter("classical"), {"params": ClassicalParams().to_dict()})
    if args.cellpose_model:
        try:
            seg = make_segmenter("cellpose", cellpose_model=args.cellpose_model, diameter=args.diameter)
        except MasksError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        methods["cellpose"] = (seg, {"model": args.cellpose_model, "diameter": args.diameter})

    result = {"data": str(root), "results": {}}
    for mname, (seg, info) in methods.items():
        result["results"][mname] = {**info}
        for dname, items in datasets.items():
            summary, rows = evaluate(seg, items)
            if args.per_image:
                summary["per_image"] = rows
            result["results"][mname][dname] = summary
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
