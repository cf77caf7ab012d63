#!/usr/bin/env bash
# One device call's worth of GPU figures (P5 first, then P1, the start probe, the forward pass's profile, a second
# P5 and P4; PARTS="p5a profile p5b" runs only those), each part under its own time limit so that the whole stays
# inside BUDGET_S seconds and what ran comes back.
# Results: $OUT/results.tgz (logs, JSON, run.log and metrics.json of each P5 run) and $OUT/summary.txt.
# Setup first (see ../shared/tools/device-wheels.sh --with-faiss): carry .whl, then run this script. With faiss the
# wheels and the tree were just over the device tool's 64 MiB; dropping Ray Serve from the ray wheel (no part uses it)
# made room:  python3 -c "import zipfile,sys; w=sys.argv[1]; z=zipfile.ZipFile(w); i=[x for x in z.infolist()
#   if not x.filename.startswith('ray/serve/')]; d=[(x, z.read(x.filename)) for x in i]; z.close();
#   o=zipfile.ZipFile(w, 'w', zipfile.ZIP_DEFLATED); [o.writestr(x, b) for x, b in d]; o.close()" .whl/ray-*.whl
set -uo pipefail
out=${OUT:-gpu-results}; work=/tmp/gpu-session; mkdir -p "$out" "$work"
budget=${BUDGET_S:-500}
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
say() { echo "[$SECONDS s] $*" | tee -a "$work/summary.txt"; }
left() { echo $((budget - SECONDS)); }
parts=" ${PARTS:-p5a p1 probe profile p5old p5b p4} "  # also: p5f p5f2 (the default detector, twice on one cache), p1beats
part() {  # part NAME MAX_S COMMAND...: runs COMMAND under min(MAX_S, time left - 10)
    local name=$1 max=$2; shift 2; local t=$(( $(left) - 10 )); (( t > max )) && t=$max
    if [[ $name != p5_synth && $parts != *" $name "* ]]; then return; fi
    if (( t < 20 )); then say "$name skipped: ${t}s left"; return; fi
    say "$name start (limit ${t}s)"; local t0=$SECONDS
    timeout "$t" bash -c "$*" > "$work/$name.log" 2>&1; local rc=$?
    say "$name rc=$rc in $((SECONDS - t0)) s"
}
{ nvidia-smi -L; nproc; python3 -c "import torch, transformers, ray, faiss; print(torch.__version__, transformers.__version__, ray.__version__, faiss.__version__)"; } > "$work/device.txt" 2>&1
cat "$work/device.txt" | tee -a "$work/summary.txt"
python3 -c "
import torch; from transformers import HubertConfig, HubertModel
torch.manual_seed(0); HubertModel(HubertConfig(layerdrop=0.0)).save_pretrained('/tmp/hubert-base-random')" 2>/dev/null \
    && say "model saved" || say "model NOT saved: the parts that need it will fail"
runp() {  # runp NAME CACHE LABEL [ARGS...]: asd-ray run on the DCASE-sized corpus (its wall: "LABEL wall s"), ARGS added
    local name=$1 cache=$2 label=$3; shift 3
    echo "TIMEFORMAT='$label wall s: %R'; time python3 -m asd_ray.cli run --data /tmp/p5 --out /tmp/$name $* \
--set ray.cache_dir=/tmp/$cache; cp /tmp/$name/run.log $work/${name}_run.log; cp /tmp/$name/metrics.json $work/${name}_metrics.json"
}
p5() {  # p5 NAME CACHE: the main job on the DCASE-sized corpus with a random HuBERT-Base, fresh cache
    runp "$1" "$2" P5 --detector knn --backbone /tmp/hubert-base-random --set embed.batch_size=128
}
[[ $parts == *" p5"* ]] && part p5_synth 150 "python3 -m asd_ray.cli synth --out /tmp/p5 --eval-machines --workers $(nproc) ${SYNTH_ARGS:-}"
part p5a 150 "$(p5 p5a p5a_cache)"
grep -s "P5 wall" "$work/p5a.log" | tee -a "$work/summary.txt"
# the default detector (log-mel frames, no backbone) on the same corpus, then again on its cache (frames cached)
part p5f 150 "$(runp p5f p5f_cache P5F)"
grep -s "P5F wall" "$work/p5f.log" | tee -a "$work/summary.txt"
part p5f2 120 "$(runp p5f2 p5f_cache P5F2)"
grep -s "P5F2 wall" "$work/p5f2.log" | tee -a "$work/summary.txt"
# P1 for BEATs_iter3 and EAT-base (random weights in the official formats), bf16 (P1_BACKBONES: which of them)
part p1beats 180 "for b in ${P1_BACKBONES:-beats-iter3-random eat-base-random}; do python3 benchmarks/embed_throughput.py --clips 2048 \
--backbone \$b --device cuda --batch-size 128 && echo \$b done; done"
grep -sv " INFO \|WARNING" "$work/p1beats.log" | tail -40 >> "$work/summary.txt"
part p1 120 "python3 benchmarks/embed_throughput.py --clips 2048 --backbone hubert-base-random --device cuda --batch-size 128"
grep -sv " INFO \|WARNING" "$work/p1.log" | tail -22 >> "$work/summary.txt"
part probe 60 "python3 benchmarks/startup_probe.py /tmp/hubert-base-random 2>/dev/null; python3 -X importtime -c 'import torch; from transformers.models.hubert import modeling_hubert' 2>&1 | sort -t'|' -k2 -n -r | head -25"
part profile 90 "python3 benchmarks/forward_profile.py /tmp/hubert-base-random --json $work/profile.json"
# the same run with an older asd_ray (OLD_TGZ: a `git archive --format=tar.gz <commit> asd_ray`), same machine
if [[ -n ${OLD_TGZ:-} ]]; then mkdir -p /tmp/old && tar xzf "$OLD_TGZ" -C /tmp/old; else parts=${parts/ p5old / }; fi
part p5old 120 "cd /tmp/old && export PYTHONPATH=/tmp/site:/tmp/old; $(p5 p5old p5old_cache)"
grep -s "P5 wall" "$work/p5old.log" | tee -a "$work/summary.txt"
part p5b 120 "$(p5 p5b p5b_cache)"
grep -s "P5 wall" "$work/p5b.log" | tee -a "$work/summary.txt"
part p4 120 "python3 benchmarks/finetune_throughput.py --gpu --steps 60 --batch-size 8 --json $work/p4.json"
shopt -s nullglob; for f in "$work"/p5*_metrics.json; do python3 -c "import json,sys; m=json.load(open(sys.argv[1])); print(sys.argv[1], m['timings_s'], m['counts'])" "$f" >> "$work/summary.txt"; done
[[ -f $work/p4.json ]] && cat "$work/p4.json" >> "$work/summary.txt"
cp "$work/summary.txt" "$out/summary.txt"
tar czf "$out/results.tgz" -C "$work" .
