#!/usr/bin/env bash
# Helpers shared by slurm/train.sbatch, slurm/eval.sbatch and slurm/pipeline.sh.
#
# Sourced by the batch scripts, and again inside every srun task (so that the values that
# differ per node, SLURM_NODEID above all, are read in the task and not in the batch shell).
# Run directly, it has one subcommand used by the push job of slurm/pipeline.sh:
#   bash slurm/common.sh push RUN_DIR REPO_ID [fpdiff push options...]
#
# Variables read (all optional):
#   FPDIFF_VENV            virtual environment to activate (default: $FPDIFF_ROOT/.venv if present,
#                          else the environment sbatch was called from)
#   FPDIFF_MAIN_ADDR       rendezvous host (default: first host of SLURM_JOB_NODELIST)
#   FPDIFF_MAIN_PORT       rendezvous port (default: 20000 + SLURM_JOB_ID % 20000)
#   FPDIFF_GPUS_PER_NODE   GPUs per node (default: from the allocation, see fpdiff_gpus_on_node)
#   FPDIFF_PROCS_PER_NODE  trainer processes per node (default: GPUs per node, at least 1;
#                          set it > 1 on CPU nodes to train with several gloo processes)
#   FPDIFF_LAUNCH_DRYRUN   1: every task prints its launch line ("FPDIFF_LAUNCH <node> <cmd>")
#                          instead of running it

fpdiff_die() {
    printf 'fpdiff: error: %s\n' "$*" >&2
    exit 1
}

fpdiff_log() {
    printf '[fpdiff %s] %s\n' "$(date '+%F %T')" "$*" >&2
}

# Activate the project's Python environment (no-op when none is found).
fpdiff_activate() {
    local venv=${FPDIFF_VENV:-}
    if [[ -z $venv && -n ${FPDIFF_ROOT:-} && -f $FPDIFF_ROOT/.venv/bin/activate ]]; then
        venv=$FPDIFF_ROOT/.venv
    fi
    if [[ -n $venv ]]; then
        [[ -f $venv/bin/activate ]] || fpdiff_die "FPDIFF_VENV=$venv has no bin/activate"
        # shellcheck disable=SC1091
        source "$venv/bin/activate"
    fi
}

# First host name of a Slurm node list: "gpu-[003-004,010],cpu1" -> "gpu-003",
# "rack[1-2]-n[07,09]" -> "rack1-n07". Pure bash (the same answer as the first line of
# `scontrol show hostnames LIST`), so it needs neither scontrol nor a slurm.conf.
fpdiff_first_host() {
    local list=$1 host="" c i inside=0 taking=0
    for ((i = 0; i < ${#list}; i++)); do
        c=${list:i:1}
        if ((inside)); then
            if [[ $c == "]" ]]; then
                inside=0
            elif [[ $c == "," || $c == "-" ]]; then
                taking=0
            elif ((taking)); then
                host+=$c
            fi
        elif [[ $c == "[" ]]; then
            inside=1
            taking=1
        elif [[ $c == "," ]]; then
            break
        else
            host+=$c
        fi
    done
    printf '%s\n' "$host"
}

# GPUs on this node: FPDIFF_GPUS_PER_NODE, else SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE
# ("4" or "a100:4"), else the length of CUDA_VISIBLE_DEVICES, else 0.
fpdiff_gpus_on_node() {
    local n
    if [[ -n ${FPDIFF_GPUS_PER_NODE:-} ]]; then
        n=$FPDIFF_GPUS_PER_NODE
    elif [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then
        n=$SLURM_GPUS_ON_NODE
    elif [[ -n ${SLURM_GPUS_PER_NODE:-} ]]; then
        n=${SLURM_GPUS_PER_NODE##*:}
    elif [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != NoDevFiles ]]; then
        local -a ids
        IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
        n=${#ids[@]}
    else
        n=0
    fi
    [[ $n =~ ^[0-9]+$ ]] || fpdiff_die "cannot read a GPU count from '$n'"
    printf '%s\n' "$n"
}

fpdiff_procs_per_node() {
    local n=${FPDIFF_PROCS_PER_NODE:-}
    if [[ -z $n ]]; then
        n=$(fpdiff_gpus_on_node)
        ((n >= 1)) || n=1
    fi
    [[ $n =~ ^[1-9][0-9]*$ ]] || fpdiff_die "FPDIFF_PROCS_PER_NODE must be a positive integer, got '$n'"
    printf '%s\n' "$n"
}

fpdiff_main_port() {
    if [[ -n ${FPDIFF_MAIN_PORT:-} ]]; then
        printf '%s\n' "$FPDIFF_MAIN_PORT"
    else
        # a job-dependent port, so that two jobs sharing a node do not collide
        printf '%s\n' "$((20000 + ${SLURM_JOB_ID:-0} % 20000))"
    fi
}

# Fill the array FPDIFF_CMD with the launch line of THIS task (this node):
#   fpdiff_launch_cmd MODULE [module arguments...]
# -> [env ACCELERATE_USE_CPU=true] accelerate launch [--multi_gpu] --num_processes NODES*PROCS --num_machines NODES
#      --machine_rank $SLURM_NODEID --main_process_ip HOST --main_process_port PORT
#      --dynamo_backend no -m MODULE [module arguments...]
fpdiff_launch_cmd() {
    local module=$1
    shift
    local nnodes=${SLURM_NNODES:-1} node_rank=${SLURM_NODEID:-0}
    local per_node total addr port
    per_node=$(fpdiff_procs_per_node) || return 1
    total=$((nnodes * per_node))
    addr=${FPDIFF_MAIN_ADDR:-}
    if [[ -z $addr ]]; then
        if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
            addr=$(fpdiff_first_host "$SLURM_JOB_NODELIST")
        else
            addr=127.0.0.1
        fi
    fi
    port=$(fpdiff_main_port)
    FPDIFF_CMD=()
    if (($(fpdiff_gpus_on_node) == 0)); then
        # no GPU allocated: Accelerate (1.15) makes `--multi_gpu` processes MULTI_CPU (gloo) only
        # with ACCELERATE_USE_CPU set; without it every process runs alone (DistributedType.NO)
        FPDIFF_CMD+=(env ACCELERATE_USE_CPU=true)
    fi
    FPDIFF_CMD+=(accelerate launch)
    if ((total > 1)); then
        FPDIFF_CMD+=(--multi_gpu)
    fi
    FPDIFF_CMD+=(--num_processes "$total" --num_machines "$nnodes" --machine_rank "$node_rank"
        --main_process_ip "$addr" --main_process_port "$port" --dynamo_backend no
        -m "$module" "$@")
}

# Entry point of each srun task: fpdiff_task_main MODULE [module arguments...]
fpdiff_task_main() {
    fpdiff_launch_cmd "$@" || exit 1
    if [[ ${FPDIFF_LAUNCH_DRYRUN:-0} == 1 ]]; then
        local quoted
        quoted=$(printf '%q ' "${FPDIFF_CMD[@]}")
        printf 'FPDIFF_LAUNCH %s %s\n' "${SLURM_NODEID:-0}" "${quoted% }"
        return 0
    fi
    fpdiff_log "node ${SLURM_NODEID:-0} ($(hostname -s)): ${FPDIFF_CMD[*]}"
    exec "${FPDIFF_CMD[@]}"
}

# The srun line shared by the batch scripts: one task per node, each running
# fpdiff_task_main MODULE ARGS... (the single quotes keep $SLURM_NODEID for the task).
# Fills the array FPDIFF_SRUN.
fpdiff_srun_cmd() {
    # shellcheck disable=SC2016
    local task_script='source "$1" && shift && fpdiff_task_main "$@"'
    local nnodes=${SLURM_NNODES:-1}
    # shellcheck disable=SC2034  # read by the batch scripts
    FPDIFF_SRUN=(srun --nodes="$nnodes" --ntasks="$nnodes" --ntasks-per-node=1
        --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --kill-on-bad-exit=1
        bash -c "$task_script" fpdiff-task "$FPDIFF_ROOT/slurm/common.sh" "$@")
}

# Job script of the push stage of slurm/pipeline.sh.
fpdiff_push_main() {
    (($# >= 2)) || fpdiff_die "usage: common.sh push RUN_DIR REPO_ID [options...]"
    local run_dir=$1 repo=$2
    shift 2
    fpdiff_activate
    fpdiff_log "pushing $run_dir to $repo"
    exec fpdiff push "$run_dir" --repo-id "$repo" "$@"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -euo pipefail
    case ${1:-} in
        push) shift; fpdiff_push_main "$@" ;;
        *) echo "usage: bash slurm/common.sh push RUN_DIR REPO_ID [options...]" >&2; exit 2 ;;
    esac
fi
