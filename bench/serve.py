"""Load test of ``ldm serve`` against ``ldm generate`` making the same images in one process.

    python bench/serve.py [--requests 48] [--clients 4] [--steps 30] [--batch-size 1] [--rounds 2]

Serve: starts ``ldm serve`` (the embedded model unless --model) as its own process on a free
loopback port, waits for /api/health, sends two warm-up requests, then --requests POST /api/txt2img
from --clients concurrent clients (threads with one HTTP connection each) and times from the first
request to the last answer; each answer's PNGs are decoded, as a client would. Direct: in this
process, the same requests (same prompts, seeds, steps, batch size) go through the code path of
``ldm generate --from-file`` (pipelines.batch.write_tasks: generate, then write each PNG with its
parameters), after one warm-up, timed the same way. The two alternate over --rounds rounds (direct,
serve, serve, direct, ...) so that a drift in this machine's speed falls on both. Prints images/s
of each, the serving overhead (direct images/s over served images/s, minus 1) per round and over all,
and the served requests' latency percentiles. Nothing here is a target.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["a large red circle on a blue background", "a small green square on a white background",
           "a large yellow triangle on a black background", "a small blue star on a yellow background"]


def requests_for(n: int, steps: int, batch: int) -> list[dict]:
    return [{"prompt": PROMPTS[i % len(PROMPTS)], "seed": 1000 + i * batch, "steps": steps, "batch_size": batch}
            for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def run_direct(pipe, reqs: list[dict], out: Path) -> float:
    from pipelines.batch import Task, write_tasks

    tasks = [Task(r["prompt"], [r["seed"] + i for i in range(r["batch_size"])],
                  [out / f"{k:05d}-{r['seed'] + i}.png" for i in range(r["batch_size"])]) for k, r in enumerate(reqs)]
    steps = reqs[0]["steps"]
    t0 = time.perf_counter()
    write_tasks(pipe, tasks, lambda t, cb: pipe.text_to_image(t.prompt, seeds=t.seeds, batch_size=len(t.seeds),
                                                              steps=steps), skip_done=False)
    return time.perf_counter() - t0


def run_served(url: str, reqs: list[dict], clients: int) -> tuple[float, list[float]]:
    import httpx
    from PIL import Image

    todo = list(enumerate(reqs))
    lock = threading.Lock()
    latencies, failures = [], []

    def client():
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    if not todo:
                        return
                    _, body = todo.pop(0)
                t = time.perf_counter()
                r = http.post("/api/txt2img", json=body)
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                for b64 in r.json()["images"]:
                    Image.open(io.BytesIO(base64.b64decode(b64))).load()
                latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    if failures:
        raise SystemExit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return wall, latencies


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the embedded model)")
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args()

    import httpx

    from ldm.models import default_model_path
    from pipelines.pipeline import Pipeline

    model = args.model or str(default_model_path())
    reqs = requests_for(args.requests, args.steps, args.batch_size)
    n_images = args.requests * args.batch_size
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        server = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--model", model, "--port", str(port),
                                   "--output-dir", str(tmp / "served"), "--queue-size", str(args.clients + 1),
                                   "--max-batch", str(max(8, args.batch_size)), "--max-steps", str(max(150, args.steps))],
                                  cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.time() + 120
            while True:
                try:
                    if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"ldm serve did not start: {server.stderr.read()[-2000:]}")
                time.sleep(0.5)
            pipe = Pipeline.from_pretrained(model)
            run_direct(pipe, reqs[:1], tmp / "warm")
            run_served(url, reqs[:2], 1)
            for r in range(args.rounds):
                order = ("direct", "serve") if r % 2 == 0 else ("serve", "direct")
                got = {}
                for what in order:
                    if what == "direct":
                        got["direct_s"] = run_direct(pipe, reqs, tmp / f"direct-{r}")
                    else:
                        got["serve_s"], got["latencies"] = run_served(url, reqs, args.clients)
                rounds.append(got)
                print(f"round {r}: direct {n_images / got['direct_s']:.2f} img/s, served "
                      f"{n_images / got['serve_s']:.2f} img/s, overhead {got['serve_s'] / got['direct_s'] - 1:+.1%}")
        finally:
            server.terminate()
            server.wait(30)
    direct = sum(g["direct_s"] for g in rounds)
    served = sum(g["serve_s"] for g in rounds)
    lat = [x for g in rounds for x in g["latencies"]]
    result = {"requests": args.requests, "clients": args.clients, "steps": args.steps, "batch_size": args.batch_size,
              "rounds": args.rounds, "direct_images_per_s": n_images * args.rounds / direct,
              "served_images_per_s": n_images * args.rounds / served, "overhead": served / direct - 1,
              "latency_s": {"p50": percentile(lat, 0.5), "p90": percentile(lat, 0.9), "p99": percentile(lat, 0.99),
                            "mean": statistics.mean(lat)},
              "direct_s_per_request": direct / (args.requests * args.rounds)}
    print(f"{args.requests} requests x {args.rounds} rounds, {args.clients} clients, {args.steps} steps, "
          f"batch {args.batch_size}, model {model}")
    print(f"ldm generate path: {result['direct_images_per_s']:.2f} img/s "
          f"({result['direct_s_per_request']:.3f} s a request, one after another)")
    print(f"ldm serve:         {result['served_images_per_s']:.2f} img/s; serving overhead {result['overhead']:+.1%}")
    lq = result["latency_s"]
    print(f"served latency: p50 {lq['p50']:.3f} s, p90 {lq['p90']:.3f} s, p99 {lq['p99']:.3f} s "
          f"(queueing behind {args.clients - 1} other clients included)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
