#!/bin/sh
# The measured run as it was launched: the same sub-runs as
#   python evolve.py --manifest manifests/sec5_paired.toml --out runs/sec5_paired
# in another order, so that the s = 1 arm (c) of every seed comes after arms (a) and (b) of all seeds (the one to cut
# if time runs out). Rerunning it resumes: finished sub-runs are skipped.
set -u
OUT=${1:-runs/sec5_paired}
M=manifests/sec5_paired.toml
one() { /usr/bin/time -f "sweep-index $1: %e s wall, %U s user, %S s sys, %M KB max RSS" \
          python evolve.py --manifest $M --out "$OUT" --sweep-index "$1" || echo "sweep-index $1 FAILED"; }
date -u +"start %FT%TZ"
for r in 0 1 2 3 4; do one $((4 * r)); one $((4 * r + 1)); one $((4 * r + 2)); done
for r in 0 1 2 3 4; do one $((4 * r + 3)); done
python evolve.py report "$OUT"
date -u +"end %FT%TZ"
