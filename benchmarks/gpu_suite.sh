#!/usr/bin/env bash
# P1, P4 and P5 on a GPU machine in one go (how the README's GPU figures were made). Logs and JSON go to
# $OUT (the device tool's output folder) or ./gpu-results. Needs ray, faiss, pyloudnorm, soundfile importable.
set -uo pipefail
out=${OUT:-gpu-results}; mkdir -p "$out"
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
{ nvidia-smi -L; nproc; python3 -c "import torch, transformers, ray; print(torch.__version__, transformers.__version__, ray.__version__)"; } > "$out/device.txt" 2>&1
cat "$out/device.txt"
parts=" ${PARTS:-p1 p4 p5} "  # PARTS="p5 probe" runs only those; p1beats: P1 and the start for BEATs and EAT
python3 -c "
import torch; from transformers import HubertConfig, HubertModel
torch.manual_seed(0); HubertModel(HubertConfig(layerdrop=0.0)).save_pretrained('/tmp/hubert-base-random')" 2>/dev/null
if [[ $parts == *" probe "* ]]; then  # an embedding actor's start, step by step, in a fresh process
    python3 benchmarks/startup_probe.py /tmp/hubert-base-random 2>/dev/null | tee "$out/probe.json"
    # the imports that dominate a fresh process's start (cumulative microseconds, largest first)
    python3 -X importtime -c "import torch; from transformers.models.hubert import modeling_hubert" 2>&1 \
        | sort -t'|' -k2 -n -r | head -25 > "$out/importtime.txt"
fi
if [[ $parts == *" p1 "* ]]; then
# P1: the Ray Data embedding pipeline vs the raw forward, random HuBERT-Base, 10 s clips, bf16
python3 benchmarks/embed_throughput.py --clips 2048 --backbone hubert-base-random --device cuda --batch-size 128 \
    > "$out/p1.log" 2>&1; grep -v " INFO \|WARNING" "$out/p1.log" | tail -22
fi
if [[ $parts == *" p1beats "* ]]; then
# P1 for BEATs and EAT (issue 24: >= 0.9 of the raw forward, bf16) and their actors' start without transformers
for b in beats-iter3-random eat-base-random; do
    python3 benchmarks/embed_throughput.py --clips 2048 --backbone "$b" --device cuda --batch-size 128 \
        > "$out/p1_$b.log" 2>&1; grep -v " INFO \|WARNING" "$out/p1_$b.log" | tail -16
done
PYTHONPATH="benchmarks:${PYTHONPATH:-}" python3 -c "
from pathlib import Path; from embed_throughput import random_checkpoint
for name in ('beats-iter3-random', 'eat-base-random'): random_checkpoint(name, Path('/tmp'))"
for f in beats_iter3 eat_base; do python3 benchmarks/startup_probe.py /tmp/$f.pt 2>/dev/null | tee "$out/probe_$f.json"; done
fi
if [[ $parts == *" p4 "* ]]; then
# P4: Ray Train fine-tuning vs a plain loop of the same step
python3 benchmarks/finetune_throughput.py --gpu --steps 60 --batch-size 8 --json "$out/p4.json" > "$out/p4.log" 2>&1
cat "$out/p4.json"
fi
if [[ $parts == *" p5 "* ]]; then
# P5: a DCASE-sized synthetic corpus (7 dev + 8 eval machines, 18,150 clips), then the main job with a random HuBERT-Base
python3 -m asd_ray.cli synth --out /tmp/p5 --eval-machines --workers "$(nproc)" > "$out/p5_synth.log" 2>&1
TIMEFORMAT='P5 wall s: %R'
{ time python3 -m asd_ray.cli run --data /tmp/p5 --out /tmp/p5run --detector knn --backbone /tmp/hubert-base-random \
    --set ray.cache_dir=/tmp/p5cache --set embed.batch_size=128 > "$out/p5.log" 2>&1; } 2>> "$out/p5.log"
tail -1 "$out/p5.log"
python3 -c "import json; m = json.load(open('/tmp/p5run/metrics.json')); print(m['timings_s'], m['counts'])" | tee -a "$out/p5.log"
fi
