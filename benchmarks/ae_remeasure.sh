#!/usr/bin/env bash
# Issue 28: the ae-maha cells of docs/dcase-researchers.md measured again with the AE on one thread in every
# process (the seed tables' corpora A1 A2 B1 B2 at reduced size, and the full-size style-B corpus), with the
# commands the docs give. `pooled` runs alongside as a check that each regenerated corpus is the one of the tables
# (its per-machine h-means must equal benchmarks/results_seeds/seeds.json's). Hours on a 2-core machine; it
# resumes where it stopped (a machine's folder with .done is skipped). Run it from a checkout at a fixed commit
# (a worktree), not from a tree being edited: an editable install picks up edits mid-run.
#   bash benchmarks/ae_remeasure.sh OUT_DIR        then: python benchmarks/ae_pinned_summary.py OUT_DIR
set -uo pipefail
out="${1:?OUT_DIR}"; mkdir -p "$out"; cd "$out"
M="ToyCar ToyTrain bearing fan gearbox slider valve"
compare() {  # corpus folder, output folder, machine
  [ -f "$2/$3/.done" ] && return
  asd-ray compare --local --data "$1" --machines "$3" --out "$2/$3" --detectors ae-maha pooled \
      --set ae.epochs=10 > "$(basename "$2")_$3.log" 2>&1 && touch "$2/$3/.done"
  echo "$(date -u +%T) $2 $3 rc=$?" >> progress.txt
}
for s in 1 2; do for st in A B; do
  grep -q "^wrote" "synth_$st$s.log" 2>/dev/null || asd-ray synth --style $st --out "/tmp/h13s_$st$s" \
      --train-source 400 --test-per-cell 50 --seed $s > "synth_$st$s.log" 2>&1
  for m in $M; do compare "/tmp/h13s_$st$s" "cmp/$st$s" $m; done
done; done
grep -q "^wrote" synth_full_b.log 2>/dev/null || asd-ray synth --style B --out /tmp/full_b > synth_full_b.log 2>&1
for m in $M; do compare /tmp/full_b full_b $m; done
