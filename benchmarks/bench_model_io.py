"""Benchmark of model I/O: loading and saving full-size fp16 checkpoints, and script start-up.

    python benchmarks/bench_model_io.py [--families sd1,sdxl] [--cache_dir DIR] [--skip_generate]

For each family a seeded random full-size fp16 checkpoint is generated once with
`tools/make_random_model.py` and cached. Every measurement then runs in a fresh child process of
this same script (`--child read|read_fresh|write|load|save`), so its RSS holds only what that measurement
needs. The file is read once before the timed runs, so the read baseline and the load both find
it in the page cache: the comparison is of CPU/memory work, not of the disk.

Targets (from the issue): peak RSS while loading <= 1.3 x the file size, load time <= 1.5 x the
time to read the file's bytes, a script's `--help` in under 1.5 s. An fp16 file loaded into an fp16
model is mapped (zero-copy, see library/models/safetensors_io.py) rather than read, so its pages are read
at first use: the load child then reads one value of every 4 KiB page of every weight, timed on its
own, and the table shows the load alone and the load plus that first touch. Saving has no target; it is
shown against the time to write (and fsync) the same number of bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import struct
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_checkpoints import checkpoint_path, ensure_checkpoint  # noqa: E402,F401
CHUNK = 16 * 1024 * 1024
GIB = 1024 ** 3

LOAD_TIME_FACTOR = 1.5  # load time <= this x read-bytes time
LOAD_RSS_FACTOR = 1.3  # peak RSS while loading <= this x file size
HELP_SECONDS = 1.5
HELP_SCRIPTS = ("train_network.py", "tools/convert_diffusers20_original_sd.py", "tools/make_random_model.py")
FAMILIES = ("sd1", "sdxl")


# ---------------------------------------------------------------------------------------------
# memory probes (Linux)


def current_rss() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def rss_split() -> dict:
    """Resident anonymous memory (the process's own) and resident file-backed pages (mapped files,
    shared with the page cache), from /proc/self/status."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:")):
                out["rss_anon" if line.startswith("RssAnon") else "rss_file"] = int(line.split()[1]) * 1024
    return out


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark so that ru_maxrss covers only what follows.

    Without it, a save measured after a load would report the load's peak.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------
# children: each prints one JSON line with its measurements


def measured(fn, profile: bool = False) -> tuple:
    """Run fn() and return (its result, measurements): wall and CPU seconds, RSS before, peak RSS.

    CPU seconds matter on a shared machine: other work stretches wall time, much less CPU time.
    With `profile`, fn runs under cProfile and the top entries go to stderr.
    """
    rss_before = current_rss()
    reset_ok = reset_peak_rss()
    cpu_start, start = time.process_time(), time.perf_counter()
    if profile:
        import cProfile

        prof = cProfile.Profile()
        result = prof.runcall(fn)
    else:
        result = fn()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    stats = {
        "seconds": seconds, "cpu_seconds": cpu_seconds, "rss_before": rss_before,
        # without a reset the high-water mark could be older than fn (e.g. the load before a save)
        "peak_rss": peak_rss() if reset_ok else None,
    }
    if profile:
        _print_profile(prof)
    return result, stats


def _print_profile(prof) -> None:
    import pstats

    stats = pstats.Stats(prof, stream=sys.stderr).strip_dirs()
    for key in ("cumulative", "tottime"):
        print(f"--- cProfile, sorted by {key} ---", file=sys.stderr)
        stats.sort_stats(key).print_stats(25)


def child_read(path: str) -> dict:
    """Read the file in chunks into one reused buffer: the cost of the bytes alone."""
    view = memoryview(bytearray(CHUNK))

    def read() -> int:
        total = 0
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
        return total

    total, stats = measured(read)
    return dict(stats, bytes=total)


def child_read_fresh(path: str) -> dict:
    """Read each tensor's bytes into its own new tensor, as any copying loader must.

    Unlike the plain read, which reuses one buffer, this pays for first-touching fresh memory:
    the floor for a loader that does nothing but read.
    """
    import torch

    header, data_start = _header(path)
    spans = sorted(tuple(v["data_offsets"]) for v in header.values())

    def read() -> list:
        keep = []
        with open(path, "rb", buffering=0) as f:
            for begin, end in spans:
                t = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(data_start + begin)
                f.readinto(memoryview(t.numpy()))
                keep.append(t)
        return keep

    keep, stats = measured(read)
    return dict(stats, bytes=sum(t.numel() for t in keep))


def child_write(path: str, size: int) -> dict:
    """Write `size` bytes in chunks and fsync, as `save_tensors` does: the save's baseline."""
    buf = os.urandom(CHUNK)

    def write() -> None:
        with open(path, "wb", buffering=0) as f:
            left = size
            while left > 0:
                left -= f.write(buf[: min(left, CHUNK)])
            os.fsync(f.fileno())

    try:
        _, stats = measured(write)
    finally:
        if os.path.exists(path):
            os.remove(path)
    return dict(stats, bytes=size)


def _import_model_stack():
    """Import everything a load/save touches lazily, so the timed part holds no import cost."""
    start = time.perf_counter()
    import torch
    from accelerate import init_empty_weights  # noqa: F401
    from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

    from library.models.loading import load_models
    from library.models.saving import save_models

    return torch, load_models, save_models, time.perf_counter() - start


def _model_tensors(models) -> list:
    modules = [("unet", models.unet), ("vae", models.vae)]
    modules += [(f"text_encoder{i}", m) for i, m in enumerate(models.text_encoders)]
    return [(f"{label}.{name}", t) for label, module in modules
            for name, t in list(module.named_parameters()) + list(module.named_buffers())]


def _assert_ready(models, torch) -> int:
    """Every parameter and buffer holds real CPU data (not meta); floating ones are fp16. Returns
    the parameter count. Tensors may be mapped from the file (zero-copy): `_touch` then reads them."""
    count = 0
    for name, t in _model_tensors(models):
        assert t.device.type == "cpu" and not t.is_meta, f"{name} is on {t.device}, not a ready CPU tensor"
        assert not t.is_floating_point() or t.dtype == torch.float16, f"{name} is {t.dtype}"
        if isinstance(t, torch.nn.Parameter):
            count += t.numel()
    return count


def _touch(models, torch) -> int:
    """First use of every weight: read one value from every 4 KiB page of every parameter and buffer,
    so that each is resident (pages of a mapped file are faulted in from the page cache). Returns
    the number of values read; every one must be finite (seeded random weights)."""
    read, total = 0, torch.zeros((), dtype=torch.float32)
    for name, t in _model_tensors(models):
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, 4096 // t.element_size())]
        if t.is_floating_point():
            assert bool(torch.isfinite(sample).all()), f"{name} holds non-finite values"
        total += sample.float().sum()
        read += sample.numel()
    assert bool(torch.isfinite(total)), "non-finite sum"
    return read


def child_load(path: str, profile: bool) -> dict:
    torch, load_models, _, import_seconds = _import_model_stack()
    models, stats = measured(lambda: load_models(path, dtype=torch.float16), profile)
    after_load = rss_split()
    params = _assert_ready(models, torch)
    # first use, measured on its own: what a lazily mapped load leaves for later
    _, touch = measured(lambda: _touch(models, torch))
    return dict(stats, import_seconds=import_seconds, parameters=params, family=models.family.name,
                touch_seconds=touch["seconds"], touch_cpu_seconds=touch["cpu_seconds"], touch_peak_rss=touch["peak_rss"],
                after_load=after_load, after_touch=rss_split())


def child_save(path: str, out: str, profile: bool) -> dict:
    torch, load_models, save_models, _ = _import_model_stack()
    models = load_models(path, dtype=torch.float16)
    _assert_ready(models, torch)
    if os.path.exists(out):
        os.remove(out)  # the previous repeat's copy: the atomic write would keep it beside the new one
    _, stats = measured(lambda: save_models(models, out), profile)
    return stats


def run_child_mode(args) -> None:
    sys.path.insert(0, REPO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child == "read":
        result = child_read(args.path)
    elif args.child == "read_fresh":
        result = child_read_fresh(args.path)
    elif args.child == "write":
        result = child_write(args.out, args.size)
    elif args.child == "load":
        result = child_load(args.path, args.profile)
    else:
        result = child_save(args.path, args.out, args.profile)
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# parent: orchestration


def child(mode: str, *extra: str, profile_to: str | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, *extra]
    if profile_to:
        cmd.append("--profile")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if profile_to:
        with open(profile_to, "w", encoding="utf-8") as f:
            f.write(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(repeat: int, specs: dict) -> dict:
    """Run each spec (name -> (child args, profile report path or None)) `repeat` times, interleaved
    so that other work on the machine falls on all of them alike. Per name: median seconds, highest
    peak RSS."""
    runs = {name: [] for name in specs}
    for _ in range(repeat):
        for name, (args, profile_to) in specs.items():
            runs[name].append(child(*args, profile_to=profile_to))
    return {name: _summarise(results) for name, results in runs.items()}


def _summarise(runs: list) -> dict:
    result = dict(runs[-1])
    result["all_seconds"] = [r["seconds"] for r in runs]
    result["all_cpu_seconds"] = [r["cpu_seconds"] for r in runs]
    result["seconds"] = statistics.median(result["all_seconds"])
    result["cpu_seconds"] = statistics.median(result["all_cpu_seconds"])
    peaks = [r["peak_rss"] for r in runs if r.get("peak_rss") is not None]
    result["peak_rss"] = max(peaks) if peaks else None
    if "touch_seconds" in result:
        result["all_touch_seconds"] = [r["touch_seconds"] for r in runs]
        result["all_touch_cpu_seconds"] = [r["touch_cpu_seconds"] for r in runs]
        touch_peaks = [r["touch_peak_rss"] for r in runs if r.get("touch_peak_rss") is not None]
        result["touch_peak_rss"] = max(touch_peaks) if touch_peaks else None
    return result


def _header(path: str) -> tuple:
    """(tensor entries, offset of the data section) of a safetensors file.

    Parsed here rather than with library.models.safetensors_io: the parent must not import torch, whose
    RSS every child would otherwise inherit in its ru_maxrss at exec.
    """
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def compare_layout(a: str, b: str) -> str:
    """How the re-saved file's tensors (names, shapes, dtypes) differ from its source's."""
    ha, hb = _header(a)[0], _header(b)[0]
    if ha.keys() != hb.keys():
        return f"KEYS DIFFER ({len(ha.keys() - hb.keys())} missing, {len(hb.keys() - ha.keys())} new)"
    shapes = [k for k in ha if ha[k]["shape"] != hb[k]["shape"]]
    if shapes:
        return f"SHAPES DIFFER ({len(shapes)}, e.g. {shapes[0]})"
    dtypes = sorted({f"{ha[k]['dtype']}->{hb[k]['dtype']}" for k in ha if ha[k]["dtype"] != hb[k]["dtype"]})
    count = sum(ha[k]["dtype"] != hb[k]["dtype"] for k in ha)
    same = f"same {len(ha)} keys and shapes"
    return same if not count else f"{same}; {count} tensors changed dtype ({', '.join(dtypes)})"


def row(item: str, m: dict, ratio: str, size: int | None = None, target: str = "-", verdict: str = "-") -> dict:
    """A table row from a measurement `m`; with `size`, RSS growth and peak are also given per file byte."""
    peak = m.get("peak_rss")
    per_file = size is not None and peak is not None
    return dict(
        item=item, seconds=m["seconds"], cpu=m.get("cpu_seconds"), ratio=ratio, peak=peak,
        growth_file=(peak - m["rss_before"]) / size if per_file else None,
        peak_file=peak / size if per_file else None, target=target, verdict=verdict,
    )


def _ratio(m: dict, base: dict, name: str) -> str:
    # the CPU-time ratio too: it holds up better than wall time when others share the cores
    return f"{m['seconds'] / base['seconds']:.2f}x {name} (CPU {m['cpu_seconds'] / base['cpu_seconds']:.2f}x)"


def _verdict(m: dict, read: dict, size: int) -> str:
    misses = [what for what, bad in (
        ("time", m["seconds"] / read["seconds"] > LOAD_TIME_FACTOR),
        ("RSS", m["peak_rss"] is not None and m["peak_rss"] > LOAD_RSS_FACTOR * size)) if bad]
    return "MISS " + "+".join(misses) if misses else "ok"


def _load_then_touch(load: dict) -> dict:
    """The load followed by the first touch of every weight page (medians of the per-run sums; the
    peak over both, from the same process)."""
    pairs = list(zip(load["all_seconds"], load["all_touch_seconds"]))
    cpu = list(zip(load["all_cpu_seconds"], load["all_touch_cpu_seconds"]))
    return dict(
        load, seconds=statistics.median(a + b for a, b in pairs), cpu_seconds=statistics.median(a + b for a, b in cpu),
        peak_rss=max((p for p in (load["peak_rss"], load["touch_peak_rss"]) if p is not None), default=None),
    )


def bench_family(family: str, path: str, cache_dir: str, repeat: int, profile: bool) -> tuple:
    size = os.path.getsize(path)
    prof = (lambda what: os.path.join(cache_dir, f"profile-{family}-{what}.txt")) if profile else (lambda what: None)
    print(f"[{family}] {path}: {size / GIB:.2f} GiB; warming the page cache...", flush=True)
    child("read", "--path", path)  # warm-up, not timed
    print(f"[{family}] reading and loading...", flush=True)
    m = measure(repeat, {
        "read": (["read", "--path", path], None),
        "fresh": (["read_fresh", "--path", path], None),
        "load": (["load", "--path", path], prof("load")),
    })
    read, fresh, load = m["read"], m["fresh"], m["load"]
    print(f"[{family}] writing and saving...", flush=True)
    out = os.path.join(cache_dir, f"{family}-resaved.safetensors")
    m = measure(repeat, {
        "write": (["write", "--out", os.path.join(cache_dir, f".{family}-write-baseline.tmp"), "--size", str(size)], None),
        "save": (["save", "--path", path, "--out", out], prof("save")),
    })
    write, save = m["write"], m["save"]
    layout = compare_layout(path, out)
    print(f"[{family}] re-saved file vs source: {layout}", flush=True)
    os.remove(out)
    for what, r in (("read", read), ("read fresh", fresh), ("load", load), ("write", write), ("save", save)):
        print(f"[{family}] {what}: wall " + ", ".join(f"{t:.2f}" for t in r["all_seconds"]) + " s; CPU "
              + ", ".join(f"{t:.2f}" for t in r["all_cpu_seconds"]) + " s", flush=True)

    used = _load_then_touch(load)
    for what, key in (("after load", "after_load"), ("after touching every page", "after_touch")):
        split = load[key]
        print(f"[{family}] RSS {what}: anonymous {split['rss_anon'] / GIB:.2f} GiB, "
              f"file-backed (mapped, shared with the page cache) {split['rss_file'] / GIB:.2f} GiB", flush=True)
    print(f"[{family}] touch every page after the load: wall " + ", ".join(f"{t:.2f}" for t in load["all_touch_seconds"])
          + " s", flush=True)
    label = f"{family} ({size / GIB:.2f} GiB)"
    target = f"<={LOAD_TIME_FACTOR}x read, peak<={LOAD_RSS_FACTOR}x file"
    return [
        row(f"{label} read bytes, warm cache", read, "base"),
        row(f"{label} read into fresh tensors", fresh, _ratio(fresh, read, "read"), size, verdict="floor"),
        row(f"{label} load_models fp16", load, _ratio(load, read, "read"), size, target, _verdict(load, read, size)),
        row(f"{label} load_models fp16 + first touch of every weight page", used, _ratio(used, read, "read"), size,
            target, _verdict(used, read, size)),
        row(f"{label} write bytes + fsync", write, "base"),
        row(f"{label} save_models", save, _ratio(save, write, "write"), size, "none set",
            "info" if layout.startswith("same") else "info; " + layout.split(" (")[0]),
    ], load


def time_help(script: str, runs: int) -> dict:
    """Median wall and CPU time, max peak RSS of `python SCRIPT --help`, after one untimed run (bytecode cache)."""
    cmd = [sys.executable, os.path.join(REPO, script), "--help"]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    times, cpus, peaks = [], [], []
    for i in range(runs + 1):
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode(errors="replace")
        proc.stderr.close()
        if proc.returncode != 0:
            raise SystemExit(f"{script} --help failed ({proc.returncode}):\n{err[-2000:]}")
        if i:
            times.append(seconds)
            cpus.append(usage.ru_utime + usage.ru_stime)
            peaks.append(usage.ru_maxrss * 1024)
    return {"seconds": statistics.median(times), "cpu_seconds": statistics.median(cpus), "peak_rss": max(peaks)}


def bench_help(runs: int) -> list:
    rows = []
    for script in HELP_SCRIPTS:
        if not os.path.isfile(os.path.join(REPO, script)):
            continue
        m = time_help(script, runs)
        rows.append(row(f"{script} --help (median of {runs})", m, f"{m['seconds'] / HELP_SECONDS:.2f}x target",
                        target=f"<{HELP_SECONDS} s", verdict="ok" if m["seconds"] < HELP_SECONDS else "MISS"))
    return rows


def _loadavg() -> str:
    """Other work on the machine skews the times; the 1-minute load average shows how much."""
    with open("/proc/loadavg", encoding="ascii") as f:
        return f.read().split()[0]


def _fmt(value, spec: str) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else format(value, spec)


def render(rows: list) -> str:
    head = ["item", "seconds", "CPU s", "ratio to target base", "peak RSS GiB", "RSS growth / file", "peak RSS / file",
            "target", "verdict"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["item"], _fmt(r["seconds"], ".2f"), _fmt(r["cpu"], ".2f"), _fmt(r["ratio"], ""),
                 _fmt(None if r["peak"] is None else r["peak"] / GIB, ".2f"),
                 _fmt(r["growth_file"], ".2f"), _fmt(r["peak_file"], ".2f"), r["target"], r["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default=",".join(FAMILIES), help="comma-separated: sd1, sdxl (default both)")
    p.add_argument("--cache_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "sdtrain-bench"),
                   help="where generated checkpoints are kept between runs")
    p.add_argument("--skip_generate", action="store_true", help="skip a family whose checkpoint is not cached")
    p.add_argument("--regenerate", action="store_true", help="delete cached checkpoints first (after a layout change)")
    p.add_argument("--repeat", type=int, default=3, help="fresh processes per measurement (median time, max RSS)")
    p.add_argument("--help_runs", type=int, default=5, help="runs per --help timing (median)")
    p.add_argument("--no_help", action="store_true", help="skip the --help start-up timings")
    p.add_argument("--profile", action="store_true",
                   help="run load/save under cProfile; reports go to CACHE_DIR/profile-FAMILY-load|save.txt "
                        "(profiling slows them: use the times of a run without it)")
    # internal: one measurement in a fresh process
    p.add_argument("--child", choices=("read", "read_fresh", "write", "load", "save"), help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child_mode(args)
        return
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"--families: unknown {unknown}; choose from {', '.join(FAMILIES)}")
    rows = []
    load_before = _loadavg()
    for family in families:
        if args.regenerate and os.path.exists(checkpoint_path(args.cache_dir, family)):
            os.remove(checkpoint_path(args.cache_dir, family))
        path = ensure_checkpoint(args.cache_dir, family, args.skip_generate)
        if path:
            family_rows, load = bench_family(family, path, args.cache_dir, args.repeat, args.profile)
            rows += family_rows
            print(f"[{family}] {load['parameters'] / 1e6:.0f} M parameters; imports before the load took "
                  f"{load['import_seconds']:.1f} s (not in the load time); RSS after imports "
                  f"{load['rss_before'] / GIB:.2f} GiB", flush=True)
    if not args.no_help:
        rows += bench_help(args.help_runs)
    print()
    print(f"Model I/O benchmark, {datetime.date.today().isoformat()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; page cache warm for read and load; "
          f"median of {args.repeat} fresh processes; load average {load_before} before, {_loadavg()} after")
    print(render(rows))


if __name__ == "__main__":
    main()
