#!/usr/bin/env bash
# Every benchmark of issue 12 on one CUDA GPU, in under 8 minutes, every ratio into one JSON file.
#
#   COMFYUI_PATH=/path/to/ComfyUI benchmarks/device.sh [OUT_DIR]       (default: $OUT, else ./bench_out)
#   benchmarks/device.sh --quick [OUT_DIR]                             (CPU, small UNets: checks the script)
#
# Runs, each under its own time limit (the limits add up to 7.5 minutes):
#   1. intervention_overhead.py: add and scale, per-token and kernel-8, SD1.5 512 px and SDXL 1024 px (fp16),
#      interleaved blocks, peak RSS and max_memory_allocated of each variant in its own child process;
#   2. attribution_cost.py: Attribute Bias Features at the real SD1.5 width against its paired sampling;
# then writes OUT_DIR/device.json: {"ratios": {"<benchmark>/<size>/<variant>/<kind>": [ratio, low, high]},
# "memory": ..., "overhead": <the first JSON>, "attribution": <the second>}. A step that fails or runs out of
# time is recorded in "errors" and the others still run.
set -u
cd "$(dirname "$0")/.."
quick=""
if [ "${1:-}" = "--quick" ]; then quick="--quick"; shift; fi
out="${1:-${OUT:-bench_out}}"
mkdir -p "$out"
if [ -z "${COMFYUI_PATH:-}" ] && [ -d ../shared/comfyui ]; then export COMFYUI_PATH="$(cd ../shared/comfyui && pwd)"; fi
: "${COMFYUI_PATH:?set COMFYUI_PATH to a ComfyUI checkout}"
python=${PYTHON:-python}
errors=()

if [ -n "$quick" ]; then
  device="cpu"
  overhead=(--quick --sizes sd15,sdxl --memory "sd15:unpatched+add_kernel8+scale_kernel8")
  attribution=(--quick)
  limits=(1500 600)
else
  device="cuda"
  overhead=(--sizes sd15,sdxl --blocks sd15:12,sdxl:8 --steps-per-call 4 --child-timeout 150
            --memory "sd15:unpatched+add_kernel8+scale_kernel8+add_per_token,sdxl:unpatched+add_per_token")
  attribution=(--channels 320 --samples 16 --batch-size 8 --steps 10 --pairs 4)
  limits=(330 120)
fi

echo "== intervention overhead ($device)"
timeout "${limits[0]}" "$python" benchmarks/intervention_overhead.py --device "$device" "${overhead[@]}" \
  --json "$out/overhead.json" || errors+=("intervention_overhead.py exit $?")
echo "== attribution cost ($device)"
timeout "${limits[1]}" "$python" benchmarks/attribution_cost.py --device "$device" "${attribution[@]}" \
  --json "$out/attribution.json" || errors+=("attribution_cost.py exit $?")

ERRORS="$(printf '%s\n' "${errors[@]+"${errors[@]}"}")" "$python" - "$out" <<'EOF'
import json, os, sys
from pathlib import Path

out = Path(sys.argv[1])
merged = {"ratios": {}, "memory": {}, "errors": [e for e in os.environ["ERRORS"].splitlines() if e]}
for name in ("overhead", "attribution"):
    path = out / f"{name}.json"
    merged[name] = json.loads(path.read_text()) if path.is_file() else None
    if merged[name] is None:
        merged["errors"].append(f"{path} was not written")
for size, result in ((merged["overhead"] or {}).get("sizes") or {}).items():
    timing = result.get("timing", {})
    if "error" in timing:
        merged["errors"].append(f"overhead {size}: {timing['error'][-500:]}")
    for variant, kinds in timing.get("ratios", {}).items():
        for kind, r in kinds.items():
            merged["ratios"][f"overhead/{size}/{variant}/{kind}"] = [r["ratio"], r["low"], r["high"]]
    merged["memory"][size] = result.get("memory_summary", {})
for kind, r in ((merged["attribution"] or {}).get("ratios") or {}).items():
    merged["ratios"][f"attribution/{kind}"] = [r["ratio"], r["low"], r["high"]]
(out / "device.json").write_text(json.dumps(merged, indent=2))
for key, (ratio, low, high) in merged["ratios"].items():
    print(f"{key:48s} {ratio:.4f} [{low:.4f}, {high:.4f}]")
for error in merged["errors"]:
    print("error:", error)
EOF
