#!/usr/bin/env bash
# Build the task image of containers/Containerfile without a registry, once per set of inputs:
# the Containerfile's Debian packages and suite through mmdebstrap (from the Debian mirror), the
# project and its dependencies as wheels (pip wheel) installed into /opt/snapstore, then
# `podman import` with the Containerfile's ENV and CMD. The image is tagged
# localhost/snapstore-task:KEY, KEY a hash of every input (the Containerfile, this script, the
# project's sources); an image with that tag already present is reused (a second run takes
# about a second). Writes the tag to build/task-image/IMAGE and a containers.conf for this
# machine to build/task-image/containers.conf (CONTAINERS_CONF: runc, and ulimits no higher
# than this machine's hard limits). As root. Prints the image tag as its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\033[1mbuild-task-image:\033[0m %s\n' "$*" >&2; }
die() { echo "build-task-image: $*" >&2; exit 1; }

for tool in podman mmdebstrap; do
    command -v "$tool" >/dev/null || die "no $tool (scripts/setup.sh installs it)"
done
out=build/task-image
mkdir -p "$out"

# runc: crun refuses cgroup v1 hybrid hosts; ulimits: podman's default nofile/nproc exceed
# what a capped machine allows a container (crun/runc: setrlimit: Operation not permitted)
# (measured here: nofile 20000 and nproc 32768 work; nproc at the hard limit, 96367, did not)
nofile=$(ulimit -Hn) nproc=$(ulimit -Hu)
[[ $nofile == unlimited || $nofile -gt 20000 ]] && nofile=20000
[[ $nproc == unlimited || $nproc -gt 32768 ]] && nproc=32768
cat >"$out/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF="$PWD/$out/containers.conf"

file=containers/Containerfile
# The Containerfile, step by step: FROM gives the suite, the apt-get RUN the packages
# (mmdebstrap --include), every later COPY and RUN becomes a hook in the same order (COPY
# wheels/ takes the wheels built below, any other COPY a file of containers/), ENV and CMD
# go to podman import. Any other instruction is refused, so the two cannot drift apart.
suite="" packages="" hooks=() changes=()
while IFS= read -r line; do
    case "$line" in
    "" | "#"*) ;;
    "FROM debian:"*) suite=${line#FROM debian:} suite=${suite%%-*} ;;
    "RUN apt-get update && apt-get install -y --no-install-recommends "*)
        packages=${line#*--no-install-recommends } packages=${packages%%&&*} ;;
    "RUN "*"'"*) die "$file: a RUN with a single quote cannot be a hook: $line" ;;
    "RUN "*) hooks+=(--customize-hook="chroot \"\$1\" sh -c '${line#RUN }'") ;;
    "COPY wheels/ /tmp/wheels/") hooks+=(--customize-hook="copy-in $out/wheels /tmp") ;;
    "COPY "*)
        set -- ${line#COPY }
        [[ -f containers/$1 ]] || die "$file: COPY $1: no such file in containers/"
        hooks+=(--customize-hook="copy-in containers/$1 $(dirname "$2")") ;;
    "ENV "* | "CMD "*) changes+=(--change "$line") ;;
    *) die "$file: this script cannot build: $line" ;;
    esac
done <"$file"
packages=$(echo "$packages" | xargs)
[[ -n "$suite" && -n "$packages" ]] || die "cannot read the suite and the packages from $file"

key=$( { cat "$file" "$0" containers/snapstore-entry pyproject.toml; find fusionfs snapstore -name '*.py' | LC_ALL=C sort | xargs cat; } | sha256sum | cut -c1-16)
image="localhost/snapstore-task:$key"
if podman image exists "$image"; then
    say "$image is up to date"
    echo "$image" >"$out/IMAGE"
    echo "$image"
    exit 0
fi

started=$SECONDS
say "wheels of the project and its dependencies"
rm -rf "$out/wheels"
py=.venv/bin/python
[[ -x $py ]] || py=python3
"$py" -m pip wheel -q -w "$out/wheels" . >"$out/pip.log" 2>&1 || { cat "$out/pip.log" >&2; die "pip wheel failed"; }

say "Debian $suite with: $packages (mmdebstrap)"
rm -f "$out/rootfs.tar"
# the image's packages and the project's wheels, nothing from a registry
if ! mmdebstrap --variant=minbase --include="${packages// /,}" "${hooks[@]}" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/*' \
    "$suite" "$out/rootfs.tar" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$out/mmdebstrap.log" 2>&1; then
    tail -n 30 "$out/mmdebstrap.log" >&2
    die "mmdebstrap failed (log above)"
fi
say "podman import as $image"
podman import -q "${changes[@]}" "$out/rootfs.tar" "$image" >/dev/null
rm -f "$out/rootfs.tar"
# builds of this image older than a day (other checkouts on this machine may use newer ones)
podman images --filter reference=localhost/snapstore-task --filter until=24h \
    --format '{{.Repository}}:{{.Tag}}' | grep -vxF "$image" | xargs -r podman rmi >/dev/null 2>&1 || true
say "built in $((SECONDS - started)) s"
echo "$image" >"$out/IMAGE"
echo "$image"
