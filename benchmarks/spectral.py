"""Benchmark: top singular value of ResNet18-on-CIFAR layer shapes.

For each shape (random weights scaled so that sigma_1 is about 3-10), measure the
layer passes and wall time to reach relative error 1e-3 and 1e-6 against the exact
value (scipy svds, tol 1e-10, float64, timed too) for

* ``lanczos``  - our default (block Lanczos on A^T A, thick restart),
* ``powerqr``  - the published iteration on I + A^T A (k = 1),
* ``power``    - plain power iteration on A^T A,

and the cost of one iteration as a ratio to one forward+backward of the layer on a
batch of 128. Results go to benchmarks/results/spectral.md.

Run: ``python benchmarks/spectral.py [--max-iter 600] [--shapes 0,1,2] [--threads 2]``
(by hand, not in CI; the full run takes a few minutes on 2 CPU cores, most of it svds).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from fastclip.exact import svds_singular_values
from fastclip.linalg import warm_start
from fastclip.linalg.operator import AffineOperator, unwrap
from fastclip.pipeline.cli import OneLineErrorParser
from fastclip.pipeline.data import dataset_info
from fastclip.pipeline.methods.lip4conv import conv_bound
from fastclip.pipeline.training import load_model
from fastclip.spectral import lanczos, power_qr, singular_values

log = logging.getLogger("benchmarks.spectral")

SHAPES = [  # (label, module factory, input shape)
    ("conv 3->64 3x3, 32x32", lambda: nn.Conv2d(3, 64, 3, padding=1, bias=False), (3, 32, 32)),
    ("conv 64->64 3x3, 32x32", lambda: nn.Conv2d(64, 64, 3, padding=1, bias=False), (64, 32, 32)),
    (
        "conv 64->128 3x3 s2, 32x32",
        lambda: nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False),
        (64, 32, 32),
    ),
    ("conv 128->128 3x3, 16x16", lambda: nn.Conv2d(128, 128, 3, padding=1, bias=False), (128, 16, 16)),
    ("conv 256->256 3x3, 8x8", lambda: nn.Conv2d(256, 256, 3, padding=1, bias=False), (256, 8, 8)),
    ("conv 512->512 3x3, 4x4", lambda: nn.Conv2d(512, 512, 3, padding=1, bias=False), (512, 4, 4)),
    ("conv 64->128 1x1 s2, 32x32", lambda: nn.Conv2d(64, 128, 1, stride=2, bias=False), (64, 32, 32)),
    ("linear 512->10", lambda: nn.Linear(512, 10, bias=False), (512,)),
]
TARGETS = (1e-3, 1e-6)


def get_args_parser() -> argparse.ArgumentParser:
    p = OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--max-iter", type=int, default=600, help="cap on passes for powerqr/power (default 600)")
    p.add_argument("--shapes", default="all", help="comma-separated indices into the shape list, or 'all'")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "spectral.md"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--side-by-side",
        action="store_true",
        help="only the table of exact sigma_1 against the Gram bound, PowerQR and svds on the ResNet18 "
        "convs (float32), written into its section of --out",
    )
    p.add_argument(
        "--trained",
        nargs="+",
        metavar="RUN",
        default=None,
        help="only passes with and without the Fourier start on every conv of these trained runs",
    )
    p.add_argument("--reps", type=int, default=5, help="runs per timing, the minimum is kept (side by side)")
    p.add_argument(
        "--device",
        default="cpu",
        help="cpu or cuda[:N]: where the iterations and the layer passes run "
        "(svds always runs on the host, on a CPU copy)",
    )
    return p


DEVICE = torch.device("cpu")


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _first_below(history: list[float], exact: float, target: float) -> int | None:
    for i, v in enumerate(history):
        if abs(v - exact) / exact <= target:
            return i + 1
    return None


def _power_history(op: AffineOperator, n_iter: int, gen: torch.Generator) -> tuple[list[float], float]:
    v = torch.randn((1, *op.input_shape), generator=gen, dtype=op.dtype).to(op.device)
    v /= v.norm()
    hist = []
    _sync()
    t = time.perf_counter()
    with torch.no_grad():
        for _ in range(n_iter):
            w = op.gram(v)
            # Rayleigh quotient <v, A^T A v> = ||A v||^2 costs nothing extra
            hist.append(float((v * w).sum()) ** 0.5)
            v = w / w.norm()
    _sync()
    return hist, time.perf_counter() - t


def _time_fwd_bwd(module: nn.Module, shape: tuple[int, ...], batch: int = 128, reps: int = 3) -> float:
    x = torch.randn((batch, *shape), dtype=torch.float64, device=DEVICE, requires_grad=True)
    times = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        module(x).square().sum().backward()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _time_one_iteration(fn, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_shape(label, factory, shape, args, gen) -> dict:
    torch.manual_seed(args.seed)
    module = factory().double()
    t = time.perf_counter()
    s0 = svds_singular_values(module, shape, k=1, tol=1e-10)[0].item()
    target_sigma = 3.0 + 7.0 * torch.rand((), generator=gen).item()
    with torch.no_grad():
        module.weight.mul_(target_sigma / s0)
    t = time.perf_counter()
    exact = svds_singular_values(module, shape, k=1, tol=1e-10)[0].item()
    t_svds = time.perf_counter() - t  # on the host, as a user would run it
    module = module.to(DEVICE)
    op = AffineOperator(module, shape)
    row = {"shape": label, "sigma1": exact, "svds_s": t_svds}

    # our default: run to a tight tolerance, record sigma_1 after every pass, and time
    # the default stopping rule separately
    _sync()
    t = time.perf_counter()
    r = lanczos(
        op,
        k=1,
        tol=1e-12,
        max_passes=args.max_iter,
        record_history=True,
        generator=torch.Generator(device=DEVICE).manual_seed(args.seed),
        with_left=False,
        check_every=1,
    )
    _sync()
    t_lz = time.perf_counter() - t
    per_pass = t_lz / max(r.passes, 1)
    _sync()
    t = time.perf_counter()
    got = singular_values(module, shape, k=1, check_affine=False)
    _sync()
    row["lanczos_default_s"] = time.perf_counter() - t
    rd = lanczos(op, k=1, generator=torch.Generator(device=DEVICE).manual_seed(args.seed), with_left=False)
    row["lanczos_default_passes"] = rd.passes if not isinstance(module, nn.Linear) else 0
    row["lanczos_default_err"] = abs(got[0].item() - exact) / exact
    for tgt in TARGETS:
        p = _first_below(r.history, exact, tgt)
        row[f"lanczos_{tgt:g}"] = p
        row[f"lanczos_{tgt:g}_s"] = None if p is None else p * per_pass

    q = power_qr(op, k=1, n_iter=0)  # allocation only
    _sync()
    t = time.perf_counter()
    q = power_qr(
        op,
        X=torch.randn((1, *shape), generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64),
        n_iter=args.max_iter,
        record_history=True,
    )
    _sync()
    t_pqr = time.perf_counter() - t
    for tgt in TARGETS:
        p = _first_below(q.history, exact, tgt)
        row[f"powerqr_{tgt:g}"] = p
        row[f"powerqr_{tgt:g}_s"] = None if p is None else p * t_pqr / args.max_iter

    hist, t_pow = _power_history(op, args.max_iter, torch.Generator().manual_seed(args.seed))
    for tgt in TARGETS:
        p = _first_below(hist, exact, tgt)
        row[f"power_{tgt:g}"] = p
        row[f"power_{tgt:g}_s"] = None if p is None else p * t_pow / args.max_iter

    fb = _time_fwd_bwd(module, shape)
    X1 = torch.randn((1, *shape), dtype=torch.float64, device=DEVICE)
    if isinstance(module, nn.Conv2d):  # the circular Gram-iteration bound (lip4conv), 6 iterations
        _sync()
        t = time.perf_counter()
        with torch.no_grad():
            bound = float(conv_bound(module, shape, 6, True))
        _sync()
        row["gram_bound"], row["gram_s"] = bound, time.perf_counter() - t
    row["fwd_bwd_128_s"] = fb
    row["powerqr_iter_ratio"] = _time_one_iteration(lambda: power_qr(op, X=X1, n_iter=1)) / fb
    row["lanczos_pass_ratio"] = per_pass / fb
    log.info("%s: %s", label, {k: v for k, v in row.items() if k != "shape"})
    return row


def _fmt_passes(p, s) -> str:
    return "> cap" if p is None else f"{p} ({s:.2f} s)"


def write_markdown(rows: list[dict], args, path: Path) -> None:
    lines = [
        "# Spectral extraction benchmark",
        "",
        f"Generated by `python benchmarks/spectral.py` on {time.strftime('%Y-%m-%d')}, "
        + (
            f"{torch.cuda.get_device_name(DEVICE)} (svds on the host CPU), "
            if DEVICE.type == "cuda"
            else "CPU, "
        )
        + f"{args.threads} threads, float64, torch {torch.__version__}. Random weights scaled to sigma_1 in [3, 10]; "
        "exact value by scipy svds (tol 1e-10). Cells: layer passes (one pass = one forward + backward of the "
        f"layer on the iterate) to reach the relative error, and the wall time that took; '> cap' = not reached "
        f"within {args.max_iter} passes.",
        "",
        "| layer | sigma_1 | svds time | lanczos 1e-3 | lanczos 1e-6 | PowerQR 1e-3 | PowerQR 1e-6 "
        "| power 1e-3 | power 1e-6 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['sigma1']:.4f} | {r['svds_s']:.2f} s | "
            + " | ".join(
                _fmt_passes(r[f"{m}_{t:g}"], r[f"{m}_{t:g}_s"])
                for m in ("lanczos", "powerqr", "power")
                for t in TARGETS
            )
            + " |"
        )
    lines += [
        "",
        "`fastclip.singular_values` with its defaults (block Lanczos, relative residual 1e-6 in float64; "
        "SVD of the weight for Linear, shown as 0 passes):",
        "",
        "| layer | passes | wall time | relative error | vs svds time |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['lanczos_default_passes']} | {r['lanczos_default_s']:.2f} s | "
            f"{r['lanczos_default_err']:.1e} | {r['lanczos_default_s'] / r['svds_s']:.2f}x |"
        )
    lines += [
        "",
        "Circular Gram-iteration bound (Delattre et al., 6 iterations, polyphase for strides; an upper "
        "bound of the circular conv, not the zero-padded one):",
        "",
        "| layer | bound | bound / exact | time |",
        "|---|---|---|---|",
    ]
    for r in rows:
        if "gram_bound" in r:
            lines.append(
                f"| {r['shape']} | {r['gram_bound']:.4f} | {r['gram_bound'] / r['sigma1']:.3f} | "
                f"{r['gram_s']:.3f} s |"
            )
    lines += [
        "",
        "Cost of one iteration as a ratio to one forward+backward of the layer on a batch of 128:",
        "",
        "| layer | fwd+bwd, batch 128 | one PowerQR iteration (k=1) | one Lanczos pass (k=1, incl. reorth.) |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['fwd_bwd_128_s'] * 1e3:.1f} ms | {r['powerqr_iter_ratio']:.3f} | "
            f"{r['lanczos_pass_ratio']:.3f} |"
        )

    def ratio(t):
        pairs = []
        for r in rows:
            lz = r[f"lanczos_{t:g}"]
            pq = r[f"powerqr_{t:g}"]
            pairs.append((args.max_iter if pq is None else pq) / lz if lz else float("nan"))
        return statistics.median(pairs), sum(r[f"powerqr_{t:g}"] is None for r in rows)

    med6, capped6 = ratio(1e-6)
    med3, _ = ratio(1e-3)
    faster = sum(r["lanczos_default_s"] < r["svds_s"] for r in rows)
    lines += [
        "",
        "## Headline",
        "",
        f"- Median over the {len(rows)} shapes of PowerQR passes / Lanczos passes to reach 1e-6: "
        f"**{med6:.0f}x** (a lower bound: PowerQR hit the {args.max_iter}-pass cap on {capped6} shapes); "
        f"to reach 1e-3: {med3:.1f}x.",
        f"- The default stopping rule was faster than svds on {faster} of {len(rows)} shapes "
        f"(total {sum(r['lanczos_default_s'] for r in rows):.1f} s vs {sum(r['svds_s'] for r in rows):.1f} s), "
        f"max relative error {max(r['lanczos_default_err'] for r in rows):.1e}.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print("\n".join(lines))


# -- side by side: exact sigma_1 against the fastest bound ------------------------------
RESNET18_CONVS = [  # (label, c_in, c_out, stride, input size): ResNet18 on CIFAR-10
    ("3->64 3x3 @32x32", 3, 64, 1, 32),
    ("64->64 3x3 @32x32", 64, 64, 1, 32),
    ("64->128 3x3 s2 @32x32", 64, 128, 2, 32),
    ("128->128 3x3 @16x16", 128, 128, 1, 16),
    ("256->256 3x3 @8x8", 256, 256, 1, 8),
    ("512->512 3x3 @4x4", 512, 512, 1, 4),
]
SIDE_BEGIN, SIDE_END = "<!-- side-by-side: begin -->", "<!-- side-by-side: end -->"
TRAINED_BEGIN, TRAINED_END = "<!-- trained: begin -->", "<!-- trained: end -->"


def _best_of(fn, reps: int):
    best, out = float("inf"), None
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        out = fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best, out


def side_by_side_row(label: str, cin: int, cout: int, stride: int, size: int, args) -> dict:
    """Ours (``singular_values``, float32, converged), the circular Gram bound, the
    published PowerQR (run until it is within 1e-5 of the exact value, or the cap) and
    svds (float64): times (min of ``args.reps``), passes, errors."""
    torch.manual_seed(args.seed)
    conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False).to(DEVICE)
    shape = (cin, size, size)
    t_svds, s = _best_of(lambda: svds_singular_values(conv.double().cpu(), shape, k=1, tol=1e-10), 1)
    exact = float(s[0])
    conv = conv.float().to(DEVICE)
    op = AffineOperator(conv, shape)
    gen = lambda: torch.Generator(device=DEVICE).manual_seed(args.seed)  # noqa: E731
    t_ours, got = _best_of(
        lambda: singular_values(conv, shape, check_affine=False, generator=gen()), args.reps
    )
    start = warm_start.start_for(conv, shape, gen())
    r = lanczos(
        op, k=1, X=start, with_left=False, generator=gen(), predict_checks=True
    )  # what singular_values runs
    rc = lanczos(op, k=1, with_left=False, generator=gen(), predict_checks=True)  # without the Fourier start
    x = torch.randn((1, *shape), device=DEVICE)
    t_pass, _ = _best_of(lambda: op.gram(x), 20)
    with torch.no_grad():
        t_gram, bound = _best_of(lambda: conv_bound(conv, shape, 6, True), args.reps)
    X0 = torch.randn((1, *shape), generator=torch.Generator().manual_seed(args.seed))
    q = power_qr(op, X=X0, n_iter=args.max_iter, record_history=True)
    p_pqr = _first_below(q.history, exact, 1e-5)
    t_pqr, _ = _best_of(lambda: power_qr(op, X=X0, n_iter=p_pqr or args.max_iter), args.reps)
    row = {
        "layer": label,
        "exact": exact,
        "ours_s": t_ours,
        "ours_err": abs(float(got[0]) - exact) / exact,
        "passes": r.passes,
        "passes_cold": rc.passes,
        "pass_s": t_pass,
        "gram_s": t_gram,
        "gram_over": float(bound) / exact - 1,
        "pqr_s": t_pqr,
        "pqr_passes": p_pqr,
        "svds_s": t_svds,
    }
    log.info("%s: %s", label, {k: v for k, v in row.items() if k != "layer"})
    return row


def side_by_side_markdown(rows: list[dict], args) -> str:
    lines = [
        SIDE_BEGIN,
        "## Exact sigma_1 against the fastest bound (ResNet18-on-CIFAR convs)",
        "",
        f"Generated by `python benchmarks/spectral.py --side-by-side` on {time.strftime('%Y-%m-%d')}, "
        + (torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "CPU")
        + f", {args.threads} thread(s), float32, torch {torch.__version__}, min of {args.reps} runs in one "
        "process. Random weights (seed "
        f"{args.seed}). *ours*: `fastclip.singular_values` with its defaults (block Lanczos to a relative "
        "residual of 1e-5, the Fourier start where it pays); error against scipy svds in float64 (tol 1e-10). "
        "*Gram bound*: the circular Gram-iteration bound (Delattre et al. 2023, 6 iterations, polyphase for "
        "strides), an upper bound that ignores zero padding (its excess over the exact value shown). "
        f"*PowerQR*: the published iteration, run until within 1e-5 of the exact value (cap {args.max_iter}). "
        "*passes x pass*: the passes ours took times one pass of the layer (forward + backward on one "
        "vector): the Krylov limit of the time.",
        "",
        "| layer | ours | passes (cold start) | passes x pass | ours / (passes x pass) | rel. error | "
        "Gram bound | bound excess | **ours / bound** | PowerQR (passes) | svds (float64) |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        limit = r["passes"] * r["pass_s"]
        pqr = f"{r['pqr_s']:.3f} s ({r['pqr_passes']})" if r["pqr_passes"] else f"> {args.max_iter} passes"
        lines.append(
            f"| {r['layer']} | {r['ours_s']:.3f} s | {r['passes']} ({r['passes_cold']}) | {limit:.3f} s | "
            f"{r['ours_s'] / limit:.2f} | {r['ours_err']:.1e} | {r['gram_s']:.3f} s | "
            f"{r['gram_over'] * 100:.2f} % | **{r['ours_s'] / r['gram_s']:.2f}x** | {pqr} | "
            f"{r['svds_s']:.1f} s |"
        )
    wins = sum(r["ours_s"] <= r["gram_s"] for r in rows)
    lines += [
        "",
        f"Exact sigma_1 in no more time than the bound on {wins} of {len(rows)} shapes; max relative "
        f"error {max(r['ours_err'] for r in rows):.1e}.",
        SIDE_END,
        "",
    ]
    return "\n".join(lines)


def write_section(text: str, begin: str, end: str, path: Path) -> None:
    """Replace (or insert after the title) the section of ``path`` between the markers
    ``begin`` and ``end``, keeping the rest."""
    old = path.read_text() if path.exists() else ""
    if begin in old and end in old:
        a, b = old.index(begin), old.index(end) + len(end)
        new = old[:a] + text.rstrip("\n") + old[b:]
    else:
        head, _, rest = old.partition("\n\n")
        new = (head + "\n\n" + text + "\n" + rest) if old else text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
    print(text)


def trained_rows(run_dirs: list[str], args) -> list[dict]:
    """Passes to convergence (float32, the default rule) with and without the Fourier
    start on every conv of trained models (a run directory each), at its true input
    size (recorded by forward hooks on one batch)."""
    rows = []
    for run in run_dirs:
        model, cfg = load_model(run)
        shapes, convs, seen = {}, {}, set()
        for name, m in model.named_modules():
            if isinstance(unwrap(m), nn.Conv2d) and id(unwrap(m)) not in seen:
                seen.add(id(unwrap(m)))
                convs[name] = unwrap(m)

        def record(name, shapes=shapes):
            def hook(mod, inp):
                shapes.setdefault(name, tuple(inp[0].shape[1:]))

            return hook

        hooks = [m.register_forward_pre_hook(record(name)) for name, m in convs.items()]
        with torch.no_grad():
            model(torch.zeros(1, *dataset_info(cfg.dataset).input_shape))
        for h in hooks:
            h.remove()
        for name, conv in convs.items():
            shape = shapes[name]
            conv = conv.float()
            op = AffineOperator(conv, shape)
            gen = lambda: torch.Generator().manual_seed(args.seed)  # noqa: E731
            start = warm_start.start_for(conv, shape, gen())
            cold = lanczos(op, k=1, with_left=False, generator=gen(), predict_checks=True)
            warm = (
                lanczos(op, k=1, X=start, with_left=False, generator=gen(), predict_checks=True)
                if start is not None
                else None
            )
            rows.append(
                {
                    "run": Path(run).name,
                    "layer": name,
                    "shape": shape,
                    "cold": cold.passes,
                    "warm": warm.passes if warm is not None else None,
                    "sigma1": float(cold.values[0]),
                }
            )
            log.info("%s", rows[-1])
    return rows


def trained_markdown(rows: list[dict]) -> str:
    lines = [
        TRAINED_BEGIN,
        "## Passes on trained layers, with and without the Fourier start",
        "",
        f"Generated by `python benchmarks/spectral.py --trained RUN...` on {time.strftime('%Y-%m-%d')}: every "
        "conv of the trained models, float32, default stopping rule (predicted checks), at its input size. "
        "'-': no Fourier start (the layer is too wide for the search to pay).",
        "",
        "| run | layer | input | sigma_1 | passes, random start | passes, Fourier start |",
        "|---|---|---|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['layer']} | {'x'.join(map(str, r['shape']))} | {r['sigma1']:.4f} | "
            f"{r['cold']} | {r['warm'] if r['warm'] is not None else '-'} |"
        )
    lines += [TRAINED_END, ""]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> None:
    global DEVICE
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    DEVICE = torch.device(args.device)
    idx = range(len(SHAPES)) if args.shapes == "all" else [int(i) for i in args.shapes.split(",")]
    gen = torch.Generator().manual_seed(args.seed)
    if args.side_by_side:
        idx = range(len(RESNET18_CONVS)) if args.shapes == "all" else idx
        rows = [side_by_side_row(*RESNET18_CONVS[i], args) for i in idx]
        write_section(side_by_side_markdown(rows, args), SIDE_BEGIN, SIDE_END, Path(args.out))
        return
    if args.trained:
        write_section(
            trained_markdown(trained_rows(args.trained, args)), TRAINED_BEGIN, TRAINED_END, Path(args.out)
        )
        return
    rows = [bench_shape(*SHAPES[i], args, gen) for i in idx]
    write_markdown(rows, args, Path(args.out))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
