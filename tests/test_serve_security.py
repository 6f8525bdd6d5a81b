"""``ldm serve`` against hostile and unlucky clients (issue 52): every limit refuses early and cheaply,
with an answer that names the problem; who may use the server (authentication, Host and Origin);
nothing said about the server's files. A real uvicorn server on loopback over the embedded model."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import httpx
import pytest
from PIL import Image
from test_serve import PROMPT, Server, _raw_post, _wait, post, start_ldm_serve

from pipelines.serve import Limits, Security


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), Limits(max_side=256, max_batch=4, max_images=8, max_steps=50,
                                                         max_prompt_chars=1000, max_body_mb=2, queue_size=4))
    yield s
    s.stop()


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG file whose header says it is width x height (what a decompression bomb looks like)."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def fields(r) -> list[str]:
    return [d["field"] for d in r.json()["detail"]]


def test_a_huge_prompt_is_refused_before_tokenising(server):
    t0 = time.perf_counter()
    r = post(server, "/api/txt2img", {"prompt": "a red circle " * 100_000})
    assert r.status_code == 422 and fields(r) == ["prompt"], r.text[:500]
    assert "--max-prompt-chars" in r.text and time.perf_counter() - t0 < 10
    r = post(server, "/sdapi/v1/txt2img", {"prompt": PROMPT, "negative_prompt": "x" * 5000, "steps": 2})
    assert r.status_code == 422 and "negative_prompt" in r.text


def test_images_per_request_are_bounded(server):
    r = post(server, "/api/txt2img", {"prompt": PROMPT, "batch_size": 4, "n_iter": 1000})
    assert r.status_code == 422 and fields(r) == ["n_iter"] and "--max-images" in r.text, r.text
    r = post(server, "/sdapi/v1/txt2img", {"prompt": PROMPT, "batch_size": 2, "n_iter": 5, "steps": 2})
    assert r.status_code == 422 and "at most 8" in r.text
    limits = httpx.get(server.url + "/api/models").json()["limits"]
    assert limits == {"max_side": 256, "max_batch": 4, "max_images": 8, "max_steps": 50, "max_prompt_chars": 1000,
                      "max_body_mb": 2, "queue_size": 4}


@pytest.mark.parametrize("side", [13000, 20000])
def test_a_huge_image_is_refused_from_its_header(server, side):
    t0 = time.perf_counter()
    r = post(server, "/api/img2img", {"prompt": PROMPT, "image": b64(png_claiming(side, side))})
    assert r.status_code == 422 and fields(r) == ["image"], r.text
    assert (f"is {side}x{side}; sides must be at most 256" in r.text) or "too large" in r.text
    r = post(server, "/sdapi/v1/img2img", {"prompt": PROMPT, "init_images": [b64(png_claiming(side, side))],
                                           "width": 64, "height": 64})
    assert r.status_code == 422 and fields(r) == ["init_images"], r.text
    assert time.perf_counter() - t0 < 10
    assert httpx.get(server.url + "/api/health").status_code == 200


def test_a_bad_mask_is_named_as_the_mask(server):
    ok = io.BytesIO()
    Image.new("RGB", (64, 64)).save(ok, format="PNG")
    r = post(server, "/sdapi/v1/img2img", {"prompt": PROMPT, "init_images": [b64(ok.getvalue())], "mask": "bm90IGFuIGltYWdl"})
    assert r.status_code == 422 and fields(r) == ["mask"] and "in field 'mask'" in r.text, r.text


def test_bodies_over_the_cap_are_refused_unread_and_bad_values_echo_a_prefix(server):
    big = b'{"prompt": "' + b"x" * (3 * 2**20) + b'"}'
    r = httpx.post(server.url + "/api/txt2img", content=big, headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 413 and "--max-body-mb" in r.text

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(3):
            yield b"x" * 2**20

    r = httpx.post(server.url + "/api/txt2img", content=chunks(), headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == 413, r.text
    r = post(server, "/api/txt2img", {"prompt": PROMPT, "steps": "9" * 200_000})
    assert r.status_code == 422 and len(r.content) < 2000 and "characters)" in r.text, len(r.content)


@pytest.mark.parametrize("body, field", [
    ({"steps": True}, "steps"), ({"guidance": False}, "guidance"), ({"batch_size": 1.0}, "batch_size"),
    ({"guidance": 1e308}, "guidance"), ({"guidance": 101}, "guidance"), ({"seed": "1"}, "seed"),
])
def test_strict_types_and_one_guidance_bound(server, body, field):
    r = post(server, "/api/txt2img", {"prompt": PROMPT, **body})
    assert r.status_code == 422 and fields(r) == [field], r.text


def test_a1111_guidance_bound(server):
    r = post(server, "/sdapi/v1/txt2img", {"prompt": PROMPT, "cfg_scale": 1e308, "steps": 2})
    assert r.status_code == 422 and "cfg_scale" in r.text, r.text


def test_lora_paths_reveal_nothing_about_the_servers_files(server):
    answers = [post(server, "/api/txt2img", {"prompt": PROMPT, "steps": 2, "lora": [name]})
               for name in ("/etc/passwd", "/no/such/file.safetensors", "mine.safetensors")]
    assert {r.status_code for r in answers} == {422}
    assert len({r.text for r in answers}) == 1 and "--lora-dir" in answers[0].text


def test_host_header_and_origin(server):
    port = server.url.rsplit(":", 1)[1]
    assert httpx.get(server.url + "/api/health", headers={"Host": f"localhost:{port}"}).status_code == 200
    r = httpx.get(server.url + "/api/health", headers={"Host": f"attacker.example:{port}"})
    assert r.status_code == 400 and "--allowed-hosts" in r.text
    r = httpx.post(server.url + "/sdapi/v1/interrupt", headers={"Origin": "http://attacker.example"})
    assert r.status_code == 403 and "Origin" in r.text
    r = httpx.post(server.url + "/sdapi/v1/interrupt", headers={"Origin": server.url})
    assert r.status_code == 200
    r = httpx.post(server.url + "/api/txt2img", json={"prompt": PROMPT, "steps": 1}, headers={"Origin": "null"})
    assert r.status_code == 403


def test_security_rules():
    sec = Security(host="10.0.0.5", allowed_hosts=["studio.lan"])
    assert all(sec.host_allowed(h) for h in ("localhost:7860", "127.0.0.1", "[::1]:7860", "10.0.0.5:7860",
                                             "192.168.1.9", "studio.lan:7860", "app.localhost"))
    assert not any(sec.host_allowed(h) for h in ("evil.example", "evil.example:7860", "", "studio.lan.evil.example"))


def test_basic_authentication(tmp_path):
    s = Server(tmp_path / "out", Limits(max_side=64, max_steps=10), Security(api_auth=[("ann", "s3cret")]))
    try:
        assert httpx.get(s.url + "/api/health").status_code == 401
        assert httpx.get(s.url + "/api/health").headers["WWW-Authenticate"].startswith("Basic")
        assert httpx.get(s.url + "/api/health", auth=("ann", "wrong")).status_code == 401
        assert httpx.get(s.url + "/sdapi/v1/options", auth=("bob", "s3cret")).status_code == 401
        assert httpx.get(s.url + "/api/health", auth=("ann", "s3cret")).status_code == 200
        assert httpx.get(s.url + "/", auth=("ann", "s3cret")).status_code == 200
        assert httpx.get(s.url + "/").status_code == 401
    finally:
        s.stop()


@pytest.mark.parametrize("argv, message", [
    (["--host", "0.0.0.0"], "give --api-auth USER:PASS"),
    (["--api-auth", "ann"], "--api-auth: expected user:password"),
    (["--port", "99999"], "--port must be from 0 to 65535"),
    (["--max-images", "0"], "--max-images must be a number >= 1"),
])
def test_serve_refuses_unsafe_or_bad_flags_before_loading(capsys, tmp_path, argv, message):
    from pipelines.cli import main

    assert main(["serve", "--output-dir", str(tmp_path)] + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_clients_that_left_hold_no_queue_slot_and_retry_after_is_measured(tmp_path):
    s = Server(tmp_path / "out", Limits(max_side=64, max_batch=8, max_steps=100000, queue_size=2))
    try:
        progress = lambda: httpx.get(s.url + "/api/progress").json()  # noqa: E731
        assert post(s, "/api/txt2img", {"prompt": PROMPT, "steps": 4, "seed": 0}).status_code == 200  # a rate
        long = {"prompt": PROMPT, "seed": 0, "steps": 999, "batch_size": 8}
        a = _raw_post(s.url, "/api/txt2img", long)
        _wait(lambda: progress()["busy"] and progress()["step"] > 0, what="A to start")
        gone = [_raw_post(s.url, "/api/txt2img", {**long, "seed": i}) for i in (1, 2)]  # fill the queue
        _wait(lambda: progress()["queue"] == 2, what="two to queue")
        full = post(s, "/api/txt2img", {"prompt": PROMPT, "steps": 1})
        assert full.status_code == 503
        # A's 999 steps at its own rate, not a flat second
        assert int(full.headers["Retry-After"]) > 5, full.headers
        for g in gone:
            g.close()
        _wait(lambda: progress()["queue"] == 0, timeout=10, what="the queue to forget the gone clients")
        c = _raw_post(s.url, "/api/txt2img", {"prompt": PROMPT, "steps": 1})  # takes a freed slot at once
        _wait(lambda: progress()["queue"] == 1, timeout=10, what="C to queue")
        c.close()
        a.close()
    finally:
        s.stop()


def test_sigterm_answers_the_running_job_and_exits_promptly(tmp_path):
    import signal
    import threading

    proc, url = start_ldm_serve(["--max-steps", "100000", "--output-dir", str(tmp_path)])
    try:
        answer = {}
        t = threading.Thread(target=lambda: answer.update(r=httpx.post(
            url + "/api/txt2img", json={"prompt": PROMPT, "steps": 999, "batch_size": 8}, timeout=60)))
        t.start()
        _wait(lambda: httpx.get(url + "/api/progress").json()["step"] > 0, what="the job to run")
        t0 = time.time()
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert answer["r"].status_code == 503 and "shutting down" in answer["r"].text
        assert proc.wait(30) == 0
        assert time.time() - t0 < 10, time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_queued_model_override_never_leaks_into_other_jobs(tmp_path, sd1_dir):
    """A1111's override_settings switch the model for their own job only, in queue order: a queued plain
    request after an overriding one runs on the server's model, and a queued /options switch stays."""
    import threading

    models = tmp_path / "models"
    models.mkdir()
    (models / "tiny-sd1").symlink_to(sd1_dir)
    s = Server(tmp_path / "out", Limits(max_side=64, max_batch=8, max_steps=100000, queue_size=8), models_dir=models)
    try:
        progress = lambda: httpx.get(s.url + "/api/progress").json()  # noqa: E731
        out = {}
        first = threading.Thread(target=lambda: out.update(a=post(s, "/api/txt2img", {
            "prompt": PROMPT, "steps": 150, "batch_size": 8, "seed": 0})))
        first.start()
        _wait(lambda: progress()["busy"], what="the first job")
        jobs = [("over", "/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 2, "width": 64, "height": 64,
                                               "override_settings": {"sd_model_checkpoint": "tiny-sd1"}}),
                ("plain", "/api/txt2img", {"prompt": PROMPT, "steps": 2})]
        threads = []
        for name, path, body in jobs:
            threads.append(threading.Thread(target=lambda n=name, p=path, b=body: out.update({n: post(s, p, b)})))
            threads[-1].start()
            _wait(lambda k=len(threads): progress()["queue"] >= k, what=f"{name} to queue")
        for t in [first, *threads]:
            t.join(120)
        import json
        assert json.loads(out["over"].json()["info"])["sd_model_name"] == "tiny-sd1"
        assert out["plain"].json()["model"] == "shapes-model", out["plain"].json()["model"]
        assert httpx.get(s.url + "/sdapi/v1/options").json()["sd_model_checkpoint"] == "shapes-model"
        bad = post(s, "/sdapi/v1/txt2img", {"prompt": PROMPT, "steps": 2,
                                            "override_settings": {"sd_model_checkpoint": "nope"}})
        assert bad.status_code == 422 and "sd_model_checkpoint" in bad.text
    finally:
        s.stop()


def test_an_unwritable_output_folder_costs_the_files_not_the_images(tmp_path, monkeypatch):
    import errno

    import pipelines.serve as serve_module

    def read_only(*a, **kw):
        raise OSError(errno.EROFS, "Read-only file system")

    s = Server(tmp_path / "out", Limits(max_side=64, max_steps=10))
    try:
        monkeypatch.setattr(serve_module, "save_png", read_only)
        r = post(s, "/api/txt2img", {"prompt": PROMPT, "steps": 2, "seed": 1, "batch_size": 2})
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["images"]) == 2 and body["files"] == [None, None] and "could not be written" in body["warnings"][0]
        assert "Read-only" in httpx.get(s.url + "/api/health").json()["output_error"]
    finally:
        s.stop()


def test_edit_and_png_info_name_their_fields(server):
    r = post(server, "/api/edit", {"source_prompt": PROMPT, "target_prompt": "a large red square on a blue background",
                                   "inversion": "nti"})
    assert r.status_code == 422 and fields(r) == ["inversion"] and "--" not in r.text, r.text
    r = post(server, "/sdapi/v1/png-info", {"image": b64(b"not an image at all")})
    assert r.status_code == 422 and "BytesIO" not in r.text and "not an image format" in r.text, r.text


def test_interrupt_keeps_the_batches_that_finished(tmp_path):
    import threading

    s = Server(tmp_path / "out", Limits(max_side=64, max_batch=8, max_steps=150, queue_size=2))
    try:
        out = {}
        t = threading.Thread(target=lambda: out.update(r=post(s, "/sdapi/v1/txt2img", {
            "prompt": PROMPT, "steps": 150, "n_iter": 4, "seed": 3, "width": 64, "height": 64})))
        t.start()
        _wait(lambda: httpx.get(s.url + "/api/progress").json()["step"] > 150, what="the first batch to finish")
        assert httpx.post(s.url + "/sdapi/v1/interrupt").status_code == 200
        t.join(60)
        body = out["r"].json()
        assert out["r"].status_code == 200 and 1 <= len(body["images"]) < 4, (out["r"].status_code, len(body["images"]))
        assert len(list((tmp_path / "out").glob("*.png"))) == len(body["images"])
    finally:
        s.stop()


def test_a_broken_model_switch_answers_json_with_the_reason(tmp_path):
    import json

    models = tmp_path / "models"
    (models / "broken").mkdir(parents=True)
    (models / "broken" / "model_index.json").write_text(json.dumps({"unet": ["diffusers", "UNet2DConditionModel"]}))
    s = Server(tmp_path / "out", Limits(max_side=64, max_steps=10), models_dir=models)
    try:
        r = post(s, "/sdapi/v1/options", {"sd_model_checkpoint": "broken"})
        assert r.status_code == 500 and r.headers["content-type"].startswith("application/json"), r.text
        assert "broken" in r.json()["error"] and "incomplete" in r.json()["error"], r.text
        ok = post(s, "/api/txt2img", {"prompt": PROMPT, "steps": 2})  # still serving, on the model it had
        assert ok.status_code == 200 and ok.json()["model"] == "shapes-model"
    finally:
        s.stop()


@pytest.mark.parametrize("body, field", [({"steps": True}, "steps"), ({"cfg_scale": False}, "cfg_scale"),
                                         ({"n_iter": True}, "n_iter")])
def test_a1111_booleans_are_not_numbers(server, body, field):
    r = post(server, "/sdapi/v1/txt2img", {"prompt": PROMPT, "width": 64, "height": 64, **body})
    assert r.status_code == 422 and fields(r) == [field], r.text
