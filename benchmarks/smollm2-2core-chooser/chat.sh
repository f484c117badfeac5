#!/usr/bin/env bash
# Ten fresh `specd chat --max-new-tokens 64` processes per round trip, cloud-only and the default in turns
# (benchmarks/chat_fresh.py), against a verifier with this folder's config.toml.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benchmarks/smollm2-2core-chooser
echo "chat-fresh before: $(uptime)" >> "$out/load.txt"
${PYTHON:-python} benchmarks/chat_fresh.py --runs 10 --rtt-ms 0 50 --max-new-tokens 64 --config "$out/config.toml" \
    --out "$out/chat-fresh.md" > "$out/chat-fresh.log" 2>&1
echo "chat-fresh after: $(uptime)" >> "$out/load.txt"
