#!/usr/bin/env python
"""Physics validation: every acceptance number of the realism issue, measured on the built-in
test objects (``uniform``, ``wires``, ``cysts``, ``layers``) against its prediction from the set
parameters. Prints a Markdown table and writes figures (PSF profiles, speckle histogram against
the Rayleigh density, attenuation fit, cyst contrast) to ``--out``.

    python benchmarks/validate_physics.py --arch cpu --out assets/figures/validation

The measurement functions return plain dicts and are reused (smaller sizes) by
tests/test_physics_validation.py.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings

import numpy as np

warnings.filterwarnings("ignore", message=".*getdefaultlocale.*", category=DeprecationWarning)

from diffus_taichi import get_probe  # noqa: E402
from diffus_taichi.acoustics import AcousticMapping, TissueTable  # noqa: E402
from diffus_taichi.builtin_volumes import CYSTS, WIRE_DEPTHS_MM, WIRE_X_MM  # noqa: E402
from diffus_taichi.simulator import Simulator  # noqa: E402

RAYLEIGH_SNR = math.sqrt(math.pi / (4.0 - math.pi))        # mean/std of a Rayleigh variable, 1.913
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _gauss_fwhm(y, x, floor=0.25):
    """FWHM of a Gaussian fitted (least squares on log y) to the points of y >= floor * max
    around the peak; x the sample positions."""
    i0 = int(np.argmax(y))
    lo = i0
    while lo > 0 and y[lo - 1] >= floor * y[i0]:
        lo -= 1
    hi = i0
    while hi < len(y) - 1 and y[hi + 1] >= floor * y[i0]:
        hi += 1
    lo, hi = min(lo, i0 - 1), max(hi, i0 + 1)
    c = np.polyfit(x[lo:hi + 1] - x[i0], np.log(y[lo:hi + 1]), 2)
    return FWHM_PER_SIGMA * math.sqrt(-0.5 / c[0])


# --------------------------------------------------------------------------------------------
def measure_speckle(arch="cpu", probe="craniotomy", n_lines=256, n_samples=512, depth_range=(10, 45),
                    edge=48, **settings):
    """Envelope mean/std in the fully developed region of ``uniform`` (normalised per depth by
    its RMS, so attenuation and beam changes cancel)."""
    pr = get_probe(probe, n_lines=n_lines, n_samples=n_samples)
    sim = Simulator("uniform", probe=pr, arch=arch, tgc_db_per_cm=0.0, **settings)
    sim.render()
    st = sim.stages()
    d = pr.sample_depths_mm()
    sel = (d > depth_range[0]) & (d < depth_range[1])
    e = st["envelope"][edge:-edge][:, sel]
    e = e / np.sqrt((e ** 2).mean(0))
    iq_i, iq_q = st["iq_i"][edge:-edge][:, sel], st["iq_q"][edge:-edge][:, sel]
    return {"snr": float(e.mean() / e.std()), "env": e.ravel(), "n": int(e.size),
            "iq_ratio": float(iq_q.std() / iq_i.std()),
            "iq_corr": float(np.corrcoef(iq_i.ravel(), iq_q.ravel())[0, 1])}


def measure_mean_consistency(arch="cpu", volume="brain", n_lines=128, n_samples=256):
    """Mean intensity of the coherent image over that of ``speckle='mean'`` (expected 1)."""
    pr = get_probe("craniotomy", n_lines=n_lines, n_samples=n_samples)
    out = {}
    for sp in ("coherent", "mean"):
        sim = Simulator(volume, probe=pr, arch=arch, speckle=sp)
        sim.set_pose(None)
        sim.forward_staged()          # keeps the envelope stages in their fields
        out[sp] = (sim.env_mean if sp == "mean" else sim.env).to_numpy()
    return {"ratio": float((out["coherent"] ** 2).mean() / (out["mean"] ** 2).mean())}


def wire_probe(n_samples=1024):
    """Linear probe with lines every 0.25 mm (the wires lie on lines 14, 24, 34)."""
    return get_probe("linear", width_mm=12.0, n_lines=49, depth_mm=40.0, n_samples=n_samples,
                     frequency_mhz=9.0, bandwidth=0.6, aperture_mm=12.0, focus_mm=20.0,
                     image_px=(128, 128))


def measure_wires(arch="cpu", n_samples=1024):
    """Axial and lateral FWHM of each wire's echo vs the set pulse and aperture."""
    pr = wire_probe(n_samples)
    sim = Simulator("wires", probe=pr, arch=arch, speckle=False, tgc_db_per_cm=0.0)
    sim.render()
    env = sim.stages()["envelope"]
    depth = pr.sample_depths_mm()
    xl = np.linspace(-pr.width_mm / 2, pr.width_mm / 2, pr.n_lines)
    rows = []
    for d, x in zip(WIRE_DEPTHS_MM, WIRE_X_MM):
        line = int(np.argmin(np.abs(xl - x)))
        win = np.abs(depth - d) < 0.5
        s = int(np.flatnonzero(win)[np.argmax(env[line, win])])
        ax = _gauss_fwhm(env[line, s - 12:s + 13], depth[s - 12:s + 13])
        lat = _gauss_fwhm(env[line - 8:line + 9, s], xl[line - 8:line + 9])
        rows.append({"depth_mm": d, "axial_mm": ax, "axial_pred_mm": pr.axial_fwhm_mm(),
                     "lateral_mm": lat, "lateral_pred_mm": float(pr.lateral_fwhm_mm(depth[s])),
                     "axial_profile": (depth[s - 12:s + 13] - depth[s], env[line, s - 12:s + 13]),
                     "lateral_profile": (xl[line - 8:line + 9] - xl[line], env[line - 8:line + 9, s])})
    return rows


def measure_attenuation(arch="cpu", alpha=0.5, frequency_mhz=5.0, n_lines=256, n_samples=512):
    """Round-trip attenuation slope (dB/cm) fitted to the speckle intensity of ``uniform`` with
    alpha set, TGC off, by the reference-phantom method (divided by the same block with alpha = 0,
    which removes the depth dependence of the beam), and the residual slope of the displayed
    level with TGC = 2 alpha f (also relative to the reference)."""
    pr = get_probe("linear", width_mm=20.0, depth_mm=40.0, n_lines=n_lines, n_samples=n_samples,
                   image_px=(64, 64), frequency_mhz=frequency_mhz)
    depth_cm = pr.sample_depths_mm() / 10.0
    inside = (depth_cm > 0.3) & (depth_cm < 3.5)
    out = {"set_db_cm": -2 * alpha * frequency_mhz}
    lvl = {}
    for a, tgc in ((alpha, 0.0), (0.0, 0.0), (alpha, 2 * alpha * frequency_mhz)):
        mapping = AcousticMapping("tissue", overrides={"white_matter": (1.62, a, 0.15)})
        sim = Simulator("uniform", probe=pr, mapping=mapping, arch=arch, tgc_db_per_cm=tgc,
                        dynamic_range_db=200.0, gain_db=80.0)
        sim.render()
        st = sim.stages()
        env_db = 10 * np.log10((st["envelope"][:, inside] ** 2).mean(0))
        lvl[(a, tgc)] = (st["bmode_lines"][:, inside] * 200.0 - 200.0).mean(0)   # displayed dB
        if tgc == 0.0:
            out[f"env_db_{a}"] = env_db
    rel = out[f"env_db_{alpha}"] - out["env_db_0.0"]
    out.update(depth_cm=depth_cm[inside], env_db=rel,
               slope_db_cm=float(np.polyfit(depth_cm[inside], rel, 1)[0]),
               raw_slope_db_cm=float(np.polyfit(depth_cm[inside], out[f"env_db_{alpha}"], 1)[0]),
               tgc_residual_db_cm=float(np.polyfit(
                   depth_cm[inside], lvl[(alpha, 2 * alpha * frequency_mhz)] - lvl[(0.0, 0.0)], 1)[0]))
    return out


def measure_cysts(arch="cpu", n_lines=256, n_samples=768):
    """Mean intensity inside each inclusion (r < 0.6 R, image plane through its centre) relative
    to the background at the same depths beside it, vs 20 log10(scattering ratio)."""
    pr = get_probe("linear", width_mm=36.0, depth_mm=45.0, n_lines=n_lines, n_samples=n_samples,
                   frequency_mhz=7.5, image_px=(256, 256))
    sim = Simulator("cysts", probe=pr, arch=arch, tgc_db_per_cm=0.0)
    fan = sim.render()
    env = sim.stages()["envelope"]
    tab = TissueTable.load()
    xl = np.linspace(-pr.width_mm / 2, pr.width_mm / 2, pr.n_lines)
    depth = pr.sample_depths_mm()
    rows = []
    for t, x, d, rad in CYSTS:
        dz = np.abs(depth - d) < 0.6 * rad
        inner = np.abs(xl - x) < 0.6 * rad
        inside = env[inner][:, dz] ** 2
        ring = (np.abs(xl - x) > rad + 1.5) & (np.abs(xl - x) < rad + 4.5)
        for t2, x2, d2, r2 in CYSTS:      # skip lines under a shallower inclusion (enhancement)
            if d2 < d:
                ring &= np.abs(xl - x2) > r2 + 1.0
        bg = env[ring][:, dz] ** 2
        meas = 10 * np.log10(max(inside.mean(), 1e-30) / bg.mean())
        s_c, s_b = tab[t].scattering, tab["white_matter"].scattering
        pred = 20 * np.log10(s_c / s_b) if s_c > 0 else -np.inf
        rows.append({"tissue": t, "depth_mm": d, "radius_mm": rad, "measured_db": float(meas),
                     "predicted_db": float(pred)})
    xs, zs = pr.fan_axes_mm()                # pixel centres of the fan image (isotropic px)
    return {"rows": rows, "fan": fan, "extent": (xs[0], xs[-1], zs[0], zs[-1])}


def measure_layers(arch="cpu", n_samples=1024):
    """Two-layer reflection (primary model) from the echo stage and the envelope, vs
    (Z2 - Z1)/(Z2 + Z1), at the water|fat and fat|white-matter interfaces of ``layers``."""
    pr = get_probe("linear", width_mm=8.0, n_lines=8, depth_mm=30.0, n_samples=n_samples,
                   image_px=(64, 64))
    sim = Simulator("layers", probe=pr, arch=arch, speckle=False, tgc_db_per_cm=0.0)
    sim.render()
    st = sim.stages()
    depth = pr.sample_depths_mm()
    tab = TissueTable.load()
    rows = []
    for (t1, _), (t2, top) in zip([("water", 0.0), ("fat", 10.0)], [("fat", 10.0), ("white_matter", 20.0)]):
        z1, z2 = tab[t1].impedance_MRayl, tab[t2].impedance_MRayl
        near = np.abs(depth - top) < 0.2
        r_echo = float((st["echo"][4, near] / st["two_way_gain"][4, near]).sum())
        s = int(np.flatnonzero(near)[np.argmax(st["envelope"][4, near])])
        rows.append({"interface": f"{t1} / {t2}", "predicted": (z2 - z1) / (z2 + z1), "echo": r_echo,
                     "envelope": float(st["envelope"][4, s] / st["two_way_gain"][4, s])})
    return rows


def measure_reverb(arch="cpu", n_samples=1024, za=3.0, zb=1.6):
    """3-layer ``reverb`` trace (water | layer A 10-20 mm | layer B, lossless): primary at a, second
    primary at b, first multiple at 2b - a, amplitudes vs the analytic ones."""
    mapping = AcousticMapping("tissue", overrides={"water": (1.48, 0.0, 0.0), "fat": (za, 0.0, 0.0),
                                                   "white_matter": (zb, 0.0, 0.0)})
    pr = get_probe("linear", width_mm=4.0, n_lines=2, depth_mm=40.0, n_samples=n_samples,
                   image_px=(32, 32))
    sim = Simulator("layers", probe=pr, arch=arch, mapping=mapping, echo_model="reverb",
                    speckle=False, tgc_db_per_cm=0.0)
    sim.render()
    tr = sim.stages()["echo"][0]
    z0 = 1.48
    ra, rb = (za - z0) / (za + z0), (zb - za) / (zb + za)
    a = int(np.argmax(np.abs(tr[:int(n_samples * 0.375)])))
    b = a + 5 + int(np.argmax(np.abs(tr[a + 5:int(n_samples * 0.625)])))
    t_mult = 2 * b - a

    def amp(i):
        return float(tr[i - 2:i + 3].sum())
    m = int(np.argmax(np.abs(tr[b + 5:])) + b + 5)
    return {"a": a, "b": b, "multiple_expected_sample": t_mult, "multiple_found_sample": m,
            "primary_a": (amp(a), ra), "primary_b": (amp(b), (1 - ra * ra) * rb),
            "multiple": (amp(t_mult), -(1 - ra * ra) * rb * rb * ra), "trace": tr,
            "depth": pr.sample_depths_mm()}


# --------------------------------------------------------------------------------------------
def figures(out, sp, wires, att, cysts, rev):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out, exist_ok=True)
    fig, axs = plt.subplots(1, 2, figsize=(9, 3.4))
    for w in wires:
        x, y = w["axial_profile"]
        axs[0].plot(x, y / y.max(), "o-", ms=3, label=f"{w['depth_mm']:.0f} mm")
        s = w["axial_pred_mm"] / FWHM_PER_SIGMA
        xx = np.linspace(x.min(), x.max(), 200)
        axs[0].plot(xx, np.exp(-0.5 * (xx / s) ** 2), "k:", lw=0.8)
        x, y = w["lateral_profile"]
        axs[1].plot(x, y / y.max(), "o-", ms=3, label=f"{w['depth_mm']:.0f} mm")
        s = w["lateral_pred_mm"] / FWHM_PER_SIGMA
        xx = np.linspace(x.min(), x.max(), 200)
        axs[1].plot(xx, np.exp(-0.5 * (xx / s) ** 2), "k:", lw=0.8)
    axs[0].set(title="axial PSF (wires; dotted: predicted)", xlabel="depth - peak (mm)",
               ylabel="envelope / peak")
    axs[1].set(title="lateral PSF (wires; dotted: predicted)", xlabel="lateral (mm)")
    axs[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "psf_profiles.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    e = sp["env"] / sp["env"].mean() * math.sqrt(math.pi / 2)   # Rayleigh with sigma = 1
    ax.hist(e, bins=80, density=True, alpha=0.6, label=f"uniform, n={sp['n']}")
    x = np.linspace(0, e.max(), 300)
    ax.plot(x, x * np.exp(-x * x / 2), "k", label="Rayleigh")
    ax.set(title=f"speckle envelope: mean/std = {sp['snr']:.3f}", xlabel="envelope (Rayleigh sigma)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "speckle_histogram.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    ax.plot(att["depth_cm"], att["env_db"], ".", ms=2, label="speckle intensity / reference (alpha=0)")
    c = np.polyfit(att["depth_cm"], att["env_db"], 1)
    ax.plot(att["depth_cm"], np.polyval(c, att["depth_cm"]), "r",
            label=f"fit {c[0]:.2f} dB/cm (set {att['set_db_cm']:.2f})")
    ax.set(title="attenuation, uniform, 0.5 dB/cm/MHz at 5 MHz", xlabel="depth (cm)", ylabel="dB")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "attenuation_fit.png"), dpi=110)
    plt.close(fig)

    fig, axs = plt.subplots(1, 2, figsize=(9, 3.8))
    x0, x1, z0, z1 = cysts["extent"]
    axs[0].imshow(cysts["fan"], cmap="gray", extent=(x0, x1, z1, z0), vmin=0, vmax=1)
    axs[0].set(title="cysts (B-mode)", xlabel="x (mm)", ylabel="depth (mm)")
    rows = cysts["rows"]
    lab = [f"{r['tissue']}\n{r['depth_mm']:.0f} mm" for r in rows]
    pred = [max(r["predicted_db"], -40) for r in rows]
    meas = [max(r["measured_db"], -40) for r in rows]
    xs = np.arange(len(rows))
    axs[1].bar(xs - 0.2, pred, 0.4, label="predicted (-inf shown as -40)")
    axs[1].bar(xs + 0.2, meas, 0.4, label="measured")
    axs[1].set_xticks(xs, lab, fontsize=7)
    axs[1].set(title="contrast vs background (dB)")
    axs[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "cyst_contrast.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(rev["depth"], rev["trace"], lw=0.8)
    for key, i in (("primary a", rev["a"]), ("primary b", rev["b"]),
                   ("1st multiple", rev["multiple_expected_sample"])):
        ax.axvline(rev["depth"][i], color="k", ls=":", lw=0.6)
        ax.text(rev["depth"][i], ax.get_ylim()[1] * 0.8, key, fontsize=7)
    ax.set(title="reverb trace, water | Z=3.0 (10-20 mm) | Z=1.6", xlabel="depth (mm)",
           ylabel="pressure")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "reverb_trace.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="cpu")
    ap.add_argument("--out", default=os.path.join("assets", "figures", "validation"))
    a = ap.parse_args(argv)
    sp = measure_speckle(a.arch)
    sp3 = measure_speckle(a.arch, elevation_planes=3)
    spl = measure_speckle(a.arch, probe="linear", n_lines=256, n_samples=512, depth_range=(5, 35),
                          edge=32)
    mc = measure_mean_consistency(a.arch)
    wires = measure_wires(a.arch)
    att = measure_attenuation(a.arch)
    cy = measure_cysts(a.arch)
    lay = measure_layers(a.arch)
    rev = measure_reverb(a.arch)
    rows = [("uniform: envelope mean/std (craniotomy 256x512, 10-45 mm)", f"{sp['snr']:.3f}",
             f"{RAYLEIGH_SNR:.3f} +- 0.08", abs(sp["snr"] - RAYLEIGH_SNR) <= 0.08),
            ("uniform: same, 3 elevation planes", f"{sp3['snr']:.3f}", f"{RAYLEIGH_SNR:.3f} +- 0.08",
             abs(sp3["snr"] - RAYLEIGH_SNR) <= 0.08),
            ("uniform: same, linear probe 5-35 mm", f"{spl['snr']:.3f}", f"{RAYLEIGH_SNR:.3f} +- 0.08",
             abs(spl["snr"] - RAYLEIGH_SNR) <= 0.08),
            ("uniform: std(Q)/std(I), corr(I, Q)", f"{sp['iq_ratio']:.3f}, {sp['iq_corr']:+.3f}",
             "1, 0", abs(sp["iq_ratio"] - 1) < 0.05 and abs(sp["iq_corr"]) < 0.05),
            ("brain: mean intensity coherent / speckle='mean'", f"{mc['ratio']:.3f}", "1 (+-20 %)",
             abs(mc["ratio"] - 1) <= 0.2)]
    for w in wires:
        rows.append((f"wires {w['depth_mm']:.0f} mm: axial FWHM (mm)", f"{w['axial_mm']:.4f}",
                     f"{w['axial_pred_mm']:.4f} +- 10 %",
                     abs(w["axial_mm"] / w["axial_pred_mm"] - 1) <= 0.1))
        rows.append((f"wires {w['depth_mm']:.0f} mm: lateral FWHM (mm)", f"{w['lateral_mm']:.4f}",
                     f"{w['lateral_pred_mm']:.4f} +- 10 %",
                     abs(w["lateral_mm"] / w["lateral_pred_mm"] - 1) <= 0.1))
    rows.append(("uniform 0.5 dB/cm/MHz, 5 MHz: fitted slope (dB/cm)", f"{att['slope_db_cm']:.3f}",
                 f"{att['set_db_cm']:.3f} +- 5 %", abs(att["slope_db_cm"] / att["set_db_cm"] - 1) <= 0.05))
    rows.append(("  same with TGC = 2 alpha f: residual slope (dB/cm)",
                 f"{att['tgc_residual_db_cm']:.3f}", "0 +- 0.25", abs(att["tgc_residual_db_cm"]) <= 0.25))
    for r in cy["rows"]:
        ok = r["measured_db"] <= -20 if r["predicted_db"] == -np.inf else \
            abs(r["measured_db"] - r["predicted_db"]) <= 1.5
        pred = "<= -20" if r["predicted_db"] == -np.inf else f"{r['predicted_db']:.2f} +- 1.5"
        rows.append((f"cysts: {r['tissue']} r={r['radius_mm']:.0f} mm at {r['depth_mm']:.0f} mm: "
                     "contrast (dB)", f"{r['measured_db']:.2f}", pred, ok))
    for r in lay:
        rows.append((f"layers {r['interface']}: reflection (echo stage)", f"{r['echo']:.5f}",
                     f"{r['predicted']:.5f} +- 1 %", abs(r["echo"] / r["predicted"] - 1) <= 0.01))
        rows.append((f"layers {r['interface']}: envelope peak / two-way gain", f"{r['envelope']:.5f}",
                     f"abs({r['predicted']:.5f}) (info)", True))
    for key in ("primary_a", "primary_b", "multiple"):
        m, p = rev[key]
        rows.append((f"reverb 3 layers: {key.replace('_', ' ')} amplitude", f"{m:.5f}",
                     f"{p:.5f} +- 2 %", abs(m / p - 1) <= 0.02))
    rows.append(("reverb: first multiple arrival (sample)", str(rev["multiple_found_sample"]),
                 f"2b - a = {rev['multiple_expected_sample']} +- 2",
                 abs(rev["multiple_found_sample"] - rev["multiple_expected_sample"]) <= 2))
    print("| quantity | measured | predicted | ok |")
    print("|---|---:|---:|:-:|")
    for q, m, p, ok in rows:
        print(f"| {q} | {m} | {p} | {'yes' if ok else 'NO'} |")
    figures(a.out, sp, wires, att, cy, rev)
    print(f"\nfigures written to {a.out}/")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
