#!/usr/bin/env bash
# Times the reference NVlabs/edm on a CUDA GPU, as a baseline measured in the same device call as
# our own benchmark: DDPM++ CIFAR-10 32x32 (VP, batch 512) training s/kimg with --fp16=True and
# with its default (fp32, TF32 off), then its edm_sampler (18 steps = 35 evaluations) img/s.
#
#   bash reference_edm.sh REF_DIR OUT_DIR [FP16_SECONDS] [FP32_SECONDS]      (default 75, 150)
#
# Each run is cut after its seconds; the figure is its fastest 10-kimg tick after the first. On an
# H200 the fp16 run's first tick ended 30 s in; the fp32 run had printed no tick after 60 s.
# REF_DIR: a copy of NVlabs/edm (e.g. from `fetch`, kept in a git-ignored folder and carried with
# the call); it is copied to /tmp and patched there only where torch >= 2.2 stops it
# (InfiniteSampler passes `dataset` to Sampler.__init__). Data: 10k random 32x32 PNGs in a zip
# (content does not matter for throughput). Prints one JSON line last; logs go to OUT_DIR.
set -uo pipefail
ref=${1:?REF_DIR}; out=${2:?OUT_DIR}; secs=${3:-75}; secs32=${4:-$((2 * secs))}
mkdir -p "$out"; rm -rf /tmp/edm-ref && cp -r "$ref" /tmp/edm-ref && cd /tmp/edm-ref || exit 1
sed -i 's/super().__init__(dataset)/super().__init__()/' torch_utils/misc.py
"${PYTHON:-python3}" - <<'PY' || exit 1
import io, json, zipfile
import numpy as np
from PIL import Image
rng = np.random.default_rng(0)
with zipfile.ZipFile('/tmp/edm-ref-data.zip', 'w', compression=zipfile.ZIP_STORED) as z:
    for i in range(10000):
        b = io.BytesIO(); Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(b, format='png')
        z.writestr(f'{i:05d}.png', b.getvalue())
    z.writestr('dataset.json', json.dumps({'labels': None}))
PY
export PYTHONUNBUFFERED=1
train() {  # $1 = name, $2 = seconds, rest = extra flags; ticks every 10 kimg give s/kimg
  timeout "$2" "${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc_per_node=1 train.py --outdir=/tmp/edm-ref-$1 \
    --data=/tmp/edm-ref-data.zip --arch=ddpmpp --precond=vp --batch=512 --duration=0.2 --tick=10 \
    --snap=1 --dump=100000 --seed=1 --nosubdir "${@:3}" >"$out/ref-$1.log" 2>&1
  grep -E '^tick' "$out/ref-$1.log" | tail -n +2 | sed -E 's/.*sec\/kimg +([0-9.]+).*gpumem +([0-9.]+).*reserved +([0-9.]+).*/\1 \2 \3/'
}
fp16=$(train fp16 "$secs" --fp16=True | sort -n | head -1)
fp32=$(train fp32 "$secs32" | sort -n | head -1)
pkl=$(ls /tmp/edm-ref-fp16/network-snapshot-*.pkl 2>/dev/null | tail -1)
samp=$(timeout 120 "${PYTHON:-python3}" - "$pkl" <<'PY' 2>>"$out/ref-sample.log"
import pickle, sys, time, torch
sys.path.insert(0, '.')
import generate
with open(sys.argv[1], 'rb') as f:
    net = pickle.load(f)['ema'].cuda()
lat = torch.randn(512, 3, 32, 32, device='cuda')
generate.edm_sampler(net, lat, num_steps=18)
torch.cuda.synchronize(); t = time.perf_counter()
for _ in range(3):
    generate.edm_sampler(net, lat, num_steps=18)
torch.cuda.synchronize()
print(f'{3 * 512 / (time.perf_counter() - t):.1f}')
PY
)
"${PYTHON:-python3}" - "$fp16" "$fp32" "${samp:-nan}" <<'PY'
import json, sys, torch
def run(s):  # "sec/kimg gpumem reserved" of the fastest tick
    f = s.split()
    return {"img_per_s": round(1000 / float(f[0]), 1), "peak_gb": float(f[1]), "reserved_gb": float(f[2])} if len(f) == 3 else None
print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                  "ref_train_fp16": run(sys.argv[1]), "ref_train_default": run(sys.argv[2]),
                  "ref_sample_35nfe_img_per_s": float(sys.argv[3])}))
PY
