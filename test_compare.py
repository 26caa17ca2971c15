"""Section 4 comparisons: Pareto frontiers, Table 2's aggregation, and a tiny comparison run end to end, resumed."""

from __future__ import annotations

import json
import math
import textwrap

import pytest

import evolve
import report

TINY = """
name = "cmp"
seed = 0
report_set = ["digits"]

[root]
kind = "random"
vit = "tiny"
resolutions = [8, 16]
resolution = 16
hp = { lr = 0.05 }

[[segments]]
name = "one"
method = "mu2net+"
tasks = ["digits"]
generations = 1
children = 1
cycles = 1
samples_cap = 64
batch_size = 32
eval_batch = 128
P = 2e4
F = 2e6

[comparison]
repetitions = 2

[[comparison.families]]
name = "mu2net+"
vary = "s"
values = [0.5, 1.0]

[[comparison.families]]
name = "fine-tune top layers"
vary = "clone"
values = ["all", "top:1"]
set = { method = "finetune" }
"""


def test_pareto_frontier():
    pts = [(1.0, 0.5), (2.0, 0.7), (2.0, 0.6), (3.0, 0.65), (4.0, 0.9), (0.5, 0.4), (4.0, 0.9)]
    # (2, 0.6) and (3, 0.65) are dominated by (2, 0.7); equal points both stay.
    assert report.pareto(pts) == [5, 0, 1, 4, 6]
    assert report.pareto([(1.0, 1.0)]) == [0]


def test_aggregate_max_mean_sample_std():
    def run(fam, cfg, rep, accs, params, flops):
        return dict(family=fam, config=cfg, value=None, repetition=rep, test=dict(enumerate(accs)), params=params,
                    flops=flops)

    runs = [run("a", "s=1", 0, [0.8, 0.6], 10.0, 100.0), run("a", "s=1", 1, [0.9, 0.9], 20.0, 300.0),
            run("a", "s=1", 2, [0.9, 0.7], 30.0, 200.0), run("a", "s=0.5", 0, [0.5, 0.5], 1.0, 1.0),
            run("b", "k=0", 0, [0.4, 0.6], 5.0, 50.0)]
    rows = {(r["family"], r["config"]): r for r in report.compare_rows(runs)}
    r = rows["a", "s=1"]
    assert r["n"] == 3 and math.isclose(r["mean"], 0.8) and math.isclose(r["max"], 0.9)
    assert math.isclose(r["std"], 0.1)  # sample std of 0.7, 0.9, 0.8 (ddof = 1)
    assert math.isclose(r["params"], 20.0) and math.isclose(r["flops"], 200.0)
    assert math.isnan(rows["b", "k=0"]["std"])  # one repetition: no sample std
    text = report.table2(list(rows.values()))
    best = text.split("## Every configuration")[0]
    assert "| a (s=1) | 90.00 | 80.00 ± 10.00 | 3 |" in best and "a (s=0.5)" not in best
    assert "sample std (ddof = 1)" in text


def test_bad_comparison_names_the_field(tmp_path):
    p = tmp_path / "m.toml"
    p.write_text(TINY.replace('vary = "clone"', 'vary = "clones"'))
    with pytest.raises(evolve.ManifestError, match=r"comparison.families\[1\].vary = 'clones'"):
        evolve.load_manifest(p)
    p.write_text(TINY.replace('values = ["all", "top:1"]', 'values = ["all", "top:x"]'))
    with pytest.raises(evolve.ManifestError, match=r"fine-tune top layers, clone=top:x.*clone = 'top:x'"):
        evolve.load_manifest(p)


def test_tiny_comparison_end_to_end_and_resumed(tmp_path, capsys):
    p = tmp_path / "m.toml"
    p.write_text(textwrap.dedent(TINY))
    out = tmp_path / "cmp"
    m = evolve.load_manifest(p)
    subs = evolve.runs(m)
    assert [s.path for s in subs] == [f"{f}/{c}/rep{r}" for f, cs in (("mu2net+", ("s=0.5", "s=1")),
                                      ("fine-tune top layers", ("clone=all", "clone=top:1"))) for c in cs
                                      for r in (0, 1)]
    assert subs[1].manifest.seed == 1 and subs[4].manifest.segments[0].method == "finetune"
    # Interrupted between sub-runs: the first two finished, then the process died.
    args = ["--manifest", str(p), "--out", str(out), "--compile-cache", ""]
    for i in (0, 1):
        assert evolve.main(args + ["--sweep-index", str(i)]) == 0
    done = {s.path: (out / s.path / "COMMIT").read_bytes() for s in subs[:2]}
    capsys.readouterr()
    assert evolve.main(args) == 0
    err = capsys.readouterr().err
    assert err.count("finished before, skipped") == 2
    assert all((out / k / "COMMIT").read_bytes() == v for k, v in done.items())  # never redone
    rows = report.compare_rows(report.sub_runs([out]))
    assert sorted((r["family"], r["config"], r["n"]) for r in rows) == [
        ("fine-tune top layers", "clone=all", 2), ("fine-tune top layers", "clone=top:1", 2),
        ("mu2net+", "s=0.5", 2), ("mu2net+", "s=1", 2)]
    assert all(0 < r["mean"] <= 1 and r["params"] > 0 and r["flops"] > 0 for r in rows)
    assert (out / "comparison.md").exists() and (out / "figure2.png").stat().st_size > 10_000
    assert "## Table 2" in (out / "comparison.md").read_text()
    info = json.loads((out / subs[5].path / "comparison.json").read_text())
    assert info == dict(family="fine-tune top layers", config="clone=all", value="all", repetition=1)


def test_offline_miniature_manifest():
    """sec4_mini.toml: ≥ 6 tasks from ≥ 3 sources, five families × 3 configurations × 3 repetitions, and equal
    training epochs per task across the evolutionary methods (the baselines: one copy of a generation's two)."""
    import data

    m = evolve.load_manifest("manifests/sec4_mini.toml")
    subs = evolve.runs(m)
    assert len({s.family for s in subs}) == 5 and len(subs) == 5 * 3 * 3
    tasks = evolve.segment_tasks(m, m.segments[0])
    cat = data.load_catalog()
    assert len(tasks) >= 6 and len({cat[t].source for t in tasks}) >= 3
    assert m.root.pretrain.task not in tasks
    for s in subs:
        (seg,) = s.manifest.segments
        epochs = seg.iterations * seg.generations * seg.children * seg.cycles
        assert epochs == (16 if seg.method in ("mu2net+small", "munet") else 8), s.path
