#!/usr/bin/env bash
# Submit train -> eval -> push as three dependent Slurm jobs (--dependency=afterok).
#
#   slurm/pipeline.sh --config configs/cifar10_ddpmpp.yaml --run-dir runs/c10 \
#       --nodes 4 --gpus-per-node 8 --time 24:00:00 --partition gpu --account my_account \
#       --metrics fid,bpd --eval-arg --num-samples --eval-arg 50000 \
#       --repo-id me/fpdiff-c10 -- training.n_steps=1300000 fpe.alpha=0.15
#
# The eval job starts only after the training job has ended with exit 0 (requeues of the
# training job do not count as ending), the push job only after the eval job succeeded.
# Prints the three job ids (train eval push) on stdout.
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
#   --eval-arg ARG        one argument for pipeline.eval (repeat it)
#   --repo-id ID          Hugging Face repo for `fpdiff push`; without it no push job
#   --push-arg ARG        one extra argument for `fpdiff push` (repeat it)
#   --sbatch-arg ARG      one extra sbatch option for every job (repeat it)
#   --dry-run             print the sbatch commands instead of submitting
#   -- OVERRIDES...       config overrides for the trainer (section.key=value)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
FPDIFF_ROOT=${FPDIFF_ROOT:-$(dirname "$here")}
export FPDIFF_ROOT

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
die() { printf 'pipeline.sh: error: %s\n' "$*" >&2; exit 2; }

config="" run_dir="" metrics=fid repo_id="" dry_run=0
train_opts=() eval_opts=() common_opts=() eval_args=() push_args=() overrides=()
need() { (($# >= 2)) || die "$1 needs a value"; }
while (($#)); do
    case $1 in
        --config) need "$@"; config=$2; shift 2 ;;
        --run-dir) need "$@"; run_dir=$2; shift 2 ;;
        --nodes) need "$@"; train_opts+=(--nodes="$2"); shift 2 ;;
        --gpus-per-node) need "$@"; common_opts+=(--gpus-per-node="$2"); shift 2 ;;
        --cpus-per-task) need "$@"; common_opts+=(--cpus-per-task="$2"); shift 2 ;;
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
train_id=$(submit train "${common_opts[@]}" "${train_opts[@]}" "${log_opt[@]}" \
    slurm/train.sbatch "$config" "${overrides[@]}")
eval_id=$(submit eval "${common_opts[@]}" "${eval_opts[@]}" "${log_opt[@]}" \
    --dependency=afterok:"$train_id" slurm/eval.sbatch "$metrics" "${eval_args[@]}")
push_id=""
if [[ -n $repo_id ]]; then
    wrap=$(printf '%q ' bash "$FPDIFF_ROOT/slurm/common.sh" push "$run_dir" "$repo_id" "${push_args[@]}")
    push_id=$(submit push "${common_opts[@]}" --gpus-per-node=0 --time=01:00:00 --job-name=fpdiff-push \
        "${log_opt[@]}" --dependency=afterok:"$eval_id" --wrap "$wrap")
fi
printf 'train=%s eval=%s push=%s run_dir=%s\n' "$train_id" "$eval_id" "${push_id:-none}" "$run_dir" >&2
printf '%s %s %s\n' "$train_id" "$eval_id" "${push_id:-none}"
