"""The measured run's launcher: the sub-runs of
    python evolve.py --manifest manifests/sec5_paired.toml --out runs/sec5_paired
on two workers (this machine has 2 cores), a sub-run starting once its seed's shared segment 1 has finished. The
order and the waits come from manifest.runs (the run itself used the same order, written out by sweep index). Order:
each seed's segment 1, then arms (a) and (b) of the seeds whose segment 1 is done, the s = 1 arm (c) of every seed
last (the one to cut if time runs out). Rerunning resumes: finished sub-runs are skipped.
Usage: python results/sec5_paired/run.py [OUT] [WORKERS]"""
import datetime
import os
import subprocess
import sys
import threading

sys.path.insert(0, os.getcwd())  # run from the repository root, as the usage says
import evolve  # noqa: E402
import manifest  # noqa: E402

out = sys.argv[1] if len(sys.argv) > 1 else "runs/sec5_paired"
workers = int(sys.argv[2]) if len(sys.argv) > 2 else 2
M = "manifests/sec5_paired.toml"
m = evolve.load_manifest(M)
subs = manifest.runs(m, out=out)
last = m.comparison.families[-1].name  # arm (c), the one to cut if time runs out
# sweep indices: the shared segment-1 runs, then the other arms, the last family's last, each by repetition
todo = sorted(range(len(subs)), key=lambda i: (bool(subs[i].family), subs[i].family == last, subs[i].repetition, i))
needs = {i: subs[i].shared for i in todo if subs[i].family}  # an arm waits for its repetition's shared run
done: set[str] = set()
lock = threading.Condition()


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%SZ")


def take() -> int | None:
    """The first sub-run whose segment 1 has finished (a shared one needs nothing); None when all are taken."""
    with lock:
        while todo:
            ready = [i for i in todo if needs.get(i, "") in done | {""}]
            if ready:
                todo.remove(ready[0])
                return ready[0]
            lock.wait()
    return None


def worker() -> None:
    while (i := take()) is not None:
        print(f"{now()} start sweep-index {i}", flush=True)
        rc = subprocess.call(["/usr/bin/time", "-f", f"sweep-index {i}: %e s wall, %U s user, %S s sys, %M KB max RSS",
                              sys.executable, "evolve.py", "--manifest", M, "--out", out, "--sweep-index", str(i)])
        print(f"{now()} end sweep-index {i}" + (f" FAILED ({rc})" if rc else ""), flush=True)
        with lock:
            if rc == 0:
                done.add(subs[i].path)
            elif not subs[i].family:  # a failed segment 1: its arms can never start, and the other worker must not wait
                todo[:] = [j for j in todo if needs.get(j) != subs[i].path]
            lock.notify_all()


print(f"start {datetime.datetime.now(datetime.timezone.utc):%FT%TZ}", flush=True)
threads = [threading.Thread(target=worker) for _ in range(workers)]
for t in threads:
    t.start()
for t in threads:
    t.join()
subprocess.call([sys.executable, "evolve.py", "report", out])
print(f"end {datetime.datetime.now(datetime.timezone.utc):%FT%TZ}", flush=True)
