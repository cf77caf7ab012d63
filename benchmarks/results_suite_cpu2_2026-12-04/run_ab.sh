#!/bin/bash
T="tests/distributed/test_finetune.py tests/test_console.py::test_finetune_sends_ray_train_output_to_the_run_folders_log tests/distributed/test_node_loss.py::test_a_finetuning_run_that_loses_a_worker_node_checkpoints_as_without_the_fault tests/distributed/test_sweep.py tests/models/test_eat.py::test_official_base_configuration_embeds_as_the_reference"
for w in A B; do
  cd /tmp/wt$w
  s=$(date +%s.%N)
  python3 -m pytest -q -p no:cacheprovider --durations=0 $T > /tmp/ab_$w.log 2>&1
  echo "rc=$? wall=$(echo "$(date +%s.%N) - $s" | bc)" >> /tmp/ab_$w.log
done
