#!/bin/bash
# The whole suite on this 2-core machine, from a worktree of the commit under test, alone or beside a heavy
# process (heavy.py: one core busy), with vmstat every 15 s beside it: its `st` column is the CPU time the
# hypervisor gave to other machines, which moved the "alone" figures by up to ~40 % on 2026-12-05.
#   bash run.sh WORKTREE OUT.log [heavy]
set -u
tree=$1 out=$2 here=$(cd "$(dirname "$0")" && pwd)
[ "${3:-}" = heavy ] && { python3 "$here/heavy.py" & heavy=$!; }
vmstat 15 > "$out.vmstat" & stat=$!
cd "$tree" && /usr/bin/time -v python3 -m pytest -q --durations=0 -p no:cacheprovider > "$out" 2>&1
echo "rc=$?" >> "$out"
kill $stat ${heavy:-} 2>/dev/null
awk 'NR>2 && $17 ~ /^[0-9]+$/ {u+=$13; i+=$15; s+=$17; n++} END {printf "mean us %.0f%% id %.0f%% st %.0f%% (%d samples)\n", u/n, i/n, s/n, n}' "$out.vmstat" >> "$out"
