"""The shared training loop: schedule and EMA against closed forms; resume (also after kill -9)
against an uninterrupted run; NaN, output-directory and recipe errors; two processes under
``accelerate launch``."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from loop_worker import main as worker
from safetensors.torch import load_file

from finetune.config import ConfigError, TrainConfig, build
from finetune import loop
from finetune.loop import EMA, TrainingError, checkpoints, lr_lambda, resolve_mixed_precision, use_fused_adamw

WORKER = Path(__file__).with_name("loop_worker.py")


def weights(d):
    return load_file(str(Path(d) / "net.safetensors"))


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def test_lr_schedule_closed_form():
    cfg = TrainConfig(max_steps=110, learning_rate=1.0, lr_warmup_steps=10, lr_scheduler="cosine", min_lr_ratio=0.1)
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1)
    lin = lr_lambda(TrainConfig(max_steps=100, lr_scheduler="linear"))
    assert lin(25) == pytest.approx(0.75)
    assert lr_lambda(TrainConfig(lr_scheduler="constant"))(50) == 1.0


def test_ema_closed_form():
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.9)
    for v in (1.0, 2.0):
        p.data.fill_(v)
        ema.update()
    # s1 = 0.1 * 1 ; s2 = 0.9 * 0.1 + 0.1 * 2
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.29))
    with ema.swapped():
        assert torch.allclose(p, torch.full((3,), 0.29))
    assert torch.equal(p.data, torch.full((3,), 2.0))


def test_resume_equals_uninterrupted(tmp_path, caplog):
    with caplog.at_level("INFO", logger="finetune.loop"):
        worker([str(tmp_path / "full"), "6", "--ema", "0.5"])
    saved = [r.getMessage() for r in caplog.records if r.name == "finetune.loop"]
    # one line per checkpoint, naming where it landed (not the temporary directory it was written in)
    assert saved == [f"step {n}: checkpoint saved to {tmp_path / 'full' / f'checkpoint-{n}'}" for n in (2, 4, 6)]
    with pytest.raises(KeyboardInterrupt):
        worker([str(tmp_path / "part"), "6", "--ema", "0.5", "--stop-at", "5"])
    assert [s for s, _ in checkpoints(tmp_path / "part")] == [2, 4]
    worker([str(tmp_path / "part"), "6", "--resume", "--ema", "0.5"])
    assert same(weights(tmp_path / "full"), weights(tmp_path / "part"))
    assert [s for s, _ in checkpoints(tmp_path / "part")] == [4, 6]  # retention limit 2


def test_kill_9_then_resume_equals_uninterrupted(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent.parent)}
    # the uninterrupted run beside the killed one (each process is mostly its imports, on one core)
    full = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "full"), "8"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "run"), "8", "--kill-at", "5"], env=env,
                            capture_output=True)
    err = full.communicate(timeout=240)[1]
    assert full.returncode == 0, err.decode()[-2000:]
    assert killed.returncode == -9
    assert [s for s, _ in checkpoints(tmp_path / "run")] == [2, 4]
    resumed = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "run"), "8", "--resume"], env=env,
                             capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert same(weights(tmp_path / "full"), weights(tmp_path / "run"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    with pytest.raises(TrainingError, match="checkpoint-4"):
        worker([str(tmp_path), "10", "--nan-at", "6"])
    assert [s for s, _ in checkpoints(tmp_path)] == [2, 4]
    assert not (tmp_path / "net.safetensors").exists()


def test_output_dir_with_another_runs_checkpoints_is_refused(tmp_path):
    worker([str(tmp_path), "2"])
    with pytest.raises(TrainingError, match="--resume.*--overwrite"):
        worker([str(tmp_path), "4"])


def test_gradient_accumulation_runs_and_differs(tmp_path):
    worker([str(tmp_path / "a1"), "3"])
    worker([str(tmp_path / "a2"), "3", "--accum", "2"])
    assert not same(weights(tmp_path / "a1"), weights(tmp_path / "a2"))


def test_runs_of_another_mixed_precision_in_one_process(tmp_path):
    # accelerate refused the second Accelerator of another precision in a process (a build's bf16
    # VAE stages, then its fp32 CLIP stage); bf16 autocast must apply, and fp32 after it be fp32 again
    worker([str(tmp_path / "fp32"), "3"])
    worker([str(tmp_path / "bf16"), "3", "--mixed-precision", "bf16"])
    worker([str(tmp_path / "fp32-again"), "3"])
    assert not same(weights(tmp_path / "fp32"), weights(tmp_path / "bf16"))
    assert same(weights(tmp_path / "fp32"), weights(tmp_path / "fp32-again"))


def test_fused_adamw_is_the_default_and_makes_the_for_each_update(tmp_path):
    fused = worker([str(tmp_path / "fused"), "6"])
    plain = worker([str(tmp_path / "plain"), "6", "--no-fused"])
    assert fused["fused_adamw"] is True and plain["fused_adamw"] is False
    a, b = weights(tmp_path / "fused"), weights(tmp_path / "plain")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-5) for k in a)  # same update, another kernel
    # and a run resumed with the other kernel continues the same optimiser state
    with pytest.raises(KeyboardInterrupt):
        worker([str(tmp_path / "mixed"), "6", "--no-fused", "--stop-at", "5"])
    worker([str(tmp_path / "mixed"), "6", "--resume"])
    c = weights(tmp_path / "mixed")
    assert all(torch.allclose(a[k], c[k], rtol=0, atol=1e-5) for k in a)


def test_where_fused_adamw_applies():
    p = [torch.nn.Parameter(torch.zeros(2))]
    cpu = torch.device("cpu")
    assert use_fused_adamw(TrainConfig(), torch.optim.AdamW, p, cpu)
    assert not use_fused_adamw(TrainConfig(adam_fused=False), torch.optim.AdamW, p, cpu)
    assert not use_fused_adamw(TrainConfig(), torch.optim.SGD, p, cpu)  # e.g. bitsandbytes' 8-bit AdamW
    assert not use_fused_adamw(TrainConfig(), torch.optim.AdamW, p, torch.device("mps"))
    assert not use_fused_adamw(TrainConfig(), torch.optim.AdamW, [torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))], cpu)


def test_mixed_precision_auto_follows_the_hardware(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "native_bf16", lambda device_type: True)
    assert resolve_mixed_precision("auto") == "bf16"
    monkeypatch.setattr(loop, "native_bf16", lambda device_type: False)
    assert resolve_mixed_precision("auto") == "no"
    assert [resolve_mixed_precision(v) for v in ("no", "fp16", "bf16")] == ["no", "fp16", "bf16"]
    with pytest.raises(TrainingError, match="mixed_precision 'fp8' is unknown; use one of no, fp16, bf16, auto"):
        resolve_mixed_precision("fp8")
    summary = worker([str(tmp_path / "auto"), "2", "--mixed-precision", "auto"])
    assert summary["mixed_precision"] == "no"  # resolved before the run, what the objective reads too
    with pytest.raises(TrainingError, match="'fp8'"):
        worker([str(tmp_path / "bad"), "2", "--mixed-precision", "fp8"])
    assert not (tmp_path / "bad" / "checkpoint-2").exists()


def test_unknown_recipe_key_is_named():
    with pytest.raises(ConfigError, match="'learning_rte'"):
        build(TrainConfig, {"learning_rte": 1e-3})
    with pytest.raises(ConfigError, match="max_steps: expected int"):
        build(TrainConfig, {"max_steps": "many"})


def test_null_from_a_flag_clears_an_optional_key_and_is_refused_elsewhere():
    from finetune.vae import VAEConfig

    cfg = build(VAEConfig, {"oversample_shape": "null", "oversample_size": "None"})  # `--set oversample_shape=null`
    assert cfg.oversample_shape is None and cfg.oversample_size is None
    assert build(VAEConfig, {"oversample_shape": "star"}).oversample_shape == ["star"]
    with pytest.raises(ConfigError, match="max_steps: expected int, got 'null'"):
        build(TrainConfig, {"max_steps": "null"})


def test_two_processes_under_accelerate_launch(tmp_path, free_port):
    env = {**os.environ, "PYTHONPATH": str(WORKER.parent.parent)}
    # on a machine without GPUs, accelerate needs --multi_gpu to start torchrun; the processes are then MULTI_CPU (gloo)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port),
           str(WORKER), str(tmp_path), "4"]
    r = subprocess.run(cmd, env=env, capture_output=True, timeout=240)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    import json
    summary = json.loads((tmp_path / "train_summary.json").read_text())
    assert summary["processes"] == 2
    assert (tmp_path / "net.safetensors").is_file()
    assert [s for s, _ in checkpoints(tmp_path)] == [2, 4]
    for _, ckpt in checkpoints(tmp_path):  # every process's state inside the renamed checkpoint, none left behind
        assert (ckpt / "rng-0.safetensors").is_file() and (ckpt / "rng-1.safetensors").is_file(), ckpt
    assert not list(tmp_path.glob(".tmp-*"))


def test_resume_reads_no_pickle_unless_allowed(tmp_path):
    # a checkpoint of the older layout whose pickle would create a marker file when read
    worker([str(tmp_path), "2"])
    ckpt = tmp_path / "checkpoint-2"
    for f in ckpt.iterdir():
        if f.suffix in (".safetensors", ".json") and f.name != "trainer_state.json":
            f.unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    import pickle
    (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload()))
    (ckpt / "random_states_0.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(TrainingError, match="--allow-pickle"):
        worker([str(tmp_path), "4", "--resume"])
    assert not marker.exists()
    # the layout written now is safetensors and JSON only
    worker([str(tmp_path / "new"), "2", "--ema", "0.5"])
    names = {f.name for f in (tmp_path / "new" / "checkpoint-2").iterdir()}
    assert names and all(n.endswith((".safetensors", ".json")) for n in names), names


def test_a_second_run_into_a_busy_folder_is_refused(tmp_path):
    from pipelines.outputs import FolderBusy

    env = {**os.environ, "PYTHONPATH": str(WORKER.parent.parent)}
    first = subprocess.Popen([sys.executable, str(WORKER), str(tmp_path), "400", "--sleep", "0.05"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        import time
        deadline = time.time() + 120
        while not checkpoints(tmp_path) and time.time() < deadline:  # running: the first checkpoint is out
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            time.sleep(0.2)
        with pytest.raises(FolderBusy, match=f"pid {first.pid}"):
            worker([str(tmp_path), "4", "--resume"])
        with pytest.raises(FolderBusy):
            worker([str(tmp_path), "4", "--overwrite"])  # nor may it delete the running run's checkpoints
    finally:
        first.kill()
        first.wait()
    # kill -9 leaves no stale lock: the next run resumes
    assert (tmp_path / ".lock").is_file()
    worker([str(tmp_path), str(checkpoints(tmp_path)[-1][0] + 2), "--resume"])


def test_disk_full_while_saving_a_checkpoint(tmp_path, monkeypatch):
    import errno

    from finetune import state
    real = state.save_state
    calls = []

    def full_at_second(directory, **kw):
        calls.append(directory)
        if len(calls) == 2:
            (Path(directory) / "modules.safetensors").write_bytes(b"x" * 1000)  # partly written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(directory, **kw)

    monkeypatch.setattr(state, "save_state", full_at_second)
    with pytest.raises(TrainingError, match=r"the disk is full: checkpoint-4 in .* needs about .* MB are free"):
        worker([str(tmp_path), "6"])
    assert [s for s, _ in checkpoints(tmp_path)] == [2]
    assert not list(tmp_path.glob(".tmp-*"))  # the partial folder is gone
    monkeypatch.setattr(state, "save_state", real)
    worker([str(tmp_path), "6", "--resume"])  # the earlier checkpoint is intact
    worker([str(tmp_path / "full"), "6"])
    assert same(weights(tmp_path / "full"), weights(tmp_path))


def test_ctrl_c_saves_a_checkpoint_and_resume_continues_there(tmp_path):
    worker([str(tmp_path / "full"), "6", "--ema", "0.5"])
    with pytest.raises(KeyboardInterrupt, match="checkpoint-3"):
        worker([str(tmp_path / "part"), "6", "--ema", "0.5", "--sigint-at", "3"])
    assert [s for s, _ in checkpoints(tmp_path / "part")] == [2, 3]
    worker([str(tmp_path / "part"), "6", "--resume", "--ema", "0.5"])
    assert same(weights(tmp_path / "full"), weights(tmp_path / "part"))


def test_every_numeric_recipe_key_has_a_declared_range():
    import dataclasses
    import typing

    from finetune.config import BOUNDS
    from finetune.recipes import DISTILL, METHODS

    for method in [*METHODS.values(), DISTILL]:
        cls = method.config_class()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if any(t in str(hints[f.name]) for t in ("int", "float")):
                assert f.name in BOUNDS, f"{cls.__name__}.{f.name} has no range in finetune.config.BOUNDS"


@pytest.mark.parametrize("key, value, message", [
    ("batch_size", 0, "batch_size=0: must be >= 1"),
    ("checkpoint_every", -2, "checkpoint_every=-2: must be >= 0"),
    ("max_steps", -3, "max_steps=-3: must be >= 1"),
    ("learning_rate", "nan", "learning_rate=nan: must be a finite number"),
    ("ema_decay", 1.0, "ema_decay=1.0: must be >= 0 and < 1"),
])
def test_recipe_values_out_of_range_are_named(key, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build(TrainConfig, {key: value})


def test_recipe_ranges_of_the_methods_and_malformed_yaml(tmp_path):
    from finetune.config import DreamBoothConfig, read_yaml

    with pytest.raises(ConfigError, match="prior_loss_weight=-1.0: must be >= 0"):
        build(DreamBoothConfig, {"prior_loss_weight": -1})
    bad = tmp_path / "r.yaml"
    bad.write_text("max_steps: 10\nbatch_size: [4\n")
    with pytest.raises(ConfigError, match=r"r.yaml: not valid YAML at line \d+, column \d+"):
        read_yaml(bad)
