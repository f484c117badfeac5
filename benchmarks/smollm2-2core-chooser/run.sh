#!/usr/bin/env bash
# The figures of benchmarks/smollm2-2core-chooser/report.md: the two modes a user compares, with the
# config as shipped (./config.toml, mode switching on), then with mode switching off (rounds only), then the
# default again; the load average before and after each run goes to load.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benchmarks/smollm2-2core-chooser
specd=${SPECD:-specd}
common=(--modes cloud-only spec-pipelined --num-prompts 3 --iterations 2 --rtt-ms 0 20 50 100 200 --sessions 0
        --no-hf-assisted)
: > "$out/load.txt"
run() {
    local name=$1; shift
    echo "$name before: $(uptime)" >> "$out/load.txt"
    $specd bench "${common[@]}" "$@" --out "$out/$name" > "$out/$name.log" 2>&1
    echo "$name after: $(uptime)" >> "$out/load.txt"
}
run default-1 --title "default config (mode switching on), run 1"
run rounds-only --config "$out/rounds-only.toml" --title "mode_switching = false (rounds only)"
run default-2 --title "default config (mode switching on), run 2"
