#!/bin/bash
# The goodput-budget capacity benchmark: int4 then int8 recorded rounds, each in one run with and without the budget.
# SUFFIX=-repeat writes a second run beside the first (int4-repeat/, int8-repeat/); TOKENS=128 runs longer
# cells (each session's tokens before it counts as done; 32 by default), e.g. TOKENS=128 SUFFIX=-128; REPEAT=K
# measures each N's cells K times in turn and combines them (2 by default; --repeat).
cd "$(dirname "$0")/../.."
for drafts in int4 int8; do
  echo "== $drafts: uptime before: $(uptime)"
  OMP_NUM_THREADS=1 nice -n 5 ${SPECD_VERIFIER:-.venv/bin/specd-verifier} capacity --device cpu --threads 1 --tokens ${TOKENS:-32} \
      --sessions 1 8 32 64 --gamma 2 4 8 --repeat ${REPEAT:-2} --drafts $drafts --out benchmarks/capacity-goodput/$drafts${SUFFIX:-}
  echo "== $drafts: uptime after: $(uptime)"
done
