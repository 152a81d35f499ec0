"""Benchmarks: ``diffus-taichi bench`` and the shared code of ``benchmarks/bench_render.py`` and
``benchmarks/bench_gradients.py`` (timing, hardware, NumPy reference, prior prototype).

For every backend and lines x samples size, in one run:

* **forward**: ``sim.forward(); ti.sync()`` (every kernel from pose to fan image, result left on
  the device), median of ``--repeats`` frames, alternated frame by frame with ``sim.render(pose)``
  (the same plus pose upload and fan copy to NumPy) so that load bursts hit both alike;
* **forward + pose backward**: ``sim.value_and_grad(pose)`` on a ``requires_grad="pose"``
  simulator (loss kernels + ``ti.ad.Tape`` backward to the 6 pose parameters), alternated with
  that simulator's forward, and its ratio to the forward time;
* **batched frames/s**: ``Simulator(..., batch=B)``, ``set_poses(B poses); forward(); ti.sync()``
  -> B / time ("n/a (not built)" while ``Simulator`` has no ``batch`` parameter);
* **NumPy reference**: ``benchmarks/reference_numpy.PrimaryNumpy`` (the same ``primary`` model in
  vectorised float64 NumPy, pose -> fan, pose-independent set-up excluded) and the speed-up
  NumPy / forward;
* **prior prototype**: ``reference_numpy.prototype_dense_returns`` (one dense 2(n+1)-unknown solve
  per depth n, O(N^4) per ray) timed for one ray at a few sample counts in a child process with
  single-threaded BLAS; a frame is lines x per-ray time, extrapolated with t = c N^4 (N = samples
  - 1, c fitted at the largest measured count) where not measured; speed-up prototype / forward;

and, each in fresh child processes,

* **start-up**: ``python -c`` that imports diffus_taichi, builds a Simulator on the default
  volume and renders one frame, with ``TI_OFFLINE_CACHE_FILE_PATH`` a fresh directory (cold) and
  then the same, populated directory (warm): wall time and its split;
* **peak memory**: a dim^3 single-channel float32 volume written as a temporary NIfTI, loaded,
  Simulator built, one render: peak resident memory (VmHWM) over the baseline after
  ``import taichi; ti.init``, against the budget 2 x volume bytes + 64 MiB.

The Markdown table goes to stdout, progress to the log (stderr). ``benchmarks/`` is found next
to the package (a source checkout); without it the NumPy and prototype ratios read n/a.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import importlib.util
import inspect
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np

log = logging.getLogger("diffus_taichi.bench")

ARCH_ORDER = ("cpu", "vulkan", "cuda")
PKG_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_DIR_ENV = "DIFFUS_BENCHMARKS_DIR"
CHILD_MARK = "@@DIFFUS_BENCH@@ "
MIB = 1 << 20

# acceptance numbers of issue #7
GOAL_CASE = ("cpu", 256, 512, (512, 512))
GOAL_FORWARD_MS = 3.0
GOAL_BWD_RATIO = 4.0
GOAL_PROTO_SPEEDUP = 1e5
GOAL_WARM_START_S = 1.0
MEM_SLACK_BYTES = 64 * MIB

# defaults; budget_s caps the time of the backward and batched series (>= 5 repeats)
QUICK = {"sizes": "64x128", "image_px": "128x128", "repeats": 5, "proto_samples": "16,32,64",
         "numpy_budget_s": 0.3, "memory_dim": 64, "batch": 4, "budget_s": 1.0,
         "proto_budget_s": 0.1}
FULL = {"sizes": "256x512", "image_px": "512x512", "repeats": 20,
        "proto_samples": "16,32,64,128,256", "numpy_budget_s": 2.0, "memory_dim": 256,
        "batch": 16, "budget_s": 6.0, "proto_budget_s": 0.5}
SKIPPABLE = ("backward", "batch", "numpy", "prototype", "startup", "memory")


def _quiet_warnings() -> None:
    warnings.filterwarnings("ignore", message=".*unrolling more than.*")
    warnings.filterwarnings("ignore", message=".*getdefaultlocale.*", category=DeprecationWarning)


# ----------------------------------------------------------------------------------------------
# hardware, parsing, timing
# ----------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def gpu_names() -> list[str]:
    """NVIDIA GPUs from nvidia-smi ('name, memory, driver'); [] when there is none."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    try:
        r = subprocess.run([exe, "--query-gpu=name,memory.total,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [ln.strip() for ln in r.stdout.splitlines() if ln.strip()] if r.returncode == 0 else []


def vulkan_driver() -> str:
    """Which Vulkan driver(s) the loader will use, from VK_ICD_FILENAMES or the installed ICDs."""
    icd = os.environ.get("VK_ICD_FILENAMES") or os.environ.get("VK_DRIVER_FILES")
    files = [f for f in icd.split(os.pathsep) if f] if icd else sorted(
        glob.glob("/usr/share/vulkan/icd.d/*.json") + glob.glob("/etc/vulkan/icd.d/*.json"))
    names = [os.path.basename(f) for f in files]
    if not names:
        return "no Vulkan ICD found"
    src = "VK_ICD_FILENAMES" if icd else "installed ICDs"
    if all("lvp" in n for n in names):
        return f"Mesa lavapipe, software on the CPU cores ({src}: {', '.join(names)})"
    return f"{src}: {', '.join(names)}"


def loadavg():
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return None


def hardware() -> dict:
    import taichi as ti

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "usable_cores": usable,
            "gpus": gpu_names(), "vulkan_driver": vulkan_driver(),
            "loadavg_1_5_15": loadavg(), "platform": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__,
            "taichi": ".".join(map(str, ti.__version__)),
            "vk_icd_filenames": os.environ.get("VK_ICD_FILENAMES", ""),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def hardware_line(hw: dict) -> str:
    gpu = "; ".join(hw["gpus"]) if hw["gpus"] else "none (no nvidia-smi GPU)"
    return (f"hardware: CPU {hw['cpu_model']}, {hw['cpu_count']} logical cores "
            f"({hw['usable_cores']} usable); GPU: {gpu}; Vulkan: {hw['vulkan_driver']}; "
            f"taichi {hw['taichi']}, python {hw['python']}, numpy {hw['numpy']}; "
            f"{hw['platform']}; load average {hw['loadavg_1_5_15']} at start")


class OptionError(argparse.ArgumentTypeError, ValueError):
    """A bad option value (argparse shows its message; the CLI reports it as an error)."""


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'256x512,64x128' -> [(256, 512), (64, 128)] (lines x samples)."""
    out = []
    for part in str(text).split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            a, b = (int(v) for v in part.split("x"))
        except ValueError:
            raise OptionError(f"size {part!r}: expected AxB, e.g. 256x512") from None
        if a < 2 or b < 2:
            raise OptionError(f"size {part!r}: both numbers must be >= 2")
        out.append((a, b))
    if not out:
        raise OptionError("no sizes given")
    return out


def parse_image_px(text: str) -> tuple[int, int]:
    """'512' or '512x512' -> (H, W)."""
    t = str(text).strip().lower()
    if "x" in t:
        return parse_sizes(t)[0]
    try:
        n = int(t)
    except ValueError:
        raise OptionError(f"image size {text!r}: expected N or HxW") from None
    return n, n


def parse_archs(text: str | None) -> list[str]:
    """'cpu,vulkan' | 'all' | None (all available here) -> list in ARCH_ORDER order."""
    from . import backend

    if not text or text.strip().lower() == "all":
        avail = backend.available_archs()
        return [a for a in ARCH_ORDER if a in avail]
    archs = [a.strip().lower() for a in text.split(",") if a.strip()]
    for a in archs:
        if a not in ARCH_ORDER:
            raise ValueError(f"unknown arch {a!r}; choose from {', '.join(ARCH_ORDER)} or all")
    return list(dict.fromkeys(archs))


def time_ms(fn, repeats: int, warmup: int = 0) -> np.ndarray:
    for _ in range(warmup):
        fn()
    ts = np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts[i] = time.perf_counter() - t0
    return ts * 1e3


def time_interleaved(fn_a, fn_b, repeats: int, warmup: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Time two functions alternately (a, b, a, b, ...) so that load bursts from other processes
    on a shared machine hit both series alike; returns both in ms."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    ta, tb = np.empty(repeats), np.empty(repeats)
    for i in range(repeats):
        t0 = time.perf_counter()
        fn_a()
        t1 = time.perf_counter()
        fn_b()
        t2 = time.perf_counter()
        ta[i], tb[i] = t1 - t0, t2 - t1
    return ta * 1e3, tb * 1e3


def adaptive_repeats(fn, budget_s: float, lo: int, hi: int) -> np.ndarray:
    """Time fn once (warm-up + estimate), then as many repeats as fit in budget_s (lo..hi)."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    n = int(min(hi, max(lo, budget_s / max(first, 1e-6))))
    return time_ms(fn, n)


def stats(ts: np.ndarray) -> dict:
    ts = np.asarray(ts, dtype=np.float64)
    return {"median_ms": float(np.median(ts)), "min_ms": float(ts.min()),
            "p90_ms": float(np.percentile(ts, 90)), "n": int(ts.size)}


def fmt_ms(v) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    if v >= 1e4:
        return f"{v:.3g}".replace("e+0", "e").replace("e+", "e")
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def fmt_x(v) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    if v >= 1e4:
        return f"{v:.3g}".replace("e+0", "e").replace("e+", "e") + "x"
    return f"{v:.1f}x" if v < 100 else f"{v:.0f}x"


# ----------------------------------------------------------------------------------------------
# NumPy reference and prior prototype (benchmarks/reference_numpy.py)
# ----------------------------------------------------------------------------------------------
def benchmarks_dir() -> str | None:
    """The repository's benchmarks/ folder (or $DIFFUS_BENCHMARKS_DIR), None when absent
    (installed package without the source tree)."""
    d = os.environ.get(BENCH_DIR_ENV) or os.path.join(PKG_PARENT, "benchmarks")
    return d if os.path.isfile(os.path.join(d, "reference_numpy.py")) else None


def load_reference():
    """``benchmarks/reference_numpy.py`` as the module ``reference_numpy`` (shared with scripts
    that import it by name), or None when it is absent or fails to import."""
    mod = sys.modules.get("reference_numpy")
    if mod is not None:
        return mod
    d = benchmarks_dir()
    if d is None:
        log.warning("benchmarks/reference_numpy.py not found next to the package: NumPy and "
                    "prototype ratios will read n/a")
        return None
    path = os.path.join(d, "reference_numpy.py")
    try:
        spec = importlib.util.spec_from_file_location("reference_numpy", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["reference_numpy"] = mod
        spec.loader.exec_module(mod)
    except Exception as e:  # a broken reference must not stop the Taichi benchmark
        sys.modules.pop("reference_numpy", None)
        log.warning("cannot import %s (%s: %s): NumPy and prototype ratios will read n/a",
                    path, type(e).__name__, e)
        return None
    return mod


def bench_numpy(ref, pose, budget_s: float, lo: int, hi: int) -> dict:
    """Median time of ``ref.render(pose)`` (a PrimaryNumpy), adaptive number of repeats."""
    return stats(adaptive_repeats(lambda: ref.render(pose), budget_s, lo=lo, hi=hi))


def _prototype_per_ray(samples, budget_s: float) -> dict:
    """Per-ray time (stats) of the dense algorithm at each sample count, in this process."""
    ref = load_reference()
    if ref is None:
        raise RuntimeError("benchmarks/reference_numpy.py not available")
    rng = np.random.default_rng(0)
    out = {}
    for S in samples:
        z = rng.uniform(1.4, 1.8, int(S))                # soft-tissue-like impedances (MRayl)
        out[str(int(S))] = stats(adaptive_repeats(lambda: ref.prototype_dense_returns(z),
                                                  budget_s, lo=3, hi=20))
    return out


_PROTO_CHILD = """
import json, sys
P = json.loads(sys.argv[1])
from diffus_taichi.bench import _prototype_per_ray, CHILD_MARK
print(CHILD_MARK + json.dumps(_prototype_per_ray(P["samples"], P["budget_s"])), flush=True)
"""


def bench_prototype(samples=(16, 32, 64, 128, 256), budget_s: float = 0.5,
                    timeout_s: float = 900) -> dict | None:
    """Time the prior prototype for one ray at each sample count and fit t = c N^4.

    Runs in a child process with single-threaded BLAS (OPENBLAS/MKL/OMP_NUM_THREADS=1): the
    solves are small (<= 2N+2 unknowns) and multi-threaded OpenBLAS on them was both slower and
    erratic on the 2-core box (up to 10x, spin-waiting threads under load); a parallel prototype
    would split rays over cores instead. Returns None when the reference is unavailable."""
    if benchmarks_dir() is None:
        return None
    env = {"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    try:
        res = run_child(_PROTO_CHILD, {"samples": [int(s) for s in samples],
                                       "budget_s": budget_s}, env, timeout_s)
    except RuntimeError as e:
        log.warning("prototype benchmark failed: %s", e)
        return None
    meas = {int(k): v for k, v in res["result"].items()}
    for S, m in sorted(meas.items()):
        log.info("dense prototype, 1 ray x %d samples: %.2f ms (n=%d)", S, m["median_ms"], m["n"])
    return prototype_model(meas)


def prototype_model(meas: dict) -> dict:
    """c of t = c N^4 at the largest measured sample count, and a free power-law fit (>= 32)."""
    smax = max(meas)
    c4 = meas[smax]["median_ms"] / (smax - 1) ** 4
    big = [s for s in meas if s >= 32] or list(meas)
    if len(big) >= 2:
        slope = float(np.polyfit(np.log([s - 1 for s in big]),
                                 np.log([meas[s]["median_ms"] for s in big]), 1)[0])
    else:
        slope = float("nan")
    return {"per_ray": meas, "c_ms_per_N4": c4, "fit_from_samples": smax,
            "free_fit_exponent": slope, "free_fit_from_samples": sorted(big),
            "t_ray_free_fit_ms": {}, "blas_threads": 1}


def prototype_frame_ms(proto: dict, L: int, S: int) -> tuple[float, str]:
    """(ms per frame of L lines x S samples, 'measured' | 'extrapolated')."""
    if S in proto["per_ray"]:
        return L * proto["per_ray"][S]["median_ms"], "measured"
    smax, k = proto["fit_from_samples"], proto["free_fit_exponent"]
    if np.isfinite(k):      # alternative (lower) extrapolation, for the notes
        proto["t_ray_free_fit_ms"][S] = proto["per_ray"][smax]["median_ms"] * ((S - 1) / (smax - 1)) ** k
    return L * proto["c_ms_per_N4"] * (S - 1) ** 4, "extrapolated"


def prototype_note(proto: dict) -> list[str]:
    meas = ", ".join(f"{s}: {m['median_ms']:.2f}" for s, m in sorted(proto["per_ray"].items()))
    k = proto["free_fit_exponent"]
    free = (f" A free power-law fit over samples {proto['free_fit_from_samples']} gives exponent "
            f"{k:.2f}: small solves run below peak BLAS speed, so the local exponent is still < 4."
            if np.isfinite(k) else "")
    out = [f"prototype = dense 2(n+1)-unknown solve per depth n (np.linalg.solve), one ray measured "
           f"at samples {{{meas}}} ms (one core, single-threaded BLAS); frame = lines x per-ray time.",
           f"'extrapolated' = lines x c N^4 with N = samples - 1 and c = {proto['c_ms_per_N4']:.3e} ms "
           f"fitted at {proto['fit_from_samples']} samples.{free} The prototype column covers only "
           "its echo stage, so its speed-up is a lower bound on that account."]
    for S, t in sorted(proto["t_ray_free_fit_ms"].items()):
        out.append(f"  at {S} samples: {proto['c_ms_per_N4'] * (S - 1) ** 4:.4g} ms/ray by c N^4, "
                   f"{t:.4g} ms/ray by the free fit (measure it with --proto-samples ...,{S})")
    return out


# ----------------------------------------------------------------------------------------------
# in-process Taichi timings
# ----------------------------------------------------------------------------------------------
def make_sim(vol, arch: str, lines: int, samples: int, image_px=(512, 512), model="primary",
             **kw):
    """Simulator on the craniotomy probe at lines x samples, (re)initialising Taichi f32 on a
    backend switch. Returns (sim, build seconds)."""
    from . import backend, get_probe
    from .simulator import Simulator

    backend.ensure(arch, "f32")
    probe = get_probe("craniotomy", n_lines=lines, n_samples=samples, image_px=tuple(image_px))
    t0 = time.perf_counter()
    sim = Simulator(vol, probe=probe, arch=arch, echo_model=model, **kw)
    return sim, time.perf_counter() - t0


def time_forward(sim, pose, repeats: int, warmup: int = 5) -> dict:
    """forward (``sim.forward(); ti.sync()``) and render (pose upload + forward + fan copy),
    interleaved; also the first frame (JIT or offline-cache load) time."""
    import taichi as ti

    sim.set_pose(pose)
    t0 = time.perf_counter()
    sim.forward()
    ti.sync()
    first_s = time.perf_counter() - t0

    def fwd():
        sim.forward()
        ti.sync()

    t_fwd, t_render = time_interleaved(fwd, lambda: sim.render(pose), repeats, warmup=warmup)
    return {"first_frame_s": first_s, "forward": stats(t_fwd), "render": stats(t_render)}


def time_backward(sim, repeats: int, loss: str = "ncc", wrt=("pose",), pose0=None,
                  warmup: int = 3, budget_s: float | None = None) -> dict:
    """As benchmarks/bench_gradients.py: target = render at the default pose, loss ``loss``;
    at a moved pose (1 mm, 0.5 mm, 1 deg) time alternately
    forward = ``set_pose; forward(); ti.sync()`` and fwd+bwd = ``value_and_grad(pose); ti.sync()``
    (loss kernels + Tape backward). ``budget_s`` caps the repeats (at least 5)."""
    import taichi as ti

    p0 = sim.volume.default_pose if pose0 is None else pose0
    target = sim.render(p0)
    sim.set_loss(target, loss)
    p1 = p0.moved((1.0, 0.0, 0.5), np.radians([1.0, 0.0, 0.0]))
    t0 = time.perf_counter()
    sim.value_and_grad(p1, wrt=wrt)
    ti.sync()
    first_s = time.perf_counter() - t0
    for _ in range(warmup):
        sim.value_and_grad(p1, wrt=wrt)
    if budget_s is not None:
        t0 = time.perf_counter()
        sim.value_and_grad(p1, wrt=wrt)
        ti.sync()
        one = time.perf_counter() - t0
        repeats = int(max(5, min(repeats, budget_s / max(one, 1e-6))))
    tf, tb, ts = np.empty(repeats), np.empty(repeats), np.empty(repeats)
    value, grads = None, None
    for i in range(repeats):
        t = time.perf_counter()
        sim.set_pose(p1)
        sim.forward()
        ti.sync()
        tf[i] = time.perf_counter() - t
        t = time.perf_counter()
        sim.forward_staged()     # the staged kernels (Tape path of layered/reverb)
        ti.sync()
        ts[i] = time.perf_counter() - t
        t = time.perf_counter()
        value, grads = sim.value_and_grad(p1, wrt=wrt)
        ti.sync()
        tb[i] = time.perf_counter() - t
    f, b, fs = stats(tf * 1e3), stats(tb * 1e3), stats(ts * 1e3)
    return {"loss": loss, "wrt": list(wrt), "first_s": first_s, "forward": f, "fwd_bwd": b,
            "forward_staged": fs, "ratio_to_staged": b["median_ms"] / fs["median_ms"],
            "ratio": b["median_ms"] / f["median_ms"], "loss_value": float(value),
            "grad_pose": [float(g) for g in grads["pose"]],
            "grad_finite": bool(all(np.all(np.isfinite(g)) for g in grads.values()))}


def batch_supported() -> bool:
    """True once ``Simulator.__init__`` takes ``batch``."""
    from .simulator import Simulator

    try:
        return "batch" in inspect.signature(Simulator.__init__).parameters
    except (TypeError, ValueError):
        return False


def batch_poses(p0, n: int) -> list:
    """n poses around p0: lateral -2..2 mm, depth 0..1 mm, in-plane tilt -3..3 degrees."""
    u = np.linspace(-1.0, 1.0, n) if n > 1 else np.zeros(1)
    return [p0.moved((2.0 * a, 0.0, 0.5 * (a + 1.0)), np.radians([0.0, 3.0 * a, 0.0])) for a in u]


def time_batched(vol, arch: str, lines: int, samples: int, image_px, batch: int, repeats: int,
                 model: str = "primary", share=None, budget_s: float = 4.0) -> dict:
    """Frames/s of ``Simulator(..., batch=B)``: ``set_poses(poses); forward(); ti.sync()`` and
    ``render_batch(poses)`` (upload + forward + copy to NumPy), interleaved. Reports
    ``status`` 'n/a (not built)' while the Simulator has no ``batch`` parameter, and
    'error: ...' when the batched path fails (the rest of the benchmark goes on)."""
    import taichi as ti

    out = {"batch": int(batch)}
    if not batch_supported():
        out["status"] = "n/a (not built)"
        return out
    from .simulator import Simulator

    kw = {"batch": int(batch)}
    if share is not None and "share_volume_with" in inspect.signature(Simulator.__init__).parameters:
        kw["share_volume_with"] = share
    try:
        try:
            simb, build_s = make_sim(vol, arch, lines, samples, image_px, model, **kw)
        except (TypeError, ValueError) as e:
            if "share_volume_with" not in kw:
                raise
            log.info("batched simulator without share_volume_with (%s)", e)
            kw.pop("share_volume_with")
            simb, build_s = make_sim(vol, arch, lines, samples, image_px, model, **kw)
        poses = batch_poses(vol.default_pose, batch)
        t0 = time.perf_counter()
        imgs = np.asarray(simb.render_batch(poses))
        first_s = time.perf_counter() - t0
        want = (int(batch),) + tuple(image_px)
        if imgs.shape != want:
            out["status"] = f"error: render_batch returned shape {imgs.shape}, expected {want}"
            return out
        simb.set_poses(poses)

        def fwd():
            simb.forward()
            ti.sync()

        t0 = time.perf_counter()
        fwd()
        one = time.perf_counter() - t0
        n = int(max(5, min(repeats, budget_s / max(2 * one, 1e-6))))
        tf, tr = time_interleaved(fwd, lambda: simb.render_batch(poses), n, warmup=1)
        f, r = stats(tf), stats(tr)
        out.update(status="ok", build_s=build_s, first_s=first_s, forward=f, render_batch=r,
                   frames_per_s=batch * 1e3 / f["median_ms"],
                   frames_per_s_render_batch=batch * 1e3 / r["median_ms"])
        del simb
    except Exception as e:  # noqa: BLE001 - report, keep benchmarking
        log.warning("batched benchmark failed on %s: %s: %s", arch, type(e).__name__, e)
        out["status"] = f"error: {type(e).__name__}: {e}"
    return out


# ----------------------------------------------------------------------------------------------
# child processes: start-up and peak memory
# ----------------------------------------------------------------------------------------------
def child_env(extra: dict | None = None) -> dict:
    """Environment for a child that imports this very copy of the package."""
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_PARENT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONWARNINGS", "ignore")
    env.update(extra or {})
    return env


def run_child(code: str, params: dict, env_extra: dict | None = None,
              timeout_s: float = 600) -> dict:
    """Run ``python -c code json(params)``; return {"result": <the child's marked JSON line>,
    "wall_s": wall time of the whole process, "spawned_epoch": time.time() just before the
    spawn}. Raises RuntimeError with the stderr tail."""
    cmd = [sys.executable, "-c", code, json.dumps(params)]
    spawned = time.time()
    t0 = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                           env=child_env(env_extra), cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"child process timed out after {timeout_s:.0f} s") from None
    wall = time.perf_counter() - t0
    for line in reversed(r.stdout.splitlines()):
        if line.startswith(CHILD_MARK):
            return {"result": json.loads(line[len(CHILD_MARK):]), "wall_s": wall,
                    "spawned_epoch": spawned}
    tail = (r.stderr or r.stdout or "").strip().splitlines()[-8:]
    raise RuntimeError(f"child process failed (rc={r.returncode}): " + " | ".join(tail))


_STARTUP_CHILD = """
import time
e0 = time.time()
t0 = time.perf_counter()
import json, sys
P = json.loads(sys.argv[1])
import diffus_taichi
from diffus_taichi import backend, get_probe, load_volume
from diffus_taichi.simulator import Simulator
t1 = time.perf_counter()
backend.init(P["arch"], "f32")
t2 = time.perf_counter()
vol = load_volume(P["volume"])
t3 = time.perf_counter()
sim = Simulator(vol, probe=get_probe("craniotomy", n_lines=P["lines"], n_samples=P["samples"],
                                     image_px=tuple(P["image_px"])), arch=P["arch"])
t4 = time.perf_counter()
fan = sim.render()
t5 = time.perf_counter()
e5 = time.time()
print(P["mark"] + json.dumps({"epoch_start": e0, "epoch_first_frame": e5, "import_s": t1 - t0, "ti_init_s": t2 - t1, "volume_s": t3 - t2,
      "simulator_s": t4 - t3, "first_frame_s": t5 - t4, "in_process_s": t5 - t0,
      "fan_shape": list(fan.shape), "fan_mean": float(fan.mean())}), flush=True)
"""


def measure_startup(arch: str, lines: int = 256, samples: int = 512, image_px=(512, 512),
                    volume: str = "brain", cache_dir: str | None = None,
                    timeout_s: float = 600) -> dict:
    """Time to first frame in fresh processes: cold (empty Taichi offline cache and Python
    bytecode cache in ``cache_dir``, a new temporary directory by default) and warm (the same
    directory, now populated). Each entry:
    wall_s (whole process, parent clock), interpreter_s (wall - in-process time: interpreter
    start and exit), import_s (diffus_taichi + taichi), ti_init_s, volume_s (load the volume),
    simulator_s (Simulator init: fields, uploads, acoustic-property kernel), first_frame_s
    (``render()``: forward kernels, JIT or cache load, and the fan copy), to_first_frame_s (the
    goal's number: from just before the spawn to the child's clock when ``render()`` returned,
    same machine clock), interpreter_start_s (spawn to the child's first line) and teardown_s
    (interpreter and Taichi shut-down after the frame: wall_s - to_first_frame_s)."""
    own = cache_dir is None
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="diffus_bench_ticache_")
    params = {"arch": arch, "lines": lines, "samples": samples, "image_px": list(image_px),
              "volume": volume, "mark": CHILD_MARK}
    # warm = the second run over the same caches: Taichi's offline cache and Python's bytecode
    # cache (in the same directory via PYTHONPYCACHEPREFIX, also where PYTHONDONTWRITEBYTECODE
    # is set, as in some sandboxes: Python's default is to cache bytecode)
    env = {"TI_OFFLINE_CACHE_FILE_PATH": cache_dir, "TI_OFFLINE_CACHE": "1",
           "PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": os.path.join(cache_dir, "pyc")}
    out = {"backend": arch, "size": f"{lines}x{samples}", "image_px": list(image_px),
           "volume": volume}
    try:
        for kind in ("cold", "warm"):
            r = run_child(_STARTUP_CHILD, params, env, timeout_s)
            d = dict(r["result"], wall_s=r["wall_s"])
            d["interpreter_s"] = max(0.0, d["wall_s"] - d["in_process_s"])
            d["to_first_frame_s"] = d.pop("epoch_first_frame") - r["spawned_epoch"]
            d["interpreter_start_s"] = d.pop("epoch_start") - r["spawned_epoch"]
            d["teardown_s"] = max(0.0, d["wall_s"] - d["to_first_frame_s"])
            out[kind] = d
            log.info("start-up %s %s: %.2f s to first frame (interpreter %.2f, import %.2f, "
                     "ti.init %.2f, volume %.2f, Simulator %.2f, first frame %.2f; then teardown "
                     "%.2f)", arch, kind, d["to_first_frame_s"], d["interpreter_start_s"],
                     d["import_s"], d["ti_init_s"], d["volume_s"], d["simulator_s"],
                     d["first_frame_s"], d["teardown_s"])
        out["status"] = "ok"
    except RuntimeError as e:
        log.warning("start-up measurement on %s failed: %s", arch, e)
        out["status"] = f"error: {e}"
    finally:
        if own:
            shutil.rmtree(cache_dir, ignore_errors=True)
    return out


_MEMORY_CHILD = """
import json, resource, sys
P = json.loads(sys.argv[1])


def mem():
    d = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    d[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    d["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return d


def reset_peak():      # Linux >= 4.0: VmHWM := VmRSS
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


import numpy as np
import taichi as ti
from diffus_taichi import backend, get_probe, load_volume
from diffus_taichi.simulator import Simulator
backend.init(P["arch"], "f32")
base = mem()
can_reset = reset_peak()
stages = {}
vol = load_volume(P["path"])
stages["load_volume"] = mem()
reset_peak()
sim = Simulator(vol, probe=get_probe("craniotomy", n_lines=P["lines"], n_samples=P["samples"],
                                     image_px=tuple(P["image_px"])), arch=P["arch"])
ti.sync()
stages["simulator_init"] = mem()
reset_peak()
fan = sim.render()
stages["first_render"] = mem()
print(P["mark"] + json.dumps({"baseline": base, "stages": stages, "peak_reset_ok": can_reset,
      "volume_shape": list(vol.shape), "volume_channels": vol.n_channels,
      "storage": getattr(sim, "storage", "full"), "props_shape": list(sim.props.shape),
      "props_dtype": str(sim.props.dtype), "fan_mean": float(fan.mean())}), flush=True)
"""


def write_test_volume(path: str, dim: int) -> int:
    """A dim^3 float32 head-like phantom (ellipsoid, smooth texture, 1 mm voxels) as NIfTI;
    returns the bytes of its voxel data."""
    import nibabel as nib

    x = np.linspace(-1.0, 1.0, dim, dtype=np.float32)
    r2 = (x[:, None, None] ** 2 + (x[None, :, None] / np.float32(0.9)) ** 2
          + (x[None, None, :] / np.float32(0.85)) ** 2)
    data = np.where(r2 < 0.64, np.float32(0.55) + np.float32(0.3) * np.cos(np.float32(12.0) * r2),
                    np.float32(0.0)).astype(np.float32)
    del r2
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = -(dim - 1) / 2.0
    nib.save(nib.Nifti1Image(data, affine), path)
    return int(data.nbytes)


def _over_start(base: int, st: dict, stage_peak: dict) -> dict:
    """Each stage's peak minus the resident memory when it began (the previous stage's end)."""
    out, start = {}, base
    for k in st:                                   # insertion order = stage order
        out[k] = stage_peak[k] - start
        start = st[k].get("VmRSS", stage_peak[k])
    return out


def measure_memory(arch: str = "cpu", dim: int = 256, lines: int = 256, samples: int = 512,
                   image_px=(512, 512), timeout_s: float = 600) -> dict:
    """Peak resident memory of a fresh process for a dim^3 single-channel float32 volume.

    The volume (an ellipsoid phantom) is written as a temporary NIfTI (the realistic path:
    ``--volume file.nii``). The child process imports taichi and the package, runs ``ti.init``
    and takes VmRSS as the baseline; then it loads the NIfTI, builds the Simulator
    (``lines x samples``, fan ``image_px``) and renders one frame. The peak (VmHWM, reset
    between stages through /proc/self/clear_refs so that each stage's own peak is known; with
    no reset possible ru_maxrss) minus the baseline is compared with the budget
    2 x volume bytes + 64 MiB. On GPU backends the fields live in device memory, which this
    host-side figure does not see: measure on cpu. The Simulator uses its default
    ``storage="auto"`` (compact float16 properties from 256^3 voxels up, see
    :mod:`diffus_taichi.property_volume`); the storage, props dtype and shape are reported."""
    tmp = tempfile.mkdtemp(prefix="diffus_bench_mem_")
    path = os.path.join(tmp, f"phantom{dim}.nii")
    out = {"backend": arch, "dim": dim, "size": f"{lines}x{samples}", "image_px": list(image_px)}
    try:
        vol_bytes = write_test_volume(path, dim)
        params = {"arch": arch, "path": path, "lines": lines, "samples": samples,
                  "image_px": list(image_px), "mark": CHILD_MARK}
        r = run_child(_MEMORY_CHILD, params, None, timeout_s)["result"]
        base = r["baseline"].get("VmRSS", r["baseline"]["ru_maxrss"])
        st = r["stages"]
        if r["peak_reset_ok"] and all("VmHWM" in s for s in st.values()):
            stage_peak = {k: s["VmHWM"] for k, s in st.items()}
            peak = max(stage_peak.values())
            how = "VmHWM per stage (reset between stages)"
        else:
            stage_peak = {k: s["ru_maxrss"] for k, s in st.items()}
            peak = st["first_render"]["ru_maxrss"]
            how = "ru_maxrss (peak of the whole process)"
        budget = 2 * vol_bytes + MEM_SLACK_BYTES
        inc = peak - base
        out.update(status="ok", volume_bytes=vol_bytes, baseline_bytes=base,
                   baseline_hwm_bytes=r["baseline"].get("VmHWM"), peak_bytes=peak,
                   increase_bytes=inc, budget_bytes=budget, passed=bool(inc <= budget),
                   measured_with=how,
                   stage_peak_over_baseline_bytes={k: v - base for k, v in stage_peak.items()},
                   stage_peak_over_start_bytes=_over_start(base, st, stage_peak),
                   stage_rss_after_bytes={k: s.get("VmRSS", 0) for k, s in st.items()},
                   volume_shape=r["volume_shape"], volume_channels=r["volume_channels"],
                   storage=r.get("storage"), props_shape=r.get("props_shape"),
                   props_dtype=r.get("props_dtype"))
        log.info("peak memory %s, %d^3 volume: baseline %.0f MiB, peak %.0f MiB, increase %.0f MiB "
                 "(budget %.0f MiB) %s; Simulator storage %s, props %s %s", arch, dim, base / MIB,
                 peak / MIB, inc / MIB, budget / MIB, "PASS" if inc <= budget else "FAIL",
                 r.get("storage"), r.get("props_dtype"), r.get("props_shape"))
    except RuntimeError as e:
        log.warning("memory measurement failed: %s", e)
        out["status"] = f"error: {e}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------
# the whole benchmark
# ----------------------------------------------------------------------------------------------
def add_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--arch", default="all",
                   help="comma list of cpu,vulkan,cuda, or all (every backend available here) [all]")
    p.add_argument("--sizes", default=None,
                   help=f"comma list of LINESxSAMPLES [{FULL['sizes']}; --quick {QUICK['sizes']}]")
    p.add_argument("--image-px", default=None,
                   help=f"scan-converted fan, N or HxW [{FULL['image_px']}; --quick {QUICK['image_px']}]")
    p.add_argument("--batch", type=int, default=None,
                   help=f"poses per batched render [{FULL['batch']}; --quick {QUICK['batch']}]")
    p.add_argument("--repeats", type=int, default=None,
                   help=f"timed frames per case (median) [{FULL['repeats']}; --quick {QUICK['repeats']}]")
    p.add_argument("--json", default=None, help="also write every number to this JSON file")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small sizes (64x128, 128x128 fan), 5 repeats, prototype at "
                        "16,32,64 samples, 64^3 memory volume (explicit options still win)")
    p.add_argument("--volume", default="brain", help="built-in volume or NIfTI path [brain]")
    p.add_argument("--model", default="primary", choices=["primary", "layered", "reverb"],
                   help="echo model [primary; the NumPy reference exists for primary only]")
    p.add_argument("--loss", default="ncc", help="loss of the backward timing [ncc]")
    p.add_argument("--proto-samples", default=None,
                   help=f"samples per ray at which the prototype is timed (one ray) "
                        f"[{FULL['proto_samples']}; --quick {QUICK['proto_samples']}]")
    p.add_argument("--numpy-budget-s", type=float, default=None,
                   help="seconds per size for the NumPy reference (>= 2 frames) [2; --quick 0.3]")
    p.add_argument("--startup-size", default=None,
                   help="LINESxSAMPLES of the start-up runs (fan --image-px) [256x512; "
                        "--quick: the first --sizes]")
    p.add_argument("--memory-dim", type=int, default=None,
                   help=f"edge of the cubic volume of the memory run [{FULL['memory_dim']}; "
                        f"--quick {QUICK['memory_dim']}]")
    p.add_argument("--memory-arch", default="cpu",
                   help="backend of the memory run (host memory; GPU fields are not seen) [cpu]")
    p.add_argument("--skip", default="",
                   help=f"comma list of parts to leave out: {', '.join(SKIPPABLE)}")


def _resolve(a) -> dict:
    """Options with the --quick / full defaults filled in."""
    d = QUICK if a.quick else FULL
    cfg = {"archs": parse_archs(a.arch),
           "sizes": parse_sizes(a.sizes or d["sizes"]),
           "image_px": parse_image_px(a.image_px or d["image_px"]),
           "batch": a.batch if a.batch is not None else d["batch"],
           "repeats": a.repeats if a.repeats is not None else d["repeats"],
           "proto_samples": [int(v) for v in str(a.proto_samples or d["proto_samples"]).split(",")
                             if v.strip()],
           "numpy_budget_s": a.numpy_budget_s if a.numpy_budget_s is not None else d["numpy_budget_s"],
           "memory_dim": a.memory_dim if a.memory_dim is not None else d["memory_dim"],
           "budget_s": d["budget_s"], "proto_budget_s": d["proto_budget_s"],
           "memory_arch": a.memory_arch, "volume": a.volume, "model": a.model, "loss": a.loss,
           "quick": bool(a.quick), "json": a.json}
    if a.startup_size:
        cfg["startup_size"] = parse_sizes(a.startup_size)[0]
    else:
        cfg["startup_size"] = cfg["sizes"][0] if a.quick else (256, 512)
    skip = [s.strip() for s in a.skip.split(",") if s.strip()]
    bad = [s for s in skip if s not in SKIPPABLE]
    if bad:
        raise ValueError(f"--skip {','.join(bad)}: choose from {', '.join(SKIPPABLE)}")
    cfg["skip"] = skip
    if cfg["repeats"] < 1 or cfg["batch"] < 1:
        raise ValueError("--repeats and --batch must be >= 1")
    if any(s < 2 for s in cfg["proto_samples"]):
        raise ValueError("--proto-samples: every count must be >= 2")
    if cfg["memory_dim"] < 2:
        raise ValueError("--memory-dim must be >= 2")
    if not cfg["archs"]:
        raise RuntimeError("no Taichi backend available")
    return cfg


def run_bench(cfg: dict) -> dict:
    """Run every part of the benchmark; returns the JSON-able document (see :func:`main`)."""
    import taichi as ti  # noqa: F401  (hardware() reads its version)

    from . import backend, load_volume

    _quiet_warnings()
    t_start = time.perf_counter()
    hw = hardware()
    avail = backend.available_archs()
    for a in cfg["archs"]:
        if a not in avail:
            raise RuntimeError(f"Taichi backend {a!r} is not available here (available: "
                               f"{', '.join(avail)})")
    skip = set(cfg["skip"])
    vol = load_volume(cfg["volume"])
    ref = load_reference() if not ({"numpy", "prototype"} <= skip) else None
    H, W = cfg["image_px"]
    log.info("benchmark: backends %s, sizes %s, fan %dx%d, volume %s %s", ",".join(cfg["archs"]),
             ",".join(f"{L}x{S}" for L, S in cfg["sizes"]), H, W, vol.name, vol.shape)

    cases, numpy_refs = [], {}
    for arch in cfg["archs"]:
        for L, S in cfg["sizes"]:
            log.info("%s %dx%d: forward", arch, L, S)
            sim, build_s = make_sim(vol, arch, L, S, (H, W), cfg["model"])
            pose = vol.default_pose
            row = {"backend": arch, "lines": L, "samples": S, "image_px": [H, W],
                   "build_s": build_s, **time_forward(sim, pose, cfg["repeats"])}
            log.info("%s %dx%d: forward %.2f ms, render %.2f ms (first frame %.2f s)", arch, L, S,
                     row["forward"]["median_ms"], row["render"]["median_ms"], row["first_frame_s"])
            if ref is not None and "numpy" not in skip and cfg["model"] == "primary":
                if (L, S) not in numpy_refs:
                    numpy_refs[(L, S)] = ref.PrimaryNumpy.from_simulator(sim)
                fan = sim.render(pose)
                row["max_abs_diff_vs_numpy"] = float(np.abs(fan - numpy_refs[(L, S)].render(pose)).max())
            if "backward" not in skip:
                log.info("%s %dx%d: forward + pose backward (%s)", arch, L, S, cfg["loss"])
                simg, _ = make_sim(vol, arch, L, S, (H, W), cfg["model"], requires_grad="pose",
                                   share_volume_with=sim)
                row["backward"] = time_backward(simg, cfg["repeats"], loss=cfg["loss"],
                                                budget_s=cfg["budget_s"])
                row["backward"]["ratio_to_forward"] = (row["backward"]["fwd_bwd"]["median_ms"]
                                                       / row["forward"]["median_ms"])
                log.info("%s %dx%d: fwd+bwd %.2f ms (%.2fx forward)", arch, L, S,
                         row["backward"]["fwd_bwd"]["median_ms"], row["backward"]["ratio_to_forward"])
                del simg
            if "batch" not in skip:
                log.info("%s %dx%d: batched, B=%d", arch, L, S, cfg["batch"])
                row["batched"] = time_batched(vol, arch, L, S, (H, W), cfg["batch"], cfg["repeats"],
                                              cfg["model"], share=sim, budget_s=cfg["budget_s"])
                b = row["batched"]
                if b.get("status") == "ok":
                    b["speedup_vs_single"] = b["frames_per_s"] * row["forward"]["median_ms"] / 1e3
                    log.info("%s %dx%d: batched %.1f frames/s", arch, L, S, b["frames_per_s"])
                else:
                    log.info("%s %dx%d: batched %s", arch, L, S, b["status"])
            cases.append(row)
            del sim

    np_times = {}
    if numpy_refs:
        lo = 2 if cfg["quick"] else 5
        for (L, S), r in numpy_refs.items():
            log.info("NumPy reference %dx%d", L, S)
            np_times[(L, S)] = bench_numpy(r, vol.default_pose, cfg["numpy_budget_s"], lo,
                                           max(lo, cfg["repeats"]))
            log.info("NumPy reference %dx%d: %.1f ms", L, S, np_times[(L, S)]["median_ms"])
    proto = None
    if "prototype" not in skip:
        log.info("prior prototype (dense solves), child process, samples %s", cfg["proto_samples"])
        proto = bench_prototype(cfg["proto_samples"], cfg["proto_budget_s"])
    for row in cases:
        L, S, fwd = row["lines"], row["samples"], row["forward"]["median_ms"]
        npt = np_times.get((L, S), {}).get("median_ms")
        row["numpy_ms"] = npt
        row["speedup_vs_numpy"] = npt / fwd if npt else None
        if proto is not None:
            p_ms, kind = prototype_frame_ms(proto, L, S)
            row["prototype_ms"], row["prototype_kind"] = p_ms, kind
            row["speedup_vs_prototype"] = p_ms / fwd
            t_free = proto["t_ray_free_fit_ms"].get(S)
            if t_free is not None:          # the lower, free power-law extrapolation
                row["prototype_ms_free_fit"] = L * t_free
                row["speedup_vs_prototype_free_fit"] = L * t_free / fwd
        else:
            row["prototype_ms"], row["prototype_kind"], row["speedup_vs_prototype"] = None, "n/a", None

    startup = []
    if "startup" not in skip:
        sL, sS = cfg["startup_size"]
        for arch in cfg["archs"]:
            log.info("start-up %s (fresh processes, cold then warm offline cache)", arch)
            startup.append(measure_startup(arch, sL, sS, (H, W), cfg["volume"]))
    memory = None
    if "memory" not in skip:
        log.info("peak memory, %d^3 volume on %s (fresh process)", cfg["memory_dim"],
                 cfg["memory_arch"])
        L, S = cfg["sizes"][0] if cfg["quick"] else (256, 512)
        memory = measure_memory(cfg["memory_arch"], cfg["memory_dim"], L, S, (H, W))

    hw["loadavg_end"] = loadavg()
    doc = {"hardware": hw,
           "settings": {k: v for k, v in cfg.items() if k != "json"},
           "volume": {"name": vol.name, "shape": list(vol.shape), "channels": vol.n_channels},
           "cases": cases,
           "numpy": {f"{L}x{S}": v for (L, S), v in np_times.items()},
           "numpy_available": ref is not None,
           "prototype": None if proto is None else
           {**proto, "per_ray": {str(k): v for k, v in proto["per_ray"].items()},
            "t_ray_free_fit_ms": {str(k): v for k, v in proto["t_ray_free_fit_ms"].items()}},
           "startup": startup, "memory": memory}
    doc["settings"]["sizes"] = [f"{L}x{S}" for L, S in cfg["sizes"]]
    doc["settings"]["startup_size"] = "{}x{}".format(*cfg["startup_size"])
    doc["acceptance"] = acceptance(doc)
    doc["total_s"] = time.perf_counter() - t_start
    return doc


def acceptance(doc: dict) -> list[dict]:
    """Issue #7's numbers, each {what, value, goal, status: PASS | FAIL | why not judged}."""
    out = []
    g_arch, g_L, g_S, g_px = GOAL_CASE
    goal = [c for c in doc["cases"] if (c["backend"], c["lines"], c["samples"], tuple(c["image_px"]))
            == (g_arch, g_L, g_S, g_px)]
    c = goal[0] if goal else None
    no_case = "not measured (needs --arch cpu --sizes 256x512 --image-px 512)"
    skipped = set(doc["settings"].get("skip", ()))

    def item(what, value, goal_txt, ok, why=no_case):
        out.append({"what": what, "value": value, "goal": goal_txt,
                    "status": why if ok is None else ("PASS" if ok else "FAIL")})

    f = c["forward"]["median_ms"] if c else None
    item("forward, cpu, 256x512, 512x512 fan (ms/frame, median)", f, f"<= {GOAL_FORWARD_MS:g}",
         None if f is None else f <= GOAL_FORWARD_MS)
    r = c["backward"]["ratio_to_forward"] if c and "backward" in c else None
    item("forward + pose backward / forward, cpu, 256x512", r, f"<= {GOAL_BWD_RATIO:g}",
         None if r is None else r <= GOAL_BWD_RATIO,
         "skipped" if c and "backward" in skipped else no_case)
    s = c.get("speedup_vs_prototype") if c else None
    item("speed-up over the prototype's algorithm, cpu, 256x512 (c N^4 extrapolation)", s,
         f">= {GOAL_PROTO_SPEEDUP:.0e}", None if s is None else s >= GOAL_PROTO_SPEEDUP,
         no_case if not c else ("skipped" if "prototype" in skipped else
                                "n/a (benchmarks/reference_numpy.py unavailable)"))
    st = [x for x in doc["startup"] if x.get("backend") == "cpu"]
    warm = [x for x in st if x.get("status") == "ok"]
    w = warm[0]["warm"]["to_first_frame_s"] if warm else None
    item(f"start-up to first frame, warm offline cache, cpu, {warm[0]['size'] if warm else ''} "
         "(s, from process spawn)", w, f"<= {GOAL_WARM_START_S:g}",
         None if w is None else w <= GOAL_WARM_START_S,
         "skipped" if "startup" in skipped else (st[0].get("status") if st else
                                                  "not measured (needs --arch including cpu)"))
    if warm and (warm[0]["size"], tuple(warm[0]["image_px"])) != (f"{g_L}x{g_S}", g_px):
        out[-1]["status"] = "not the issue's size (needs --startup-size 256x512 --image-px 512)"
    m = doc["memory"]
    if m and m.get("status") == "ok":
        item(f"peak memory increase, {m['dim']}^3 f32 volume, {m['backend']} (MiB)",
             m["increase_bytes"] / MIB, f"<= {m['budget_bytes'] / MIB:.0f} (2 x volume + 64 MiB)",
             m["passed"])
        if m["dim"] != 256:
            out[-1]["status"] = "not the issue's size (needs --memory-dim 256)"
    else:
        item("peak memory, 256^3 volume", None, "2 x volume + 64 MiB", None,
             "skipped" if "memory" in skipped else (m or {}).get("status", "not measured"))
    bt = c.get("batched", {}) if c else {}
    item(f"batched frames/s, cpu, 256x512 (B={bt.get('batch', doc['settings']['batch'])})",
         bt.get("frames_per_s"), "stated", None if not bt else bt.get("status") == "ok",
         "skipped" if c and "batch" in skipped else no_case)
    if bt and bt.get("status") != "ok":
        out[-1]["status"] = bt.get("status")
    return out


def format_report(doc: dict) -> str:
    """The Markdown report printed on stdout."""
    hw, st = doc["hardware"], doc["settings"]
    H, W = st["image_px"]
    lines = [hardware_line(hw), "",
             f"volume {doc['volume']['name']} {tuple(doc['volume']['shape'])} x "
             f"{doc['volume']['channels']} ch, probe craniotomy, model {st['model']}, fan {H}x{W} "
             f"px, Taichi f32, NumPy f64; median of {st['repeats']} frames"
             + (" (--quick)" if st["quick"] else ""), ""]
    B = st["batch"]
    lines += ["| backend | lines x samples | forward ms | render ms | fwd+pose-bwd ms | "
              f"bwd ratio | batched frames/s (B={B}) | NumPy ms | vs NumPy | prototype ms | "
              "vs prototype |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in doc["cases"]:
        fwd = c["forward"]["median_ms"]
        bw = c.get("backward")
        bt = c.get("batched")
        if bt is None:
            btxt = "skipped"
        elif bt.get("status") == "ok":
            btxt = f"{bt['frames_per_s']:.1f}"
        else:
            btxt = bt.get("status", "n/a")
        ptxt = (f"{fmt_ms(c['prototype_ms'])} ({c['prototype_kind']})"
                if c.get("prototype_ms") else "n/a")
        lines.append(
            f"| {c['backend']} | {c['lines']} x {c['samples']} | {fmt_ms(fwd)} | "
            f"{fmt_ms(c['render']['median_ms'])} | "
            f"{fmt_ms(bw['fwd_bwd']['median_ms']) if bw else 'skipped'} | "
            f"{(fmt_x(bw['ratio_to_forward']) + ' (' + fmt_x(bw['ratio_to_staged']) + ' staged)') if bw else 'skipped'} | {btxt} | "
            f"{fmt_ms(c.get('numpy_ms'))} | {fmt_x(c.get('speedup_vs_numpy'))} | {ptxt} | "
            f"{fmt_x(c.get('speedup_vs_prototype'))} |")
    lines += ["",
              "forward = every kernel pose -> fan, `sim.forward(); ti.sync()`, fan left in Taichi "
              "fields; render = pose upload + forward + fan copy to NumPy (`sim.render(pose)`); "
              "fwd+pose-bwd = `sim.value_and_grad(pose)` with the "
              f"{st['loss']} loss (loss kernels + Tape backward to the 6 pose parameters), bwd ratio "
              "= fwd+pose-bwd / forward (in brackets: / the staged forward, the per-stage kernels "
              "that the Tape records; forward itself runs the fused kernels); batched frames/s = B / time of `set_poses(B poses); "
              "forward(); ti.sync()` on `Simulator(batch=B)`. Speed-ups (vs ...) = their time / "
              "forward."]
    if {"numpy", "prototype"} <= set(st.get("skip", ())):
        lines.append("NumPy, prototype: skipped")
    elif doc["numpy_available"]:
        lines.append("NumPy = benchmarks/reference_numpy.PrimaryNumpy: the same primary model, "
                     "vectorised float64 NumPy, pose -> fan, pose-independent set-up excluded.")
    else:
        lines.append("NumPy, prototype: n/a (benchmarks/reference_numpy.py not found next to the "
                     "package; run from a source checkout)")
    diffs = [f"{c['backend']} {c['lines']}x{c['samples']}: {c['max_abs_diff_vs_numpy']:.1e}"
             for c in doc["cases"] if "max_abs_diff_vs_numpy" in c]
    if diffs:
        lines.append("check: max |fan f32 - NumPy f64| " + ", ".join(diffs))
    proto = doc.get("prototype")
    if proto:
        p = dict(proto, per_ray={int(k): v for k, v in proto["per_ray"].items()},
                 t_ray_free_fit_ms={int(k): v for k, v in proto["t_ray_free_fit_ms"].items()})
        lines += prototype_note(p)
        free = [f"{c['backend']} {c['lines']}x{c['samples']}: {fmt_x(c['speedup_vs_prototype_free_fit'])}"
                for c in doc["cases"] if c.get("speedup_vs_prototype_free_fit")]
        if free:
            lines.append("  speed-up vs prototype with the free-fit extrapolation instead of c N^4: "
                         + ", ".join(free))

    if doc["startup"]:
        lines += ["", "Start-up to the first frame, fresh `python -c` process "
                  f"(default volume, {doc['settings']['startup_size']}, {H}x{W} fan), "
                  "TI_OFFLINE_CACHE_FILE_PATH and PYTHONPYCACHEPREFIX = new empty directory "
                  "(cold), then the same directory (warm); seconds:", "",
                  "| backend | cache | to first frame | interpreter start | import | ti.init | "
                  "volume | Simulator init | first frame | then teardown |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s in doc["startup"]:
            if s.get("status") != "ok":
                lines.append(f"| {s['backend']} | - | {s.get('status')} | | | | | | | |")
                continue
            for kind in ("cold", "warm"):
                d = s[kind]
                lines.append(f"| {s['backend']} | {kind} | {d['to_first_frame_s']:.2f} | "
                             f"{d['interpreter_start_s']:.2f} | {d['import_s']:.2f} | "
                             f"{d['ti_init_s']:.2f} | {d['volume_s']:.2f} | "
                             f"{d['simulator_s']:.2f} | {d['first_frame_s']:.2f} | "
                             f"{d['teardown_s']:.2f} |")
        lines.append("to first frame = from just before the parent spawns the process to the child's "
                     "clock when `render()` returns (the columns up to first frame add up to it); "
                     "interpreter start = spawn to the script's first line; import = diffus_taichi "
                     "+ taichi; Simulator init = fields, uploads, acoustic-property kernel; first "
                     "frame = `render()` incl. kernel JIT (cold) or cache load (warm); teardown = "
                     "interpreter and Taichi shut-down after it (not part of the goal).")
    m = doc.get("memory")
    if m:
        lines += [""]
        if m.get("status") == "ok":
            sp = ", ".join(f"{k} {v / MIB:.0f}" for k, v in m["stage_peak_over_baseline_bytes"].items())
            ss = ", ".join(f"{k} {v / MIB:.0f}" for k, v in m["stage_peak_over_start_bytes"].items())
            sr = ", ".join(f"{k} {(v - m['baseline_bytes']) / MIB:.0f}"
                           for k, v in m["stage_rss_after_bytes"].items())
            lines += [f"Peak memory ({m['backend']}, fresh process): {m['dim']}^3 float32 volume "
                      f"({m['volume_bytes'] / MIB:.0f} MiB) from a temporary NIfTI, Simulator "
                      f"{m['size']}, one render: baseline (after import taichi + ti.init) "
                      f"{m['baseline_bytes'] / MIB:.0f} MiB, peak {m['peak_bytes'] / MIB:.0f} MiB, "
                      f"increase {m['increase_bytes'] / MIB:.0f} MiB, budget 2 x volume + 64 MiB "
                      f"= {m['budget_bytes'] / MIB:.0f} MiB -> {'PASS' if m['passed'] else 'FAIL'}"
                      f" (Simulator storage {m.get('storage')}: props {m.get('props_dtype')} "
                      f"{tuple(m.get('props_shape') or ())}).",
                      f"  per stage, MiB ({m['measured_with']}): peak over baseline: {sp}; "
                      f"peak over the memory at the stage's start: {ss}; resident after the stage, "
                      f"over baseline: {sr}"]
        else:
            lines.append(f"Peak memory: {m.get('status')}")
    lines += ["", "Acceptance (issue #7):", ""]
    for a in doc["acceptance"]:
        v = a["value"]
        vtxt = "-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))
        lines.append(f"- {a['what']}: {vtxt} (goal {a['goal']}): {a['status']}")
    lines += ["", f"load average at start {hw['loadavg_1_5_15']}, at the end {hw.get('loadavg_end')} "
              f"(other processes on a shared machine slow the frames down); total "
              f"{doc['total_s']:.0f} s"]
    return "\n".join(lines)


def cmd_bench(a) -> int:
    cfg = _resolve(a)
    doc = run_bench(cfg)
    print(format_report(doc), flush=True)
    if cfg["json"]:
        with open(cfg["json"], "w") as fh:
            json.dump(doc, fh, indent=2, default=_json_default)
        log.info("wrote %s", cfg["json"])
    return 0


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray, tuple)):
        return list(o)
    return str(o)


BENCH_HELP = "benchmark: frame time, backward, batched frames/s, start-up, peak memory"
BENCH_DESCRIPTION = (
    "Benchmark the simulator on every backend (or --arch): forward and forward + pose-backward "
    "time, batched frames/s, cold and warm-cache start-up to the first frame and peak memory "
    "(fresh processes), with the NumPy reference and the prior prototype's algorithm as "
    "speed-up ratios, and issue #7's acceptance numbers. Markdown tables on stdout, progress "
    "on stderr, every number with --json.")


def add_bench_parser(sub) -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help=BENCH_HELP,
                       description=BENCH_DESCRIPTION)
    add_bench_args(b)
    b.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    b.set_defaults(func=cmd_bench)
    return b


def main(argv=None) -> int:
    """``diffus-taichi bench ...`` (argv without the word ``bench``)."""
    ap = argparse.ArgumentParser(prog="diffus-taichi bench", description=BENCH_DESCRIPTION)
    add_bench_args(ap)
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return cmd_bench(a)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        log.error("%s", e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
