"""Whole-slide preprocessing on this machine: `mil patch` time per slide on a generated 40,000 x 40,000 px slide
at 20x, and `mil extract --slides` patches/s with resnet50_trunc at 224 px and how busy the loader keeps the
encoder (target: busy >= 90 % of the wall time with 2 loader workers).

    PYTHONPATH=src python benchmarks/wsi_cpu.py [--size 40000] [--rounds 3] [--patches 256] [--workers 0,2]
                                                [--batch-size 32] [--threads N] [--cache DIR] [--json out.json]

The slide (a pyramidal tiled TIFF, JPEG tiles as most scanners write, 0.5 um / px, tissue blobs on white) is
written once into --cache and reused. Patching runs `patch_one` (CLAM's segmentation + the 256 px grid at 20x
+ the preview) `rounds` times and reports the median. Extraction encodes the first --patches patches of the
grid (read from the slide at level 0, 256 -> 224 px) with random resnet50_trunc weights, once per loader-worker
count, and reports patches/s and the encoder's busy share (time inside the forward / wall time of the loop).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings

import h5py
import torch

from lbmamba.data.slides import TissueParams
from lbmamba.data.synthetic_slides import SlideScene, write_slide_tiff
from lbmamba.engine import extract_features
from lbmamba.engine.wsi import patch_one
from machine import describe


def make_slide(cache: str, size: int) -> str:
    path = os.path.join(cache, f"bench_{size}.tiff")
    if not os.path.isfile(path):
        os.makedirs(cache, exist_ok=True)
        scene = SlideScene.random(size, size, blobs=8, positive=True, seed=0, radius=(0.06, 0.12), textured_blobs=2)
        start = time.perf_counter()
        tmp = path + ".part"
        write_slide_tiff(tmp, scene, mpp=0.5, tile=512, compression="jpeg")
        os.replace(tmp, path)
        print(f"wrote {path} in {time.perf_counter() - start:.0f} s")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=40000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--patches", type=int, default=256)
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lbmamba-wsi-bench"))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    slide = make_slide(args.cache, args.size)
    work = tempfile.mkdtemp(prefix="wsi-bench-")
    out = {"machine": describe(threads), "slide": f"{args.size} x {args.size} px at 0.5 um/px (20x)"}
    try:
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            res = patch_one(slide, os.path.join(work, "p"), TissueParams(), None, True)
            times.append(time.perf_counter() - start)
        out["patch_seconds_per_slide"] = round(statistics.median(times), 2)
        out["patch_seconds_all"] = [round(t, 2) for t in times]
        out["patches_in_slide"] = res["patches"]
        print(f"patch: {res['patches']} patches, {out['patch_seconds_per_slide']} s per slide (median of "
              f"{args.rounds}: {out['patch_seconds_all']})")
        # extraction: the first N patches of the grid, in a coordinate file of their own
        src = os.path.join(work, "p", "patches", os.path.basename(slide).rsplit(".", 1)[0] + ".h5")
        coords_dir = os.path.join(work, "coords")
        os.makedirs(coords_dir)
        with h5py.File(src) as f, h5py.File(os.path.join(coords_dir, os.path.basename(src)), "w") as g:
            g.create_dataset("coords", data=f["coords"][: args.patches])
            g.attrs.update(dict(f.attrs))
        slides_dir = os.path.join(work, "slides")
        os.makedirs(slides_dir)
        os.symlink(slide, os.path.join(slides_dir, os.path.basename(slide)))
        out["extract"] = []
        for w in [int(v) for v in args.workers.split(",")]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = extract_features(dict(slides=slides_dir, coords=coords_dir, output=os.path.join(work, f"f{w}"),
                                            encoder="resnet50_trunc", resize=224, batch_size=args.batch_size,
                                            workers=w, device="cpu", threads=threads, progress=False))
            row = {"workers": w, "patches": res["patches"], "patches_per_s": res["patches_per_s"],
                   "encoder_busy": res["encoder_busy"]}
            out["extract"].append(row)
            print(f"extract: workers {w}: {row['patches_per_s']} patches/s, encoder busy {row['encoder_busy']:.1%}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
