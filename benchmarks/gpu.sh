#!/usr/bin/env bash
# The GPU benchmark in one command: SD1.5 at 512 px and SDXL at 1024 px, ways a/b/c/d eager and
# (e) compiled, on the full-size zoo, with the UNet's TFLOP/s against the measured bf16 ceiling.
# For a machine with torch (CUDA) but neither Ray nor diffusers: what it lacks comes from wheels
# carried with the tree in .whl/ (benchmarks/gpu_wheels.sh makes them); no Ray is needed.
# Writes $OUT/gpu-bench.md, the table to paste into docs/benchmarks.md, and the raw logs.
#
#   bash benchmarks/gpu.sh [--dry-run] [OUT]
#
# --dry-run runs the very same steps on the CPU with the tiny zoo and few rows, so the script is
# known to work before GPU minutes are spent on it.
set -euo pipefail
cd "$(dirname "$0")/.."
dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
out=${1:-${OUT:-bench-gpu}}
mkdir -p "$out"
py=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ "$dry" = 1 ] && py=.venv/bin/python

if ! "$py" -c "import diffusers, pydantic" 2>/dev/null; then
  [ -d .whl ] || { echo "gpu.sh: diffusers/pydantic missing and no .whl/ folder; run benchmarks/gpu_wheels.sh and carry .whl" >&2; exit 2; }
  "$py" -m pip install -q --no-index --find-links .whl diffusers importlib_metadata pydantic
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

if [ "$dry" = 1 ]; then
  size=tiny device=cpu common=(--rows 4 --batch 4 --rounds 1 --warmup 0 --steps 2)
  sd15=(--model sd15) sdxl=(--model sdxl)
else
  size=full device=cuda common=(--rows 32 --batch 8 --rounds 2 --warmup 1 --steps 20)
  sd15=(--model sd15 --resolution 512) sdxl=(--model sdxl --resolution 1024)
fi
zoo=${IPA_BENCH_ZOO:-$PWD/.cache/bench-zoo}
table="$out/gpu-bench.md"
{
  echo "| model | work | a img/s | b | c | d | e (compiled) | b/a | c/a | c/d | e/c | UNet TFLOP/s (c, e) |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
} > "$table"
status=0
for model in sd15 sdxl; do
  for work in mixed uniform; do
    args=("${common[@]}" --size "$size" --device "$device" --zoo "$zoo" --compile regional)
    [ "$model" = sd15 ] && args+=("${sd15[@]}") || args+=("${sdxl[@]}")
    [ "$work" = uniform ] && args+=(--uniform-work)
    log="$out/$model-$work.log"
    echo "gpu.sh: $model $work: python benchmarks/bench_generate.py ${args[*]}"
    if ! "$py" benchmarks/bench_generate.py "${args[@]}" > "$log" 2>&1; then
      echo "gpu.sh: $model $work failed; see $log" >&2
      tail -5 "$log" >&2
      status=1
      continue
    fi
    "$py" - "$log" "$model" "$work" >> "$table" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
rate = dict(re.findall(r"(\w)=([0-9.]+)", re.search(r"images/s over .*", text).group(0).split(":", 1)[1]))
ratios = dict(re.findall(r"(\w/\w)=([0-9.]+)", re.search(r"^ratios: .*", text, re.M).group(0)))
tflops = re.findall(r"\((\w)\) achieved ([0-9.]+) TFLOP/s vs bf16 matmul ceiling ([0-9.]+)", text)
unet = ", ".join(f"{w}: {t} of {c}" for w, t, c in tflops) or "n/a (CPU)"
cells = [sys.argv[2], sys.argv[3], *(rate.get(k, "") for k in "abcde"), *(ratios.get(k, "") for k in ("b/a", "c/a", "c/d", "e/c")), unet]
print("| " + " | ".join(cells) + " |")
PY
  done
done
cat "$table"
exit "$status"
