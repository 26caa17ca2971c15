"""Reports of a continual run (paper Section 5): Figures 3–7, per-task accuracy, §5.4's transfer analysis, and the
mean ± std of Figure 3 over repetitions.

Figure 3: 1) average test accuracy on task-set A, 2) accounted parameters (eq. 2) averaged over all the system's
models, 3) inference FLOPs for one image averaged over all models. Figure 4: the system as a graph, one coloured path
per task from its input through embedding, class token, position embedding and its transformer layers to its head; a
component shared by several models is one node. Figure 5: the hyperparameter values of the retained models.
Figure 6: the learned probability of cloning each transformer layer, by depth. Figure 7: the distribution of the μ
values. §5.4: which task-set A models found a better-scoring path through what task-set B's models introduced.

Everything here reads the per-segment summaries (`summary`, kept in the checkpoint's `extra["history"]`) and the
system; nothing trains.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
import tyro

import checkpoint
import manifest
import methods
import mu2net
import vit


class ReportError(ValueError):
    """Run directories that cannot be reported (together): the message names the run and what differs."""


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else math.nan


def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; NaN for a single value) over repetitions."""
    xs = np.asarray(xs, np.float64)
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else math.nan


def mean_se(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error, the sample std over √n (NaN for a single value)."""
    mean, std = mean_std(xs)
    return mean, std / math.sqrt(len(xs))


def summary(system: mu2net.System, report_tasks: Sequence[str], label: str) -> dict[str, Any]:
    """Figure 3's metrics of the system now, every task's test accuracy (model.metrics["test"]), the report set,
    and per task the record of its retained model (`retained`) that Figures 5–7 and §5.4 read."""
    rec = retained(system)
    test = {t: r["test"] for t, r in rec.items()}
    return {
        "segment": label,
        "test_acc_set": _mean([test[t] for t in report_tasks if t in test]),
        "set_tasks": sum(t in test for t in report_tasks),
        "params": _mean([r["params"] for r in rec.values()]),
        "flops": _mean([r["flops"] for r in rec.values()]),
        "models": len(rec),
        "test": test,
        "report_set": list(report_tasks),
        "retained": rec,
    }


def ancestry(system: mu2net.System, model: mu2net.Model) -> list[str]:
    """Ids of the models on `model`'s parent chain, nearest first, root excluded. A child starts only from its
    parent's components (shared, cloned, or re-added from the parent's own ancestors), so these are all the models
    whose training can have reached `model`'s parameters."""
    out, mid = [], model.parent
    while mid is not None and mid != system.root.id and mid in system.lineage and len(out) < 100_000:
        out.append(mid)
        mid = system.lineage[mid][0]
    return out


def retained(system: mu2net.System) -> dict[str, dict[str, Any]]:
    """Per task (in the system's order), its retained model: id, hyperparameters, μ table, validation quality,
    score, test accuracy, accounted parameters (eq. 2), FLOPs, `sources` (the other tasks on its parent chain) and
    `uses` (task -> how many of its components that task's models introduced, shared frozen; Figure 4's colours)."""
    owner = trained_by(system)
    out: dict[str, dict[str, Any]] = {}
    for t, m in system.models.items():
        uses: dict[str, int] = {}
        for c in m.components:
            if owner.get(c, t) != t:
                uses[owner[c]] = uses.get(owner[c], 0) + 1
        out[t] = {
            "id": m.id, "hp": dict(m.hp), "mu": dict(m.mu),
            "quality": float(m.metrics.get("quality", math.nan)), "score": float(m.metrics.get("score", math.nan)),
            "test": float(m.metrics.get("test", math.nan)),
            "params": float(mu2net.accounted_params(system, m)),
            "flops": float(mu2net.model_flops(system.cfg, system.params, m)),
            "sources": sorted({mu2net.task_of(a) for a in ancestry(system, m)} - {t}),
            "uses": dict(sorted(uses.items())),
        }
    return out


def _fmt(x: float, pct: bool = False) -> str:
    if x is None or x != x:
        return "–"
    return f"{100 * x:.2f}" if pct else f"{x:.4g}"


def tables(history: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: the Figure 3 metrics after each segment (with the segment's P and F, eq. 1), then test accuracy (%)
    per task and segment."""
    lines = ["| segment | avg test acc % (report set) | avg accounted params | avg FLOPs | models | P | F |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for h in history:
        lines.append(f"| {h['segment']} | {_fmt(h['test_acc_set'], True)} ({h['set_tasks']} tasks) | "
                     f"{_fmt(h['params'])} | {_fmt(h['flops'])} | {h['models']} | {_fmt(h.get('P', math.nan))} | "
                     f"{_fmt(h.get('F', math.nan))} |")
    ran = [h for h in history if "iterations" in h]
    if ran:  # how each segment ended (evolve: the mean gain of its last round, until_gain)
        lines += ["", "| segment | task iterations run | mean gain of the last round (validation examples) | "
                  "ended by |", "|---|---:|---:|---|"]
        lines += [f"| {h['segment']} | {h['iterations']} | {h['gain']:.3g} | "
                  f"{'convergence (until_gain)' if h['converged'] else 'its iterations'} |" for h in ran]
    tasks: list[str] = []
    for h in history:
        tasks += [t for t in h["test"] if t not in tasks]
    if tasks:
        lines += ["", "| task | " + " | ".join(h["segment"] for h in history) + " |",
                  "|---|" + "---:|" * len(history)]
        for t in tasks:
            lines.append(f"| {t} | " + " | ".join(_fmt(h["test"].get(t, math.nan), True) for h in history) + " |")
    return "\n".join(lines) + "\n"


def machine() -> dict[str, Any]:
    """What a run's numbers depend on besides the manifest and the code: XLA's CPU code changes with the
    instruction set it may use (`XLA_FLAGS=--xla_cpu_max_isa`) and with the number of cores it splits work over
    (docs/reproducibility.md; `machine_line` shows it). CPU model, its AVX-512 and AMX flags, usable cores,
    XLA_FLAGS, jax, backend."""
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            if k.strip() == "model name":
                cpu = v.strip()
            elif k.strip() == "flags":
                flags = {f for f in v.split() if f.startswith(("avx512", "amx"))}
    except OSError:
        pass
    return dict(cpu=cpu, isa=" ".join(sorted(flags)), cores=len(os.sched_getaffinity(0)) if hasattr(
        os, "sched_getaffinity") else os.cpu_count(), xla_flags=os.environ.get("XLA_FLAGS", ""), jax=jax.__version__,
        backend=jax.default_backend())


def _save(fig: Any, path: str | Path, dpi: int) -> None:
    """A figure as a PNG written whole (`checkpoint.write_atomic`: never through a link at `path`)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    checkpoint.write_atomic(path, buf.getvalue())


def machine_line(machines: Sequence[Mapping[str, Any]]) -> str:
    """Where a run was computed (its figures depend on the CPU's instruction set and core count:
    docs/reproducibility.md)."""
    return "; ".join(f"{m.get('cpu')} ({m.get('isa') or 'no AVX-512'}), {m.get('cores')} cores, "
                     f"XLA_FLAGS='{m.get('xla_flags', '')}', jax {m.get('jax')} {m.get('backend')}" for m in machines)


def write(run: str | Path, history: Sequence[Mapping[str, Any]], report_tasks: Sequence[str], system: mu2net.System,
          final: bool, stream: Any = sys.stdout, machines: Sequence[Mapping[str, Any]] = ()) -> None:
    """`report.md` (always); at the end also `metrics.png` (Figure 3), `graph.png` (Figure 4), and Figures 5–7 with
    `analysis.md` (`figures`)."""
    run = Path(run)
    text = tables(history)
    where = f"Computed on: {machine_line(machines)}\n\n" if machines else ""
    checkpoint.write_atomic(run / "report.md",
                            f"# {run.name}\n\nReport set: {', '.join(report_tasks)}\n\n{where}{text}".encode())
    if stream is not None:
        print(f"\n## after segment {history[-1]['segment']}\n\n{text}", file=stream, flush=True)
    if final:
        plot_metrics(history, run / "metrics.png")
        plot_graph(system, run / "graph.png")
        figures(run, history, report_tasks, system.cfg.depth, machines)


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
    _save(fig, path, 110)
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
        _save(fig, path, 110)
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
    _save(fig, path, 110)
    plt.close(fig)


# --- Figures 5–7 and §5.4 ------------------------------------------------------------------------------------

FIGURES = ("hparams.png", "mu_depth.png", "mu_values.png", "analysis.md")


def _segments(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The summaries that hold retained-model records (runs written before they were recorded have none)."""
    return [h for h in history if h.get("retained")]


def _value_key(v: Any) -> tuple[int, float, str]:
    return (0, float(v), "") if isinstance(v, (bool, int, float)) else (1, 0.0, str(v))


def _show(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def hparam_counts(history: Sequence[Mapping[str, Any]]) -> tuple[list[str], dict[str, dict[Any, list[int]]]]:
    """Figure 5's data: (segment labels, hyperparameter -> value -> number of retained models with that value at
    each segment's end). Hyperparameters in Table 1's order, then the rest (num_layers, μ2Net's global mu)."""
    segs = _segments(history)
    names: list[str] = [n for n in methods.TABLE1 if any(n in r["hp"] for h in segs for r in h["retained"].values())]
    for h in segs:
        for r in h["retained"].values():
            names += [n for n in r["hp"] if n not in names]
    counts: dict[str, dict[Any, list[int]]] = {}
    for n in names:
        vals = sorted({r["hp"][n] for h in segs for r in h["retained"].values() if n in r["hp"]}, key=_value_key)
        counts[n] = {v: [sum(1 for r in h["retained"].values() if n in r["hp"] and r["hp"][n] == v)
                         for h in segs] for v in vals}
    return [h["segment"] for h in segs], counts


def probability(rec: Mapping[str, Any], action: str) -> float:
    """The probability a retained model's μ gives mutation `action`: its learned table entry (μ2Net+), else its
    global μ (μ2Net models, and actions its lineage never queried: a table entry starts at μ, `mu2net.query`)."""
    return float(rec["mu"].get(action, rec["hp"].get("mu", methods.PLUS_DEFAULTS["mu"])))


def clone_by_depth(history: Sequence[Mapping[str, Any]], depth: int) -> tuple[list[str], np.ndarray]:
    """Figure 6's data: (segment labels, [segment, layer] mean probability of cloning transformer layer i, over all
    the retained models at the segment's end)."""
    segs = _segments(history)
    table = np.array([[_mean([probability(r, f"clone:{vit.block(i)}") for r in h["retained"].values()])
                       for i in range(depth)] for h in segs]).reshape(len(segs), depth)
    return [h["segment"] for h in segs], table


def clone_mean(rec: Mapping[str, Any]) -> float:
    """A model's average probability of cloning one of its clonable layers (§5.2: 21.4 % -> 17.4 %)."""
    n = int(rec["hp"].get("num_layers", 0))
    acts = ["clone:embedding", "clone:cls", "clone:posembed_input"] + [f"clone:{vit.block(i)}" for i in range(n)]
    return _mean([probability(rec, a) for a in acts])


def _action_key(a: str) -> tuple:
    kind, _, name = a.partition(":")
    if kind == "hp":
        order = list(methods.TABLE1) + ["num_layers", "mu"]
        return (0, order.index(name) if name in order else len(order), name)
    lvl = _level(name)
    return (1, lvl if lvl is not None else 99, name)


def mu_values(recs: Mapping[str, Mapping[str, Any]]) -> dict[str, list[float]]:
    """Figure 7's data: mutation action -> the probability each retained model gives it (`probability`), for every
    action in some model's learned table; {"mu": global μs} when no model has a table (μ2Net only)."""
    actions = sorted({a for r in recs.values() for a in r["mu"]}, key=_action_key)
    if not actions:
        return {"mu": [float(r["hp"]["mu"]) for r in recs.values() if "mu" in r["hp"]]}
    return {a: [probability(r, a) for r in recs.values()] for a in actions}


def transfer(history: Sequence[Mapping[str, Any]], a_tasks: Sequence[str]) -> list[dict[str, Any]]:
    """§5.4: for every segment that starts with tasks outside task-set A in the system (task-set B), the A tasks
    whose retained model changed during it (a better-scoring model was found), with the B tasks on the new model's
    parent chain (`via`: it descends from B's training), the B tasks whose introduced components it shares (`uses`),
    and its validation, test, size and FLOPs before and after."""
    a, rows = set(a_tasks), []
    for before, after in zip(history, history[1:]):
        if not before.get("retained") or not after.get("retained"):
            continue
        b = set(before["retained"]) - a
        if not b:
            continue
        for t, new in after["retained"].items():
            old = before["retained"].get(t)
            if t not in a or old is None or old["id"] == new["id"]:
                continue
            rows.append({"segment": after["segment"], "task": t, "before": old["id"], "after": new["id"],
                         "via": [x for x in new["sources"] if x in b],
                         "uses": {x: n for x, n in new["uses"].items() if x in b},
                         **{f"{k}_{w}": r[k] for k in ("quality", "test", "params", "flops")
                            for w, r in (("before", old), ("after", new))}})
    return rows


def _pct(x: float) -> str:
    return _fmt(x, True)


def _transfer_section(history: Sequence[Mapping[str, Any]], a_tasks: Sequence[str]) -> list[str]:
    """§5.4's part of `analysis`: the task-set A models that found a better model while task-set B was in the
    system, and what they transfer from."""
    rows = transfer(history, a_tasks)
    out = ["", "## §5.4: task-set A models improved while task-set B was in the system", "",
            f"Task-set A: {', '.join(a_tasks)}. Task-set B: every other task in the system. A model *descends from* "
            "B when a B task's model is on its parent chain, and *shares* B's components when it uses, frozen, "
            "components that B's models introduced.", ""]
    for h in history[1:]:
        mine = [r for r in rows if r["segment"] == h["segment"]]
        if not mine:
            continue
        n_a = sum(t in h["retained"] for t in a_tasks)
        via1 = sum(len(set(r["via"]) | set(r["uses"])) >= 1 for r in mine)
        via2 = sum(len(set(r["via"]) | set(r["uses"])) >= 2 for r in mine)
        out.append(f"- {h['segment']}: {len(mine)} of {n_a} task-set A tasks found a better-scoring model; {via1} of "
                   f"them transfer from at least one task-set B task, {via2} from two or more.")
    if not any(b.get("retained") and a.get("retained") for b, a in zip(history, history[1:])):
        out.append("Not available: no two consecutive summaries hold retained-model records (a run written before "
                   "they were recorded).")
    elif not rows:
        out.append("No task-set A model changed during a segment that started with task-set B in the system.")
    else:
        out += ["", "| segment | task | model before → after | descends from (B) | shares components of (B) | "
                "val acc % | test acc % | accounted params | FLOPs |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            uses = ", ".join(f"{t} ({n})" for t, n in r["uses"].items()) or "–"
            out.append(
                f"| {r['segment']} | {r['task']} | {r['before']} → {r['after']} | {', '.join(r['via']) or '–'} | "
                f"{uses} | {_pct(r['quality_before'])} → {_pct(r['quality_after'])} | {_pct(r['test_before'])} → "
                f"{_pct(r['test_after'])} | {_fmt(r['params_before'])} → {_fmt(r['params_after'])} | "
                f"{_fmt(r['flops_before'])} → {_fmt(r['flops_after'])} |")
    return out


def analysis(history: Sequence[Mapping[str, Any]], a_tasks: Sequence[str], depth: int, name: str = "") -> str:
    """Markdown: the data behind Figures 5–7 and §5.4's transfer table."""
    out = [f"# Section 5 analysis{': ' + name if name else ''}", ""]
    segs = _segments(history)
    if not segs:
        return "\n".join(out + ["No segment summary holds retained-model records (a run written before they were "
                                "recorded): nothing to report.", ""])
    if len(segs) < len(history) - 1:
        out += [f"Only {len(segs)} of {len(history)} summaries hold retained-model records; the others are left out.",
                ""]
    labels, counts = hparam_counts(history)
    out += ["## Figure 5: hyperparameter values of the retained models", "", "![Figure 5](hparams.png)", "",
            "Number of retained models with each value at each segment's end.", "",
            "| hyperparameter | value | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    for n, vals in counts.items():
        for v, c in vals.items():
            out.append(f"| {n} | {_show(v)} | " + " | ".join(map(str, c)) + " |")
    labels, table = clone_by_depth(history, depth)
    out += ["", "## Figure 6: probability of cloning each transformer layer", "", "![Figure 6](mu_depth.png)", "",
            "Mean over the retained models of the probability their μ gives cloning block i (learned table entry, "
            "else the model's global μ).", "", "| block | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for i in range(depth):
        out.append(f"| {i} | " + " | ".join(_pct(x) for x in table[:, i]) + " |")
    if depth >= 2:
        slope = float(np.polyfit(np.arange(depth), table[-1], 1)[0])
        out += ["", f"Least-squares slope at the end ({labels[-1]}): {100 * slope:+.3f} percentage points per layer."]
    out += ["", "Mean probability of cloning a clonable layer (embedding, class token, position embedding and the "
            "model's blocks), over the retained models (§5.2 reports 21.4 % → 17.4 %):", "",
            "| " + " | ".join(labels) + " |", "|" + "---:|" * len(labels),
            "| " + " | ".join(_pct(_mean([clone_mean(r) for r in h["retained"].values()])) for h in segs) + " |"]
    vals = mu_values(segs[-1]["retained"])
    out += ["", f"## Figure 7: distribution of μ values ({labels[-1]})", "", "![Figure 7](mu_values.png)", "",
            "| action | models | with own entry | mean % | min % | max % |", "|---|---:|---:|---:|---:|---:|"]
    for act, xs in vals.items():
        own = sum(act in r["mu"] for r in segs[-1]["retained"].values()) if act != "mu" else len(xs)
        out.append(f"| {act} | {len(xs)} | {own} | {_pct(_mean(xs))} | {_pct(min(xs))} | {_pct(max(xs))} |")
    out += _transfer_section(history, a_tasks)
    return "\n".join(out) + "\n"


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_hparams(history: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Figure 5: per hyperparameter, the number of retained models using each value, one bar per segment."""
    plt = _plt()
    labels, counts = hparam_counts(history)
    cols = 4
    rows = max(1, math.ceil(len(counts) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    w = 0.8 / max(len(labels), 1)
    for ax, (n, vals) in zip(axes.flat, counts.items()):
        for j, lab in enumerate(labels):
            ax.bar([i + (j - (len(labels) - 1) / 2) * w for i in range(len(vals))], [c[j] for c in vals.values()],
                   w, label=lab)
        ax.set_xticks(range(len(vals)), [_show(v) for v in vals], fontsize=7, rotation=45)
        ax.set_title(n, fontsize=9)
    for ax in list(axes.flat)[len(counts):]:
        ax.axis("off")
    if labels:
        axes.flat[0].legend(fontsize=6)
    fig.suptitle("hyperparameter values of the retained models (count per segment end)", fontsize=10)
    fig.tight_layout()
    _save(fig, path, 100)
    plt.close(fig)


def plot_clone_depth(history: Sequence[Mapping[str, Any]], depth: int, path: str | Path) -> None:
    """Figure 6: mean probability of cloning block i, one line per segment; the last segment's least-squares line
    in red, as in the paper."""
    plt = _plt()
    labels, table = clone_by_depth(history, depth)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    x = np.arange(depth)
    for j, lab in enumerate(labels):
        ax.plot(x, 100 * table[j], marker="o", lw=2.2 if j == len(labels) - 1 else 1, alpha=1 if j == len(labels) - 1
                else 0.5, label=lab)
    if depth >= 2 and len(labels):
        a, b = np.polyfit(x, table[-1], 1)
        ax.plot(x, 100 * (a * x + b), color="red", lw=1.5, label=f"fit ({labels[-1]})")
    ax.set_xlabel("transformer layer (0 = nearest the input)")
    ax.set_ylabel("clone probability (%)")
    ax.set_xticks(x)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path, 110)
    plt.close(fig)


def plot_mu_values(history: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Figure 7: per mutation action, the histogram of the probabilities the retained models' μ give it."""
    plt = _plt()
    segs = _segments(history)
    vals = mu_values(segs[-1]["retained"]) if segs else {}
    cols = 5
    rows = max(1, math.ceil(len(vals) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.2 * rows), squeeze=False)
    grid = np.asarray(methods.MU_VALUES)
    for ax, (act, xs) in zip(axes.flat, vals.items()):
        ax.bar(100 * grid, [sum(abs(x - g) < 1e-9 for x in xs) for g in grid], width=1.6)
        ax.set_title(act, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(vals):]:
        ax.axis("off")
    fig.suptitle(f"μ values (%) over the retained models{' at ' + segs[-1]['segment'] if segs else ''}", fontsize=10)
    fig.tight_layout()
    _save(fig, path, 100)
    plt.close(fig)


def figures(run: str | Path, history: Sequence[Mapping[str, Any]], a_tasks: Sequence[str], depth: int,
            machines: Sequence[Mapping[str, Any]] = ()) -> None:
    """Writes Figures 5–7 and `analysis.md` (their data and §5.4's table) into `run`."""
    run = Path(run)
    text = analysis(history, a_tasks, depth, run.name)
    if machines:
        head, _, rest = text.partition("\n\n")
        text = f"{head}\n\nComputed on: {machine_line(machines)}\n\n{rest}"
    checkpoint.write_atomic(run / "analysis.md", text.encode())
    if _segments(history):
        plot_hparams(history, run / "hparams.png")
        plot_clone_depth(history, depth, run / "mu_depth.png")
        plot_mu_values(history, run / "mu_values.png")


def analyse(run: str | Path, a_tasks: Sequence[str] | None = None) -> list[Mapping[str, Any]]:
    """Every report of any run directory (finished or not) from its last commit: `report.md`, Figures 3–7 and
    `analysis.md`; returns the history used. Task-set A is the run's report set unless given. A run written
    before segment summaries recorded the retained models gets them for its last summary from the committed
    system, when that is the system the summary describes (the run is finished)."""
    ck = checkpoint.load(run)
    history = [dict(h) for h in ck.extra["history"]]
    if history and not history[-1].get("retained") and ck.extra.get("done"):
        history[-1]["retained"] = retained(ck.system)
    if a_tasks is None:
        a_tasks = next((h["report_set"] for h in reversed(history) if "report_set" in h), None)
    if a_tasks is None:
        raise ReportError(f"{run}: its summaries do not name the report set; pass task-set A explicitly")
    write(run, history, a_tasks, ck.system, final=True, stream=None, machines=ck.extra.get("machines", ()))
    return history


# --- repetitions: mean ± std of Figure 3 over runs ------------------------------------------------------------

AGG = (("test_acc_set", "avg test acc % (report set)", 100.0), ("test_acc_other", "avg test acc % (other tasks)", 100.0),
       ("params", "avg accounted params", 1.0), ("flops", "avg FLOPs / image", 1.0))


def _other(h: Mapping[str, Any]) -> float:
    """Average test accuracy over the tasks outside the report set (task-set B), when the summary names the set."""
    if "report_set" not in h:
        return math.nan
    return _mean([x for t, x in h["test"].items() if t not in set(h["report_set"])])


def aggregate(histories: Sequence[Sequence[Mapping[str, Any]]], names: Sequence[str] | None = None) -> list[dict]:
    """Figure 3's metrics per segment over repetitions (e.g. seeds of one manifest): for each segment its label,
    n, and for each metric of `AGG` the mean and the sample standard deviation (ddof = 1; NaN for one run)."""
    names = list(names) if names is not None else [f"run {i}" for i in range(len(histories))]
    if not histories:
        raise ReportError("aggregate: no runs given")
    labels = [h["segment"] for h in histories[0]]
    for n, hist in zip(names[1:], histories[1:]):
        if [h["segment"] for h in hist] != labels:
            raise ReportError(f"{n}: segments {[h['segment'] for h in hist]} differ from {names[0]}'s {labels} "
                              f"(unfinished, or another manifest)")
    rows = []
    for j, lab in enumerate(labels):
        row: dict[str, Any] = {"segment": lab, "n": len(histories)}
        for k, _, _ in AGG:
            row[k] = mean_std([_other(h[j]) if k == "test_acc_other" else float(h[j][k]) for h in histories])
        rows.append(row)
    return rows


def _pm(m: float, s: float, scale: float) -> str:
    if m != m:
        return "–"
    if scale != 1:
        return f"{scale * m:.2f} ± {scale * s:.2f}" if s == s else f"{scale * m:.2f}"
    return f"{m:.4g} ± {s:.2g}" if s == s else f"{m:.4g}"


def aggregate_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: mean ± sample std of each metric per segment."""
    lines = ["| segment | runs | " + " | ".join(t for _, t, _ in AGG) + " |", "|---|---:|" + "---:|" * len(AGG)]
    for r in rows:
        lines.append(f"| {r['segment']} | {r['n']} | " + " | ".join(_pm(*r[k], sc) for k, _, sc in AGG) + " |")
    return "\n".join(lines) + "\n"


def plot_aggregate(rows: Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Figure 3 over repetitions: mean per segment with ± one sample standard deviation as error bars."""
    plt = _plt()
    x = list(range(len(rows)))
    fig, axes = plt.subplots(1, len(AGG), figsize=(4.3 * len(AGG), 3.6))
    for ax, (k, title, sc) in zip(axes, AGG):
        m = np.array([r[k][0] for r in rows]) * sc
        s = np.nan_to_num(np.array([r[k][1] for r in rows]) * sc)
        ax.errorbar(x, m, yerr=s, marker="o", capsize=4)
        ax.set_title(f"{title} (n = {rows[0]['n'] if rows else 0})", fontsize=9)
        ax.set_xticks(x, [r["segment"] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path, 110)
    plt.close(fig)


def aggregate_runs(runs: Sequence[str | Path], out: str | Path) -> list[dict]:
    """Mean ± std of Figure 3 over run directories of one manifest (seeds): writes `aggregate.md` and
    `aggregate.png` into `out`. Runs whose manifests differ in anything but the seed are refused."""
    cks = [checkpoint.load(r) for r in runs]
    ref = {k: v for k, v in cks[0].extra["manifest"].items() if k != "seed"}
    for r, ck in zip(runs[1:], cks[1:]):
        other = {k: v for k, v in ck.extra["manifest"].items() if k != "seed"}
        if other != ref:
            diff = sorted(k for k in set(ref) | set(other) if ref.get(k) != other.get(k))
            raise ReportError(f"{r}: its manifest differs from {runs[0]}'s in {diff}, not only in the seed")
    rows = aggregate([ck.extra["history"] for ck in cks], [str(r) for r in runs])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = ", ".join(f"{r} (seed {ck.extra.get('seed')})" for r, ck in zip(runs, cks))
    checkpoint.write_atomic(out / "aggregate.md", (f"# Figure 3 over {len(runs)} runs: mean ± sample std (ddof = 1)"
                                                   f"\n\nRuns: {seeds}\n\n![aggregate](aggregate.png)\n\n"
                                                   f"{aggregate_table(rows)}").encode())
    plot_aggregate(rows, out / "aggregate.png")
    return rows


# --- Section 4: a comparison of method families (Table 2, Figure 2) -----------------------------------------

AGGREGATION = ("Aggregation (docs/benchmarks.md §8, §10.15; the paper does not state it): each configuration is "
               "the mean over its repetitions; s.e. is the standard error of that mean (the sample std, ddof = 1, "
               "over √n), std the sample std itself; a family's Table 2 row is its configuration with the best mean "
               "quality. Figure 2: the means, ± one standard error as bars (quality, and params or FLOPs where the "
               "repetitions differ), each family's Pareto frontier as a line. Quality = mean test accuracy over the "
               "tasks; params/task = the system's accounted parameters (eq. 2, root not a sharer) summed over tasks "
               "/ #tasks; FLOPs/task = mean forward FLOPs per image.")


def sub_runs(dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every finished sub-run below `dirs`: its `comparison.json` (family, config, value, repetition, tables) and
    the final Figure 3 summary of its `result.json` (written when the run finishes)."""
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


def compare_rows(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per (family, configuration): n, the tables it is drawn in, max / mean / sample std / standard error
    of quality, mean and standard error of params and FLOPs."""
    groups: dict[tuple[str, str], list] = {}
    for r in runs:
        groups.setdefault((r["family"], r["config"]), []).append(r)
    rows = []
    for (fam, cfg), g in groups.items():
        q, params, flops = zip(*(run_metrics(r) for r in g))
        (mean, std), se = mean_std(q), mean_se(q)[1]
        rows.append(dict(family=fam, config=cfg, value=g[0].get("value"), tables=list(g[0].get("tables", [""])),
                         n=len(q), max=max(q), mean=mean, std=std, se=se, params=_mean(params),
                         params_se=mean_se(params)[1], flops=_mean(flops), flops_se=mean_se(flops)[1]))
    return rows


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated (cost, quality) points, in increasing cost: no other point has both a cost as
    low and a quality as high, one of them strictly."""
    keep = [i for i, (c, q) in enumerate(points)
            if not any((c2 <= c and q2 >= q) and (c2 < c or q2 > q) for c2, q2 in points)]
    return sorted(keep, key=lambda i: (points[i][0], points[i][1]))


def table2(rows: Sequence[Mapping[str, Any]], table: str = "") -> str:
    """Markdown: Table 2 (each family's best configuration by mean quality), then every configuration; `table`
    names a table other than the first."""
    fams = list(dict.fromkeys(r["family"] for r in rows))

    def line(r: Mapping[str, Any], label: str) -> str:
        return (f"| {label} | {100 * r['max']:.2f} | {100 * r['mean']:.2f} ± {_pct(r['se'])} | {_pct(r['std'])} | "
                f"{r['n']} | {r['params']:.4g} | {r['flops']:.4g} |")

    head = ["| method | max % | avg ± s.e. % | std % | reps | params/task | FLOPs/task |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    best = [max((r for r in rows if r["family"] == f), key=lambda r: r["mean"]) for f in fams]
    suffix = f": {table}" if table else ""
    out = [f"## Table 2{suffix}", "", *head, *(line(r, f"{r['family']} ({r['config']})") for r in best), "",
           f"## Every configuration{suffix}", "", *head,
           *(line(r, f"{r['family']} ({r['config']})") for f in fams for r in rows if r["family"] == f)]
    return "\n".join(out) + "\n"


def plot_figure2(rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> None:
    """Figure 2: quality against params/task and against FLOPs/task (log x), one point per configuration (mean
    over repetitions, ± one standard error as bars), each family's Pareto frontier drawn as a line."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    for ax, key, xlabel in zip(axes, ("params", "flops"), ("params / task", "FLOPs / task")):
        for i, fam in enumerate(dict.fromkeys(r["family"] for r in rows)):
            rs = [r for r in rows if r["family"] == fam]
            pts = [(r[key], 100 * r["mean"]) for r in rs]
            col = f"C{i}"
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], xerr=[np.nan_to_num(r[f"{key}_se"]) for r in rs],
                        yerr=[np.nan_to_num(100 * r["se"]) for r in rs], fmt="o", color=col, alpha=0.6, capsize=2)
            front = pareto(pts)
            ax.plot([pts[j][0] for j in front], [pts[j][1] for j in front], "-", color=col, label=fam)
        _log_x(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean test accuracy (%)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path, 110)
    plt.close(fig)


def _log_x(ax: Any) -> None:
    """A log x axis; over less than a decade (the arms of a paired comparison) matplotlib labels every minor tick,
    which overlap: a few plain ticks instead."""
    from matplotlib import ticker
    ax.set_xscale("log")
    lo, hi = ax.get_xlim()
    if 0 < lo and hi < 10 * lo:
        ax.xaxis.set_major_locator(ticker.MaxNLocator(4))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.4g}"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())


def figure2_name(table: str) -> str:
    return f"figure2-{table.replace(' ', '-')}.png" if table else "figure2.png"


# --- paired comparisons: per repetition, an arm against its control ---------------------------------------------

PAIRED = (("test_acc_set", "test acc % on the report set", "points"), ("params", "avg accounted params", "%"),
          ("flops", "avg FLOPs / image", "%"))


def paired(runs: Sequence[Mapping[str, Any]], pairs: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """For each (control, arm) pair of families with repetitions both finished, over those: per repetition the two runs'
    final Figure 3 metrics and the change control → arm (test accuracy in points, accounted parameters and FLOPs in
    % of the control's); then per metric the mean control and arm values, and the change's mean and standard error."""
    by = {(r["family"], r["repetition"]): r for r in runs}
    out = []
    for control, arm in pairs:
        rows = []
        for k in sorted(k for f, k in by if f == arm and (control, k) in by):
            b, a = by[control, k], by[arm, k]
            row: dict[str, Any] = {"repetition": k}
            for key, _, unit in PAIRED:
                x, y = float(b[key]), float(a[key])
                row[key] = (x, y, 100 * (y - x) if unit == "points" else 100 * (y / x - 1))
            rows.append(row)
        if not rows:
            continue
        stats = {key: (_mean([r[key][0] for r in rows]), _mean([r[key][1] for r in rows]),
                       *mean_se([r[key][2] for r in rows])) for key, _, _ in PAIRED}
        out.append(dict(control=control, arm=arm, rows=rows, n=len(rows), **stats))
    return out


def paired_table(results: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: one table per pair, a row per repetition (control → arm, and the change), then the means and the
    change's mean ± standard error."""
    out = []
    for p in results:  # the pair's own names in the header: the first of a pair need not be named "control"
        head = " | ".join(f"{t}: {p['control']} → {p['arm']} | change ({u})" for _, t, u in PAIRED)
        out += [f"## {p['control']} → {p['arm']}", "", f"| repetition | {head} |",
                "|---:|" + "---:|---:|" * len(PAIRED)]
        for r in p["rows"]:
            cells = [f"{_fmt(r[k][0], u == 'points')} → {_fmt(r[k][1], u == 'points')} | {r[k][2]:+.2f}"
                     for k, _, u in PAIRED]
            out.append(f"| {r['repetition']} | " + " | ".join(cells) + " |")
        cells = [f"{_fmt(p[k][0], u == 'points')} → {_fmt(p[k][1], u == 'points')} | {p[k][2]:+.2f}"
                 + (f" ± {p[k][3]:.2f}" if p["n"] > 1 else "") for k, _, u in PAIRED]
        out += [f"| mean ± SE (n = {p['n']}) | " + " | ".join(cells) + " |", ""]
    return "\n".join(out + [PAIRING]) + "\n"


PAIRING = ("Pairing: repetition r of each family uses seed + r and, in a comparison with shared segments, continues "
           "the same committed run (`shared/rep<r>`) with the same keys. A change is arm − control: test accuracy on the "
           "report set in points, average accounted parameters (eq. 2) and FLOPs per image in % of the control's; "
           "mean ± SE is the mean of the per-repetition changes and their sample std (ddof = 1) over √n.")


def write_comparison(out: str | Path, pairs: Sequence[Sequence[str]] | None = None) -> list[dict[str, Any]]:
    """`comparison.md` (per table: Table 2 and every configuration), each table's Figure 2 and, for a comparison
    with `pairs` (given, else kept in `pairs.json` from an earlier call), `paired.md` in `out`, from the finished
    sub-runs below it; callable while the comparison is still running."""
    out = Path(out)
    runs = sub_runs([out])
    rows = compare_rows(runs)
    if pairs:
        checkpoint.write_atomic(out / "pairs.json", (json.dumps([list(p) for p in pairs]) + "\n").encode())
    elif (out / "pairs.json").is_file():
        pairs = json.loads((out / "pairs.json").read_text())
    if rows:
        text = [f"# {out.name}", ""]
        for t in sorted({t for r in rows for t in r["tables"]}, key=lambda t: (t != "", t)):
            rs = [r for r in rows if t in r["tables"]]
            plot_figure2(rs, out / figure2_name(t), f"{out.name}: {t}" if t else out.name)
            text += [table2(rs, t), f"![Figure 2{': ' + t if t else ''}]({figure2_name(t)})", ""]
        checkpoint.write_atomic(out / "comparison.md", "\n".join([*text, AGGREGATION, ""]).encode())
    done = paired(runs, pairs) if pairs else []
    if done:
        text = f"# {out.name}: paired differences\n\n" + paired_table(done)
        checkpoint.write_atomic(out / "paired.md", text.encode())
    return rows


@dataclasses.dataclass
class ReportArgs:
    """Write every report of run directories (finished or not): report.md, Figures 3–7 and analysis.md in each;
    with several runs (seeds of one manifest), also the mean ± std of Figure 3 over them; for the output directory
    of a Section 4 comparison, Table 2 and Figure 2 of its finished sub-runs."""

    runs: tyro.conf.Positional[tuple[str, ...]]
    """Run directories."""
    out: str | None = None
    """Where the aggregate of several runs goes. Default: <the runs' common parent>/<manifest name>-aggregate."""


def report_cli(a: ReportArgs) -> int:
    """`python evolve.py report RUN [RUN ...] [--out DIR]`: every report of each run; for a Section 4 comparison's
    directory, Table 2 and Figure 2 of its finished sub-runs; with several runs, their aggregate."""
    runs, out = a.runs, a.out
    if not runs:
        raise ReportError("evolve.py report: expected at least one run directory")
    single = [r for r in runs if checkpoint.exists(r) or not sub_runs([r])]
    for r in runs:
        if r not in single:
            write_comparison(r)
            print((Path(r) / "comparison.md").read_text())
            print(f"wrote {Path(r) / 'comparison.md'} and its Figure 2s", file=sys.stderr)
    for r in single:
        ck = checkpoint.load(r)
        raw = ck.extra["manifest"]  # only its report set: runs of an older manifest schema are reported too
        stored = manifest.Manifest(name=raw["name"], segments=(), report_set=tuple(raw["report_set"]),
                                   tasks={k: manifest.UserTask(**v) for k, v in raw.get("tasks", {}).items()},
                                   catalog=raw.get("catalog", ""))
        analyse(r, manifest.report_tasks(stored))
        print(f"wrote the reports of {r}", file=sys.stderr)
    if len(single) > 1:
        into = Path(out) if out else (Path(os.path.commonpath([Path(r).resolve() for r in single]))
                                      / f"{ck.extra['manifest']['name']}-aggregate")
        rows = aggregate_runs(single, into)
        print(aggregate_table(rows), file=sys.stdout)
        print(f"wrote {into / 'aggregate.md'} and {into / 'aggregate.png'}", file=sys.stderr)
    return 0
