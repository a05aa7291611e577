"""MkDocs hook: tables of measured figures, generated from the records in benchmarks/.

A page writes a placeholder such as ``<!-- table: engine_grid_batch1 -->`` where a table
belongs; :func:`on_page_markdown` replaces it by the table made from
``benchmarks/engine_grid_batch1.json`` followed by one line naming the machine: the CPU,
its ISA features, the load other processes put on it (where the record has it), the date
and where that date comes from, and the command that made the record. A placeholder that
names no record fails the build, so a page never shows a table that is not there.

The tests import this file by path (``tests/test_doc_tables.py``); it needs nothing but
the standard library.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
PLACEHOLDER = re.compile(r"<!--\s*table:\s*([A-Za-z0-9_.-]+(?::summary)?)\s*-->")

Rows = tuple[list[str], list[list[str]]]


class TableError(Exception):
    """A placeholder names no record, or its record cannot be made into a table."""


# --- reading a record ------------------------------------------------------------------


def record_path(name: str) -> Path:
    """The file a placeholder's name stands for: ``benchmarks/<name>.json``."""
    path = BENCHMARKS / f"{name}.json"
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or not path.is_file():
        raise TableError(f"<!-- table: {name} -->: no record benchmarks/{name}.json")
    return path


def load_record(name: str) -> dict[str, Any]:
    """The record ``benchmarks/<name>.json`` as a dict."""
    path = record_path(name)
    try:
        data = json.loads(path.read_text())
    except ValueError as error:
        raise TableError(f"benchmarks/{name}.json is not JSON: {error}") from error
    if not isinstance(data, dict):
        raise TableError(f"benchmarks/{name}.json does not hold a JSON object")
    return data


def record_names() -> list[str]:
    """Every record the hook can render, by name."""
    return sorted(p.stem for p in BENCHMARKS.glob("*.json"))


def placeholders(markdown: str) -> list[str]:
    """The record names of the placeholders in a page's Markdown."""
    return PLACEHOLDER.findall(markdown)


# --- the machine line --------------------------------------------------------------------


def _walk(value: Any) -> Iterable[tuple[str, Any]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield key, item
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


def cpu_text(rec: dict[str, Any]) -> str:
    """The CPU and its ISA features, as the record gives them."""
    cpu = rec.get("cpu") or next((v for k, v in _walk(rec) if k == "cpu"), None)
    if isinstance(cpu, dict) and cpu.get("model"):
        isa = ", ".join(cpu.get("isa") or []) or "no ISA extension beyond the baseline"
        return f"{cpu['model']}, {cpu.get('cores', '?')} cores ({isa})"
    machines = [v for k, v in _walk(rec) if k == "machine" and isinstance(v, str) and v]
    if isinstance(rec.get("machine"), str) and len(set(machines)) > 1:
        machines = [m for m in machines if m != rec["machine"]]  # "per row": name them
    if machines:
        return f"{' / '.join(dict.fromkeys(machines))} (ISA features not recorded)"
    return "CPU not recorded"


BUSY_KEYS = (
    "busy_other_cores",
    "other_processes_cores_busy",
    "other_processes_busy_cores",
    "other_busy_cores_during_run",
    "cores_busy_before_runs",
)


def load_text(rec: dict[str, Any]) -> str:
    """How busy other processes kept the machine, where the record says."""
    busy = [float(v) for k, v in _walk(rec) if k in BUSY_KEYS and isinstance(v, int | float)]
    if busy:
        return f"other processes kept at most {max(busy):.2f} cores busy"
    if isinstance(rec.get("cores_busy_percent_before"), int | float):
        share = rec["cores_busy_percent_before"]
        return f"other processes kept {share:.0f}% of a core busy before the runs"
    loads = [v for k, v in _walk(rec) if k in ("load_average_at_start", "load_average_before")]
    for value in loads:
        first = value[0] if isinstance(value, list) and value else value
        if isinstance(first, int | float):
            return f"load average {first:.2f} at the start"
    uptime = rec.get("uptime_before")
    if isinstance(uptime, str) and (m := re.search(r"load average:\s*([\d.]+)", uptime)):
        return f"load average {m.group(1)} at the start"
    return "load from other processes not recorded"


def date_text(name: str, rec: dict[str, Any]) -> str:
    """The record's date and where it comes from: the record, git, or the file's mtime."""
    if isinstance(rec.get("date"), str) and rec["date"]:
        return f"{rec['date']} (date in the record)"
    path = record_path(name)
    changed = _git(path, "status", "--porcelain", "--", path.name)
    out = "" if changed else _git(path, "log", "-1", "--format=%cs", "--", path.name)
    if out:
        return f"{out} (last commit that changed the record)"
    day = datetime.date.fromtimestamp(path.stat().st_mtime).isoformat()
    return f"{day} (the record file's modification time)"


def _git(path: Path, *args: str) -> str:
    """What git prints about ``path`` (empty outside a clone or without git)."""
    try:
        return subprocess.run(
            ["git", *args],
            cwd=path.parent,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_line(name: str, rec: dict[str, Any]) -> str:
    """One line under a table: the machine, its load, the date, the command."""
    command = rec.get("command") or rec.get("script") or "; ".join(rec.get("commands") or [])
    where = f"`benchmarks/{name}.json`"
    text = f"Measured on {cpu_text(rec)}; {load_text(rec)}; {date_text(name, rec)}; {where}"
    if isinstance(command, str) and command:
        text += f", made by `{command}`"
    return f"*{text}.*"


# --- formatting --------------------------------------------------------------------------


def ms(value: Any) -> str:
    """Milliseconds: two decimals below 100, one above; '-' when missing."""
    if not isinstance(value, int | float):
        return "-"
    return f"{value:.2f}" if value < 100 else f"{value:.1f}"


def mib(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value / 2**20:.2f} MiB"


def pct(value: Any) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.2f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table (cells escaped for '|')."""
    if not rows:
        raise TableError("the record gives no rows")

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *map(line, rows)])


# --- one renderer per kind of record -----------------------------------------------------


def bench_grid(rec: dict[str, Any], key: str = "points") -> Rows:
    """`mobilenet bench` runs side by side: median ms per batch of every engine."""
    points = rec[key]
    engines = rec.get("engines") or list(
        dict.fromkeys(e["engine"] for p in points for e in p["engines"])
    )
    auto = any("verdict" in p for p in points)
    header = ["model", "batch", "threads", *engines] + (["auto picks"] if auto else [])
    rows = []
    for p in points:
        timed = {e["engine"]: e["median_ms"] for e in p["engines"]}
        cells = [ms(timed.get(e)) if e not in p.get("failed", {}) else "failed" for e in engines]
        row = [p["model"], str(p["batch"]), str(p["threads"]), *cells]
        rows.append(row + ([p.get("verdict", {}).get("auto", "-")] if auto else []))
    return header, rows


def bench_one(rec: dict[str, Any]) -> Rows:
    """One `mobilenet bench` run: every engine with its time and memory."""
    result = rec["result"]
    header = ["engine", "median ms", "images/s", "vs best peer", "peak RSS"]
    rows = [
        [
            e["engine"],
            ms(e["median_ms"]),
            f"{e['images_per_s']:.1f}",
            f"{e['ratio_to_best']:.2f}x {e['best_peer']}" if e.get("best_peer") else "-",
            f"{e['peak_rss_bytes'] / 2**20:.0f} MiB",
        ]
        for e in result["engines"]
    ]
    return header, rows


def change(drop: float) -> str:
    """A drop in top-1 points, written as the change: 0.1 -> '-0.1', -0.5 -> '+0.5'."""
    return "0.0" if abs(drop) < 0.05 else f"{-drop:+.1f}"


def _int8_cell(entry: dict[str, Any] | None, float_top1: float) -> str:
    if not entry:
        return "-"
    base = entry.get("float_top1", float_top1)
    return f"{entry['top1']:.2f} ({change(entry['drop'])} from {base:.2f})"


def int8_mnist(rec: dict[str, Any]) -> Rows:
    """MNIST top-1 of int8 models against the float model each was made from."""
    names = {
        "torch-ptq": "torch PTQ",
        "torch-qat": "torch QAT",
        "onnx-ptq": "ONNX Runtime PTQ",
        "onnx-ptq-int": "ONNX Runtime PTQ, integer-only",
        "openvino-ptq": "OpenVINO PTQ",
    }
    found = {k for r in rec["rows"] for k, v in r.items() if isinstance(v, dict) and "top1" in v}
    methods = {k: names.get(k, k) for k in [*names, *sorted(found - set(names))] if k in found}
    header = ["model", *methods.values()]
    rows = [
        [r["model"], *(_int8_cell(r.get(m), r["float_top1"]) for m in methods)] for r in rec["rows"]
    ]
    return header, rows


def pte_int8_accuracy(rec: dict[str, Any]) -> Rows:
    header = ["model", "PyTorch float32", "`.pte` float32", "`.pte` int8 (change)"]
    rows = [
        [
            r["model"],
            pct(r["pytorch_top1"]),
            pct(r["fp32_pte_top1"]),
            f"{r['int8_pte_top1']:.2f} ({change(r['int8_drop'])})",
        ]
        for r in rec["rows"]
    ]
    return header, rows


def pte_integer_only(rec: dict[str, Any]) -> Rows:
    accuracy = {a["model"]: a for a in rec["accuracy"]}
    header = [
        "model",
        "fp32 ms",
        "int8 ms",
        "int8 integer-only ms",
        "top-1 float",
        "top-1 int8",
        "top-1 integer-only",
    ]
    rows = []
    for s in rec["speed"]:
        a, t = accuracy.get(s["model"], {}), s["median_ms"]
        rows.append(
            [s["model"], ms(t["fp32"]), ms(t["int8"]), ms(t["int8 integer-only"])]
            + [pct(a.get(k)) for k in ("pytorch_top1", "int8_top1", "int8_integer_only_top1")]
        )
    return header, rows


def median_rows(rec: dict[str, Any]) -> Rows:
    """Rows of `{model, median_ms: {variant: ms}}`: one column per variant."""
    variants = list(dict.fromkeys(v for r in rec["rows"] for v in r["median_ms"]))
    header = ["model", *(f"{v} ms" for v in variants)]
    rows = [[r["model"], *(ms(r["median_ms"].get(v)) for v in variants)] for r in rec["rows"]]
    if all("over_fp32" in r or "int8_over_fp32" in r for r in rec["rows"]):
        header.append("int8 / fp32")
        for row, r in zip(rows, rec["rows"], strict=True):
            over = r.get("int8_over_fp32") or min(
                v for k, v in r["over_fp32"].items() if k != "fp32"
            )
            row.append(f"{over:.2f}x")
    return header, rows


def memory_rows(rec: dict[str, Any], key: str) -> Rows:
    """Memory-efficient inference against the standard forward, per model, size and t."""
    header = [
        "model",
        "resolution",
        "t",
        "analytic standard",
        "analytic efficient",
        "measured standard",
        "measured efficient",
        "memory ratio",
        "time ratio",
    ]
    rows = []
    for r in rec[key]:
        measured, time_ms = r["measured"], r["time_ms"]
        rows.append(
            [
                r["model"],
                str(r["resolution"]),
                str(r["splits"]),
                mib(r["analytic"]["standard_bytes"]),
                mib(r["analytic"]["efficient_bytes"]),
                mib(measured["standard_bytes"]),
                mib(measured["efficient_bytes"]),
                f"{measured['efficient_bytes'] / measured['standard_bytes']:.3f}",
                f"{time_ms['efficient'] / time_ms['standard']:.2f}",
            ]
        )
    return header, rows


def memory_labels(rec: dict[str, Any]) -> Rows:
    """The standard forward, the logits executor and the label-map executor: what each
    returns, its measured peak with and without it, and how its label map agrees."""
    header = ["forward", "returns", "measured peak", "without the output", "peak / standard"]
    header += ["time (median)", "label map = standard arg-max"]
    run, unit = rec["default_init"], rec["unit_scale"]
    rows = []
    for key, name in (("standard", "standard"), ("logits", "executor"), ("labels", "executor")):
        out = run["output_bytes"]["labels" if key == "labels" else "logits"]
        kind = f"label map, {run['labels_dtype']}" if key == "labels" else "logits, float32"
        agree = "-"
        if key == "labels":
            agree = ", ".join(
                f"{r['equal_to_standard']:,} of {r['pixels']:,} ({what})"
                for r, what in ((run, "initial BatchNorm"), (unit, "unit-scale logits"))
            )
        measured = run["measured"][key]
        rows.append(
            [
                f"{name}, `output='{key}'`" if name == "executor" else name,
                f"{kind}: {mib(out)}",
                mib(measured),
                mib(run["measured_without_output"][key]),
                f"{measured / run['measured']['standard']:.3f}",
                f"{ms(run['time_ms'][key])} ms",
                agree,
            ]
        )
    # the standard forward's way to the label map: its logits, then their arg-max
    then = ["standard, then `argmax(1)`", "label map, int64", "-", "-", "-"]
    rows.insert(1, [*then, f"{ms(run['time_ms']['standard_argmax'])} ms", "-"])
    return header, rows


def runtime_recipes(rec: dict[str, Any]) -> Rows:
    header = ["model", "variant", "wall ms", "wall / recipe (quartiles)", "CPU ms"]
    rows = []
    for r in rec["rows"]:
        for name, v in r["variants"].items():
            q = v["wall_over_recipe_quartiles"]
            ratio = f"{v['wall_over_recipe']:.3f} ({q[0]:.3f}-{q[1]:.3f})"
            rows.append([r["model"], name, ms(v["wall_ms"]), ratio, ms(v["cpu_ms"])])
    return header, rows


def data_startup(rec: dict[str, Any]) -> Rows:
    header = ["files", "case", "processes", "dataset ready s", "first batch s", "total s"]
    rows = [
        [f"{r['files']:,}", r["case"], str(r["processes"])]
        + [f"{r[k]:.2f}" for k in ("dataset_s", "first_batch_s", "total_s")]
        for r in rec["results"]
    ]
    return header, rows


def shards_startup(rec: dict[str, Any]) -> Rows:
    header = ["images", "processes", "workers", "path to first batch s", "listing s", "imports s"]
    rows = [
        [f"{r['images']:,}", str(r["processes"]), str(r["workers"])]
        + [f"{r[k]:.2f}" for k in ("data_s", "list_s", "imports_s")]
        for r in rec["results"]
    ]
    return header, rows


def train_throughput(rec: dict[str, Any]) -> Rows:
    header = ["variant", "median step s", "images/s", "vs torchvision eager"]
    rows = [
        [
            r["variant"],
            f"{r['median_step_s']:.3f}",
            f"{r['images_per_s']:.2f}",
            f"{r['speedup_vs_torchvision_eager']:.2f}x",
        ]
        for r in rec["results"]
    ]
    return header, rows


def _speed(variant: dict[str, Any]) -> str:
    if "failed" in variant:
        return "failed"
    return f"{variant['images_per_s']:.2f}" if "images_per_s" in variant else "-"


def train_compile(rec: dict[str, Any]) -> Rows:
    """`mobilenet train` eager against `--compile`: the engine's images/s, side by side."""
    header = ["model", "batch", "resolution", "eager images/s", "`--compile` images/s"]
    header += ["compiled / eager", "compile s"]
    rows = []
    for p in rec["points"]:
        speeds = [_speed(p[v]) for v in ("eager", "compiled")]
        ratio = f"{p['compiled_over_eager']:.2f}x" if "compiled_over_eager" in p else "-"
        seconds = f"{p['compile_s']:.0f}" if "compile_s" in p else "-"
        rows.append([p["model"], str(rec["batch"]), str(p["resolution"]), *speeds, ratio, seconds])
    return header, rows


def _top1_spread(arm: dict[str, Any]) -> str:
    return f"{arm['mean']:.2f} ± {arm['std']:.2f} ({arm['min']:.1f} to {arm['max']:.1f})"


def distill_mnist(rec: dict[str, Any]) -> Rows:
    """A small student with and without a teacher: held-out top-1 over seeds, per setting
    (the teacher's is that of the weights the students learn from, on the same digits)."""
    teacher = rec["teacher"]
    header = ["student epochs", "kd alpha, T", "mixup", "teacher top-1", "without teacher"]
    header += ["with teacher", "gain (points)", "gain per seed"]
    rows = []
    for s in rec["settings"]:
        f = s["final_top1"]
        per_seed = ", ".join(f"{g:+.1f}" for g in f["gain_per_seed"].values())
        rows.append(
            [
                str(s["epochs"]),
                f"{s['kd_alpha']:g}, {s['kd_temperature']:g}",
                f"{s.get('mixup', 0.0):g}" if s.get("mixup") else "none",
                f"{teacher.get('held_out_folder_top1', teacher['best_top1']):.1f}",
                _top1_spread(f["without_teacher"]),
                _top1_spread(f["with_teacher"]),
                f"{f['gain']:+.2f}",
                per_seed,
            ]
        )
    return header, rows


def v5_encoder(rec: dict[str, Any]) -> Rows:
    """MobileNetV5's encoder per engine, input size and thread count: latency of one
    image and the process's peak memory, loading included; the points not run, why."""
    header = ["engine", "input", "threads", "latency (ms)", "peak memory (process RSS)"]
    rows = []
    for key, point in rec["points"].items():
        engine, res, threads = key.split("/")
        latency = ms(point["latency_s"] * 1e3)
        rows.append([engine, f"{res}x{res}", threads, latency, mib(point["peak_rss_bytes"])])
    for key, why in rec["not_run"].items():
        if key.count("/") != 2:  # a step that is not a timed point (the cosine's)
            continue
        engine, res, threads = key.split("/")
        rows.append([engine, f"{res}x{res}", threads, why, "-"])
    for key, file in rec["files"].items():
        if "not written" in file:
            kind, res = key.split("/")
            rows.append([f"({kind} file)", f"{res}x{res}", "-", file["not written"], "-"])
    return header, rows


def v5_encoder_cosine(rec: dict[str, Any]) -> Rows:
    """The int8 file's map against the float encoder's, photograph by photograph."""
    cosines = rec["int8_cosine_on_photos"]
    header = ["photograph", "cosine (whole map)", "tokens: mean", "tokens: least"]
    header.append("relative RMS error")
    keys = ("map", "tokens_mean", "tokens_min", "relative_rms_error")
    rows = [
        [name, *(f"{c[k]:.4f}" for k in keys)] for name, c in cosines.items() if isinstance(c, dict)
    ]
    return header, rows


def load_checks(rec: dict[str, Any]) -> Rows:
    header = [
        "file",
        "size",
        "cold `predict`",
        "checks",
        "share",
        "first read: checks of `predict`",
    ]
    rows = [
        [
            f"`{r['format']}`",
            f"{r['file_mb']:.1f} MB",
            f"{r['cold_predict_s']:.2f} s",
            f"{r['checks_s'] * 1000:.0f} ms",
            f"{r['checks_share'] * 100:.1f}%",
            f"{r['first_checks_s']:.2f} s of {r['first_cold_predict_s']:.2f} s",
        ]
        for r in rec["results"]
    ]
    return header, rows


def hostile_files(rec: dict[str, Any]) -> Rows:
    outcomes = list(dict.fromkeys(c["outcome"] for c in rec["counts"]))
    cases: dict[tuple[str, str], dict[str, int]] = {}
    for c in rec["counts"]:
        cases.setdefault((c["format"], c["kind"]), {})[c["outcome"]] = c["files"]
    header = ["file", "change", *outcomes]
    rows = [
        [f"`{fmt}`", kind, *(str(counts.get(o, 0)) for o in outcomes)]
        for (fmt, kind), counts in sorted(cases.items())
    ]
    return header, rows


def history(rec: dict[str, Any]) -> Rows:
    """A training run's epochs: every scalar the record keeps per epoch."""
    epochs = rec["history"]
    keys = list(dict.fromkeys(k for e in epochs for k, v in e.items() if _is_number(v)))
    rows = [[_scalar(e[k]) if _is_number(e.get(k)) else "-" for k in keys] for e in epochs]
    return [k.replace("_", " ") for k in keys], rows


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _scalar(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if value != 0 and abs(value) < 1e-2:
        return f"{value:.2e}"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"


SKIP = {"command", "machine", "cpu", "script", "torch", "python", "date", "note"}


def summary(rec: dict[str, Any]) -> Rows:
    """Any record: its figures (numbers, one level of nesting) as name | value."""
    rows = []
    for key, value in rec.items():
        if key in SKIP or key in BUSY_KEYS or key.startswith(("uptime", "load_average")):
            continue
        if isinstance(value, dict):
            for sub, item in value.items():
                if isinstance(item, int | float) and not isinstance(item, bool):
                    rows.append(
                        [f"{key.replace('_', ' ')}: {sub.replace('_', ' ')}", _scalar(item)]
                    )
        elif isinstance(value, int | float) and not isinstance(value, bool):
            rows.append([key.replace("_", " "), _scalar(value)])
    return ["figure", "value"], rows


RENDERERS: dict[str, Callable[[dict[str, Any]], Rows]] = {
    "engine_grid": bench_grid,
    "engine_grid_batch1": bench_grid,
    "engine_grid_batch32": bench_grid,
    "inference_bench": lambda r: bench_grid(r, "results"),
    "inference_bench_all_engines": lambda r: bench_grid(r, "results"),
    "v4_bench": bench_one,
    "int8_mnist": int8_mnist,
    "pte_int8_accuracy": pte_int8_accuracy,
    "pte_integer_only": pte_integer_only,
    "litert_int8": median_rows,
    "ort_float_head": median_rows,
    "memory_efficient": lambda r: memory_rows(r, "results"),
    "memory_v4": lambda r: memory_rows(r, "rows"),
    "memory_labels": memory_labels,
    "runtime_recipes": runtime_recipes,
    "data_startup": data_startup,
    "shards_startup": shards_startup,
    "train_throughput": train_throughput,
    "train_compile": train_compile,
    "distill_mnist": distill_mnist,
    "load_checks": load_checks,
    "v5_encoder": v5_encoder,
    "v5_encoder:cosine": v5_encoder_cosine,
    "hostile_files": hostile_files,
    "detection_mnist": history,
    "detection_mnist_4000_images": history,
    "segmentation_mnist": history,
}


def render(name: str) -> str:
    """The table of record ``name`` (a specific one where it has one, its figures
    otherwise; ``NAME:VIEW`` asks for another of its tables, ``NAME:summary`` for its
    figures) and the machine line under it."""
    name, _, view = name.partition(":")
    rec = load_record(name)
    try:
        renderer = RENDERERS.get(f"{name}:{view}" if view else name, summary)
        header, rows = renderer(rec)
        table = markdown_table(header, rows)
    except (KeyError, TypeError, IndexError, ValueError) as error:
        raise TableError(f"benchmarks/{name}.json: cannot make its table ({error!r})") from error
    return f"{table}\n\n{machine_line(name, rec)}"


def on_page_markdown(markdown: str, page: Any = None, **kwargs: Any) -> str:
    """MkDocs event: every ``<!-- table: NAME -->`` becomes NAME's table; an unknown
    NAME stops the build."""
    where = getattr(getattr(page, "file", None), "src_uri", "a page")
    try:
        return PLACEHOLDER.sub(lambda m: render(m.group(1)), markdown)
    except TableError as error:
        raise build_error(f"{where}: {error}") from error


def build_error(message: str) -> Exception:
    """The error MkDocs reports without a traceback (PluginError), if MkDocs is there."""
    try:
        from mkdocs.exceptions import PluginError
    except ImportError:
        return TableError(message)
    return PluginError(message)
