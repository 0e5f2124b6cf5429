"""``flashkat train / validate / plot``: the default digits run, resuming, atomic checkpoints, DDP on
gloo, datasets and the CLI's answers to bad input."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flashkat import datasets
from flashkat.cli import main
from flashkat.train import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--no-progress", "--threads", "2"]


def cli(*argv) -> int:
    return main([str(a) for a in argv])


def subprocess_env() -> dict:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    env.pop("TRITON_INTERPRET", None)  # CPU runs the reference; no Triton needed
    return env


def weights(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """The default ``flashkat train`` (KAT-micro on digits, 20 epochs), run once for several tests."""
    output = tmp_path_factory.mktemp("digits")
    started = time.perf_counter()
    assert cli("train", "--output", output, *QUICK) == 0
    return output, time.perf_counter() - started


def test_default_run_reaches_95_percent_and_writes_its_outputs(digits_run):
    output, seconds = digits_run
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["top1"] >= 95.0, metrics
    assert {"top1", "top5", "epochs", "seconds", "images_per_second"} <= set(metrics)
    assert metrics["epochs"] == 20 and metrics["top5"] >= metrics["top1"]
    assert seconds < 180, f"the default run took {seconds:.0f} s"
    rows = list(csv.DictReader(open(output / "log.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 21))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    last = weights(output / "last.pth")
    assert last["arch"] == "kat_micro_patch4_16" and last["epoch"] == 20 and last["global_step"] == 20 * 22
    assert weights(output / "best.pth")["top1"] == pytest.approx(max(float(r["top1"]) for r in rows), abs=1e-3)


def test_validate_reproduces_the_final_accuracy(digits_run, capsys):
    output, _ = digits_run
    capsys.readouterr()
    assert cli("validate", output / "last.pth") == 0
    result = json.loads(capsys.readouterr().out)
    final = json.loads((output / "metrics.json").read_text())
    assert result["images"] == 360 and result["top1"] == pytest.approx(final["top1"])


def test_plot_draws_every_rational(digits_run, tmp_path):
    output, _ = digits_run
    assert cli("plot", output / "last.pth", "--output", tmp_path) == 0
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    expected = sorted([f"blocks.{i}.mlp.act{a}.png" for i in range(4) for a in (1, 2)] + ["overview.png"])
    assert pngs == expected
    assert all((tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in pngs)


def test_group_functions_cover_every_numerator_denominator_pair():
    from flashkat.layers import GroupRational
    from flashkat.plot import group_functions

    assert group_functions(GroupRational(8, "swish")) == [(0, g) for g in range(8)]
    assert group_functions(GroupRational(2, "swish", numerator_groups=3)) == [(0, 0), (1, 0), (1, 1), (2, 1)]


def test_resume_after_stop_is_bitwise_the_uninterrupted_run(tmp_path):
    """Stop part-way through epoch 2, resume: same weights, EMA and optimizer state as one run (on
    the CPU: a GPU's convolution and matmul backward passes need not repeat their bits)."""
    common = ["--epochs", 2, "--mixup", 0.2, "--ema-decay", 0.9, "--device", "cpu", *QUICK]  # RNG in use
    assert cli("train", "--output", tmp_path / "whole", *common) == 0
    assert cli("train", "--output", tmp_path / "split", "--max-steps", 30, *common) == 0
    stopped = weights(tmp_path / "split" / "last.pth")
    assert (stopped["epoch"], stopped["step_in_epoch"], stopped["global_step"]) == (1, 8, 30)
    assert cli("train", "--output", tmp_path / "split", "--resume", *common) == 0
    whole, resumed = weights(tmp_path / "whole" / "last.pth"), weights(tmp_path / "split" / "last.pth")
    for key in ("state_dict", "state_dict_ema"):
        assert all(torch.equal(whole[key][k], resumed[key][k]) for k in whole[key]), key
    moments = [(s["exp_avg"], r["exp_avg"]) for s, r in zip(whole["optimizer"]["state"].values(),
                                                            resumed["optimizer"]["state"].values())]  # fmt: skip
    assert all(torch.equal(a, b) for a, b in moments)
    rows = list(csv.DictReader(open(tmp_path / "split" / "log.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]


def test_killed_run_leaves_a_loadable_checkpoint_and_resumes(tmp_path):
    """SIGKILL a run that checkpoints every step, whenever it happens to be: last.pth is whole."""
    command = [sys.executable, "-m", "flashkat.cli", "train", "--output", str(tmp_path), "--epochs", "1",
               "--save-every-steps", "1", "--drop-path", "0", *QUICK]  # fmt: skip
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (tmp_path / "last.pth").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # a few more steps, each rewriting last.pth
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()
    killed_at = load_checkpoint(tmp_path / "last.pth")["global_step"]
    assert 1 <= killed_at < 22
    assert cli("train", "--output", tmp_path, "--resume", "--epochs", 1, "--drop-path", 0, *QUICK) == 0
    assert weights(tmp_path / "last.pth")["global_step"] == 22


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pth"
    save_checkpoint({"step": 1}, path)

    def broken_save(obj, file, *args, **kwargs):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_ddp_on_gloo_matches_one_process(tmp_path):
    """2 gloo processes x 32 images == 1 process x 64 images: same weights after 6 steps (on the
    CPU, so that a machine with one GPU runs it too)."""
    common = ["--epochs", 1, "--max-steps", 6, "--batch-size", 64, "--opt", "sgd", "--lr", 0.05,
              "--drop-path", 0, "--no-progress", "--device", "cpu"]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "flashkat.cli", "train", "--output", str(tmp_path / "ddp"), *map(str, common)]  # fmt: skip
    finished = subprocess.run(torchrun, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "2 processes (rank 0 on cpu)" in finished.stderr
    assert cli("train", "--output", tmp_path / "one", *common) == 0
    ddp, one = weights(tmp_path / "ddp" / "last.pth"), weights(tmp_path / "one" / "last.pth")
    assert ddp["global_step"] == one["global_step"] == 6 and len(ddp["rng"]) == 2
    for key, value in one["state_dict"].items():
        torch.testing.assert_close(ddp["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    ddp_metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    one_metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert ddp_metrics["world_size"] == 2 and ddp_metrics["top1"] == pytest.approx(one_metrics["top1"])


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    common = ["--epochs", 1, "--max-steps", 4, "--opt", "sgd", "--drop-path", 0, *QUICK]
    assert cli("train", "--output", tmp_path / "full", *common) == 0
    assert cli("train", "--output", tmp_path / "accum", "--accum-steps", 4, *common) == 0
    full, accum = weights(tmp_path / "full" / "last.pth"), weights(tmp_path / "accum" / "last.pth")
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(accum["state_dict"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_synthetic_images_are_fixed_and_learnable(tmp_path):
    first = datasets.SyntheticImages(16, 5, (3, 32, 32), seed=1)
    again = datasets.SyntheticImages(16, 5, (3, 32, 32), seed=1)
    other = datasets.SyntheticImages(16, 5, (3, 32, 32), seed=1, split="val")
    assert torch.equal(first[7][0], again[7][0]) and first[7][1] == again[7][1]
    assert not torch.equal(first[7][0], other[7][0]) and first[3][0].shape == (3, 32, 32)
    assert cli("train", "--dataset", "synthetic", "--synthetic-size", 256, "--batch-size", 32, "--epochs", 3,
               "--lr", 3e-3, "--workers", 0, "--output", tmp_path, *QUICK) == 0  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert "images_per_second" in json.loads((tmp_path / "metrics.json").read_text())


def write_image_folder(root: Path, images_per_class: int = 4) -> Path:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (root / split / name).mkdir(parents=True)
            for i in range(images_per_class):
                pixels = torch.randint(0, 256, (40, 48, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.png")
    return root


def test_image_folder_with_timm_augmentation_and_bf16(tmp_path):
    root = write_image_folder(tmp_path / "data")
    assert cli("train", "--dataset", root, "--model", "kat_tiny_patch4_32", "--model-kwargs", "depth=1",
               "--epochs", 1, "--batch-size", 4, "--aa", "rand-m9-mstd0.5", "--reprob", 0.25, "--mixup", 0.8,
               "--cutmix", 1.0, "--amp", "bf16", "--workers", 1, "--output", tmp_path / "run", *QUICK) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["amp"] == "bf16"


def test_kat_imagenet_preset_sets_the_recipe_and_flags_override_it():
    import argparse

    from flashkat.train import add_arguments, resolve_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = resolve_args(parser.parse_args(["--preset", "kat-imagenet", "--model", "kat_tiny_patch16_224",
                                           "--lr", "5e-4"]))  # fmt: skip
    recipe = dict(epochs=300, batch_size=1024, opt="adamw", weight_decay=0.05, sched="cosine", warmup_epochs=5,
                  mixup=0.8, cutmix=1.0, smoothing=0.1, drop_path=0.1, aa="rand-m9-mstd0.5", reprob=0.25,
                  amp="fp16", ema_decay=0.9999, lr=5e-4)  # fmt: skip
    assert {key: getattr(args, key) for key in recipe} == recipe
    base = resolve_args(parser.parse_args(["--preset", "kat-imagenet", "--model", "kat_base_patch16_224"]))
    assert base.drop_path == 0.4 and base.lr == 1e-3


# --- bad input: a clear one-line message, exit code 2, nothing written -------------------------------


def fails(capsys, *argv) -> str:
    capsys.readouterr()
    assert cli(*argv) == 2
    error = capsys.readouterr().err
    assert "error:" in error and "Traceback" not in error
    return error


def test_missing_dataset_path(tmp_path, capsys):
    error = fails(capsys, "train", "--dataset", tmp_path / "nowhere", "--output", tmp_path / "run", *QUICK)
    assert "does not exist" in error and not (tmp_path / "run").exists()


def test_dataset_folder_without_splits_or_with_a_corrupt_image(tmp_path, capsys):
    (tmp_path / "flat" / "cat").mkdir(parents=True)
    assert "train/" in fails(capsys, "train", "--dataset", tmp_path / "flat", "--output", tmp_path / "r1", *QUICK)
    root = write_image_folder(tmp_path / "data", images_per_class=1)
    for image in sorted((root / "train").rglob("*.png")):
        image.write_bytes(b"not an image")
    error = fails(capsys, "train", "--dataset", root, "--model", "kat_tiny_patch4_32", "--output", tmp_path / "r2",
                  "--batch-size", 2, *QUICK)  # fmt: skip
    assert "cannot read" in error and not (tmp_path / "r2").exists()


def test_unknown_model(tmp_path, capsys):
    error = fails(capsys, "train", "--model", "kat_gigantic", "--output", tmp_path, *QUICK)
    assert "unknown model 'kat_gigantic'" in error and "kat_tiny_patch16_224" in error


def test_corrupt_or_incompatible_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli("train", "--output", run, "--epochs", 1, "--max-steps", 2, *QUICK) == 0
    before = (run / "last.pth").read_bytes()
    error = fails(capsys, "train", "--output", run, "--resume", "--model", "kat_tiny_patch4_32", *QUICK)
    assert "kat_micro_patch4_16" in error
    assert "steps per epoch" in fails(capsys, "train", "--output", run, "--resume", "--batch-size", 32, *QUICK)
    assert "--epochs" in fails(capsys, "train", "--output", run, "--resume", "--epochs", 5, *QUICK)
    assert "already holds a run" in fails(capsys, "train", "--output", run, *QUICK)
    assert (run / "last.pth").read_bytes() == before  # nothing was overwritten
    (tmp_path / "broken.pth").write_bytes(before[: len(before) // 2])
    assert "unreadable" in fails(capsys, "train", "--resume", tmp_path / "broken.pth", *QUICK)
    assert "unreadable" in fails(capsys, "validate", tmp_path / "broken.pth")
    assert "does not exist" in fails(capsys, "validate", tmp_path / "missing.pth")


def test_validate_a_foreign_checkpoint_needs_and_uses_the_model_name(tmp_path, capsys):
    import timm

    state = timm.create_model("kat_micro_patch4_16").state_dict()
    torch.save({"model": state}, tmp_path / "kat_style.pth")
    assert "--model" in fails(capsys, "validate", tmp_path / "kat_style.pth")
    assert cli("validate", tmp_path / "kat_style.pth", "--model", "kat_micro_patch4_16") == 0
    assert json.loads(capsys.readouterr().out)["images"] == 360


@pytest.mark.parametrize("flag, mode", [(["--compile"], None), (["--compile", "reduce-overhead"], "reduce-overhead")])
def test_compile_flag_passes_its_mode_to_torch_compile(tmp_path, monkeypatch, flag, mode):
    modes = []

    def fake_compile(model, mode=None):
        modes.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert cli("train", *flag, "--epochs", 1, "--max-steps", 2, "--output", tmp_path, *QUICK) == 0
    assert modes == [mode]


def test_compile_flag_rejects_an_unknown_mode(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli("train", "--compile", "fast")
    assert exit_info.value.code == 2 and "invalid choice: 'fast'" in capsys.readouterr().err


def test_more_processes_than_gpus_is_a_clear_error(tmp_path, monkeypatch, capsys):
    """torchrun with more processes per node than visible GPUs: one line that says so (instead of
    a CUDA 'invalid device ordinal' from the second rank), before any process group is joined."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert cli("train", "--device", "cuda", "--epochs", 1, "--output", tmp_path, *QUICK) == 2
    assert "2 processes per node but 1 visible GPU(s)" in capsys.readouterr().err
