#!/usr/bin/env bash
# What `make test` takes from a fresh clone, as CI runs it (.ci/run): the environment it installs and the most the
# suite's temporary folders hold while it runs (pytest's under /tmp, its fixtures' under /dev/shm; sampled every
# 5 s), with the suite's own result and time. Run it alone: it is the whole CI run.
#   benchmarks/suite_footprint.sh [CLONE_DIR]    (default /tmp/resunet-footprint, removed first)
set -u
source_repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
clone=${1:-/tmp/resunet-footprint}
rm -rf "$clone" && git clone -q "$source_repo" "$clone" && cd "$clone" || exit 1
log="$clone.log"
started=$(date -u +%s)
(.ci/run > "$log" 2>&1; echo "EXIT $?" >> "$log") &
runner=$!
peak_tmp=0
peak_shm=0
while kill -0 "$runner" 2>/dev/null; do
    tmp=$(du -sm "/tmp/pytest-of-$(id -un)" 2>/dev/null | cut -f1)
    shm=$(du -smc /dev/shm/resunet-tests-* 2>/dev/null | tail -1 | cut -f1)
    [ "${tmp:-0}" -gt "$peak_tmp" ] && peak_tmp=${tmp:-0}
    [ "${shm:-0}" -gt "$peak_shm" ] && peak_shm=${shm:-0}
    sleep 5
done
wait "$runner"
echo "commit $(git rev-parse --short HEAD); $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) cores"
echo "whole CI run $(( ($(date -u +%s) - started) / 60 )) min; $(grep -E '[0-9]+ (passed|failed)' "$log" | tail -1)"
echo "environment (.venv): $(du -sm .venv | cut -f1) MB"
echo "most held while the suite ran: /tmp/pytest-of-$(id -un) ${peak_tmp} MB, /dev/shm ${peak_shm} MB"
tail -1 "$log"
