"""``mobilenet bench``: engines timed side by side, with the machine's conditions recorded."""

import json

import pytest

from mobilenet import MobileNetError, bench, machine
from mobilenet.cli import main
from mobilenet.formats.onnx import ort_session

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni amx_tile amx_int8
processor\t: 1
model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz
flags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw avx512_vnni amx_tile amx_int8
"""
STAT = "cpu  {user} 0 {system} {idle} {iowait} 0 10 {steal} 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"


def test_cpu_model_and_isa_features_from_cpuinfo():
    info = machine.cpu(CPUINFO)
    assert info["model"] == "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"
    assert info["isa"] == ["AVX2", "AVX-512", "VNNI", "AMX"]  # no avx512_bf16: no BF16
    laptop = "model name : AMD Ryzen 7\nflags : sse avx2 avx_vnni avx512_bf16\n"
    assert machine.cpu(laptop)["isa"] == ["AVX2", "VNNI", "BF16"]
    assert machine.cpu("")["isa"] == [] and machine.cpu("")["model"]  # not Linux: the arch


def test_busy_cores_of_other_processes_from_two_stat_snapshots():
    before = STAT.format(user=1000, system=500, idle=9000, iowait=100, steal=0)
    # 3.0 s user, 1.0 s system and 0.5 s steal in 4 s; idle and iowait do not count
    after = STAT.format(user=1300, system=600, idle=9500, iowait=400, steal=50)
    assert machine.busy_jiffies(after) - machine.busy_jiffies(before) == 450
    assert machine.other_busy_cores(before, after, own_s=2.5, wall_s=4.0) == pytest.approx(0.5)
    assert machine.other_busy_cores(before, after, own_s=9.0, wall_s=4.0) == 0.0  # never below


def _result(busy: float) -> dict:
    rows = bench.engine_rows(2, {"eager": 0.040, "eager-fused": 0.020, "onnxruntime": 0.010})
    for row in rows:
        row["peak_rss_bytes"] = 300 * 2**20
    info = {"model": "Test CPU", "cores": 4, "isa": ["AVX2", "VNNI"]}
    setting = {"model": "mobilenet_v2", "width_mult": 1.0, "batch": 2, "resolution": 224}
    return {**setting, "threads": 1, "cpu": info, "busy_other_cores": busy, "engines": rows,
            "failed": {"openvino": "not installed"}}  # fmt: skip


def test_ratios_are_to_the_best_peer_and_to_eager():
    rows = {row["engine"]: row for row in _result(0.0)["engines"]}
    assert rows["eager"]["best_peer"] == "onnxruntime" and rows["eager"]["ratio_to_best"] == 4.0
    assert rows["eager-fused"]["ratio_to_best"] == 2.0
    assert rows["onnxruntime"]["best_peer"] == "eager-fused"  # the fastest, by half
    assert rows["onnxruntime"]["ratio_to_best"] == 0.5
    assert [r["ratio_to_eager"] for r in rows.values()] == [1.0, 0.5, 0.25]
    assert rows["onnxruntime"]["images_per_s"] == 200.0
    alone = bench.engine_rows(1, {"eager-fused": 0.02})
    assert alone[0]["ratio_to_best"] is None and alone[0]["ratio_to_eager"] is None


def test_the_table_names_the_cpu_and_warns_of_a_busy_machine():
    table = bench.format_table(_result(0.1)).splitlines()
    assert table[1] == "Test CPU, 4 cores (AVX2, VNNI); 0.10 cores busy with other processes"
    assert "vs best peer" in table[2]
    assert "4.00x onnxruntime" in table[3] and "0.50x eager-fused" in table[5]
    assert table[-1].startswith("openvino") and "warning" not in "\n".join(table)
    busy = bench.format_table(_result(0.3)).splitlines()
    assert busy[-1].startswith("warning: other processes kept 0.30 cores busy")


def test_run_bench_records_the_machine_and_the_allocator(monkeypatch):
    cfg = bench.BenchConfig("mobilenet_v3_small", 0.25, 1, 32, 1, rounds=1, iterations=1)
    result = bench.run_bench(cfg, ["eager", "eager-fused"])
    rows = {row["engine"]: row for row in result["engines"]}
    assert list(rows) == ["eager", "eager-fused"] and result["failed"] == {}
    assert (
        rows["eager"]["best_peer"] == "eager-fused" and rows["eager-fused"]["best_peer"] == "eager"
    )
    for row in rows.values():
        assert row["ratio_to_best"] > 0 and row["median_ms"] > 0 and row["peak_rss_bytes"] > 0
        assert row["keep_freed_memory"] is True  # glibc: freed activations stay in the heap
    assert result["cpu"] == machine.cpu()
    assert result["busy_other_cores"] >= 0
    assert isinstance(result["onnxruntime_spinning"], bool)


def test_executorch_engines_only_within_the_programs_batch_bound(monkeypatch):
    from mobilenet.export.executorch import MAX_BATCH

    names = ["eager", "executorch", "executorch-int8"]
    assert bench.check_engines(names, "mobilenet_v2", 1.0, batch=MAX_BATCH) == names
    assert bench.check_engines(names, "mobilenet_v2", 1.0, batch=MAX_BATCH + 1) == ["eager"]
    with pytest.raises(MobileNetError, match=f"executorch runs batches of 1 to {MAX_BATCH}"):
        bench.check_engines(names, "mobilenet_v2", 1.0, explicit=True, batch=MAX_BATCH + 1)
    assert set(names) <= set(bench.ENGINES)


@pytest.mark.slow  # two .pte exports, one of them int8: about 25 s
@pytest.mark.parametrize("engine", ["executorch", "executorch-int8"])
def test_executorch_engines_run_on_the_threads_asked_for(engine, tmp_path):
    pytest.importorskip("executorch")
    from executorch.extension.pybindings import portable_lib

    from mobilenet.export.executorch import set_pte_threads

    set_pte_threads(2)  # as on a machine of two cores, where the pool starts with two
    cfg = bench.BenchConfig("mobilenet_v1_conv", 0.25, 2, 32, threads=1)
    run = bench.build_engine(engine, cfg, tmp_path)
    assert portable_lib._threadpool_get_thread_count() == 1
    assert run().shape == (2, 1000)


def test_onnx_runtime_spins_only_with_a_core_to_spare(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    images, out = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in "ab")
    identity = helper.make_node("Identity", ["a"], ["b"])
    graph = helper.make_graph([identity], "g", [images], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "m.onnx")
    key = "session.{}_op.allow_spinning"
    quiet = ort_session(tmp_path / "m.onnx", 2, spin=False).get_session_options()
    assert [quiet.get_session_config_entry(key.format(p)) for p in ("intra", "inter")] == ["0"] * 2
    assert quiet.intra_op_num_threads == 2
    spinning = ort_session(tmp_path / "m.onnx", 1, spin=True).get_session_options()
    with pytest.raises(RuntimeError, match="does not have configuration"):
        spinning.get_session_config_entry(key.format("intra"))  # ONNX Runtime's default: spin


def test_bench_json(capsys):
    args = ["bench", "mobilenet_v3_small", "--resolution", "64", "--rounds", "2"]
    args += [
        "--iterations",
        "2",
        "--engines",
        "eager,eager-fused,onnxruntime,torch-int8,torchvision-eager",
    ]
    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert {k: result[k] for k in ("model", "batch", "resolution", "threads")} == {
        "model": "mobilenet_v3_small",
        "batch": 1,
        "resolution": 64,
        "threads": 1,
    }
    engines = {row["engine"]: row for row in result["engines"]}
    assert list(engines) == [
        "eager",
        "eager-fused",
        "onnxruntime",
        "torch-int8",
        "torchvision-eager",
    ]
    assert engines["eager"]["ratio_to_eager"] == 1.0
    assert {engines[e]["best_peer"] for e in engines} <= set(engines)
    assert {"cpu", "busy_other_cores", "onnxruntime_spinning"} <= set(result)
    for row in engines.values():
        assert row["median_ms"] > 0 and row["peak_rss_bytes"] > 0
        assert row["images_per_s"] == pytest.approx(1000 / row["median_ms"], rel=0.01)
    assert "round 2/2" in captured.err  # progress while it runs


def test_bench_unknown_engine(capsys):
    assert main(["bench", "mobilenet_v2", "--engines", "eager,tensorrt"]) == 2
    assert "unknown engine 'tensorrt'" in capsys.readouterr().err


def test_classifier_only_engines_are_left_out_or_refused_for_other_inputs():
    from mobilenet.bench import check_engines

    square_only = ["torch-int8", "executorch", "executorch-int8", "litert", "litert-int8"]
    names = ["eager", "onnxruntime", *square_only]
    kept = check_engines(names, "lraspp_mobilenet_v3_small", 1.0)
    assert kept == ["eager", "onnxruntime"]
    assert check_engines(names, "mobilenet_v2", 1.0, square=False) == ["eager", "onnxruntime"]
    assert "litert" in check_engines(names, "mobilenet_v2", 1.0)
    with pytest.raises(MobileNetError, match="litert runs square classifiers only, not non-sq"):
        check_engines(["eager", "litert"], "mobilenet_v2", 1.0, explicit=True, square=False)
    with pytest.raises(MobileNetError, match="torch-int8 runs square classifiers only, not seg"):
        check_engines(["torch-int8"], "lraspp_mobilenet_v3_small", 1.0, explicit=True)


def test_engines_left_out_are_named_in_one_line(capsys):
    # torchvision has no MobileNetV4: its engine is left out, and the note says so.
    args = ["bench", "mobilenet_v4_conv_small", "--width-mult", "0.5", "--resolution", "32"]
    args += ["--rounds", "1", "--iterations", "1", "--engines", "eager,torchvision-eager"]
    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    assert [row["engine"] for row in json.loads(captured.out)["engines"]] == ["eager"]
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert notes == ["note: left out, not applicable here: torchvision-eager"]
