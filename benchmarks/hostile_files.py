"""A campaign of hostile files against ``mobilenet predict``: what a damaged or crafted file
makes the command do.

A small classifier (mobilenet_v3_small, width 0.5, 10 classes, 64x64, BatchNorm statistics
measured on random images) is exported to every format (``.onnx``, ``.pt2``, ``.pte``,
``.tflite``) and saved as our safetensors; each file is then changed in many ways, and
``mobilenet predict --json`` runs on every changed copy in a child process of its own:

  flip        one byte of the file changed at random (a damaged download, a bad disk)
  flip-sealed the same, then the file's digest computed again: what a crafted file can
              carry, so the change reaches the runtime's own reader
  cut         the file cut short at a random length
  names       (.pt2) a graph name, an argument name or a shape expression replaced by
              code or by an expression that would compute without end, the archive
              rebuilt with correct CRCs and digest

Every outcome is one of:

  refused     exit status 2 and one line ``mobilenet predict: error: ...``, the last
              (the preprocessing line and warnings, a line each, may come before it)
  same        exit status 0 and the scores of the unchanged file: the change did not
              touch what the model computes
  changed     exit status 0 and other scores: a wrong result accepted in silence
  other model exit status 0 and other scores from a ``flip-sealed`` file: its weights
              changed and its digest made to match, it is another model as far as any
              reader can tell (a digest finds damage; it does not authenticate)
  traceback   a Python traceback
  crash       the process killed by a signal, or another exit status, without a line
  hang        no answer within the limit (``--timeout``)
  code ran    a marker file written by code placed in the file

Only ``refused``, ``same`` and ``other model`` are acceptable. The counts by format, kind
and outcome, and one example of each unacceptable outcome, are written to JSON with the
CPU and the load from other processes.

    python benchmarks/hostile_files.py [--cases 40] [--seed 1] [--out hostile_files.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
FORMATS = (".safetensors", ".onnx", ".pt2", ".pte", ".tflite")
RESOLUTION = 64
MARKER = "PWNED"
ACCEPTABLE = ("refused", "same", "other model")


def build(folder: Path) -> dict[str, Path]:
    """The model saved and exported to every format, and one image."""
    import numpy as np
    import torch
    from PIL import Image

    from mobilenet import create_model
    from mobilenet.cli import main
    from mobilenet.export.prepare import measure_batchnorm
    from mobilenet.weights import save_weights

    torch.manual_seed(0)
    model = create_model("mobilenet_v3_small", width_mult=0.5, num_classes=10)
    measure_batchnorm(model, [torch.randn(8, 3, RESOLUTION, RESOLUTION)])
    files = {".safetensors": folder / "model.safetensors"}
    save_weights(model, files[".safetensors"])
    for suffix in FORMATS[1:]:
        out = folder / f"model{suffix}"
        code = main(
            ["export", "--weights", str(files[".safetensors"]), "--out", str(out),
             "--resolution", str(RESOLUTION)]
        )  # fmt: skip
        if code != 0:
            raise SystemExit(f"export to {suffix} failed")
        files[suffix] = out
    rng = np.random.default_rng(0)
    image = folder / "image.png"
    Image.fromarray(rng.integers(0, 255, (80, 80, 3), dtype=np.uint8)).save(image)
    files["image"] = image
    return files


def rezip(data: bytes, edit) -> bytes:
    """A ``.pt2`` archive rebuilt with ``edit(name, bytes) -> bytes`` applied to its
    records, its CRCs and its digest correct, as a crafter would make it."""
    from mobilenet.export.pt2 import records_digest

    with zipfile.ZipFile(io.BytesIO(data)) as z:
        records = {i.filename: edit(i.filename, z.read(i)) for i in z.infolist()}
    meta_name = next(n for n in records if n.endswith("/extra/mobilenet.json"))
    others = {n.split("/", 1)[-1]: v for n, v in records.items() if n != meta_name}
    meta = json.loads(records[meta_name])
    records[meta_name] = json.dumps({**meta, "digest": records_digest(others)}).encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as z:
        for name, value in records.items():
            z.writestr(name, value)
    return buffer.getvalue()


def name_attacks(marker: Path) -> list[tuple[str, object]]:
    """(kind, edit of models/model.json's text) pairs: code in names, endless shapes."""
    code = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    return [
        ("names:input", lambda t: t.replace('"x"', json.dumps(f"x=({code})"), 1)),
        ("names:node", lambda t: _replace_nth(t, '"name": "', f'"name": "({code})or_', 3)),
        ("names:argument", lambda t: t.replace('"input"', json.dumps(f"input;{code}"), 1)),
        ("names:expression", lambda t: _expression(t, "9**9**9**9")),
        ("names:expression-int", lambda t: _expression(t, f"Integer({'9' * 5000})")),
        ("names:expression-code", lambda t: _expression(t, f"Symbol({code!r})")),
    ]


def _expression(text: str, expression: str) -> str:
    """``text`` with its first shape expression replaced by ``expression``."""
    return re.sub(r'"expr_str": "[^"]*"', lambda _: f'"expr_str": {json.dumps(expression)}',
                  text, count=1)  # fmt: skip


def _replace_nth(text: str, old: str, new: str, n: int) -> str:
    at = -1
    for _ in range(n):
        at = text.find(old, at + 1)
        if at < 0:
            return text
    return text[:at] + new + text[at + len(old) :]


def cases(files: dict[str, Path], n: int, seed: int, marker: Path):
    """(format, kind, bytes) of every changed file."""
    from mobilenet.integrity import reseal

    rng = random.Random(seed)
    for suffix in FORMATS:
        data = files[suffix].read_bytes()
        for _ in range(n):
            at = rng.randrange(len(data))
            flipped = data[:at] + bytes([data[at] ^ (1 << rng.randrange(8))]) + data[at + 1 :]
            yield suffix, "flip", flipped
            if suffix != ".pt2":
                yield suffix, "flip-sealed", reseal(flipped)
            else:  # a record's byte changed, the archive's CRCs and digest made right again
                names = zipfile.ZipFile(io.BytesIO(data)).namelist()
                target = rng.choice([m for m in names if not m.startswith("extra/")])

                def edit(name, value, target=target):
                    if name != target or not value:
                        return value
                    i = rng.randrange(len(value))
                    return value[:i] + bytes([value[i] ^ 0x10]) + value[i + 1 :]

                yield suffix, "flip-sealed", rezip(data, edit)
        for _ in range(max(1, n // 4)):
            yield suffix, "cut", data[: rng.randrange(len(data))]
    data = files[".pt2"].read_bytes()
    for kind, attack in name_attacks(marker):

        def edit(name, value, attack=attack):
            return attack(value.decode()).encode() if name.endswith("models/model.json") else value

        yield ".pt2", kind, rezip(data, edit)


def run(path: Path, image: Path, timeout: float, env: dict) -> tuple[str, str]:
    """(outcome before comparing scores, stdout or the stderr that decided it)."""
    command = [sys.executable, "-m", "mobilenet", "predict", "--json", "--weights", str(path),
               str(image)]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return "hang", ""
    err = result.stderr
    if "Traceback" in err:
        return "traceback", err[-2000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("mobilenet predict: error: ")]
    if result.returncode == 2 and len(errors) == 1 and lines[-1] == errors[0]:
        return "refused", errors[0]
    if result.returncode == 0 and not errors:
        return "ran", result.stdout
    signal = f" (signal {-result.returncode})" if result.returncode < 0 else ""
    return "crash", f"exit {result.returncode}{signal}: {err[-2000:]}"


def scores(stdout: str) -> list:
    return [
        [(t["class"], round(t["probability"], 6)) for t in r["top"]] for r in json.loads(stdout)
    ]


def main() -> None:
    from mobilenet.machine import cpu, load_snapshot, others_since

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=40, help="changed files per format and kind")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=HERE / "hostile_files.json")
    args = parser.parse_args()

    start = load_snapshot()
    began = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MOBILENET_HOME": str(folder / "home")}
        files = build(folder)
        marker = folder / MARKER
        baseline = {}
        for suffix in FORMATS:
            outcome, text = run(files[suffix], files["image"], args.timeout, env)
            if outcome != "ran":
                raise SystemExit(f"the unchanged {suffix} file does not run: {text}")
            baseline[suffix] = scores(text)
        counts: Counter[tuple[str, str, str]] = Counter()
        examples: dict[str, str] = {}
        for i, (suffix, kind, data) in enumerate(cases(files, args.cases, args.seed, marker)):
            path = folder / f"case{i}{suffix}"
            path.write_bytes(data)
            outcome, text = run(path, files["image"], args.timeout, env)
            if outcome == "ran":
                same = scores(text) == baseline[suffix]
                # A file sealed anew after its weights changed is another model with a
                # valid digest: nothing can tell it from one exported so.
                outcome = "same" if same else "other model" if kind == "flip-sealed" else "changed"
            if marker.exists():
                outcome = "code ran"
                marker.unlink()
            counts[suffix, kind, outcome] += 1
            if outcome not in ACCEPTABLE:
                examples.setdefault(f"{suffix} {kind} {outcome}", text[-600:])
            print(f"{i:4d} {suffix:12s} {kind:22s} {outcome:9s} {text.strip()[-110:]!r}")
            path.unlink()
    record = {
        "benchmark": "hostile files against mobilenet predict",
        "command": "python benchmarks/hostile_files.py " + " ".join(sys.argv[1:]),
        "cpu": cpu(),
        "python": sys.version.split()[0],
        "date": time.strftime("%Y-%m-%d", time.gmtime(began)),
        "other_processes_cores_busy": others_since(start),
        "model": f"mobilenet_v3_small width 0.5, 10 classes, {RESOLUTION}x{RESOLUTION}",
        "counts": [
            {"format": s, "kind": k, "outcome": o, "files": n}
            for (s, k, o), n in sorted(counts.items())
        ],
        "unacceptable": sum(n for (_, _, o), n in counts.items() if o not in ACCEPTABLE),
        "examples": examples,
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"{sum(counts.values())} files, {record['unacceptable']} unacceptable -> {args.out}")


if __name__ == "__main__":
    main()
