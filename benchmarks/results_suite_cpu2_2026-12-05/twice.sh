#!/bin/bash
# Issue 22's bar: two fresh-clone .ci/run back to back, heavy.py (one busy core) beside both, vmstat every 30 s.
#   bash twice.sh REPO WORKDIR   (WORKDIR gets clone1, clone2, ci1.log, ci2.log, vmstat.log, summary.log)
repo=$(realpath "${1:?REPO}"); work=$(realpath -m "${2:?WORKDIR}"); here=$(dirname "$(realpath "$0")")
mkdir -p "$work" && cd "$work" || exit 1
python3 "$here/heavy.py" &
heavy=$!
vmstat -t 30 > "$work/vmstat.log" &
vm=$!
for i in 1 2; do
  rm -rf "$work/clone$i" && git clone -q "$repo" "$work/clone$i"
  start=$(date +%s)
  (cd "$work/clone$i" && bash .ci/run > "$work/ci$i.log" 2>&1); rc=$?
  echo "run $i rc=$rc wall=$(( $(date +%s) - start )) s ended $(date)" >> "$work/summary.log"
done
kill $heavy $vm
