#!/usr/bin/env bash
# Issue 25: what to do with DCASE 2026's near/far pairs, measured. Two noise styles of the synthetic 2026 corpus
# (synth --noise direct | diffuse), two seeds each, 3 dev machines at reduced size; every channel handling
# (preprocess.channels near / mix / cancel / subtract, and far for the default detector) scored by the default
# detector (fusion), knn, local and ae-maha (10 epochs, as in docs/dcase-researchers.md), each through
# `asd-ray compare --local`. About an hour on a 2-core machine; it resumes where it stopped (a folder with .done is
# skipped). Run it from a checkout at a fixed commit (a worktree, PYTHONPATH=<it>): an editable install picks up
# edits mid-run.
#   bash benchmarks/channels_2026.sh OUT_DIR        then: python benchmarks/channels_2026_table.py OUT_DIR
set -uo pipefail
out="${1:?OUT_DIR}"; mkdir -p "$out"; cd "$out"
compare() {  # corpus, output folder, channels, detectors...
  local corpus=$1 dest=$2 channels=$3; shift 3
  [ -f "$dest/.done" ] && return
  local ae=(); [[ " $* " == *" ae-maha "* ]] && ae=(--set ae.epochs=10)  # a setting no detector reads is refused
  asd-ray compare --local --data "$corpus" --out "$dest" --detectors "$@" --set "preprocess.channels=$channels" \
      "${ae[@]}" > "$dest.log" 2>&1 && touch "$dest/.done"
  echo "$(date -u +%T) $dest rc=$?" >> progress.txt
}
for seed in 0 1; do for noise in direct diffuse; do
  corpus="$out/corpus_${noise}_$seed"
  grep -q "^wrote" "synth_${noise}_$seed.log" 2>/dev/null || asd-ray synth --year 2026 --noise $noise \
      --machines ToyCar fan valveEmu --train-source 60 --test-per-cell 20 --seed $seed --out "$corpus" \
      > "synth_${noise}_$seed.log" 2>&1
  mkdir -p "cmp/${noise}_$seed"
  for ch in cancel near mix subtract; do compare "$corpus" "cmp/${noise}_$seed/$ch" $ch fusion knn local ae-maha; done
  compare "$corpus" "cmp/${noise}_$seed/far" far fusion
done; done
