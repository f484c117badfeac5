#!/bin/bash
# The goodput-budget capacity benchmark: int4 then int8 recorded rounds, each in one run with and without the budget.
# SUFFIX=-repeat writes a second run beside the first (int4-repeat/, int8-repeat/).
cd "$(dirname "$0")/../.."
for drafts in int4 int8; do
  echo "== $drafts: uptime before: $(uptime)"
  OMP_NUM_THREADS=1 nice -n 5 ${SPECD_VERIFIER:-.venv/bin/specd-verifier} capacity --device cpu --threads 1 --tokens 32 \
      --sessions 1 8 32 64 --gamma 2 4 8 --drafts $drafts --out benchmarks/capacity-goodput/$drafts${SUFFIX:-}
  echo "== $drafts: uptime after: $(uptime)"
done
