#!/usr/bin/env bash
# The privacy-utility frontier on the embedded MNIST digits (mnist5k): every method at each epsilon, one
# results file, then `dp-diffusion report` into experiments/results/mnist5k/ (RESULTS.md, plots, grid mosaic).
#
#   bash experiments/frontier_mnist5k.sh                       # epsilon 0.2, 1, 10; seed 0
#   EPSILONS=1,10 SEEDS=0,1 bash experiments/frontier_mnist5k.sh
#   METHODS="dpdm_scratch dpdm_main" bash experiments/frontier_mnist5k.sh   # a subset
#   EXTRA="trainer=gpu" bash experiments/frontier_mnist5k.sh                 # overrides for every run
#   METHODS="dp_sad dp_sad_paper dp_sad_dp_teacher dp_sad_warm dp_sad_lambda0 dp_sad_lambda0.5 dp_sad_lambda2" \
#     EPSILONS=1,10 OUT=runs/dp_sad_mnist5k REPORT=experiments/results/mnist5k_dp_sad bash experiments/frontier_mnist5k.sh
#                       # DP-SAD: sound vs paper variant, DP teacher, student warm-started, lambda ablation
#   METHODS="dp_ldm_all dp_ldm_lora dp_ldm_condition_dead_leaves dp_ldm_all_dead_leaves dp_ldm_lora_dead_leaves" \
#     EPSILONS=1,10 bash experiments/frontier_mnist5k.sh   # DP-LDM: fine-tuned part x public set (issue 14)
#
# Runs already in the results file (same method config, epsilon and seed) are skipped, so an interrupted
# frontier continues where it stopped. Each entry is a CPU-sized config of the method (conf/experiment/*_cpu
# or the main job); the report's wall-time column gives each run's compute.
set -euo pipefail
cd "$(dirname "$0")/.."
DP=${DP:-dp-diffusion}
EPSILONS=${EPSILONS:-0.2,1,10}
SEEDS=${SEEDS:-0}
OUT=${OUT:-runs/frontier_mnist5k}
REPORT=${REPORT:-experiments/results/mnist5k}
METHODS=${METHODS:-"dpdm_scratch dpdm_warm dpdm_warm_font dpdm_main dp_syngen dp_syngen_high_noise dp_ldm dp_ldm_condition_font_digits dp_ldm_main dp_sad"}
EXTRA=${EXTRA:-}   # overrides added to every run, e.g. EXTRA="trainer=gpu"
RESULTS="$OUT/results.jsonl"
mkdir -p "$OUT"

# DP-LDM's CPU experiment as these entries were measured (until session 14): the latent model pretrained 600
# public steps, then 300 DP steps (each entry names its fine-tuned part; the experiment now tunes `all`)
DP_LDM_AS_MEASURED="experiment=dp_ldm_mnist5k_cpu method.module.pretraining.latent_steps=600 train.steps=300"

dp_ldm_entry() {  # <finetune>[_<public>] -> overrides of experiment=dp_ldm_mnist5k_cpu
  local finetune=${1%%_*} public=digits sets
  [ "$finetune" != "$1" ] && public=${1#*_}
  case "$finetune" in condition|attention|all|lora) ;; *) echo "unknown DP-LDM fine-tuned part: $finetune" >&2; exit 2 ;; esac
  case "$public" in
    digits|font_digits) sets="public=$public" ;;
    # 20,000 images: the latent stage encodes the whole public set (100,000 take ~4 minutes here)
    dead_leaves) sets="public=dead_leaves public.size=20000" ;;
    ae_dead_leaves) sets="public=digits method.module.autoencoder_public={name:dead_leaves}" ;;
    *) echo "unknown DP-LDM public set: $public (digits, dead_leaves, ae_dead_leaves, font_digits)" >&2; exit 2 ;;
  esac
  echo "$DP_LDM_AS_MEASURED method.module.finetune=$finetune $sets"
}

overrides_for() {  # the config of one frontier entry
  case "$1" in
    dpdm_scratch) echo "public=none" ;;                        # DPDM from scratch (the earlier default)
    # DPDM warm-started on a public set for 600 steps (the main job: on digits until session 11, on font_digits in it):
    dpdm_warm)    echo "public=digits method.module.warm_start.steps=600" ;;       # on scikit-learn's digits
    dpdm_warm_font) echo "public=font_digits method.module.warm_start.steps=600" ;; # on font_digits
    dpdm_main)    echo "" ;;                                   # the main job: font_digits, 1500 warm-start steps
    dp_syngen_high_noise) echo "experiment=dp_syngen_mnist5k_cpu" ;;   # its noise levels are the main job's
    # DP-SynGen as first measured (plain edm noise levels, until session 13), and that without the synthetic
    # coarse stage (the context stage, DP and labelled, covers every sigma above the cleaning range):
    dp_syngen)    echo "experiment=dp_syngen_mnist5k_cpu diffusion=edm" ;;
    dp_syngen_no_coarse) echo "experiment=dp_syngen_mnist5k_cpu diffusion=edm method.module.log_tau_coarse=null" ;;
    dp_ldm)       echo "$DP_LDM_AS_MEASURED method.module.finetune=condition public=digits" ;;  # as first measured
    dp_ldm_main)  echo "experiment=dp_ldm_mnist5k_cpu" ;;      # the CPU experiment as it is (since session 14)
    dp_sad)       echo "experiment=dp_sad_mnist5k_cpu" ;;              # sound; public teacher on digits
    # DP-SAD's variants and ablations (issue 15; not in the default METHODS):
    dp_sad_paper) echo "experiment=dp_sad_mnist5k_cpu method.module.privacy_model=paper method.module.teacher.source=nonprivate" ;;
    dp_sad_dp_teacher) echo "experiment=dp_sad_mnist5k_cpu method.module.teacher.source=dp" ;;
    # the student from DPDM's warm start, 600 steps as measured:
    dp_sad_warm)  echo "experiment=dp_sad_mnist5k_cpu method.module.student_init=warm_start method.module.warm_start.steps=600" ;;
    dp_sad_lambda*) echo "experiment=dp_sad_mnist5k_cpu method.module.adversarial_weight=${1#dp_sad_lambda}" ;;
    # DP-LDM's fine-tuned part and public set (issue 14): dp_ldm_<finetune>[_<public>], finetune = condition |
    # attention | all | lora, public = digits (default) | dead_leaves | ae_dead_leaves (the autoencoder on dead
    # leaves, the latent model on digits) | font_digits (the experiment's own); e.g. dp_ldm_lora_dead_leaves
    dp_ldm_*) dp_ldm_entry "${1#dp_ldm_}" ;;
    *) echo "unknown frontier entry $1 (known: dpdm_scratch dpdm_warm dpdm_warm_font dpdm_main dp_syngen dp_syngen_high_noise dp_syngen_no_coarse dp_ldm dp_ldm_main dp_sad dp_sad_paper" \
            "dp_sad_dp_teacher dp_sad_warm dp_sad_lambda<weight> dp_ldm_<finetune>[_<public>])" >&2; exit 2 ;;
  esac
}

done_already() {  # entry epsilon seed -> 0 if the results file holds that run
  [ -f "$RESULTS" ] && python3 - "$RESULTS" "$1" "$2" "$3" <<'PY'
import json, sys
path, entry, eps, seed = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
for line in open(path):
    r = json.loads(line)
    if (r.get("kind") == "train" and f"+frontier={entry}" in r.get("overrides", [])
            and float(r.get("target_epsilon") or -1) == eps and int(r.get("seed", -1)) == seed):
        sys.exit(0)
sys.exit(1)
PY
}

for entry in $METHODS; do
  for eps in ${EPSILONS//,/ }; do
    for seed in ${SEEDS//,/ }; do
      if done_already "$entry" "$eps" "$seed"; then echo "frontier: $entry epsilon=$eps seed=$seed already done"; continue; fi
      echo "frontier: $entry epsilon=$eps seed=$seed"
      overrides=$(overrides_for "$entry")   # an assignment, so an unknown entry stops the script (set -e)
      # shellcheck disable=SC2086
      $DP train $overrides privacy.epsilon="$eps" seed="$seed" "+frontier=$entry" $EXTRA \
        results_file="$RESULTS" hydra.run.dir="$OUT/$entry/eps$eps-seed$seed" overwrite=true
    done
  done
done
$DP report "$RESULTS" --out "$REPORT"
