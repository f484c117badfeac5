#!/usr/bin/env bash
# Where streaming can beat rounds: the torch draft (the fp32 model itself, on one core, no ONNX speed-ups)
# at long round trips; the default config and the same with mode switching off (rounds only).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=benchmarks/smollm2-2core-chooser
specd=${SPECD:-specd}
common=(--device torch:cpu --modes cloud-only spec-pipelined --num-prompts 3 --iterations 2 --rtt-ms 200 400
        --sessions 0 --no-hf-assisted)
for name in torch-default torch-rounds-only; do
    config=$out/config.toml
    [ "$name" = torch-rounds-only ] && config=$out/rounds-only.toml
    echo "$name before: $(uptime)" >> "$out/load.txt"
    $specd bench "${common[@]}" --config "$config" --title "$name: torch draft on one core" --out "$out/$name" \
        > "$out/$name.log" 2>&1
    echo "$name after: $(uptime)" >> "$out/load.txt"
done
