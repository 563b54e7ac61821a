#!/usr/bin/env bash
# Build every stage image with docker or podman (whichever is present; CONTAINER_ENGINE overrides).
# Tags come from patchgap.kfp.images (registry and tag tied to the package version).
set -euo pipefail
cd "$(dirname "$0")/.."
engine="${CONTAINER_ENGINE:-}"
if [[ -z "$engine" ]]; then
  if command -v docker >/dev/null 2>&1; then engine=docker
  elif command -v podman >/dev/null 2>&1; then engine=podman
  else echo "error: neither docker nor podman found; set CONTAINER_ENGINE" >&2; exit 2; fi
fi
py="${PYTHON:-.venv/bin/python}"
ref() { "$py" -c "from patchgap.kfp.images import image_for; print(image_for('$1'))"; }
base="$(ref base)"
echo "building $base"
"$engine" build -f images/base/Dockerfile -t "$base" .
for dir in images/*/; do
  stage="$(basename "$dir")"
  [[ "$stage" == base ]] && continue
  [[ -f "$dir/Dockerfile" ]] || continue
  tag="$(ref "$stage")"
  echo "building $tag"
  "$engine" build -f "$dir/Dockerfile" --build-arg "BASE_IMAGE=$base" -t "$tag" .
done
