#!/bin/bash
# The runs of experiments/locality.py behind the locality comparison, one at a time (niced).
# Usage: bash experiments/locality_queue.sh STAGE   (the stages below, in the order they were run;
# the base editor was trained first with `emsedit-jax train --dataset counterfact --data
# counterfact-train.json --test-data counterfact-val.json --n-train 400 --layers 27-29 --rank 256
# --beta 3e-3 --skip-invalid --out runs/locality/counterfact_base_s0`)
set -x
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
run() { nice -n 10 python experiments/locality.py "$@"; }
VARS='{"km1_lp20": {"key_memory": 1, "loc_prior": 20},
 "km1_lp20_wide": {"key_memory": 1, "loc_prior": 20, "prior_source": "wide"},
 "ns1e-2_wide": {"null_space": 0.01, "prior_source": "wide"},
 "km1_lp20_ns1e-2_wide": {"key_memory": 1, "loc_prior": 20, "null_space": 0.01, "prior_source": "wide"}}'
FEW='{"paper": {}, "km1_lp20_wide": {"key_memory": 1, "loc_prior": 20, "prior_source": "wide"},
 "ns1e-2_wide": {"null_space": 0.01, "prior_source": "wide"}}'
case "$1" in
  cf-base)      # the current best editor (trained by the CLI on the first 400), its evaluation-time variants
    run --dataset counterfact --name base --parts val --config "{\"evals\": $VARS}" ;;
  cf-subject)   # keys and value gradients at the subject's last token
    run --dataset counterfact --name subject --parts val --config "{\"train\": {\"key_positions\": \"subject\"}, \"evals\": $FEW}" ;;
  cf-base-wide)   # C0 from many more preserved facts, as a prior and as a null-space projection
    run --dataset counterfact --name base --parts val --config '{"evals": {"km1_lp20_wide": {"key_memory": 1, "loc_prior": 20, "prior_source": "wide"}, "ns1e-2_wide": {"null_space": 0.01, "prior_source": "wide"}}}' ;;
  cf-trained-prior)   # the prior and the projection in meta-training too
    run --dataset counterfact --name prior_ns_trained --parts val --config '{"train": {"key_memory": 1, "loc_prior": 20, "null_space": 0.01}, "prior": {"source": "wide"}, "evals": {"as-trained": {}, "no-projection": {"null_space": 0.0}}}' ;;
  cf-test)   # the test part of the current best and of the editor trained with the prior and the projection
    run --dataset counterfact --name prior_ns_trained --parts test --config '{"train": {"key_memory": 1, "loc_prior": 20, "null_space": 0.01}, "prior": {"source": "wide"}, "evals": {"as-trained": {}}}'
    run --dataset counterfact --name base --parts test --config '{"evals": {"km1_lp20": {"key_memory": 1, "loc_prior": 20}}}'
    run --dataset counterfact --name base --parts test --config '{"evals": {"km1_lp20_wide": {"key_memory": 1, "loc_prior": 20, "prior_source": "wide"}, "ns1e-2_wide": {"null_space": 0.01, "prior_source": "wide"}}}' ;;
esac
