#!/usr/bin/env bash
# The main job, end to end, on the embedded default (a local directory as the object store; no
# server): mount fusionfs, start a task that holds memory and appends to a file on the mount,
# checkpoint it with snapstore, "move" it (unmount, delete the cache, mount again: an empty cache
# as on another machine), restore it lazily and show its counter going on, with the timings.
# Usage: sudo scripts/demo.sh [--mib N]     (DEMO_DIR, default /tmp/fusionfs-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=256
[[ "${1:-}" == "--mib" ]] && MIB="$2"
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
export CRIU="$PWD/.venv/bin/criu"

D="${DEMO_DIR:-/tmp/fusionfs-demo}"
STORE="$D/store"; MNT="$D/fusion"; TASK=demo
step() { printf '\n\033[1;36m==> %s\033[0m\n' "$*"; }
mounted() { awk -v m="$MNT" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo; }
cleanup() {
    if [[ -n "${TASK_PID:-}" ]]; then kill "$TASK_PID" 2>/dev/null || true; sleep 0.5; fi
    if mounted; then
        fusionfs unmount "$MNT" --force >/dev/null 2>&1 || fusermount3 -uz "$MNT" 2>/dev/null || true
    fi
}
trap cleanup EXIT
show_stats() {
    fusionfs stats "$MNT" --json | python -c "import json, sys
s = json.load(sys.stdin); r = s['requests']
print('store traffic since this mount: uploaded %.1f MB (%d PUTs, %d parts), fetched %.1f MB (%d GETs)'
      % (s['bytes_uploaded'] / 1e6, r.get('put', 0), r.get('upload_part', 0),
         s['bytes_fetched'] / 1e6, r.get('get_range', 0)))"
}

if mounted; then fusermount3 -uz "$MNT" || true; fi
rm -rf "$D"; mkdir -p "$STORE" "$MNT"

step "machine A: mount $STORE (the object store: a local directory) at $MNT"
fusionfs mount "$STORE" "$MNT" --cache-dir "$D/cache-A"
mkdir -p "$MNT/work" "$MNT/snapshots"

step "machine A: start a task holding $MIB MiB that appends a counter to $MNT/work/out.txt"
setsid python scripts/demo_task.py "$MNT/work/out.txt" --mib "$MIB" </dev/null >"$D/task.log" 2>&1 &
TASK_PID=$!
sleep 4
tail -n 2 "$MNT/work/out.txt"

step "machine A: checkpoint it into the mount (snapstore dump $TASK_PID --task $TASK)"
snapstore dump "$TASK_PID" --task "$TASK" --root "$MNT/snapshots"
TASK_PID=
LAST=$(tail -n 1 "$MNT/work/out.txt")
echo "last line written before the checkpoint: $LAST"
show_stats

step "move: unmount machine A, delete its cache; machine B mounts the same store with an EMPTY cache"
fusionfs unmount "$MNT"
rm -rf "$D/cache-A"
fusionfs mount "$STORE" "$MNT" --cache-dir "$D/cache-B"
snapstore list --root "$MNT/snapshots"

step "machine B: restore lazily (memory pages are fetched from the store as they are touched)"
snapstore restore --task "$TASK" --root "$MNT/snapshots" --lazy --detach
sleep 4
step "machine B: the task goes on where it stopped"
grep -n -A3 -F "$LAST" "$MNT/work/out.txt" | head -n 4
tail -n 2 "$MNT/work/out.txt"
show_stats
TASK_PID=$(tail -n 1 "$MNT/work/out.txt" | sed -n 's/.*pid=\([0-9]*\).*/\1/p')
kill "$TASK_PID" 2>/dev/null || true
sleep 0.5; TASK_PID=
step "done: unmounting"
fusionfs unmount "$MNT"
