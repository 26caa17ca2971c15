"""Per arm and seed of runs/sec5_paired: what the search tried (12-px and shallower children), how far the best 12-px
child was below the best 16-px one (validation examples), what was retained, and in which task iterations of arm (a)
the penalty changed the final choice among the children's snapshots. Usage: python explore.py [RUN_DIR]"""
import collections
import json
import pathlib
import sys

out = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "runs/sec5_paired")
N = 2640  # validation examples per task (chars48/digits*)
for fam in ("control", "plus", "plus_s1"):
    tot = collections.Counter()
    for r in range(5):
        p = out / f"{fam}/default/rep{r}/metrics.jsonl"
        if not (out / f"{fam}/default/rep{r}/result.json").exists():
            continue
        ev = [json.loads(l) for l in open(p)]
        ch = {e["child"]: e for e in ev if e.get("event") == "child"}
        cyc = [e for e in ev if e.get("event") == "cycle"]
        best = collections.defaultdict(lambda: collections.defaultdict(float))  # task -> res -> best quality
        for c in cyc:
            h = ch[c["child"]]["hp"]
            best[c["task"]][h["resolution"]] = max(best[c["task"]][h["resolution"]], c["quality"])
        gaps = [(best[t][16] - best[t][12]) * N for t in best if 12 in best[t]]
        res = json.loads((out / f"{fam}/default/rep{r}/result.json").read_text())
        shared = sum(1 for m in res["retained"].values() if m["params"] < 36000)
        tot["children"] += len(ch); tot["12px"] += sum(h["hp"]["resolution"] == 12 for h in ch.values())
        tot["fewer layers"] += sum(h["hp"]["num_layers"] < 4 for h in ch.values())
        print(f"{fam:8s} seed {r}: children {len(ch)}, at 12 px {sum(h['hp']['resolution'] == 12 for h in ch.values())}, "
              f"fewer layers {sum(h['hp']['num_layers'] < 4 for h in ch.values())}; best 16 px − best 12 px per task "
              f"(validation examples): {[round(g) for g in gaps]}; retained at 12 px: "
              f"{sum(m['hp']['resolution'] == 12 for m in res['retained'].values())}, layers {[m['hp']['num_layers'] for m in res['retained'].values()]}, "
              f"params/model {[round(m['params']) for m in res['retained'].values()]}")
    print(fam, dict(tot))

print("penalty decided (the best-score snapshot is not the best-quality one) per task iteration:")
for fam in ("plus",):
    for r in range(5):
        p = out / f"{fam}/default/rep{r}/metrics.jsonl"
        if not (out / f"{fam}/default/rep{r}/result.json").exists():
            continue
        ev = [json.loads(l) for l in open(p)]
        by = collections.defaultdict(list)
        for c in ev:
            if c.get("event") == "cycle":
                by[c["task"]].append(c)
        dec = []
        for t, cs in by.items():
            q = max(cs, key=lambda c: c["quality"]); s = max(cs, key=lambda c: c["score"])
            dec.append((t.split("/")[-1], q["child"] != s["child"], round((q["quality"] - s["quality"]) * N, 1)))
        print(f"  seed {r}: {dec}")
