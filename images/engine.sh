#!/usr/bin/env bash
# Make a container engine available to images/build.sh and to kfp.local's DockerRunner, and
# print the variables to use it: eval "$(images/engine.sh)".
# A running docker wins. Otherwise podman: installed from Debian's packages when missing
# (apt-get install podman runc), with runc as its runtime (crun fails on some cgroup layouts)
# and no default ulimits, then its Docker-compatible API served on a unix socket.
set -euo pipefail
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
  echo "export CONTAINER_ENGINE=docker"
  exit 0
fi
sudo=""
[[ "$(id -u)" == 0 ]] || sudo=sudo
if ! command -v podman >/dev/null 2>&1; then
  echo "installing podman (apt-get install podman runc)" >&2
  $sudo apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q podman runc >&2
fi
conf=/etc/containers/containers.conf
if [[ ! -f "$conf" ]]; then
  printf '[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\n' \
    | $sudo tee "$conf" >/dev/null
fi
if [[ "$(id -u)" == 0 ]]; then sock=/run/podman/podman.sock
else sock="${XDG_RUNTIME_DIR:-/tmp}/podman/podman.sock"; fi
if ! podman --url "unix://$sock" version >/dev/null 2>&1; then
  mkdir -p "$(dirname "$sock")"
  nohup podman system service --time=0 "unix://$sock" >"$(dirname "$sock")/service.log" 2>&1 &
  for _ in $(seq 1 30); do
    podman --url "unix://$sock" version >/dev/null 2>&1 && break
    sleep 1
  done
fi
podman --url "unix://$sock" version >/dev/null 2>&1 || {
  echo "error: podman's API service did not start on $sock" >&2; exit 2; }
echo "export CONTAINER_ENGINE=podman DOCKER_HOST=unix://$sock"
