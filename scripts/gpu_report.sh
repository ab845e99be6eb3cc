#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md and the CUDA tests, on one CUDA GPU, in one call.
#
#   bash scripts/gpu_report.sh OUT [NVLABS_EDM_DIR] [FP16_SECONDS] [FP32_SECONDS]
#
# 1. At once: tests/test_cuda.py, test_networks.py and test_hardware.py (all markers; at most
#    TEST_SECONDS, default 200) and seven scripts/bench.py processes (DDPM++ CIFAR-10 32x32,
#    batch 512, EDM augmentation p = 0.12 as the reference trains). They compile side by side,
#    then time one at a time once every one of them and the tests are done (bench.py --share-gpu).
# 2. NVlabs/edm itself (scripts/reference_edm.sh, its training runs cut after 60 and 150 s) when
#    NVLABS_EDM_DIR is given, alone on the GPU.
# 3. OUT/summary.md: our figures against the reference's, as ratios from this one run.
# OUT (new or empty) gets report.log, results.jsonl (one JSON per setting), profile-train*.txt, cuda-tests.log,
# reference.log and summary.md. PYTHON picks the interpreter (python3); DEVICE=cpu rehearses the
# whole script on the CPU (tiny network, two steps, no reference).
set -uo pipefail
out=${1:?usage: bash scripts/gpu_report.sh OUT [NVLABS_EDM_DIR] [FP16_SECONDS] [FP32_SECONDS]}
ref=${2:-}; ref_secs=${3:-60}; ref_secs32=${4:-150}
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"; out=$(cd "$out" && pwd)
if [ -n "$(ls -A "$out")" ]; then  # results.jsonl and report.log are appended to: one run per folder
  echo "gpu_report.sh: error: $out holds an earlier report; give a new or empty OUT, so that summary.md's ratios come from one run" >&2
  exit 2
fi
work=$(mktemp -d); turns=$work/turns; mkdir -p "$turns"
exec > >(tee -a "$out/report.log") 2>&1
small=()
if [ "${DEVICE:-cuda}" = cpu ]; then
  small=(--device cpu --batch 8 --steps 2 --warmup 1 --sample-steps 4); ref=
else
  "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "no CUDA GPU visible to torch")' || exit 1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
fi
xdist=(); "$py" -c 'import xdist' 2>/dev/null && xdist=(-n 4)
"$py" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
date -u +"start %FT%TZ"

bench() {  # NAME, then bench.py flags
  "$py" scripts/bench.py --share-gpu "$turns" 8 --out "$work/$1.json" "${@:2}" "${small[@]}" >"$work/$1.log" 2>&1 \
    && "$py" -c 'import json, sys; d = json.load(open(sys.argv[1])); d["name"] = sys.argv[2]; print(json.dumps(d))' \
         "$work/$1.json" "$1" >>"$out/results.jsonl" \
    || { echo "bench $1 FAILED:"; tail -30 "$work/$1.log"; }
}
train=(--mode train --augment 0.12)
( timeout "${TEST_SECONDS:-200}" "$py" -m pytest -q -p no:cacheprovider -m "slow or not slow" \
    "${xdist[@]}" tests/test_cuda.py tests/test_networks.py tests/test_hardware.py \
    >"$out/cuda-tests.log" 2>&1; echo "tests exit $?" >>"$out/cuda-tests.log"; touch "$turns/warm-tests" ) & pids=($!)
bench train-bf16-compile "${train[@]}" --precision bf16 --compile --profile "$out/profile-train.txt" & pids+=($!)
bench train-bf16-compile-cl "${train[@]}" --precision bf16 --compile --channels-last --profile "$out/profile-train-cl.txt" & pids+=($!)
bench train-fp16-eager "${train[@]}" --precision fp16 --no-compile & pids+=($!)
bench train-fp32-notf32-eager "${train[@]}" --precision fp32 --no-compile --no-tf32 --steps 6 --warmup 2 & pids+=($!)
bench sample-bf16-compile --mode sample --precision bf16 --compile & pids+=($!)
bench sample-bf16-compile-cl --mode sample --precision bf16 --compile --channels-last & pids+=($!)
bench sample-fp16-eager --mode sample --precision fp16 --no-compile & pids+=($!)
wait "${pids[@]}"  # (a bare wait would also wait for the tee above)
tail -3 "$out/cuda-tests.log"
date -u +"ours done %FT%TZ"

if [ -n "$ref" ]; then
  bash scripts/reference_edm.sh "$ref" "$work/ref" "$ref_secs" "$ref_secs32" | tail -1 >"$work/ref.json"
  for f in "$work"/ref/*.log; do echo "== $f"; cat "$f"; done >"$out/reference.log"
  "$py" -c 'import json, sys; d = json.load(open(sys.argv[1])); d["name"] = "nvlabs-edm"; print(json.dumps(d))' \
    "$work/ref.json" >>"$out/results.jsonl" || echo "reference FAILED: see reference.log"
  date -u +"reference done %FT%TZ"
fi

"$py" - "$out/results.jsonl" >"$out/summary.md" <<'PY'
import json, sys
rows = {d["name"]: d for d in map(json.loads, open(sys.argv[1]))}
ref = rows.pop("nvlabs-edm", {})
print(f"| setting | img/s | peak GB | TFLOP/s | vs reference |\n| --- | --- | --- | --- | --- |")
def line(name, ips, peak, tflops, base):
    ratio = f"{ips / base:.2f}x" if base else ""
    print(f"| {name} | {ips:.0f} | {peak:.1f} | {tflops} | {ratio} |")
base_train = (ref.get("ref_train_fp16") or {}).get("img_per_s")
base_sample = ref.get("ref_sample_35nfe_img_per_s")
for key in ("ref_train_fp16", "ref_train_default"):
    if ref.get(key):
        line(f"NVlabs/edm {key[10:]}", ref[key]["img_per_s"], ref[key]["peak_gb"], "", base_train)
    elif ref:
        print(f"| NVlabs/edm {key[10:]} | not measured: no tick after the first (reference.log) | | | |")
if base_sample:
    print(f"| NVlabs/edm edm_sampler, 35 evaluations | {base_sample:.0f} | | | 1.00x |")
for name, d in sorted(rows.items(), key=lambda kv: ("train" not in kv[1], kv[0])):
    mode = "train" if "train" in d else "sample"
    r = d[mode]
    line(name, r["images_per_s"], r.get("peak_memory_gb", 0), f"{r['achieved_tflops']:.0f}",
         base_train if mode == "train" else base_sample)
PY
cat "$out/summary.md"
date -u +"end %FT%TZ"
