"""How long `softmask explore` takes to answer: request -> overlays, and request -> top-5 images.

    python benchmarks/explore_latency.py --checkpoint PATH [--compare PATH2] --images WORLD_DIR
                                         [--caption "..."] [--repeats 20] [--json OUT]
    python benchmarks/explore_latency.py --tiny            # two random tiny models on a fresh 60-image world

Starts the real command (``softmask explore --port 0``) in a child process, waits until it serves,
then times HTTP round trips from this process (what a page waits for, without the browser's drawing):
``/api/analyse`` (scores and one overlay per word, for every model) over ``--repeats`` requests that
cycle through the gallery's images, and ``/api/retrieve`` (each model's top 5 of the gallery). The
first request of each kind is reported apart: it includes one-time work (the gallery's image features
for retrieval, lazy imports). Prints medians, min and max in ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def post(url: str, path: str, body: dict) -> tuple[float, dict]:
    request = urllib.request.Request(url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        out = json.loads(response.read())
    return 1000 * (time.perf_counter() - start), out


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=600) as response:
        return json.loads(response.read())


def tiny_setup(tmp: Path) -> tuple[list[str], str]:
    """Two random tiny models (the tests' architecture, 32 px) and a 60-image world at 32 px."""
    import torch

    from softmask.config import model_config_from_dict
    from softmask.models.vlp import create_model
    from softmask.world import generate_world

    world = tmp / "world"
    generate_world(world, images=60, size=32, seed=0)
    section = {"embed_dim": 16, "vision": {"image_size": 32, "patch_size": 8, "width": 48, "depth": 2, "num_heads": 2,
                                           "mlp_dim": 96},
               "text": {"vocab_size": 30522, "hidden_size": 32, "num_layers": 4, "fusion_layer": 2, "num_heads": 2,
                        "intermediate_size": 64, "max_positions": 40}}
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        create_model(model_config_from_dict(section)).save_pretrained(tmp / f"m{seed}")
        paths.append(str(tmp / f"m{seed}"))
    return paths, str(world)


def summary(times: list[float]) -> dict:
    return {"median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1),
            "max_ms": round(max(times), 1), "n": len(times)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint")
    parser.add_argument("--compare")
    parser.add_argument("--images")
    parser.add_argument("--tiny", action="store_true", help="random tiny models and a fresh small world")
    parser.add_argument("--caption", default="a red circle left of a blue square")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            models, images = tiny_setup(Path(tmp))
        elif args.checkpoint:
            models, images = [args.checkpoint] + ([args.compare] if args.compare else []), args.images
        else:
            parser.error("give --checkpoint PATH (and --images WORLD_DIR) or --tiny")
        command = [sys.executable, "-m", "softmask", "-q", "explore", "--checkpoint", models[0], "--port", "0"]
        command += ["--compare", models[1]] if len(models) > 1 else []
        command += ["--images", images] if images else []
        server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        try:
            line = server.stdout.readline()
            if "http://" not in line:
                print(f"the server did not start: {line!r}", file=sys.stderr)
                return 1
            url = line.split()[2].rstrip("/")
            names = get(url, "/api/info")["images"]
            first_analyse, _ = post(url, "/api/analyse", {"image": names[0], "caption": args.caption})
            analyse, words = [], 0
            for i in range(args.repeats):
                ms, out = post(url, "/api/analyse", {"image": names[(i + 1) % len(names)], "caption": args.caption})
                analyse.append(ms)
                words = len(out["results"][0]["words"])
            first_retrieve, _ = post(url, "/api/retrieve", {"caption": args.caption})
            retrieve = [post(url, "/api/retrieve", {"caption": args.caption})[0] for _ in range(args.repeats)]
        finally:
            server.terminate()
            server.wait(timeout=60)
    result = {"models": models, "gallery_images": len(names), "caption": args.caption, "words": words,
              "threads": os.environ.get("OMP_NUM_THREADS", "default"),
              "analyse": summary(analyse), "analyse_first_ms": round(first_analyse, 1),
              "retrieve": summary(retrieve), "retrieve_first_ms": round(first_retrieve, 1)}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
