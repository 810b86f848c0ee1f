#!/usr/bin/env bash
# Build the aiflow images from the repository's Dockerfiles, without aiflow itself installed.
#
#   images/build.sh [TARGET...]    TARGET: deps base wheels operator stage-cpu stage-gpu all
#                                  (default: operator stage-cpu, and what they need)
#
#   deps       apt-get install debootstrap, buildah, podman, runc, iptables, netavark and aardvark-dns
#              where absent (root, Debian/Ubuntu)
#   base       a Debian bookworm + Python 3.11 base image made with debootstrap, imported as
#              $BASE_IMAGE (localhost/aiflow-base:bookworm-<hash>); kept when it exists already.
#              Only for buildah/podman with no BASE_IMAGE given: where a registry is reachable,
#              BASE_IMAGE=python:3.11-slim-bookworm does the same.
#   wheels     fill images/wheels/ from the host's pip: the CPU build of torch and every wheel the
#              images install, for Python 3.11 on x86_64, so the builds read no package index
#   operator   ghcr.io/aiflow/operator:<version>          (images/operator.Dockerfile)
#   stage-cpu  ghcr.io/aiflow/triton-stage-cpu:<version>  (images/triton-stage-cpu.Dockerfile)
#   stage-gpu  ghcr.io/aiflow/triton-stage:<version>      (images/triton-stage.Dockerfile; pulls
#              NVIDIA's Triton image, several GB; GPU tiers)
#
# Environment:
#   ENGINE           buildah, podman or docker (default: the first one installed, in that order)
#   BASE_IMAGE       base of the operator and CPU stage images (default: the debootstrap base for
#                    buildah/podman, python:3.11-slim-bookworm for docker)
#   TRITON_IMAGE     base of the GPU stage image (default: the Dockerfile's NVIDIA Triton image)
#   DEBIAN_MIRROR    debootstrap's mirror (default: the first Debian URI of the machine's apt sources)
#   TORCH_INDEX_URL  where pip finds the CPU torch wheel (e.g. https://download.pytorch.org/whl/cpu;
#                    default: the host pip's configured indexes)
#   OPERATOR_IMAGE, STAGE_CPU_IMAGE, STAGE_IMAGE   the image names to tag
#   OCI_RUNTIME      runtime of buildah's RUN steps (default: runc when installed; crun refuses
#                    hybrid cgroup hosts)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf '==> %s\n' "$*" >&2; }
die() { printf 'images/build.sh: error: %s\n' "$*" >&2; exit 2; }
have() { command -v "$1" >/dev/null 2>&1; }

VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n1)"
[ -n "$VERSION" ] || die "no version in pyproject.toml"
REVISION="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
SOURCE="https://github.com/aiflow-project/aiflow"
OPERATOR_IMAGE="${OPERATOR_IMAGE:-ghcr.io/aiflow/operator:$VERSION}"
STAGE_CPU_IMAGE="${STAGE_CPU_IMAGE:-ghcr.io/aiflow/triton-stage-cpu:$VERSION}"
STAGE_IMAGE="${STAGE_IMAGE:-ghcr.io/aiflow/triton-stage:$VERSION}"
WHEELS="$ROOT/images/wheels"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION=2.13.0
# The Python of both images (Debian bookworm's, and python:3.11-slim's); the Triton Python backend
# stub is picked for it at build time.
IMAGE_PYTHON=3.11
# What the debootstrap base holds: Python with venv, and the libpython the backend stub links.
BASE_PACKAGES="python3,python3-venv,ca-certificates,libpython3.11"

if [ -z "${ENGINE:-}" ]; then
  for e in buildah podman docker; do have "$e" && { ENGINE=$e; break; }; done
fi
ENGINE="${ENGINE:-}"
if [ -z "${OCI_RUNTIME:-}" ] && have runc; then OCI_RUNTIME=runc; fi

deps() {
  local want=() pkg
  for pkg in debootstrap buildah podman runc iptables netavark aardvark-dns; do
    dpkg -s "$pkg" >/dev/null 2>&1 || want+=("$pkg")
  done
  if [ ${#want[@]} -eq 0 ]; then say "deps: all installed"; return; fi
  [ "$(id -u)" = 0 ] || die "installing ${want[*]} needs root"
  have apt-get || die "no apt-get: install ${want[*]} with your system's package manager"
  say "deps: apt-get install ${want[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
}

need_engine() {
  [ -n "$ENGINE" ] || die "no container engine: install buildah+podman (images/build.sh deps) or docker"
  have "$ENGINE" || die "ENGINE=$ENGINE is not installed"
  if [ "$ENGINE" = docker ]; then
    docker info >/dev/null 2>&1 || die "the docker daemon is not reachable (is it running?)"
  fi
}

image_exists() {
  case "$ENGINE" in
    buildah) buildah inspect --type image "$1" >/dev/null 2>&1 ;;
    podman) podman image exists "$1" ;;
    docker) docker image inspect "$1" >/dev/null 2>&1 ;;
  esac
}

debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local uri
  uri="$( { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}';
            grep -h '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk '{print $2}'; } \
          | grep -E '/debian/?$' | head -n1 || true)"
  echo "${uri:-http://deb.debian.org/debian}"
}

# The debootstrap base is named by what it holds, so a change of packages makes a new one.
default_base() {
  local tag
  tag="$(printf '%s' "$BASE_PACKAGES" | sha256sum | cut -c1-12)"
  echo "localhost/aiflow-base:bookworm-$tag"
}

base() {
  need_engine
  [ "$ENGINE" != docker ] || die "the debootstrap base is for buildah/podman; with docker use BASE_IMAGE=python:3.11-slim-bookworm"
  local image="$1"
  if image_exists "$image"; then say "base: $image exists, kept"; return; fi
  have debootstrap || die "debootstrap is not installed (images/build.sh deps)"
  [ "$(id -u)" = 0 ] || die "debootstrap needs root"
  local dir mirror start
  dir="$(mktemp -d "${TMPDIR:-/tmp}/aiflow-base.XXXXXX")"
  trap 'rm -rf "$dir"' RETURN
  mirror="$(debian_mirror)"
  start=$SECONDS
  say "base: debootstrap bookworm from $mirror ($BASE_PACKAGES)"
  debootstrap --variant=minbase --include="$BASE_PACKAGES" bookworm "$dir/rootfs" "$mirror" >"$dir/log" 2>&1 \
    || { tail -n 20 "$dir/log" >&2; die "debootstrap failed"; }
  rm -rf "$dir"/rootfs/var/cache/apt/archives/*.deb "$dir"/rootfs/var/lib/apt/lists/*
  have podman || die "podman is needed to import the base (images/build.sh deps)"
  tar -C "$dir/rootfs" -c . | podman import - "$image" >/dev/null
  say "base: $image in $((SECONDS - start)) s"
}

wheels() {
  have "$PYTHON" || die "$PYTHON not found (PYTHON=...): the host's pip fills images/wheels/"
  mkdir -p "$WHEELS"
  local stamp
  stamp="$(cat images/stage-requirements.txt images/operator-requirements.txt; echo "${TORCH_INDEX_URL:-}")"
  stamp="$(printf '%s' "$stamp" | sha256sum | cut -c1-16)"
  if [ -f "$WHEELS/.stamp" ] && [ "$(cat "$WHEELS/.stamp")" = "$stamp" ]; then
    say "wheels: images/wheels/ is up to date"; return
  fi
  local start=$SECONDS
  # Wheels for the images' Python and glibc (bookworm: 2.36), whatever Python the host runs.
  local target=(--only-binary=:all: --python-version "$IMAGE_PYTHON" --implementation cp) g
  for g in $(seq 36 -1 17); do target+=(--platform "manylinux_2_${g}_x86_64"); done
  target+=(--platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)
  local torch_index=()
  [ -z "${TORCH_INDEX_URL:-}" ] || torch_index=(--index-url "$TORCH_INDEX_URL")
  say "wheels: torch==$TORCH_VERSION (CPU) and images/*-requirements.txt into images/wheels/"
  "$PYTHON" -m pip download -q --no-deps "${target[@]}" "${torch_index[@]}" -d "$WHEELS" "torch==$TORCH_VERSION"
  ls "$WHEELS"/torch-"$TORCH_VERSION"*.whl >/dev/null 2>&1 || die "pip found no torch $TORCH_VERSION wheel"
  case "$(ls "$WHEELS"/torch-"$TORCH_VERSION"*.whl)" in
    *+cpu*) ;;
    *) say "wheels: warning: the torch wheel is not the +cpu build (set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu)" ;;
  esac
  # torch's own dependencies, the images' requirements, and setuptools and wheel: the project itself
  # builds from source in the image.
  grep -v '^torch==' images/stage-requirements.txt >"$WHEELS/.rest.txt"
  "$PYTHON" -m pip download -q "${target[@]}" -d "$WHEELS" "$(ls "$WHEELS"/torch-"$TORCH_VERSION"*.whl)" \
    "setuptools>=69" wheel -r "$WHEELS/.rest.txt" -r images/operator-requirements.txt
  echo "$stamp" >"$WHEELS/.stamp"
  say "wheels: $(ls "$WHEELS"/*.whl | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1), in $((SECONDS - start)) s"
}

build() {  # build DOCKERFILE IMAGE BUILD-ARG...
  local file="$1" image="$2" start=$SECONDS
  shift 2
  local args=(--build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION" --build-arg "SOURCE=$SOURCE")
  for a in "$@"; do args+=(--build-arg "$a"); done
  say "build: $image from $file"
  case "$ENGINE" in
    buildah|podman)
      local extra=(--layers --network host --ulimit nofile=1024:1024 --ulimit nproc=4096:4096)
      [ -z "${OCI_RUNTIME:-}" ] || extra+=(--runtime "$OCI_RUNTIME")
      if [ "$ENGINE" = buildah ]; then
        buildah bud "${extra[@]}" "${args[@]}" -f "$file" -t "$image" .
      else
        podman build "${extra[@]}" "${args[@]}" -f "$file" -t "$image" .
      fi ;;
    docker) docker build "${args[@]}" -f "$file" -t "$image" . ;;
  esac
  local size
  case "$ENGINE" in
    docker) size="$(docker image inspect -f '{{.Size}}' "$image")" ;;
    *) size="$(podman image inspect -f '{{.Size}}' "$image" 2>/dev/null || echo 0)" ;;
  esac
  say "build: $image in $((SECONDS - start)) s, $((size / 1000000)) MB"
}

base_image() {
  if [ -n "${BASE_IMAGE:-}" ]; then echo "$BASE_IMAGE"
  elif [ "$ENGINE" = docker ]; then echo python:3.11-slim-bookworm
  else default_base
  fi
}

# images/wheels/ holds every wheel: the builds read no package index.
pip_args() { echo "--no-index"; }

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(operator stage-cpu)
for t in "${targets[@]}"; do
  case "$t" in
    deps) deps ;;
    base) base "$(base_image)" ;;
    wheels) wheels ;;
    operator|stage-cpu)
      need_engine
      b="$(base_image)"
      [ -n "${BASE_IMAGE:-}" ] || [ "$ENGINE" = docker ] || base "$b"
      wheels
      if [ "$t" = operator ]; then
        build images/operator.Dockerfile "$OPERATOR_IMAGE" "BASE_IMAGE=$b" "PIP_ARGS=$(pip_args)"
      else
        build images/triton-stage-cpu.Dockerfile "$STAGE_CPU_IMAGE" "BASE_IMAGE=$b" "PIP_ARGS=$(pip_args)"
      fi ;;
    stage-gpu)
      need_engine
      gpu_args=()
      [ -z "${TRITON_IMAGE:-}" ] || gpu_args+=("TRITON_IMAGE=$TRITON_IMAGE")
      build images/triton-stage.Dockerfile "$STAGE_IMAGE" "${gpu_args[@]}" ;;
    all) "$0" operator stage-cpu stage-gpu ;;
    -h|--help) sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown target $t (deps base wheels operator stage-cpu stage-gpu all)" ;;
  esac
done
