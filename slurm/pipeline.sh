#!/usr/bin/env bash
# Submit train -> eval -> push as dependent Slurm jobs (--dependency=afterok): one eval job
# per metric, each given only the --eval-arg options its metric takes.
#
#   slurm/pipeline.sh --config configs/cifar10_ddpmpp.yaml --run-dir runs/c10 \
#       --nodes 4 --gpus-per-node 8 --time 24:00:00 --partition gpu --account my_account \
#       --metrics fid,bpd --eval-arg --num-samples --eval-arg 50000 \
#       --repo-id me/fpdiff-c10 -- training.n_steps=1300000 fpe.alpha=0.15
#
# The eval jobs start only after the training job has ended with exit 0 (requeues of the
# training job do not count as ending), the push job only after every eval job succeeded.
# Prints the job ids on stdout: TRAIN EVAL[,EVAL...] PUSH (PUSH is "none" without --repo-id).
#
# Options (defaults come from the #SBATCH lines of slurm/train.sbatch and slurm/eval.sbatch):
#   --config FILE         experiment config (required)
#   --run-dir DIR         run directory on a shared filesystem (default runs/<config name>)
#   --nodes N             training nodes
#   --gpus-per-node G     GPUs per node, for training and evaluation (0: CPU)
#   --cpus-per-task C     CPU cores per node
#   --time T              time limit of each training job (training continues through requeues)
#   --eval-time T         time limit of the eval job
#   --partition P, --account A, --qos Q   passed to every sbatch
#   --metrics LIST        comma-separated metrics for slurm/eval.sbatch (default fid)
#   --eval-arg ARG        one argument for pipeline.eval (repeat it); an option (and the value
#                         after it) goes to the metrics that take it (--num-samples: fid only),
#                         a dotted override (key=value) to every metric; one no metric takes fails
#   --repo-id ID          Hugging Face repo for `fpdiff push`; without it no push job
#   --push-arg ARG        one extra argument for `fpdiff push` (repeat it)
#   --sbatch-arg ARG      one extra sbatch option for every job (repeat it)
#   --dry-run             print the sbatch commands instead of submitting (writes nothing)
#   -- OVERRIDES...       config overrides for the trainer (section.key=value)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FPDIFF_ROOT=${FPDIFF_ROOT:-$(dirname "$here")}
export FPDIFF_ROOT

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { printf 'pipeline.sh: error: %s\n' "$*" >&2; exit 2; }

config="" run_dir="" metrics=fid repo_id="" dry_run=0
train_opts=() eval_opts=() common_opts=() resource_opts=() eval_args=() push_args=() overrides=()
need() { (($# >= 2)) || die "$1 needs a value"; }
while (($#)); do
    case $1 in
        --config) need "$@"; config=$2; shift 2 ;;
        --run-dir) need "$@"; run_dir=$2; shift 2 ;;
        --nodes) need "$@"; train_opts+=(--nodes="$2"); shift 2 ;;
        --gpus-per-node) need "$@"; resource_opts+=(--gpus-per-node="$2"); shift 2 ;;
        --cpus-per-task) need "$@"; resource_opts+=(--cpus-per-task="$2"); shift 2 ;;
        --time) need "$@"; train_opts+=(--time="$2"); shift 2 ;;
        --eval-time) need "$@"; eval_opts+=(--time="$2"); shift 2 ;;
        --partition | --account | --qos) need "$@"; common_opts+=("$1=$2"); shift 2 ;;
        --metrics) need "$@"; metrics=$2; shift 2 ;;
        --eval-arg) need "$@"; eval_args+=("$2"); shift 2 ;;
        --repo-id) need "$@"; repo_id=$2; shift 2 ;;
        --push-arg) need "$@"; push_args+=("$2"); shift 2 ;;
        --sbatch-arg) need "$@"; common_opts+=("$2"); shift 2 ;;
        --dry-run) dry_run=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; overrides=("$@"); break ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
[[ -n $config ]] || die "--config is required (see --help)"
[[ $config == /* ]] || config=$PWD/$config
[[ -f $config ]] || die "config not found: $config"
if [[ -z $run_dir ]]; then
    run_dir=$FPDIFF_ROOT/runs/$(basename "${config%.*}")
fi
[[ $run_dir == /* ]] || run_dir=$PWD/$run_dir
# sbatch passes this environment on to the jobs
RUN_DIR=$run_dir
export RUN_DIR

if ((!dry_run)); then
    mkdir -p "$run_dir/slurm"
    command -v sbatch >/dev/null 2>&1 || die "sbatch not found (is this a Slurm login node?)"
fi
log_opt=(--output="$run_dir/slurm/%x-%j.out")

# the options of each metric of pipeline.eval (tests/test_slurm.py checks them against its parser)
EVAL_COMMON_OPTS=" --batch-size --seed --out --no-progress --device "
declare -A EVAL_OPTS=(
    [fid]="$EVAL_COMMON_OPTS --num-samples --sampler --ref-stats --feature-extractor --save-samples --grid --no-kid --from-samples --save-features "
    [bpd]="$EVAL_COMMON_OPTS --shards --passes --max-samples --hutchinson --rtol --atol --eps --no-dequantize "
    [fpe]="$EVAL_COMMON_OPTS --shards --num-times --max-samples "
)
IFS=, read -r -a metric_list <<<"$metrics"
for metric in "${metric_list[@]}"; do
    [[ -n ${EVAL_OPTS[$metric]:-} ]] || die "--metrics: unknown metric '$metric' (fid, bpd or fpe)"
done
# eval_args_for METRIC: the --eval-arg arguments that METRIC takes, one per line
eval_args_for() {
    local metric=$1 arg takes=1 name
    for arg in "${eval_args[@]}"; do
        if [[ $arg == -* ]]; then
            name=${arg%%=*}
            takes=0
            [[ ${EVAL_OPTS[$metric]} == *" $name "* ]] && takes=1
        elif [[ $arg == *=* ]]; then
            takes=1  # a dotted override: every metric
        fi  # else: the value of the option before it, where that option went
        ((takes)) && printf '%s\n' "$arg"
    done
    return 0
}
for arg in "${eval_args[@]}"; do
    [[ $arg == -* ]] || continue
    taken=0
    for metric in "${metric_list[@]}"; do
        [[ ${EVAL_OPTS[$metric]} == *" ${arg%%=*} "* ]] && taken=1
    done
    ((taken)) || die "--eval-arg $arg: no metric of --metrics $metrics takes it"
done

# submit STAGE OPTIONS... -> prints the job id
submit() {
    local stage=$1
    shift
    if ((dry_run)); then
        printf 'sbatch' >&2
        printf ' %q' "$@" >&2
        printf '\n' >&2
        echo "DRYRUN_$stage"
    else
        sbatch --parsable "$@" | cut -d';' -f1
    fi
}

cd "$FPDIFF_ROOT"
train_id=$(submit train "${common_opts[@]}" "${resource_opts[@]}" "${train_opts[@]}" "${log_opt[@]}" \
    slurm/train.sbatch "$config" "${overrides[@]}")
eval_ids=()
for metric in "${metric_list[@]}"; do
    mapfile -t args_of_metric < <(eval_args_for "$metric")
    eval_ids+=("$(submit "eval_$metric" "${common_opts[@]}" "${resource_opts[@]}" "${eval_opts[@]}" "${log_opt[@]}" \
        --dependency=afterok:"$train_id" slurm/eval.sbatch "$metric" "${args_of_metric[@]}")")
done
eval_list=$(IFS=,; echo "${eval_ids[*]}")
push_id=""
if [[ -n $repo_id ]]; then
    wrap=$(printf '%q ' bash "$FPDIFF_ROOT/slurm/common.sh" push "$run_dir" "$repo_id" "${push_args[@]}")
    # no GPUs for an upload: the resource options of the other jobs are not passed
    push_id=$(submit push "${common_opts[@]}" --gpus-per-node=0 --time=01:00:00 --job-name=fpdiff-push \
        "${log_opt[@]}" --dependency=afterok:"$(IFS=:; echo "${eval_ids[*]}")" --wrap "$wrap")
fi
printf 'train=%s eval=%s push=%s run_dir=%s\n' "$train_id" "$eval_list" "${push_id:-none}" "$run_dir" >&2
printf '%s %s %s\n' "$train_id" "$eval_list" "${push_id:-none}"
