#!/bin/bash
# A short, prepared check of diffperf's CUDA paths (torch, JAX, A/B, xdist) for a GPU machine lent for minutes.
#
#   bash benchmarks/gpu_check.sh                      # every step, within BUDGET seconds (default 560)
#   STEPS="fid sdxlfid" BUDGET=170 bash benchmarks/gpu_check.sh
#
# Each step is one `pytest perf -m cuda` (3 rounds, 1 warmup round), capped by what is left before the budget
# ends; logs, journals and --benchmark-json files go to $OUT (default ./gpu-check) and are packed into
# $OUT/all.tgz after every step, so a step that is killed still leaves what came before it. Wheels in .whl/
# (for a machine that cannot reach an index) are installed into /tmp/site first.
START=$(date +%s)
BUDGET=${BUDGET:-560}
DEADLINE=$((START + BUDGET))
OUT=${OUT:-$PWD/gpu-check}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT  # everything it holds is packed into $OUT/all.tgz
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
pack() { tar czf "$OUT/all.tgz" -C "$W" . 2>/dev/null; }
left() { echo $((DEADLINE - $(date +%s))); }
step() {  # step NAME CAP -- command...
  local name=$1 cap=$2; shift 3
  local t; t=$(left); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 15 ]; then echo "== $name: not run, ${t}s left" | tee -a "$W/summary.txt"; return; fi
  echo "== $name (cap ${t}s) $(date +%T)"
  local s; s=$(date +%s)
  timeout -k 5 "$t" "$@" > "$W/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc $(( $(date +%s) - s ))s" | tee -a "$W/summary.txt"
  tail -n "${TAILN:-25}" "$W/$name.log"
  pack
}

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$W/pip.log" 2>&1 || { cat "$W/pip.log"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv
  nproc; python3 --version
  python3 -c "import torch,diffusers,transformers,torchao;print('torch',torch.__version__,torch.version.cuda,torch.cuda.is_available());print('diffusers',diffusers.__version__,'transformers',transformers.__version__,'torchao',torchao.__version__)"
  python3 -c "import jax,flax;print('jax',jax.__version__,'flax',flax.__version__,jax.devices())"
  python3 -c "from diffperf import hardware;print(hardware.nvidia_gpus(), hardware.cuda_compute_capability())"
  python3 -c "
import torch
for shape in [(1,4,16,16),(1,4,128,128)]:
    a=torch.randn(shape,generator=torch.Generator('cpu').manual_seed(0))
    for dt in (torch.bfloat16, torch.float16):
        b=torch.randn(shape,generator=torch.Generator('cpu').manual_seed(0),dtype=dt)
        print('randn', torch.__version__, shape, dt, 'cosine', round(torch.nn.functional.cosine_similarity(a.flatten(), b.float().flatten(),dim=0).item(),5), 'equal to rounded fp32', (a.to(dt)==b).float().mean().item())
"
} > "$W/env.log" 2>&1
cat "$W/env.log"
PT="python3 -m pytest perf -m cuda -p no:cacheprovider -q -rA --perf-rounds 3 --perf-warmup-rounds 1 --perf-max-time 20"
for s in ${STEPS:-tinyc jax ab sdxl xdist}; do
  case $s in
  tinyc) step tinyc 170 -- $PT --perf-frameworks torch --perf-preset tiny \
           --perf-recipes torch:fp32-classic,torch:bf16-sdpa,torch:bf16-sdpa-cl-compile,torch:bf16-sdpa-cl-fuseqkv-compile-int8dq,torch:bf16-sdpa-fp8dq \
           --perf-journal "$W/tinyc.jsonl" --benchmark-json "$W/tinyc.json" ;;
  fid) step fid 75 -- $PT --perf-frameworks torch --perf-preset tiny \
         --perf-recipes torch:bf16-sdpa,torch:bf16-sdpa-compiledefault,torch:bf16-sdpa-fp8dq \
         --perf-journal "$W/fid.jsonl" --benchmark-json "$W/fid.json" ;;
  jax) step jax 90 -- $PT --perf-frameworks jax --perf-preset tiny --perf-journal "$W/jax.jsonl" --benchmark-json "$W/jax.json" ;;
  ab) step ab 90 -- $PT --perf-frameworks torch --perf-preset tiny --perf-recipes torch:bf16-sdpa \
        --perf-ab-python python3 --perf-ab-processes 2 --perf-journal "$W/ab.jsonl" --benchmark-json "$W/ab.json" ;;
  sdxl) step sdxl 230 -- $PT --perf-frameworks torch --perf-recipes torch:eager \
          --perf-journal "$W/sdxl.jsonl" --benchmark-json "$W/sdxl.json" ;;
  sdxlfid) step sdxlfid 85 -- $PT --perf-frameworks torch --perf-recipes torch:bf16-sdpa --perf-rounds 1 --perf-warmup-rounds 0 \
             --perf-journal "$W/sdxlfid.jsonl" --benchmark-json "$W/sdxlfid.json" ;;
  xdist) step xdist 45 -- $PT -n auto --perf-frameworks torch --perf-preset tiny --perf-recipes torch:bf16-sdpa \
           --perf-journal "$W/xdist.jsonl" --benchmark-json "$W/xdist.json" ;;
  *) echo "gpu_check.sh: unknown step '$s' (known: tinyc fid jax ab sdxl sdxlfid xdist)" >&2; exit 2 ;;
  esac
done
nvidia-smi --query-gpu=memory.used --format=csv >> "$W/summary.txt" 2>&1
pack
cat "$W/summary.txt"
