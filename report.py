"""Reports of a continual run: the three Figure 3 metrics per segment, per-task accuracy, and the Figure 4 graph.

Figure 3 (paper Section 5): 1) average test accuracy on task-set A, 2) accounted parameters (eq. 2) averaged over
all the system's models, 3) inference FLOPs for one image averaged over all models. Figure 4: the system as a graph,
one coloured path per task from its input through embedding, class token, position embedding and its transformer
layers to its head; a component shared by several models is one node.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mu2net
import vit


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else math.nan


def summary(system: mu2net.System, report_tasks: Sequence[str], label: str) -> dict[str, Any]:
    """Figure 3's metrics of the system now, plus every task's test accuracy (model.metrics["test"])."""
    models = list(system.models.values())
    test = {m.task: float(m.metrics.get("test", math.nan)) for m in models}
    return {
        "segment": label,
        "test_acc_set": _mean([test[t] for t in report_tasks if t in test]),
        "set_tasks": sum(t in test for t in report_tasks),
        "params": _mean([mu2net.accounted_params(system, m) for m in models]),
        "flops": _mean([float(mu2net.model_flops(system.cfg, system.params, m))
                        for m in models]),
        "models": len(models),
        "test": test,
    }


def _fmt(x: float, pct: bool = False) -> str:
    if x is None or x != x:
        return "–"
    return f"{100 * x:.2f}" if pct else f"{x:.4g}"


def tables(history: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: the Figure 3 metrics after each segment, then test accuracy (%) per task and segment."""
    lines = ["| segment | avg test acc % (report set) | avg accounted params | avg FLOPs | models |",
             "|---|---:|---:|---:|---:|"]
    for h in history:
        lines.append(f"| {h['segment']} | {_fmt(h['test_acc_set'], True)} ({h['set_tasks']} tasks) | "
                     f"{_fmt(h['params'])} | {_fmt(h['flops'])} | {h['models']} |")
    tasks: list[str] = []
    for h in history:
        tasks += [t for t in h["test"] if t not in tasks]
    if tasks:
        lines += ["", "| task | " + " | ".join(h["segment"] for h in history) + " |",
                  "|---|" + "---:|" * len(history)]
        for t in tasks:
            lines.append(f"| {t} | " + " | ".join(_fmt(h["test"].get(t, math.nan), True) for h in history) + " |")
    return "\n".join(lines) + "\n"


def write(run: str | Path, history: Sequence[Mapping[str, Any]], segments: Sequence[Any],
          report_tasks: Sequence[str], system: mu2net.System, final: bool, stream: Any = sys.stdout) -> None:
    """`report.md` (always); at the end also `metrics.png` (Figure 3) and `graph.png` (Figure 4)."""
    run = Path(run)
    text = tables(history)
    (run / "report.md").write_text(f"# {run.name}\n\nReport set: {', '.join(report_tasks)}\n\n{text}")
    if stream is not None:
        print(f"\n## after segment {history[-1]['segment']}\n\n{text}", file=stream, flush=True)
    if final:
        plot_metrics(history, run / "metrics.png")
        plot_graph(system, run / "graph.png")


def plot_metrics(history: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Figure 3: the three metrics over the sequence of segments."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(history)))
    labels = [h["segment"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (k, title, scale) in zip(axes, [("test_acc_set", "avg test accuracy on report set (%)", 100),
                                            ("params", "avg accounted params", 1), ("flops", "avg FLOPs / image", 1)]):
        ax.plot(x, [h[k] * scale for h in history], marker="o")
        ax.set_title(title, fontsize=10)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _level(name: str) -> float | None:
    if name == "embedding":
        return 1
    if name == "cls":
        return 2
    if name == "posembed_input":
        return 3
    if vit.is_block(name):
        return 4 + vit.block_index(name)
    if vit.is_adapter(name):
        return 3.5 + vit.block_index(name)
    return None  # encoder_norm and head are drawn as the task's top node


def trained_by(system: mu2net.System) -> dict[str, str]:
    """Component id → the task whose model first listed it (the task that trained it, Figure 4's node colour);
    root components are absent (drawn grey)."""
    root = set(system.root.components)
    out: dict[str, str] = {}
    lin = system.lineage
    for mid, (parent, comps) in sorted(lin.items(), key=lambda kv: _depth(lin, kv[0])):
        if mid == system.root.id:
            continue
        have = set(lin[parent][1]) if parent in lin else set()
        for c in comps:
            if c not in root and c not in have and c not in out:
                out[c] = mu2net.task_of(mid)
    for m in system.models.values():
        for c in m.components:
            if c not in root:
                out.setdefault(c, m.task)
    return out


def _depth(lin: Mapping[str, tuple], mid: str) -> int:
    d = 0
    while mid in lin and lin[mid][0] is not None and d < 10_000:
        mid, d = lin[mid][0], d + 1
    return d


def plot_graph(system: mu2net.System, path: str | Path) -> None:
    """Figure 4: inputs (triangles) at the bottom, heads (rectangles) at the top, shared components as one round
    node; each task's path in its own colour; nodes coloured by the task that trained them, grey = root."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted(system.models.values(), key=lambda m: m.task)
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(models) + 2), 7))
    if not models:
        ax.text(0.5, 0.5, "no models yet", ha="center")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    cmap = plt.get_cmap("tab20" if len(models) > 10 else "tab10")
    colour = {m.task: cmap(i % cmap.N) for i, m in enumerate(models)}
    users: dict[str, list[int]] = {}
    for i, m in enumerate(models):
        for c in m.components:
            if _level(mu2net.kind(c)) is not None:
                users.setdefault(c, []).append(i)
    xpos = {c: sum(ix) / len(ix) for c, ix in users.items()}
    top = 5 + system.cfg.depth
    owner = trained_by(system)
    for i, m in enumerate(models):
        pts = [(i, 0.0)] + [(xpos[c], _level(mu2net.kind(c))) for c in m.components if c in xpos] + [(i, top)]
        jitter = (i - len(models) / 2) * 0.01
        ax.plot([p[0] + jitter for p in pts], [p[1] for p in pts], color=colour[m.task], lw=1.6, alpha=0.8, zorder=1)
        ax.scatter([i], [0], marker="^", s=120, color=colour[m.task], zorder=3, edgecolor="k")
        ax.scatter([i], [top], marker="s", s=160, color=colour[m.task], zorder=3, edgecolor="k")
        ax.text(i, top + 0.4, m.task, rotation=60, ha="left", va="bottom", fontsize=7)
    for c, x in xpos.items():
        col = colour.get(owner.get(c, ""), (0.6, 0.6, 0.6, 1.0))
        ax.scatter([x], [_level(mu2net.kind(c))], s=60 + 25 * len(users[c]), color=col, edgecolor="k", zorder=2)
    names = ["input", "embedding", "cls", "posembed"] + [f"block {i}" for i in range(system.cfg.depth)]
    ax.set_yticks(list(range(4 + system.cfg.depth)) + [top], names + ["head"], fontsize=8)
    ax.set_xticks([])
    ax.set_ylim(-0.7, top + 2.5)
    ax.set_title(f"system graph: {len(models)} tasks, {len(system.params)} components", fontsize=10)
    for s in ("top", "right", "bottom"):
        ax.spines[s].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- Section 4: a comparison of method families (Table 2, Figure 2) -----------------------------------------

AGGREGATION = ("Aggregation (section4.md §8, §10.15; the paper does not state it): each configuration is the mean "
               "over its repetitions; std is the sample std (ddof = 1); a family's Table 2 row is its configuration "
               "with the best mean quality. Quality = mean test accuracy over the tasks; params/task = the system's "
               "accounted parameters (eq. 2, root not a sharer) summed over tasks / #tasks; FLOPs/task = mean "
               "forward FLOPs per image.")


def sub_runs(dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every finished sub-run below `dirs`: its `comparison.json` (family, config, value, repetition) and the final
    Figure 3 summary of its `result.json` (written when the run finishes)."""
    import json
    out = []
    for d in dirs:
        for f in sorted(Path(d).rglob("comparison.json")):
            res = f.with_name("result.json")
            if res.exists():
                out.append({**json.loads(f.read_text()), **json.loads(res.read_text()), "dir": str(f.parent)})
    return out


def run_metrics(result: Mapping[str, Any]) -> tuple[float, float, float]:
    """(quality, params/task, FLOPs/task) of one finished run's final summary."""
    test = list(result["test"].values())
    return _mean(test), float(result["params"]), float(result["flops"])


def aggregate(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (family, configuration): n, max / mean / sample std of quality, mean params and FLOPs."""
    groups: dict[tuple[str, str], list] = {}
    for r in runs:
        groups.setdefault((r["family"], r["config"]), []).append((r.get("value"), run_metrics(r)))
    rows = []
    for (fam, cfg), g in groups.items():
        q = [m[0] for _, m in g]
        n = len(q)
        mean = sum(q) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in q) / (n - 1)) if n > 1 else math.nan
        rows.append(dict(family=fam, config=cfg, value=g[0][0], n=n, max=max(q), mean=mean, std=std,
                         params=_mean([m[1] for _, m in g]), flops=_mean([m[2] for _, m in g])))
    return rows


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (cost, quality) points, in increasing cost: no other point has both a cost as
    low and a quality as high, one of them strictly."""
    keep = [i for i, (c, q) in enumerate(points)
            if not any((c2 <= c and q2 >= q) and (c2 < c or q2 > q) for c2, q2 in points)]
    return sorted(keep, key=lambda i: (points[i][0], points[i][1]))


def table2(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: Table 2 (each family's best configuration by mean quality), then every configuration."""
    fams = list(dict.fromkeys(r["family"] for r in rows))

    def line(r: Mapping[str, Any], label: str) -> str:
        std = "–" if r["std"] != r["std"] else f"{100 * r['std']:.2f}"
        return (f"| {label} | {100 * r['max']:.2f} | {100 * r['mean']:.2f} ± {std} | {r['n']} | "
                f"{r['params']:.4g} | {r['flops']:.4g} |")

    head = ["| method | max % | avg ± std % | reps | params/task | FLOPs/task |", "|---|---:|---:|---:|---:|---:|"]
    best = [max((r for r in rows if r["family"] == f), key=lambda r: r["mean"]) for f in fams]
    out = ["## Table 2", "", *head, *(line(r, f"{r['family']} ({r['config']})") for r in best), "",
           "## Every configuration", "", *head,
           *(line(r, f"{r['family']} ({r['config']})") for f in fams for r in rows if r["family"] == f), "",
           AGGREGATION]
    return "\n".join(out) + "\n"


def plot_figure2(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> None:
    """Figure 2: quality against params/task and against FLOPs/task (log x), one point per configuration (mean
    over repetitions, std as error bars), each family's Pareto frontier drawn as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, key, xlabel in zip(axes, ("params", "flops"), ("params / task", "FLOPs / task")):
        for i, fam in enumerate(dict.fromkeys(r["family"] for r in rows)):
            rs = [r for r in rows if r["family"] == fam]
            pts = [(r[key], 100 * r["mean"]) for r in rs]
            col = f"C{i}"
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                        yerr=[0 if r["std"] != r["std"] else 100 * r["std"] for r in rs], fmt="o", color=col,
                        alpha=0.6, capsize=2)
            front = pareto(pts)
            ax.plot([pts[j][0] for j in front], [pts[j][1] for j in front], "-", color=col, label=fam)
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean test accuracy (%)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_comparison(out: str | Path) -> list[dict[str, Any]]:
    """`comparison.md` (Table 2 and every configuration) and `figure2.png` in `out` from the finished sub-runs
    below it; callable while the comparison is still running."""
    out = Path(out)
    rows = aggregate(sub_runs([out]))
    if rows:
        (out / "comparison.md").write_text(f"# {out.name}\n\n" + table2(rows))
        plot_figure2(rows, out / "figure2.png", out.name)
    return rows


if __name__ == "__main__":  # python report.py RUN_DIR [...]: aggregate the finished sub-runs of comparisons
    for d in sys.argv[1:]:
        rows = write_comparison(d)
        print(table2(rows) if rows else f"{d}: no finished sub-run yet")
