"""Per arm and seed of runs/sec5_paired: what the search tried (12-px and shallower children), how far the best 12-px
child was below the best 16-px one (validation examples), what was retained, and in which task iterations of arm (a)
the penalty changed the final choice among the children's snapshots, and how each seed's segment 1 ended.
Usage: python explore.py [RUN_DIR]"""
import collections
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/sec5_paired")
N = 2640  # validation examples per task (chars48/digits*)
SEEDS = range(5)


def records(log: pathlib.Path) -> list[dict]:
    with open(log) as f:
        return [json.loads(x) for x in f]


def finished(fam: str, r: int) -> tuple[list[dict], dict] | None:
    """The log's records and result.json of a finished sub-run, else None."""
    d = out / f"{fam}/default/rep{r}"
    if not (d / "result.json").exists():
        return None
    return records(d / "metrics.jsonl"), json.loads((d / "result.json").read_text())


def cycles(ev: list[dict]) -> list[dict]:
    return [e for e in ev if e.get("event") == "cycle"]


print("segment 1 (shared) per seed: rounds run, each round's mean gain (validation examples per task iteration)")
for r in SEEDS:
    log = out / f"shared/rep{r}/metrics.jsonl"
    ends = [e for e in records(log) if e.get("event") == "round"] if log.exists() else []
    if ends:
        how = "converged" if ends[-1]["converged"] else "not converged"
        print(f"  seed {r}: {ends[-1]['iterations']} rounds, {how}; gains {[round(e['gain'], 1) for e in ends]}")

runs = {(fam, r): finished(fam, r) for fam in ("control", "plus", "plus_s1") for r in SEEDS}
for fam in ("control", "plus", "plus_s1"):
    tot = collections.Counter()
    for r in SEEDS:
        if runs[fam, r] is None:
            continue
        ev, res = runs[fam, r]
        ch = {e["child"]: e for e in ev if e.get("event") == "child"}
        best = collections.defaultdict(lambda: collections.defaultdict(float))  # task -> res -> best quality
        for c in cycles(ev):
            h = ch[c["child"]]["hp"]
            best[c["task"]][h["resolution"]] = max(best[c["task"]][h["resolution"]], c["quality"])
        gaps = [(best[t][16] - best[t][12]) * N for t in best if 12 in best[t]]
        at12 = sum(h["hp"]["resolution"] == 12 for h in ch.values())
        fewer = sum(h["hp"]["num_layers"] < 4 for h in ch.values())
        tot["children"] += len(ch)
        tot["12px"] += at12
        tot["fewer layers"] += fewer
        kept = res["retained"].values()
        print(f"{fam:8s} seed {r}: children {len(ch)}, at 12 px {at12}, fewer layers {fewer}; best 16 px − best 12 px "
              f"per task (validation examples): {[round(g) for g in gaps]}; retained at 12 px: "
              f"{sum(m['hp']['resolution'] == 12 for m in kept)}, layers {[m['hp']['num_layers'] for m in kept]}, "
              f"params/model {[round(m['params']) for m in kept]}")
    print(fam, dict(tot))

print("penalty decided (the best-score snapshot is not the best-quality one) per task iteration:")
for r in SEEDS:
    if runs["plus", r] is None:
        continue
    by = collections.defaultdict(list)
    for c in cycles(runs["plus", r][0]):
        by[c["task"]].append(c)
    dec = []
    for t, cs in by.items():
        q, s = max(cs, key=lambda c: c["quality"]), max(cs, key=lambda c: c["score"])
        dec.append((t.split("/")[-1], q["child"] != s["child"], round((q["quality"] - s["quality"]) * N, 1)))
    print(f"  seed {r}: {dec}")
