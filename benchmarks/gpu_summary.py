"""One short summary of a ``benchmarks/gpu_check.sh`` run (or of any folder of benchmark outputs).

    python benchmarks/gpu_summary.py runs/gpu-check-20261201-0010      # what gpu_check.sh runs last
    python benchmarks/gpu_summary.py benchmarks/measured/h200-2026-12-01   # markdown tables only

Reads what the scripts already write, in ``DIR`` or ``DIR/bench``:

* ``phases.tsv`` (gpu_check.sh: phase, exit code, seconds, note) and ``meta.txt`` (key=value);
* ``tests.xml`` (pytest's junit XML; else the last count line of ``tests.log``);
* ``bench_kernels_<dev>``, ``bench_step_<dev>``, ``bench_train_fixed_<dev>`` / ``bench_train_<dev>``:
  the ``.csv`` if there is one, else the tables of the ``.md``.

Prints the test counts, the % of copy bandwidth of every op per backend (and of the baselines),
the step-time ratios against torch's foreach/fused steps and the authors' loop, and vSAM's
end-to-end overhead against its ideal; writes the same text to ``DIR/summary.md`` and the
numbers to ``DIR/summary.json``. Exit status: 0 when every recorded phase exited 0 and no test
failed, 1 otherwise (2: nothing to summarise).
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import os
import re
import sys
import xml.etree.ElementTree as ET
from collections import Counter
from typing import Dict, List, Optional, Tuple

KERNEL_TARGET = 85.0          # % of copy bandwidth, fused ops at >= 50 M parameters
VSAM_TARGET = 3.0             # % over its ideal, end to end
STEP_TARGETS = [("vsam_reuse", "resnet50", "foreach", 3.0), ("vsam_reuse", "resnet50", "authors", 10.0)]
BACKEND_ORDER = ["cuda", "triton", "cpu", "reference"]


# -- small helpers -------------------------------------------------------------------------------
def _num(s) -> Optional[float]:
    if s is None:
        return None
    s = str(s).strip().replace(",", "").rstrip("x%")
    if s in ("", "-", "OOM", "None"):
        return None
    try:
        return float(s)
    except ValueError:
        return None


def _count(s: str) -> Optional[float]:
    """'67.1M' -> 67.1e6 (the tables' fmt_count), plain numbers as they are."""
    s = s.strip()
    m = re.fullmatch(r"([\d.]+)\s*([KMB]?)", s)
    if not m:
        return _num(s)
    return float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[m.group(2)]


def _fmt_count(n: float) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            v = n / div
            return f"{v:.0f}{suffix}" if v >= 100 or v == int(v) else f"{v:.3g}{suffix}"
    return str(int(n))


def _x(v: Optional[float]) -> str:
    return "-" if v is None else (f"{v:.1f}x" if v >= 10 else f"{v:.2f}x")


def _ms(v: Optional[float]) -> str:
    return "-" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.3g}")


def _pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.0f}%"


def _short(impl: str) -> str:
    return impl[len("vsam_ext["):-1] if impl.startswith("vsam_ext[") else impl


def _backend_key(b: str) -> int:
    return BACKEND_ORDER.index(b) if b in BACKEND_ORDER else len(BACKEND_ORDER)


def table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda vals: "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "| " + " | ".join("-" * w for w in widths) + " |"] + [line(r) for r in rows])


def _find(folder: str, pattern: str) -> Optional[str]:
    for sub in ("", "bench"):
        hits = sorted(glob.glob(os.path.join(folder, sub, pattern)))
        if hits:
            return hits[0]
    return None


def _read_csv(path: str) -> List[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _md_tables(path: str) -> List[Tuple[str, List[str], List[List[str]]]]:
    """(### heading, header cells, rows of cells) of every table under a ### heading."""
    out, heading, header, rows = [], "", None, []
    with open(path) as f:
        lines = f.read().splitlines() + [""]
    for line in lines:
        s = line.strip()
        if s.startswith("|"):
            cells = [c.strip() for c in s.strip("|").split("|")]
            if header is None:
                header = cells
            elif not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
            continue
        if header is not None:
            out.append((heading, header, rows))
            header, rows = None, []
        if s.startswith("### "):
            heading = s[4:]
    return out


def _md_header(path: str) -> Dict[str, str]:
    info = {}
    with open(path) as f:
        for line in f:
            m = re.match(r"\* (device|torch|triton|vsam_ext|date|command|training): (.*)", line.strip())
            if m:
                info.setdefault(m.group(1), m.group(2).strip("`"))
    return info


def _cell3(cell: str) -> Tuple[Optional[float], Optional[float], Optional[float]]:
    """'0.273 / 3939 / 95%' -> (ms, GB/s, % copy)."""
    parts = [p.strip() for p in cell.split("/")]
    if len(parts) != 3:
        return None, None, None
    return _num(parts[0]), _num(parts[1]), _num(parts[2])


# -- loading ---------------------------------------------------------------------------------------
def load_kernels(folder: str):
    """rows {op, params, layers, impl, ms, pct_copy}, copy GB/s, header info, source path."""
    path = _find(folder, "bench_kernels_*.csv")
    md = _find(folder, "bench_kernels_*.md")
    info = _md_header(md) if md else {}
    if path:
        rows = [{"op": r["op"], "params": _num(r["params"]), "layers": int(_num(r["layers"]) or 0),
                 "impl": r["impl"], "ms": _num(r["ms"]), "pct_copy": _num(r["pct_copy"])} for r in _read_csv(path)]
        copy = next((_num(r["copy_gbps"]) for r in _read_csv(path) if _num(r.get("copy_gbps"))), None)
        return rows, copy, info, path
    if not md:
        return [], None, {}, None
    rows = []
    for heading, header, cells in _md_tables(md):
        m = re.match(r"(\S+) \(\d+ bytes/param", heading)
        if not m or header[:2] != ["params", "layers"]:
            continue
        for c in cells:
            for impl, cell in zip(header[2:], c[2:]):
                ms, _, pct = _cell3(cell)
                rows.append({"op": m.group(1), "params": _count(c[0]), "layers": int(_num(c[1]) or 0),
                             "impl": impl, "ms": ms, "pct_copy": pct})
    with open(md) as f:
        m = re.search(r"\*\*([\d.]+) GB/s\*\*", f.read())
    return rows, (float(m.group(1)) if m else None), info, md


def load_step(folder: str):
    """rows {model, params, step, impl, ms, pct_copy}, header info, source path."""
    path = _find(folder, "bench_step_*.csv")
    md = _find(folder, "bench_step_*.md")
    info = _md_header(md) if md else {}
    if path:
        rows = [{"model": r["model"], "params": _num(r["params"]), "step": r["step"], "impl": r["impl"],
                 "ms": _num(r["ms"]), "pct_copy": _num(r["pct_copy"])} for r in _read_csv(path)]
        return rows, info, path
    if not md:
        return [], {}, None
    rows = []
    for heading, header, cells in _md_tables(md):
        m = re.match(r"(\S+) \(\d+ bytes/param", heading)
        if not m or header[:3] != ["model", "params", "tensors"]:
            continue
        for c in cells:
            for impl, cell in zip(header[3:], c[3:]):
                ms, _, pct = _cell3(cell)
                rows.append({"model": c[0], "params": _count(c[1]), "step": m.group(1), "impl": impl,
                             "ms": ms, "pct_copy": pct})
    return rows, info, md


def load_train(folder: str):
    """rows {model, method, backend, n_sam, steps, ms_per_step, overhead_pct}, fixed?, info, path."""
    for name, fixed in (("bench_train_fixed", True), ("bench_train", False)):
        path = _find(folder, f"{name}_*.csv")
        md = _find(folder, f"{name}_*.md")
        if not (path or md):
            continue
        info = _md_header(md) if md else {}
        if path:
            rows = [{"model": r["model"], "method": r["method"], "backend": r["backend"],
                     "n_sam": int(_num(r["n_sam"]) or 0), "steps": int(_num(r["steps"]) or 0),
                     "batch": int(_num(r["batch"]) or 0), "ms_per_step": _num(r["ms_per_step"]),
                     "overhead_pct": _num(r["overhead_pct"])} for r in _read_csv(path)]
            return rows, fixed, info, path
        rows = []
        for heading, header, cells in _md_tables(md):
            m = re.match(r"(\S+) \(.* parameters, batch (\d+)\)", heading)
            if not m or "method" not in header:
                continue
            col = {h: i for i, h in enumerate(header)}
            for c in cells:
                done, _, total = c[col["SAM steps"]].partition("/")
                rows.append({"model": m.group(1), "method": c[col["method"]], "backend": c[col["backend"]],
                             "n_sam": int(_num(done) or 0), "steps": int(_num(total) or 0),
                             "batch": int(m.group(2)), "ms_per_step": _num(c[col["ms/step"]]),
                             "overhead_pct": _num(c[col["overhead vs ideal"]])})
        fixed = fixed or "fixed batch" in info.get("training", "")
        return rows, fixed, info, md
    return [], False, {}, None


def load_tests(folder: str) -> Optional[dict]:
    xml = os.path.join(folder, "tests.xml")
    res = None
    if os.path.exists(xml) and os.path.getsize(xml) > 0:
        try:
            res = _junit(xml)
        except ET.ParseError as exc:
            res = {"error": f"tests.xml unreadable: {exc}"}
    log = os.path.join(folder, "tests.log")
    if (res is None or "error" in res) and os.path.exists(log):
        with open(log, errors="replace") as f:
            lines = [ln for ln in f.read().splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
        if lines:
            counts = Counter({k: int(v) for v, k in re.findall(
                r"(\d+) (passed|failed|skipped|xfailed|xpassed|errors?|deselected)", lines[-1])})
            if "error" in counts:
                counts["errors"] += counts.pop("error")
            res = {"counts": dict(counts), "failed": [], "by_file": {}, "source": "tests.log"}
    rc_path = os.path.join(folder, "tests.rc")
    if res is not None and os.path.exists(rc_path):
        res["rc"] = int((open(rc_path).read().strip() or "0").split()[0])
    return res


def _junit(path: str) -> dict:
    root = ET.parse(path).getroot()
    counts, failed, by_file = Counter(), [], Counter()
    for case in root.iter("testcase"):
        kinds = {child.tag: child for child in case}
        cls = case.get("classname", "")
        test_id = f"{cls.rsplit('.', 1)[-1]}.py::{case.get('name')}" if cls else case.get("name", "?")
        if "failure" in kinds or "error" in kinds:
            kind = "failed" if "failure" in kinds else "errors"
            counts[kind] += 1
            msg = (kinds.get("failure") if "failure" in kinds else kinds["error"]).get("message", "") or ""
            failed.append((test_id, msg.strip().splitlines()[0][:140] if msg.strip() else ""))
            by_file[test_id.split("::")[0]] += 1
        elif "skipped" in kinds:
            counts["xfailed" if kinds["skipped"].get("type") == "pytest.xfail" else "skipped"] += 1
        else:
            counts["passed"] += 1
    return {"counts": dict(counts), "failed": failed, "by_file": dict(by_file.most_common()), "source": "tests.xml"}


def load_phases(folder: str) -> List[dict]:
    path = os.path.join(folder, "phases.tsv")
    phases = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3:
                    phases.append({"phase": parts[0], "rc": parts[1], "seconds": _num(parts[2]),
                                   "note": parts[3] if len(parts) > 3 else ""})
    return phases


def load_meta(folder: str) -> Dict[str, str]:
    path = os.path.join(folder, "meta.txt")
    meta = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                k, sep, v = line.rstrip("\n").partition("=")
                if sep:
                    meta[k.strip()] = v.strip()
    return meta


# -- the summary -----------------------------------------------------------------------------------
def summarise(folder: str) -> Tuple[str, dict, bool]:
    """(text, numbers, ok)."""
    meta, phases, tests = load_meta(folder), load_phases(folder), load_tests(folder)
    k_rows, copy_gbps, k_info, k_path = load_kernels(folder)
    s_rows, s_info, s_path = load_step(folder)
    t_rows, fixed, t_info, t_path = load_train(folder)
    data: dict = {"folder": folder, "meta": meta, "phases": phases}
    out: List[str] = [f"# vsam_ext GPU check — {os.path.basename(os.path.abspath(folder))}", ""]
    problems: List[str] = []

    info = k_info or s_info or t_info
    if meta.get("mode") == "cpu-smoke" or (info.get("device") and "CUDA" not in info.get("device", "")):
        out += ["**CPU smoke run, no GPU: the CUDA parts were skipped; the numbers below are not a "
                "measurement.**", ""]
    for key in ("device", "torch", "triton", "vsam_ext"):
        value = meta.get(key) or info.get(key)
        if value:
            out.append(f"* {key}: {value}")
    if meta.get("backends"):
        out.append(f"* backends: {meta['backends']}")
    if meta.get("date") or info.get("date"):
        out.append(f"* date: {meta.get('date') or info.get('date')}")
    if meta.get("command"):
        out.append(f"* command: `{meta['command']}`")
    if phases:
        cells = []
        for p in phases:
            sec = "" if p["seconds"] is None else f" {p['seconds']:.0f} s"
            state = {"0": "ok", "skip": "skipped"}.get(p["rc"], f"FAILED rc {p['rc']}")
            if p["rc"] == "124":
                state = "TIMED OUT (rc 124)"
            cells.append(f"{p['phase']} {state}{sec}" + (f" ({p['note']})" if p["note"] else ""))
            if p["rc"] not in ("0", "skip"):
                problems.append(f"{p['phase']} exited {p['rc']}")
        out.append("* phases: " + "; ".join(cells))
    out.append("")

    # tests
    if tests is not None:
        c = tests.get("counts", {})
        data["tests"] = tests
        if "error" in tests:
            out.append(f"## Tests: {tests['error']}")
            problems.append(tests["error"])
        else:
            order = ["passed", "failed", "errors", "skipped", "xfailed", "xpassed", "deselected"]
            text = ", ".join(f"{c[k]} {k}" for k in order if c.get(k))
            out.append(f"## Tests: {text or 'none ran'}" + (f" (pytest exit {tests['rc']})" if "rc" in tests else ""))
            if tests.get("by_file"):
                out.append("failed by file: " + ", ".join(f"{f} {n}" for f, n in tests["by_file"].items()))
            for test_id, msg in tests.get("failed", [])[:6]:
                out.append(f"* {test_id}" + (f": {msg}" if msg else ""))
            if len(tests.get("failed", [])) > 6:
                out.append(f"* ... {len(tests['failed']) - 6} more in tests.log / tests.xml")
            n_bad = c.get("failed", 0) + c.get("errors", 0)
            if n_bad:
                problems.append(f"{n_bad} test(s) failed")
            elif tests.get("rc") not in (None, 0):
                problems.append(f"pytest exited {tests['rc']}")
        out.append("")

    # kernels: % of copy per op and implementation, at the largest size, worst over the layer counts
    if k_rows:
        top = max(r["params"] for r in k_rows if r["params"])
        big = [r for r in k_rows if r["params"] == top and r["op"] != "copy"]
        impls = sorted({r["impl"] for r in big if r["impl"].startswith("vsam_ext[") and r["impl"] != "vsam_ext[reference]"},
                       key=lambda i: _backend_key(_short(i)))
        impls += [i for i in ("torch-fused", "foreach", "authors") if any(r["impl"] == i for r in big)]
        layers = sorted({r["layers"] for r in big})
        out.append(f"## Kernels: % of copy bandwidth ({copy_gbps:.0f} GB/s) at {_fmt_count(top)} parameters, worst "
                   f"over {', '.join(map(str, layers))} layer(s); target >= {KERNEL_TARGET:.0f}% for ours at >= 50M"
                   if copy_gbps else "## Kernels: % of copy bandwidth")
        ops = list(dict.fromkeys(r["op"] for r in big))
        rows, kern = [], {}
        for op in ops:
            line = [op]
            for impl in impls:
                vals = [r["pct_copy"] for r in big if r["op"] == op and r["impl"] == impl]
                vals = [v for v in vals if v is not None]
                worst = min(vals) if vals else None
                kern.setdefault(_short(impl), {})[op] = worst
                line.append(_pct(worst))
            rows.append(line)
        out.append(table(rows, ["op"] + [_short(i) for i in impls]))
        below = [f"{op} [{b}] {v:.0f}%" for b, d in kern.items() if b in BACKEND_ORDER
                 for op, v in d.items() if v is not None and v < KERNEL_TARGET]
        if top >= 50e6:
            out.append("below the target: " + (", ".join(below) if below else "none"))
        else:
            out.append(f"(the target applies at >= 50M parameters; this run's largest size is {_fmt_count(top)})")
        data["kernels"] = {"params": top, "layers": layers, "copy_gbps": copy_gbps, "pct_copy": kern,
                           "source": k_path}
        out.append("")

    # step: time ratios, baseline / ours
    if s_rows:
        ms = {(r["model"], r["step"], r["impl"]): r["ms"] for r in s_rows if r["ms"]}
        models = list(dict.fromkeys(r["model"] for r in s_rows))
        ours = sorted({r["impl"] for r in s_rows if r["impl"].startswith("vsam_ext[") and r["impl"] != "vsam_ext[reference]"},
                      key=lambda i: _backend_key(_short(i)))
        cols = [("sgd", "torch-fused"), ("sgd", "foreach"), ("sam", "foreach"), ("sam", "authors"),
                ("vsam_sampling", "foreach"), ("vsam_sampling", "authors"), ("vsam_reuse", "foreach"),
                ("vsam_reuse", "authors")]
        cols = [c for c in cols if any(k[1] == c[0] and k[2] == c[1] for k in ms)]
        out.append("## Optimizer step: their time / ours (> 1: ours faster); baselines: torch SGD(fused=True), "
                   "a torch._foreach_* chain around SGD(foreach=True), the authors' per-parameter loop")
        rows, ratios = [], {}
        for model in models:
            for impl in ours:
                line = [model, _short(impl)]
                for step, other in cols:
                    t_ours, t_other = ms.get((model, step, impl)), ms.get((model, step, other))
                    x = t_other / t_ours if (t_ours and t_other) else None
                    ratios.setdefault(model, {}).setdefault(_short(impl), {})[f"{step} vs {other}"] = x
                    line.append(_x(x))
                rows.append(line)
        out.append(table(rows, ["model", "ours"] + [f"{s} vs {o}" for s, o in cols]))
        tline = []
        for step, model, other, target in STEP_TARGETS:
            for impl in ours:
                x = ratios.get(model, {}).get(_short(impl), {}).get(f"{step} vs {other}")
                if x is not None:
                    tline.append(f"{_short(impl)} {x:.2f}x ({'met' if x >= target else 'NOT met'})")
            if tline:
                out.append(f"target {step} >= {target:g}x {other} at {model}: " + ", ".join(tline))
                tline = []
        data["step"] = {"ratios": ratios, "source": s_path}
        out.append("")

    # train: end to end
    if t_rows:
        for model in dict.fromkeys(r["model"] for r in t_rows):
            mine = [r for r in t_rows if r["model"] == model]
            by = {r["method"]: r for r in mine}
            what = "one fixed batch on the device, no data loading" if fixed else "DataLoader included"
            out.append(f"## End to end: {model}, batch {mine[0]['batch']}, {mine[0]['steps']} timed steps ({what})")
            rows = [[r["method"], r["backend"], _ms(r["ms_per_step"]),
                     f"{r['n_sam']}/{r['steps']}",
                     "-" if r["overhead_pct"] is None else f"{r['overhead_pct']:+.1f}%"] for r in mine]
            out.append(table(rows, ["method", "backend", "ms/step", "SAM steps", "vs its ideal"]))
            notes = []
            t = {m: r["ms_per_step"] for m, r in by.items() if r["ms_per_step"]}
            if "sam" in t:
                for other in ("sam-torch", "sam-authors"):
                    if other in t:
                        notes.append(f"SAM step: {other} {_ms(t[other])} ms / vsam_ext sam {_ms(t['sam'])} ms = "
                                     f"{t[other] / t['sam']:.2f}x")
            if "vsam" in by and by["vsam"]["overhead_pct"] is not None:
                o = by["vsam"]["overhead_pct"]
                notes.append(f"vSAM {o:+.1f}% over its ideal ({by['vsam']['n_sam']}/{by['vsam']['steps']} SAM steps; "
                             f"target <= {VSAM_TARGET:g}%: {'met' if o <= VSAM_TARGET else 'NOT met'})")
            out += [f"* {n}" for n in notes]
            data.setdefault("train", {})[model] = {"fixed_batch": fixed, "rows": mine, "source": t_path}
            out.append("")

    if not (tests or k_rows or s_rows or t_rows or phases):
        return f"nothing to summarise in {folder} (no phases.tsv, tests.xml/log or bench_* outputs)\n", data, False

    missing = [name for name, rows in (("bench_kernels", k_rows), ("bench_step", s_rows), ("bench_train", t_rows))
               if not rows and any(p["phase"] == name and p["rc"] != "skip" for p in phases)]
    problems += [f"{m}: no output" for m in missing]
    ok = not problems
    out.append(f"RESULT: {'OK' if ok else 'FAIL'}" + ("" if ok else " — " + "; ".join(problems)))
    data["ok"], data["problems"] = ok, problems
    return "\n".join(out) + "\n", data, ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a gpu_check.sh output folder, or a folder of bench_*.csv/.md files")
    ap.add_argument("--no-write", action="store_true", help="print only; do not write summary.md/.json")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.folder):
        print(f"gpu_summary: no folder {args.folder}", file=sys.stderr)
        return 2
    text, data, ok = summarise(args.folder)
    print(text, end="")
    if not data.get("phases") and not any(k in data for k in ("tests", "kernels", "step", "train")):
        return 2
    if not args.no_write:
        with open(os.path.join(args.folder, "summary.md"), "w") as f:
            f.write(text)
        with open(os.path.join(args.folder, "summary.json"), "w") as f:
            json.dump(data, f, indent=1, default=str)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
