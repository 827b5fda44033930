#!/usr/bin/env bash
# The GPU check on a machine without network, with its own python3 and PyTorch.
#
#   benchmarks/gpu_offline.sh fetch          here (PyPI reachable): the wheels the GPU machine may lack, for
#                                            CPython 3.12 manylinux x86_64, into wheels/gpu-check/ (git-ignored)
#   benchmarks/gpu_offline.sh run [ARGS...]  there, offline: install what python3 cannot import from that folder
#                                            (pip --no-index --no-deps, into wheels/gpu-check/site, never over
#                                            what is installed), then python3 -m benchmarks.gpu_check ARGS
#
# Environment: PYTHON (default python3), WHEELS (default wheels/gpu-check), TORCH_VERSION for fetch (the GPU
# machine's torch, default 2.11: picks the matching torchvision), DECODE=1 for fetch to add PyAV (the decode
# section; about 40 MB). Pins come from constraints.txt. The check itself needs torch, timm and their imports;
# flash-attn, DeepSpeed, open_clip, webdataset and the decoders are optional and reported as absent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-$ROOT/wheels/gpu-check}"

# import name : distribution. Installed only when the import name is missing on the machine.
PACKAGES=(
  pytest:pytest _pytest:pytest pluggy:pluggy iniconfig:iniconfig packaging:packaging pygments:Pygments
  numpy:numpy PIL:pillow yaml:PyYAML safetensors:safetensors tqdm:tqdm filelock:filelock fsspec:fsspec
  typing_extensions:typing_extensions click:click idna:idna h11:h11 anyio:anyio truststore:truststore
  httpcore2:httpcore2 httpx2:httpx2 hf_xet:hf-xet huggingface_hub:huggingface_hub
  torchvision:torchvision timm:timm
)

pin() {  # the constraints.txt line of distribution $1, or the bare name
  local line
  line="$(grep -i -m1 -E "^${1//[-_]/[-_]}==" "$ROOT/constraints.txt" || true)"
  echo "${line:-$1}"
}

fetch() {
  local torch="${TORCH_VERSION:-2.11}" minor specs=() platforms=() seen=" "
  minor="${torch#2.}"; minor="${minor%%.*}"
  for pair in "${PACKAGES[@]}"; do
    dist="${pair#*:}"
    [[ "$seen" == *" $dist "* ]] && continue
    seen+="$dist "
    if [ "$dist" = torchvision ]; then specs+=("torchvision==0.$((minor + 15)).*")  # torch 2.N <-> torchvision 0.(N+15)
    else specs+=("$(pin "$dist")"); fi
  done
  [ "${DECODE:-0}" = 1 ] && specs+=("$(pin av)")
  for tag in manylinux1 manylinux2010 manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 \
      manylinux_2_34; do
    platforms+=(--platform "${tag}_x86_64")
  done
  mkdir -p "$WHEELS"
  echo "fetching ${#specs[@]} wheels for CPython 3.12 (torch $torch) into $WHEELS"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --abi abi3 --abi none "${platforms[@]}" --platform any -d "$WHEELS" "${specs[@]}"
  du -sh "$WHEELS"
}

run() {
  local missing=() seen=" "
  for pair in "${PACKAGES[@]}"; do
    mod="${pair%%:*}"; dist="${pair#*:}"
    if ! PYTHONPATH="$WHEELS/site${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
        "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)" 2>/dev/null; then
      [[ "$seen" == *" $dist "* ]] || missing+=("$dist")
      seen+="$dist "
    fi
  done
  if [ ${#missing[@]} -gt 0 ]; then
    [ -d "$WHEELS" ] || { echo "gpu_offline: $PY lacks ${missing[*]} and $WHEELS does not exist;" \
      "run 'benchmarks/gpu_offline.sh fetch' where PyPI is reachable and bring the folder along" >&2; exit 2; }
    echo "installing from $WHEELS (no network): ${missing[*]}"
    PIP_BREAK_SYSTEM_PACKAGES=1 "$PY" -m pip install --quiet --no-index --no-deps --find-links "$WHEELS" \
      --target "$WHEELS/site" "${missing[@]}"
  fi
  cd "$ROOT"
  PYTHONPATH="$ROOT:$WHEELS/site${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" -m benchmarks.gpu_check "$@"
}

case "${1:-}" in
  fetch) shift; fetch "$@" ;;
  run) shift; run "$@" ;;
  *) echo "usage: $0 fetch | run [gpu_check args, e.g. --cpu --tiny]" >&2; exit 2 ;;
esac
