"""``flashkat bench kernels``, ``flashkat bench model`` and ``flashkat analyze`` end to end at tiny
sizes (CPU: the reference, plus the Triton kernels under the interpreter), and their helpers."""

import json

import pytest
import torch

from flashkat.analyze import flops_per_element, parse_ncu_csv
from flashkat.bench import harness
from flashkat.bench import model as mbench
from flashkat.cli import main
from flashkat.ops import group_rational as op
from conftest import DEVICE, requires_cuda

# Small models whatever the device: the tests check plumbing, not speed.
SMALL_MODEL = ["--model-args", "img_size=32", "patch_size=8", "depth=2", "--batch", "2"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is fastest (and immune to a busy machine's other processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def last_table(text: str) -> list[str]:
    """The Markdown table the console output ends with."""
    lines = text.rstrip().splitlines()
    end = len(lines)
    start = end
    while start > 0 and lines[start - 1].startswith("|"):
        start -= 1
    return lines[start:end]


def test_bench_kernels(tmp_path, capsys):
    assert main(["bench", "kernels", "--tokens", "64", "--dims", "32", "--dtypes", "fp32", "bf16",
                 "--rep-ms", "1", "--output", str(tmp_path)]) == 0  # fmt: skip
    payload = json.loads((tmp_path / "kernels.json").read_text())
    rows = payload["rows"]
    assert {"environment", "timer", "impls", "settings", "rows"} <= set(payload)
    assert {r["dtype"] for r in rows} == {"float32", "bfloat16"}
    backward_impls = {r["impl"] for r in rows if r["kernel"] == "backward"}
    if DEVICE == "cuda":
        assert backward_impls == {"flashkat", "blocked", "atomic"}
    else:  # the reference, and the Triton kernels under the interpreter (labelled as not speeds)
        assert backward_impls == {"cpu-reference", "flashkat", "blocked", "atomic"}
        assert all(r["note"] == "interpreter: not a speed" for r in rows if r["impl"] not in ("cpu-reference",))
    for row in rows:
        assert row["floor"] == ("copy" if row["kernel"] == "forward" else "gelu_backward")
        assert row["ms"] > 0 and row["floor_ms"] > 0
        assert row["x_floor"] == pytest.approx(row["ms"] / row["floor_ms"])
        assert row["GBps"] > 0
    table = last_table(capsys.readouterr().out)
    assert table[0].startswith("| shape | dtype | kernel | impl | ms |")
    assert len(table) == 2 + len(rows)
    assert (tmp_path / "kernels.md").read_text().strip().splitlines() == table


def test_bench_kernels_sweep_restores_tuning(tmp_path):
    before = dict(op._TUNING)
    assert main(["bench", "kernels", "--sweep", "--impls", "flashkat", "--tokens", "32", "--dims", "32",
                 "--dtypes", "fp32", "--rep-ms", "1", "--output", str(tmp_path)]) == 0  # fmt: skip
    payload = json.loads((tmp_path / "kernels.json").read_text())
    assert op._TUNING == before
    assert {r["setting"] for r in payload["rows"]} == set(range(len(payload["settings"])))
    assert (tmp_path / "kernels.md").read_text().startswith("| setting |")


def test_bench_model(tmp_path, capsys):
    args = ["bench", "model", "--sizes", "tiny", "--dtypes", "bf16", "fp16", "--modes", "eager", "--warmup", "1",
            "--steps", "1", "--impls", "flashkat", "blocked", "atomic", "gelu", "unfused", "--atomic-steps", "1",
            "--output", str(tmp_path), *SMALL_MODEL]  # fmt: skip
    assert main(args) == 0
    payload = json.loads((tmp_path / "model.json").read_text())
    rows = payload["rows"]
    vits = [r for r in rows if r["model"] == "vit_tiny_patch16_224"]
    kats = [r for r in rows if r["model"] == "kat_tiny_patch16_224"]
    assert len(vits) == 2  # one per dtype
    expected = {"flashkat", "blocked", "atomic", "gelu", "unfused"} if DEVICE == "cuda" else {"cpu-reference", "gelu"}
    assert {r["impl"] for r in kats} == expected and len(kats) == 2 * len(expected)
    for row in kats:
        vit = next(v for v in vits if v["dtype"] == row["dtype"])
        assert row["vs_vit"] == pytest.approx(row["images_per_s"] / vit["images_per_s"])
        assert row["pipelined_vs_vit"] == pytest.approx(row["pipelined_images_per_s"] / vit["pipelined_images_per_s"])
        assert row["img_size"] == 32 and row["batch"] == 2
    assert all(r["images_per_s"] > 0 and 0 < r["host_ms"] <= r["step_ms"] and r["pipelined_images_per_s"] > 0
               for r in rows)  # fmt: skip
    table = last_table(capsys.readouterr().out)
    assert table[0].startswith("| size | mode | dtype | model | impl |") and len(table) == 2 + len(rows)


def test_eager_configurations_run_before_compiled_ones():
    from flashkat.bench.model import configurations

    order = configurations(["tiny", "base"], ["bf16"], ["reduce-overhead", "eager", "compile"])
    assert order == [("tiny", "bf16", "eager"), ("base", "bf16", "eager"), ("tiny", "bf16", "reduce-overhead"),
                     ("tiny", "bf16", "compile"), ("base", "bf16", "reduce-overhead"), ("base", "bf16", "compile")]


def test_unfused_impl_builds_timms_blocks():
    from timm.models.vision_transformer import Block

    from flashkat.models.kat import FusedNormBlock

    steps = [mbench.TrainingStep("kat_tiny_patch16_224", impl, torch.bfloat16, "eager", 2, DEVICE, mbench.CPU_MODEL_ARGS)
             for impl in ("flashkat", mbench.UNFUSED_LABEL)]  # fmt: skip
    fused, unfused = (step.model.blocks for step in steps)
    assert all(type(block) is FusedNormBlock for block in fused) and all(type(block) is Block for block in unfused)
    assert all(step.first_step_s > 0 for step in steps)


def test_pipelined_steps_run_back_to_back():
    step = mbench.TrainingStep("kat_tiny_patch16_224", "gelu", torch.bfloat16, "eager", 2, DEVICE, mbench.CPU_MODEL_ARGS)
    parameter = next(step.model.parameters())
    before = int(step.optimizer.state[parameter]["step"])
    assert step.pipelined(3) > 0 and int(step.optimizer.state[parameter]["step"]) == before + 3
    with pytest.raises(SystemExit):
        main(["bench", "model", "--pipelined-steps", "-1"])


def test_bench_model_compiles_blocks_or_the_whole_model(tmp_path):
    args = ["bench", "model", "--sizes", "tiny", "--dtypes", "bf16", "--modes", "compile-model", "--impls", "flashkat",
            "--warmup", "1", "--steps", "1", "--pipelined-steps", "0", "--output", str(tmp_path), *SMALL_MODEL]  # fmt: skip
    assert main(args) == 0
    rows = json.loads((tmp_path / "model.json").read_text())["rows"]
    assert [r["mode"] for r in rows] == ["compile-model", "compile-model"] and all(r["step_ms"] > 0 for r in rows)
    assert not any("pipelined_images_per_s" in r or "pipelined_vs_vit" in r for r in rows)  # 0 skips them
    for mode in mbench.MODES:
        model = mbench.create_model("kat_tiny_patch16_224", "cpu", dict(mbench.CPU_MODEL_ARGS))
        mbench.apply_mode(model, mode)
        assert (model._compiled_call_impl is not None) == (mode in ("compile-model", "reduce-overhead"))
        assert all((b._compiled_call_impl is not None) == (mode == "compile") for b in model.blocks)


def test_kat_model_has_group_rationals_to_switch():
    kat = mbench.create_model("kat_tiny_patch16_224", "cpu", dict(mbench.CPU_MODEL_ARGS))
    vit = mbench.create_model("vit_tiny_patch16_224", "cpu", dict(mbench.CPU_MODEL_ARGS))
    assert mbench.set_impl(kat, "blocked") == 2 * mbench.CPU_MODEL_ARGS["depth"]  # act1 and act2 per block
    assert mbench.set_impl(vit, "blocked") == 0
    assert {m.impl for m in kat.modules() if hasattr(m, "impl")} == {"blocked"}


def test_gelu_standins_replace_every_group_rational():
    kat = mbench.create_model("kat_tiny_patch16_224", "cpu", dict(mbench.CPU_MODEL_ARGS))
    assert mbench.use_gelu_standins(kat) == 2 * mbench.CPU_MODEL_ARGS["depth"]
    assert mbench.set_impl(kat, "flashkat") == 0 and not any("weight_denominator" in n for n, _ in kat.named_parameters())
    act1, act2 = kat.blocks[0].mlp.act1, kat.blocks[0].mlp.act2
    x = torch.randn(2, 5, 192)
    assert torch.equal(act2(x), torch.nn.functional.gelu(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # act1 stores what fc1 casts to, act2 keeps its input's
        assert act1(x).dtype == torch.bfloat16 and act2(x).dtype == torch.float32
        assert torch.equal(act1(x), torch.nn.functional.gelu(x).to(torch.bfloat16))


def test_parse_model_args():
    assert mbench.parse_model_args(["img_size=32", "global_pool=avg", "depth=-1"], "cuda") == {
        "img_size": 32, "global_pool": "avg", "depth": -1}  # fmt: skip
    assert mbench.parse_model_args(None, "cuda") == {}
    assert mbench.parse_model_args(None, "cpu") == mbench.CPU_MODEL_ARGS


def test_analyze(tmp_path, capsys):
    sections = ["slowdown", "flops", "fwd_bwd", "rounding"] + (["ncu"] if DEVICE == "cpu" else [])
    args = ["analyze", "--output", str(tmp_path), "--tokens", "64", "--dim", "32", "--dims", "32", "--seeds", "2",
            "--steps", "1", "--atomic-steps", "1", "--rep-ms", "1", "--sections", *sections, *SMALL_MODEL]  # fmt: skip
    assert main(args) == 0
    report = (tmp_path / "report.md").read_text()
    payload = json.loads((tmp_path / "analyze.json").read_text())
    assert list(payload["sections"]) == sections
    assert report.count("\n## ") == len(sections)
    for name in ("slowdown", "flops", "fwd_bwd", "rounding"):
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
        assert f"]({name}.png)" in report
    data = payload["sections"]
    assert {r["model"] for r in data["slowdown"]["data"]} == {"vit_tiny_patch16_224", "kat_tiny_patch16_224"}
    flops_rows = data["flops"]["data"]
    assert {r["order"] for r in flops_rows} == {"5/4", "10/8", "15/12"}
    assert all(r["time_x"] > 0 for r in flops_rows)
    assert data["fwd_bwd"]["data"]["summary"][0]["shape"] == "64x32"
    rounding = {r["impl"]: r for r in data["rounding"]["data"]}  # the interpreter runs on the CPU
    assert set(rounding) == {"flashkat", "blocked", "atomic"}
    for row in rounding.values():
        assert 0 < row["da_rel_l2"][0] < 1e-4 and 0 < row["db_rel_l2"][0] < 1e-4
    assert rounding["flashkat"]["bitwise_equal_pairs"] == "2/2"  # deterministic by design
    if DEVICE == "cpu":
        assert "Skipped: no GPU" in report
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"report: {tmp_path / 'report.md'}")
    assert "| impl | da mae |" in out


NCU_CSV = '''==PROF== Connected to process 1234
==PROF== Profiling "_atomic_backward_kernel": 0%....50%....100% - 9 passes
"ID","Process ID","Kernel Name","dram__throughput.avg.pct_of_peak_sustained_elapsed","gpu__time_duration.sum",\
"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_membar_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_selected_per_issue_active.ratio"
"","","","%","nsecond","ratio","ratio","ratio"
"0","1234","_atomic_backward_kernel","3.21","102,345,678","1.5","24.75","1"
'''


def test_parse_ncu_csv():
    parsed = parse_ncu_csv(NCU_CSV)
    assert parsed["dram_pct"] == pytest.approx(3.21)
    assert parsed["duration_us"] == pytest.approx(102345.678)
    assert list(parsed["stalls"]) == ["membar", "long_scoreboard"]  # sorted, "selected" is no stall
    hopper = NCU_CSV.replace('"dram__throughput.avg', '"gpu__dram_throughput.avg')  # the name on an H100
    assert parse_ncu_csv(hopper)["dram_pct"] == pytest.approx(3.21)
    with pytest.raises(ValueError):
        parse_ncu_csv("==PROF== nothing profiled\n")


def test_flops_estimates_grow():
    assert flops_per_element(5, 4, "backward") < flops_per_element(10, 8, "backward") < flops_per_element(15, 12, "backward")
    assert flops_per_element(5, 4, "backward", work=4) > 3.5 * flops_per_element(5, 4, "backward") * 0.9
    assert flops_per_element(5, 4, "forward") < flops_per_element(5, 4, "backward")


def test_time_ms_on_cpu_is_a_positive_median():
    x = torch.randn(1000)
    assert harness.time_ms(lambda: x.sum(), "cpu", rep_ms=5) > 0


@requires_cuda
def test_graph_timer_measures_gpu_time():
    x = torch.randn(64 * 2**20, device="cuda")  # 256 MB: a copy takes ~0.2 ms on an H100
    y = torch.empty_like(x)
    graph = harness.time_ms(lambda: y.copy_(x), "cuda", cuda_graph=True)
    launch = harness.time_ms(lambda: y.copy_(x), "cuda")
    assert 0 < graph < 10 and graph == pytest.approx(launch, rel=0.5)


def test_compare_with_public_uses_spec_figures():
    from flashkat.analyze import PUBLIC_MS, compare_with_public

    measured = [
        {"shape": "25216x768", "kernel": "backward", "impl": "blocked", "ms": 0.3, "x_floor": 3.6, "floor": "gelu_backward"},
        {"shape": "25216x768", "kernel": "backward", "impl": "flashkat", "ms": 0.2, "x_floor": 2.4, "floor": "gelu_backward"},
        {"shape": "25216x384", "kernel": "backward", "impl": "atomic", "ms": 50.0, "x_floor": 600, "floor": "gelu_backward"},
    ]  # fmt: skip
    rows = compare_with_public(measured, 128 * 197)
    assert [(r["impl"], r["public"]) for r in rows] == [("blocked", "FlashKAT bwd")]  # no public D=384, no twin of ours
    assert rows[0]["ms / public_ms"] == pytest.approx(0.3 / PUBLIC_MS[768]["FlashKAT bwd"])
    assert rows[0]["public_x_floor"] == pytest.approx(0.279 / 0.083)
    assert compare_with_public(measured, 64) == []  # other shapes are not comparable


def test_bench_host(tmp_path, capsys):
    assert main(["bench", "host", "--calls", "3", "--output", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "host.json").read_text())["rows"]
    calls = {r["call"] for r in rows}
    assert {"group_rational forward+backward", "gelu forward+backward", "gelu forward (no_grad)",
            "layer_norm_group_rational forward+backward", "layer_norm then gelu forward+backward"} <= calls
    assert "triton_backward" in calls  # a GPU, or the interpreter (conftest)
    assert all(r["host_us"] > 0 for r in rows)
    table = last_table(capsys.readouterr().out)
    assert table[0] == "| call | shape | host_us |" and len(table) == 2 + len(rows)


@pytest.mark.parametrize("args", [["host", "--calls", "0"], ["model", "--steps", "0"], ["model", "--atomic-steps", "-1"]])
def test_bench_counts_must_be_positive(args, capsys):
    with pytest.raises(SystemExit):
        main(["bench", *args])
    assert "must be at least 1" in capsys.readouterr().err
