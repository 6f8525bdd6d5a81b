"""What hostile and unlucky requests cost a running ``ldm serve`` (issue 52's probe, re-run).

    python bench/serve_hostile.py

Starts ``ldm serve`` on the embedded model (default limits), sends each request below once, and
prints its status, how long the answer took, the answer's size, the server's peak memory so far
(VmHWM) and whether a plain request right after it is served. Nothing is hard-coded: every figure
printed is measured in this run.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import sys
import time
import zlib
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

PROMPT = "a large red circle on a blue background"


def png_claiming(side: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", side, side)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return base64.b64encode(bytes(data)).decode()


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main():
    from test_serve import start_ldm_serve

    out = Path("/tmp/ldm-serve-hostile")
    proc, url = start_ldm_serve(["--output-dir", str(out)])
    cases = [
        ("10 MB prompt", "/api/txt2img", {"prompt": "a red circle " * 800_000}),
        ("n_iter 1000 x batch 8", "/api/txt2img", {"prompt": PROMPT, "batch_size": 8, "n_iter": 1000}),
        ("PNG claiming 13000 x 13000", "/api/img2img", {"prompt": PROMPT, "image": png_claiming(13000)}),
        ("PNG claiming 20000 x 20000 (/sdapi)", "/sdapi/v1/img2img",
         {"prompt": PROMPT, "init_images": [png_claiming(20000)], "width": 64, "height": 64}),
        ("50 MB body", "/api/txt2img", {"prompt": PROMPT, "negative": "x" * 50_000_000}),
        ("wrong-typed 5 MB field", "/api/txt2img", {"prompt": PROMPT, "steps": "9" * 5_000_000}),
        ("guidance 1e308 (/sdapi)", "/sdapi/v1/txt2img", {"prompt": PROMPT, "cfg_scale": 1e308}),
        ("lora /etc/passwd", "/api/txt2img", {"prompt": PROMPT, "lora": ["/etc/passwd"]}),
    ]
    print(f"{'request':38s} {'status':>6s} {'seconds':>8s} {'answer bytes':>12s} {'server peak MB':>14s} next ok")
    try:
        with httpx.Client(timeout=300) as client:
            for name, path, body in cases:
                data = json.dumps(body).encode()
                t0 = time.perf_counter()
                r = client.post(url + path, content=data, headers={"content-type": "application/json"})
                dt = time.perf_counter() - t0
                after = client.post(url + "/api/txt2img", json={"prompt": PROMPT, "steps": 2, "seed": 0})
                print(f"{name:38s} {r.status_code:6d} {dt:8.3f} {len(r.content):12d} {peak_mb(proc.pid):14.0f} "
                      f"{after.status_code == 200}")
            host = client.get(url + "/api/health", headers={"Host": "attacker.example"})
            print(f"{'Host: attacker.example':38s} {host.status_code:6d}")
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
