"""``ldm serve`` end to end: a real uvicorn server on loopback over the embedded model, driven by HTTP
clients and by Debian's Chromium through Playwright; and ``ldm generate --from-file`` spread over two
processes by ``accelerate launch``."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from ldm.models import default_model_path
from pipelines.pngmeta import parse_parameters, read_parameters
from pipelines.serve import Limits, Studio, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PROMPT = "a large red circle on a blue background"


class Server:
    """A Studio on the embedded model behind uvicorn, in a thread, on a free loopback port."""

    def __init__(self, out: Path, limits: Limits, security=None, **studio_kwargs):
        import uvicorn

        self.studio = Studio(default_model_path(), output_dir=out, limits=limits, **studio_kwargs)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.studio, security), log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.studio.close()
        self.sock.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), Limits(max_side=256, max_batch=4, max_steps=50, queue_size=8))
    yield s
    s.stop()


def post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=kw.pop("timeout", 60), **kw)


def decode(b64: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(b64)))
    im.load()
    return im


def pixels(im) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_nothing_served_needs_the_network(server):
    """FastAPI's /api/docs page pulled its scripts from a CDN (blank offline): it is gone, the schema
    stays, and the studio page names no outside address."""
    assert httpx.get(server.url + "/api/docs").status_code == 404
    schema = httpx.get(server.url + "/api/openapi.json")
    assert schema.status_code == 200 and "/api/txt2img" in schema.json()["paths"]
    page = httpx.get(server.url + "/").text
    assert "<html" in page.lower() and "http://" not in page and "https://" not in page


def test_the_embedded_model_is_named_after_itself_with_its_architecture(server):
    model = httpx.get(server.url + "/api/models").json()["models"][0]
    assert model["name"] == "shapes-model" and model["arch"] == "sd1"
    assert (model["defaults"]["width"], model["defaults"]["height"]) == (64, 64)


def test_txt2img_answers_pngs_with_parameters_equal_to_the_pipeline(server):
    r = post(server, "/api/txt2img", {"prompt": PROMPT, "seed": 7, "steps": 6, "batch_size": 2})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["seeds"] == [7, 8]
    ims = [decode(b) for b in out["images"]]
    params = [parse_parameters(im.info["parameters"]) for im in ims]
    assert [p["Seed"] for p in params] == ["7", "8"] and params[0]["prompt"] == PROMPT and params[0]["Steps"] == "6"
    # the same images as the library makes in this process for the same seeds
    ref = server.studio.pipe.text_to_image(PROMPT, seeds=[7, 8], batch_size=2, steps=6)
    for im, want in zip(ims, ref.images):
        assert np.abs(pixels(im) - pixels(want)).max() <= 1
    # and each was written to the output folder before the answer: the same bytes
    for b64, f in zip(out["images"], out["files"]):
        assert Path(f).read_bytes() == base64.b64decode(b64)
        assert read_parameters(f).startswith(PROMPT)


def test_img2img_round_trip(server):
    first = post(server, "/api/txt2img", {"prompt": PROMPT, "seed": 1, "steps": 4}).json()["images"][0]
    r = post(server, "/api/img2img", {"prompt": "a small green square on a white background", "seed": 3,
                                      "steps": 8, "strength": 0.5, "image": "data:image/png;base64," + first})
    assert r.status_code == 200, r.text
    im = decode(r.json()["images"][0])
    assert im.size == (64, 64)
    assert parse_parameters(im.info["parameters"])["Denoising strength"] == "0.5"
    ref = server.studio.pipe.image_to_image("a small green square on a white background", decode(first).convert("RGB"),
                                            strength=0.5, seeds=[3], steps=8)
    assert np.abs(pixels(im) - pixels(ref.images[0])).max() <= 1


def test_models_health_and_page(server):
    info = httpx.get(server.url + "/api/models").json()
    assert info["models"][0]["loaded"] and info["models"][0]["defaults"]["width"] == 64
    assert "ddim" in info["samplers"] and info["limits"]["max_batch"] == 4
    h = httpx.get(server.url + "/api/health").json()
    assert h["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and 'id="generate"' in page.text


def _png_b64(size) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("path, body, status, field", [
    ("/api/txt2img", b'{"prompt": "a red', 400, ""),
    ("/api/txt2img", b'[1, 2]', 422, ""),
    ("/api/txt2img", {"prompt": "x", "colour": "red"}, 422, "colour"),
    ("/api/txt2img", {"negative": "x"}, 422, "prompt"),
    ("/api/txt2img", {"prompt": "x", "width": 100}, 422, "width"),
    ("/api/txt2img", {"prompt": "x", "height": 4096}, 422, "height"),
    ("/api/txt2img", {"prompt": "x", "batch_size": 500}, 422, "batch_size"),
    ("/api/txt2img", {"prompt": "x", "steps": 0}, 422, "steps"),
    ("/api/txt2img", {"prompt": "x", "steps": 51}, 422, "steps"),
    ("/api/txt2img", {"prompt": "x", "steps": 1.5}, 422, "steps"),
    ("/api/txt2img", {"prompt": "x", "steps": "ten"}, 422, "steps"),
    ("/api/txt2img", {"prompt": "x", "sampler": "pndm-prk"}, 422, "sampler"),
    ("/api/txt2img", {"prompt": "x", "guidance": -1}, 422, "guidance"),
    ("/api/txt2img", {"prompt": "x", "lora": ["nope.safetensors"]}, 422, "lora"),
    ("/api/txt2img", {"prompt": "x", "prompt_2": "y"}, 422, "prompt_2"),
    ("/api/img2img", {"prompt": "x", "image": "not base64!"}, 422, "image"),
    ("/api/img2img", {"prompt": "x", "image": base64.b64encode(b"hello").decode()}, 422, "image"),
    ("/api/img2img", {"prompt": "x", "image": _png_b64((60, 64))}, 422, "image"),
    ("/api/img2img", {"prompt": "x", "image": _png_b64((64, 64)), "strength": 0}, 422, "strength"),
    ("/api/img2img", {"prompt": "x"}, 422, "image"),
])
def test_bad_input_is_a_4xx_naming_the_field_and_the_server_keeps_serving(server, path, body, status, field):
    if isinstance(body, bytes):
        r = httpx.post(server.url + path, content=body, headers={"content-type": "application/json"})
    else:
        r = post(server, path, body)
    assert r.status_code == status, r.text
    err = r.json()
    assert err["error"]
    if field:
        assert field in [d["field"] for d in err["detail"]]
        assert err["error"].startswith(field) or f"; {field}:" in err["error"]
    else:
        assert ("malformed JSON" in err["error"]) if status == 400 else ("JSON object" in err["error"])
    ok = post(server, "/api/txt2img", {"prompt": PROMPT, "steps": 1, "seed": 0})
    assert ok.status_code == 200


def test_concurrent_clients_are_all_answered(server):
    results = {}

    def client(seed):
        r = post(server, "/api/txt2img", {"prompt": PROMPT, "seed": seed, "steps": 4}, timeout=120)
        results[seed] = r

    threads = [threading.Thread(target=client, args=(s,)) for s in range(100, 106)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(100, 106))
    for seed, r in results.items():
        assert r.status_code == 200, r.text
        assert r.json()["seeds"] == [seed]  # each client got its own request's image
        assert parse_parameters(decode(r.json()["images"][0]).info["parameters"])["Seed"] == str(seed)


def _wait(cond, timeout=30.0, what="condition"):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def start_ldm_serve(argv: list[str]) -> tuple[subprocess.Popen, str]:
    """``ldm serve`` as a process on a free loopback port, with ``argv``'s flags; (process, base URL)
    once it answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "serve", "--port", str(port), *argv],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return httpx.get(url + "/api/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            assert proc.poll() is None, proc.stdout.read()
            return False

    try:
        _wait(up, timeout=90, what="ldm serve to start")
    except BaseException:
        proc.kill()
        raise
    return proc, url


def _raw_post(url: str, path: str, body: dict) -> socket.socket:
    """Send a POST and keep the connection open without reading: closing the socket later is a client
    that goes away (a closed browser tab) at a moment the test chooses."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps(body).encode()
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def test_full_queue_answers_503_and_a_gone_client_is_cancelled(tmp_path):
    s = Server(tmp_path / "out", Limits(max_side=64, max_batch=8, max_steps=100000, queue_size=1))
    try:
        progress = lambda: httpx.get(s.url + "/api/progress").json()  # noqa: E731
        long = {"prompt": PROMPT, "seed": 0, "steps": 999, "batch_size": 8}  # long, if nothing stopped it
        a = _raw_post(s.url, "/api/txt2img", long)
        _wait(lambda: progress()["busy"], what="A to start")
        b = _raw_post(s.url, "/api/txt2img", {**long, "seed": 1})  # fills the queue's one slot
        _wait(lambda: progress()["queue"] == 1, what="B to queue")
        over = post(s, "/api/txt2img", {"prompt": PROMPT, "steps": 1000})  # past the schedule: checked up front
        assert over.status_code == 422 and over.json()["detail"][0]["field"] == "steps", over.text
        c = post(s, "/api/txt2img", {"prompt": PROMPT, "steps": 1})
        assert c.status_code == 503, c.text
        assert int(c.headers["Retry-After"]) >= 1 and "queue is full" in c.json()["error"]
        # both clients go away: A stops at its next step, B is dropped unrun when its turn comes
        b.close()
        a.close()
        t0 = time.time()
        _wait(lambda: not progress()["busy"] and progress()["queue"] == 0, timeout=20, what="A and B to be dropped")
        assert time.time() - t0 < 20
        h = httpx.get(s.url + "/api/health").json()
        assert (h["cancelled"], h["done"], h["rejected"]) == (2, 0, 1)
        assert not list((tmp_path / "out").glob("*.png"))  # nothing finished, nothing written
        after = post(s, "/api/txt2img", {"prompt": PROMPT, "steps": 2, "seed": 5})
        assert after.status_code == 200
        assert len(list((tmp_path / "out").glob("*.png"))) == 1
    finally:
        s.stop()


def test_ldm_serve_runs_jobs_in_the_main_thread_and_stops_on_sigterm(tmp_path, capsys):
    """The command: jobs run in the process's main thread (PyTorch's OpenMP kernels are several times
    slower from another thread), uvicorn in a second one; a second server on a taken port is a clear
    error; SIGTERM ends the process cleanly."""
    import signal

    a, url = start_ldm_serve(["--max-steps", "50", "--output-dir", str(tmp_path / "a")])
    port = int(url.rsplit(":", 1)[1])
    cmd = [sys.executable, "-m", "pipelines.cli", "serve", "--port", str(port), "--max-steps", "50"]
    try:
        assert httpx.get(url + "/api/health").json()["worker"] == "MainThread"
        r = httpx.post(url + "/api/txt2img", json={"prompt": PROMPT, "steps": 3, "seed": 1}, timeout=60)
        assert r.status_code == 200 and len(list((tmp_path / "a").glob("*.png"))) == 1, r.text
        # a second server on the same port (in this process: the command returns its status)
        from pipelines.cli import main

        capsys.readouterr()
        assert main(cmd[3:] + ["--output-dir", str(tmp_path / "b"), "--threads", "default"]) == 2
        err = capsys.readouterr().err
        assert f"did not start on 127.0.0.1:{port}" in err, err[-2000:]
        a.send_signal(signal.SIGTERM)
        assert a.wait(30) == 0
    finally:
        if a.poll() is None:
            a.kill()
            a.wait()


def test_the_page_in_a_headless_browser(server):
    if CHROMIUM is None:  # CI installs it and sets LDM_REQUIRE_BROWSER=1, so there this is a failure
        if os.environ.get("LDM_REQUIRE_BROWSER"):
            pytest.fail("LDM_REQUIRE_BROWSER is set but no chromium is installed (apt-get install chromium)")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('sampler').options.length > 0")
            page.fill("#prompt", PROMPT)
            page.fill("#steps", "5")
            page.fill("#seed", "11")
            page.select_option("#sampler", "euler")
            page.select_option("#schedule", "karras")
            page.click("#generate")
            page.wait_for_selector(".card img", timeout=60000)
            assert page.locator(".card").count() == 1
            width = page.eval_on_selector(".card img", "img => img.complete && img.naturalWidth")
            assert width == 64
            assert "Seed: 11" in page.inner_text(".card pre")
            assert "Sampler: Euler, Schedule type: Karras" in page.inner_text(".card pre")
            assert page.get_attribute(".card a.download", "href").startswith("data:image/png;base64,")
            # the generated image goes to image to image, and that makes a second card
            page.click(".card .to-img2img")
            assert page.is_visible("#img2img-fields")
            page.fill("#strength", "0.5")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('.card').length == 2", timeout=60000)
            assert "Denoising strength: 0.5" in page.inner_text(".card pre >> nth=0")
            # a bad value shows the server's message, naming the field
            page.click("#mode-txt2img")
            page.fill("#width", "100")
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').className == 'error'", timeout=30000)
            assert "width" in page.inner_text("#status")
            # a result goes to the Edit tab: a word swapped, the edited image and its source come back
            page.fill("#width", "64")
            page.click(".card .to-edit >> nth=0")
            assert page.is_visible("#edit-fields") and page.input_value("#prompt") == PROMPT
            page.fill("#target", "a large red square on a blue background")
            page.select_option("#sampler", "euler")  # a real image needs ddim: the server says so
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').className == 'error'", timeout=30000)
            assert "use ddim" in page.inner_text("#status")
            page.select_option("#sampler", "ddim")
            page.select_option("#schedule", "default")
            page.fill("#inner-lr", "0")  # null-text inversion's rate: the server names the field
            page.click("#generate")
            page.wait_for_function("document.getElementById('status').textContent.includes('inner_lr')",
                                   timeout=30000)
            page.fill("#inner-lr", "0.03")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('.card').length == 4 || "
                                   "document.getElementById('status').className == 'error'", timeout=120000)
            assert page.locator(".card").count() == 4, page.inner_text("#status")
            assert "Edit source: " + PROMPT in page.inner_text(".card pre >> nth=0")
            # a control unit (a ControlNet of the server's folder): its map previewed, shown beside the result
            import tempfile

            from test_control import random_controlnet

            from shapes import world as shapes
            tmp = Path(tempfile.mkdtemp())
            server.studio.controlnet_dir = tmp / "controlnets"  # read at each request, as the folder's listing
            random_controlnet(default_model_path(), tmp / "controlnets" / "cn", 3)
            shapes.render(shapes.Scene("large", "red", "star", "blue", 30, 20, 6)).save(tmp / "star.png")
            page.reload()
            page.wait_for_function("!document.getElementById('add-unit').disabled")
            page.fill("#prompt", PROMPT)
            page.click("#add-unit")
            page.select_option(".unit-model", "cn")
            page.set_input_files(".unit-file", str(tmp / "star.png"))
            page.select_option(".unit-pre", "canny")
            page.wait_for_function("document.querySelector('.unit-map').src.startsWith('data:')", timeout=30000)
            page.fill(".unit-weight", "0.5")
            page.fill("#steps", "4")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('.card img').length > 0", timeout=60000)
            assert page.locator(".card >> nth=0").locator("img.map").count() == 1
            text = page.inner_text(".card pre >> nth=0")
            assert 'ControlNet 0: "Module: canny, Model: cn, Weight: 0.5' in text or \
                "ControlNet 0: Module: canny, Model: cn, Weight: 0.5" in text, text
            # the hires fix: its upscalers are the server's (latent, lanczos and --upscalers-dir's models)
            page.reload()
            page.wait_for_function("document.getElementById('hires-upscaler').options.length > 0")
            assert [o.strip() for o in page.locator("#hires-upscaler option").all_inner_texts()] == ["latent", "lanczos"]
            page.fill("#prompt", PROMPT)
            page.fill("#steps", "4")
            page.check("#hires")
            page.select_option("#hires-upscaler", "lanczos")
            page.fill("#hires-strength", "0.5")
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('.card img').length > 0 && "
                                   "document.querySelector('.card img').naturalWidth > 0", timeout=60000)
            assert page.eval_on_selector(".card img", "img => img.naturalWidth") == 128
            text = page.inner_text(".card pre >> nth=0")
            assert "Hires upscale: 2" in text and "Hires upscaler: Lanczos" in text, text
        finally:
            browser.close()


def test_from_file_under_accelerate_launch_writes_every_image_once(tmp_path, free_port, sd1_dir, monkeypatch,
                                                                    capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt number {i}" for i in range(5)) + "\n")
    out, single = tmp_path / "out", tmp_path / "single"
    gen = ["generate", "--from-file", str(prompts), "--model", str(sd1_dir), "--steps", "2", "--quiet",
           "--batch-size", "2"]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port), "-m", "pipelines.cli", *gen, "--output-dir", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    # every path each process wrote (two processes share the pipe, so lines may run together)
    printed = re.findall(r"/\S+?\.png", r.stdout)
    assert len(printed) == 10 and len(set(printed)) == 10, r.stdout  # each image written by exactly one process
    files = sorted(out.glob("*.png"))
    assert len(files) == 10
    # the same files as one process makes (the same images up to float rounding: torchrun runs each
    # process on one thread, which sums in another order)
    from pipelines.cli import main
    assert main(gen + ["--output-dir", str(single)]) == 0
    assert [f.name for f in files] == sorted(f.name for f in single.glob("*.png"))
    for f in files:
        assert np.abs(pixels(Image.open(f)) - pixels(Image.open(single / f.name))).max() <= 2
    # a rerun under two processes skips what exists: each rank of two run in this process (the launch
    # itself is shown above), rank 1 alone remaking the batch that lost an image
    mtimes = {f: f.stat().st_mtime_ns for f in files}
    files[3].unlink()

    class Barrier:
        def wait_for_everyone(self):
            pass

    remade = []
    for rank in (0, 1):
        monkeypatch.setattr("pipelines.processes.process_state", lambda rank=rank: (rank, 2, Barrier()))
        capsys.readouterr()
        assert main(gen + ["--output-dir", str(out), "--device", "cpu"]) == 0
        remade.append(re.findall(r"/\S+?\.png", capsys.readouterr().out))
    # only the batch that lost an image (prompt 1: images 2 and 3, dealt to rank 1) is made again
    assert remade == [[], [str(files[2]), str(files[3])]]
    for f, m in mtimes.items():
        if f not in (files[2], files[3]):
            assert f.stat().st_mtime_ns == m
    assert files[3].is_file()


def test_stopping_never_blocks_on_a_full_queue_and_close_cancels_what_waits(tmp_path):
    """``stop`` (what the HTTP thread calls as it ends) must return at once even when the queue is at its
    bound and nothing is taking from it; the worker then returns without running the queued job, and
    ``close`` answers that job as cancelled."""
    from pipelines.serve import Cancelled, Job, Txt2Img, to_request

    studio = Studio(default_model_path(), output_dir=tmp_path, limits=Limits(queue_size=1), worker_thread=False)
    job = Job(studio.resolve(to_request("txt2img", Txt2Img(prompt=PROMPT, steps=2))))
    studio.submit(job)
    stopper = threading.Thread(target=studio.stop, daemon=True)
    stopper.start()
    stopper.join(5)
    assert not stopper.is_alive(), "stop() blocked on the full queue"
    studio.work()  # returns: stopped, and the queued job not run
    assert studio.counts["done"] == 0 and not job.future.done()
    studio.close()
    with pytest.raises(Cancelled):
        job.future.result(timeout=1)
    assert not list(tmp_path.glob("*.png"))


def test_retry_after_is_the_time_until_the_running_job_ends_not_the_whole_queue(tmp_path):
    """A full queue frees a slot when the worker takes the next job, i.e. when the running job ends:
    its steps left times the time a step takes (the running job's own rate once it has made a step,
    else recent jobs'). It was the queue's length times the mean of all recent jobs (213 s when a slot
    freed in 13 s), then a mean job time less the elapsed time (1 s whenever a job ran long)."""
    from pipelines.serve import Job, Txt2Img, to_request

    studio = Studio(default_model_path(), output_dir=tmp_path, limits=Limits(queue_size=4), worker_thread=False)
    make = lambda: Job(studio.resolve(to_request("txt2img", Txt2Img(prompt=PROMPT, steps=2))))  # noqa: E731
    for _ in range(4):
        studio.submit(make())
    studio._step_seconds = [4.0] * 15 + [0.5] * 5  # stale slow steps, then the last five at 0.5 s
    assert studio.retry_after() == 1  # nothing running: the worker takes a job at once
    job = make()
    job.steps, job.step = 30, 0
    studio.current, studio._started = job, time.perf_counter() - 1.0
    assert studio.retry_after() == 14  # 30 steps x 0.5 s, 1 s of it spent; not 4 waiting x anything
    job.step, studio._started = 10, time.perf_counter() - 20.0  # this job runs at 2 s a step: 20 steps left
    assert studio.retry_after() in (40, 41)  # 20 steps x (20 s and the microseconds since) / 10, rounded up
    job.step = 30
    assert studio.retry_after() == 1  # done: soon
    studio.current = None
    studio.close()


def test_deepcache_and_the_new_controls_through_the_api(server):
    r = post(server, "/api/txt2img", {"prompt": PROMPT, "steps": 6, "seed": 2, "cache_interval": 2,
                                      "sampler": "DPM++ 2M", "schedule": "karras"})
    assert r.status_code == 200, r.text
    params = parse_parameters(r.json()["parameters"][0])
    assert (params["Cache interval"], params["Schedule type"]) == ("2", "Karras")
    shallow = post(server, "/api/txt2img", {"prompt": PROMPT, "steps": 6, "seed": 2, "cache_interval": 3,
                                            "cache_depth": 0})
    assert shallow.status_code == 200, shallow.text
    assert parse_parameters(shallow.json()["parameters"][0])["Cache depth"] == "0"
    # the embedded text encoder has no transformer layers, so A1111's clip skip 2 names the limit
    skip = post(server, "/api/txt2img", {"prompt": PROMPT, "steps": 2, "clip_skip": 2})
    assert skip.status_code == 422 and "has 0 layer(s), so clip_skip can be at most 1" in skip.text
    bad = post(server, "/api/txt2img", {"prompt": PROMPT, "cache_depth": 5, "cache_interval": 2})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "cache_depth"


def test_edit_through_the_api(server):
    """POST /api/edit: the same images as pipelines.edit in this process; a real image's inversion is
    cached in the output folder, so a second edit of it reads the cache; bad words are a 422."""
    from pipelines.edit import Edit, edit
    from pipelines.request import Request

    target = "a large red square on a blue background"
    r = post(server, "/api/edit", {"source_prompt": PROMPT, "target_prompt": target, "seed": 4, "steps": 6})
    assert r.status_code == 200, r.text
    out = r.json()
    ref = edit(server.studio.pipe, Edit(PROMPT, target), Request(seed=4, steps=6))
    assert np.abs(pixels(decode(out["images"][0])) - pixels(ref.target.images[0])).max() <= 1
    assert np.abs(pixels(decode(out["source"])) - pixels(ref.source.images[0])).max() <= 1
    assert "Edit source: " + PROMPT in out["parameters"][0] and Path(out["files"][0]).is_file()
    real = {"source_prompt": PROMPT, "target_prompt": target, "steps": 6, "inner_steps": 2, "image": out["source"],
            "inversion": "null-text"}
    first, second = post(server, "/api/edit", real).json(), post(server, "/api/edit", real).json()
    assert first["inversion"] == {"inverted": 1, "cached": 0} and second["inversion"] == {"inverted": 0, "cached": 1}
    assert "Inversion: null-text" in first["parameters"][0]
    third = post(server, "/api/edit", {**real, "inner_lr": 0.03}).json()  # another inversion setting
    assert third["inversion"] == {"inverted": 1, "cached": 0}
    bad = post(server, "/api/edit", {"source_prompt": PROMPT, "reweight": {"dog": 2.0}})
    assert bad.status_code == 422 and "'dog' is not a word" in bad.json()["error"]
    bad = post(server, "/api/edit", {"source_prompt": PROMPT, "cross_replace": 2})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "cross_replace"
    bad = post(server, "/api/edit", {"source_prompt": PROMPT, "inner_lr": 0})
    assert bad.status_code == 422 and bad.json()["detail"][0]["field"] == "inner_lr"


def test_a1111_lora_tags_lists_and_refreshes(tmp_path):
    """``<lora:NAME:WEIGHT>`` in an A1111 prompt applies --lora-dir's file at that weight (the image the
    pipeline makes in-process for the same request), switched off for the next request; /sdapi/v1/loras
    and /embeddings answer in A1111's shapes; refresh-embeddings loads a file added since the start."""
    import torch

    from ldm.embeddings import write_embeddings
    from ldm.tiny import random_lora
    from pipelines.pipeline import Pipeline
    from pipelines.request import Limits as RequestLimits
    from pipelines.request import Request

    loras, embeds = tmp_path / "Lora", tmp_path / "embeddings"
    loras.mkdir()
    embeds.mkdir()
    random_lora(default_model_path(), loras, sdxl=False, seed=1, std=0.5, name="ink.safetensors")
    pipe = Pipeline.from_pretrained(default_model_path())
    width = pipe.model.text_encoder.config.hidden_size
    write_embeddings(embeds / "dot.safetensors", {"<dot>": torch.zeros(2, width)})
    s = Server(tmp_path / "out", Limits(max_side=256, max_batch=4, max_steps=50), lora_dir=loras,
               embeddings_dir=embeds)
    try:
        body = {"prompt": f"{PROMPT} <lora:ink:0.6>", "steps": 4, "seed": 5, "sampler_name": "DDIM", "cfg_scale": 5,
                "width": 64, "height": 64}
        tagged = post(s, "/sdapi/v1/txt2img", body, timeout=120)
        assert tagged.status_code == 200, tagged.text
        info = json.loads(tagged.json()["info"])
        assert "Lora hashes: " in info["infotexts"][0] and "<lora:ink:0.6>" in info["infotexts"][0]
        plain = post(s, "/sdapi/v1/txt2img", {**body, "prompt": PROMPT}, timeout=120).json()
        expect = {}
        for prompt in (body["prompt"], PROMPT):
            r = Request(prompt, steps=4, seed=5, sampler="ddim", guidance=5.0).resolve(
                pipe.model, RequestLimits(lora_dir=loras))
            expect[prompt] = np.asarray(pipe.generate(r).images[0].convert("RGB"), dtype=np.int16)
        assert np.abs(pixels(decode(tagged.json()["images"][0])) - expect[body["prompt"]]).max() <= 1
        assert np.abs(pixels(decode(plain["images"][0])) - expect[PROMPT]).max() <= 1
        assert np.abs(expect[body["prompt"]] - expect[PROMPT]).max() > 10  # the LoRA shows
        bad = post(s, "/sdapi/v1/txt2img", {**body, "prompt": f"{PROMPT} <lora:nope:1>"})
        assert bad.status_code == 422 and "no LoRA file 'nope'" in bad.text and "available: ink" in bad.text
        listed = httpx.get(s.url + "/sdapi/v1/loras").json()
        assert listed == [{"name": "ink", "alias": "ink", "path": "ink.safetensors", "metadata": {}}]
        got = httpx.get(s.url + "/sdapi/v1/embeddings").json()
        assert got["loaded"]["<dot>"]["vectors"] == 2 and got["loaded"]["<dot>"]["shape"] == width
        write_embeddings(embeds / "ring.safetensors", {"<ring>": torch.ones(1, width)})
        assert "<ring>" not in httpx.get(s.url + "/sdapi/v1/embeddings").json()["loaded"]
        for path in ("/sdapi/v1/refresh-embeddings", "/sdapi/v1/refresh-loras", "/sdapi/v1/refresh-checkpoints"):
            r = httpx.post(s.url + path, timeout=60)
            assert r.status_code == 200 and r.json() is None, (path, r.text)
        assert httpx.get(s.url + "/sdapi/v1/embeddings").json()["loaded"]["<ring>"]["vectors"] == 1
    finally:
        s.stop()


def test_api_img2img_with_a_mask_inpaints_as_the_pipeline(server):
    """/api/img2img with a ``mask`` is ldm inpaint, its A1111 options included: the pipeline's image for the
    same request, and the input's pixels outside the blurred mask."""
    from ldm.inpaint import blur_mask
    from pipelines.pipeline import Pipeline

    image = Image.fromarray((np.random.default_rng(5).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 40))

    def b64(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    body = {"prompt": PROMPT, "image": b64(image), "mask": b64(mask), "steps": 5, "seed": 3, "mask_blur": 2,
            "inpaint_fill": "fill", "strength": 0.9}
    r = post(server, "/api/img2img", body, timeout=120)
    assert r.status_code == 200, r.text
    got = pixels(decode(r.json()["images"][0]))
    pipe = Pipeline.from_pretrained(default_model_path())
    expect = pipe.inpaint(PROMPT, image, mask, steps=5, seed=3, mask_blur=2, inpaint_fill="fill", strength=0.9)
    assert np.abs(got - pixels(expect.images[0])).max() <= 1
    outside = np.asarray(blur_mask(mask, 2)) == 0
    assert np.array_equal(got[outside], pixels(image)[outside])
    bad = post(server, "/api/img2img", {**body, "mask": None, "inpaint_fill": "fill"})
    assert bad.status_code == 422 and "inpaint_fill" in bad.text and "applies to inpainting" in bad.text
