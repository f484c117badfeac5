#!/usr/bin/env bash
# The figures of benchmarks/smollm2-2core-chooser/report.md: the two modes a user compares, with the
# config as shipped (config.toml here: the repository's, with only the verifier's KV memory capped at
# kv_cache_gib = 1.5 so that it fits beside other work), then with mode switching off (rounds-only.toml),
# then the default again; then ten fresh `specd chat` processes per round trip (chat-fresh.md). The load
# average before and after each run goes to load.txt.
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
run default-1 --config "$out/config.toml" --title "default config (mode switching on), run 1"
run rounds-only --config "$out/rounds-only.toml" --title "mode_switching = false (rounds only)"
run default-2 --config "$out/config.toml" --title "default config (mode switching on), run 2"
