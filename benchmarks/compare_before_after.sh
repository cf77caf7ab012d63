#!/usr/bin/env bash
# Issue 23: `asd-ray compare` on the README's demo corpus, today's code against the code the issue was filed on
# (46b8a86), the same 13 detectors (the old `compare`'s whole list), the
# same corpus (the demo sizes, generated once), fresh caches, through Ray as the README runs it, one after the
# other on the same quiet machine. Wall time of each command; the official scores are written beside it.
#   bash benchmarks/compare_before_after.sh OUT_DIR BEFORE_CHECKOUT AFTER_CHECKOUT
set -uo pipefail
out="${1:?OUT_DIR}"; before="${2:?BEFORE_CHECKOUT}"; after="${3:?AFTER_CHECKOUT}"
mkdir -p "$out"; cd "$out"
D="knn knn-domain-aware knn-density pooled pooled-gem pooled-reldev pooled-smote local fusion fusion-mean fusion-noise ae-mse ae-maha"
# the fusion of those days (local + pooled, max) on both sides: the default fusion has a third member since 2026-12-03
OLD_FUSION=(--set "fusion.members=[local, pooled]" --set fusion.combine=max)
[ -d corpus/dev_data ] || PYTHONPATH="$after" python -m asd_ray.cli synth --out corpus --train-source 100 \
    --train-target 10 --test-per-cell 25 --supplemental 2 --seconds 5 > synth.log 2>&1
for which in before after; do
  tree=$([ $which = before ] && echo "$before" || echo "$after")
  rm -rf "cmp_$which" "cache_$which"
  start=$(date +%s.%N)
  PYTHONPATH="$tree" python -m asd_ray.cli compare --data corpus --out "cmp_$which" --detectors $D \
      --set "ray.cache_dir=$out/cache_$which" "${OLD_FUSION[@]}" > "compare_$which.log" 2>&1
  rc=$?
  echo "$which $(git -C "$tree" rev-parse --short HEAD) rc=$rc wall_s=$(echo "$(date +%s.%N) - $start" | bc)" >> walls.txt
done
cat walls.txt
