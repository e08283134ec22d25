# The finetune step of the shared pipeline (sourced by pipeline.sh): fine-tuning a trained
# student (FINETUNE_FROM), and its section of the results page.

# ---- fine-tuning a trained student (FINETUNE_FROM) ------------------------
# finetune: every run of FINETUNE_METHODS starts from FINETUNE_FROM's evaluated checkpoint
# and trains for FINETUNE_MINUTES of wall clock, e.g. continuing Seq-KD against on-policy KD
# (GKD fine-tunes a supervised student).  What makes the runs comparable:
#   - the same weights, a fresh optimizer: --finetune-from-model loads the checkpoint with
#     --reset-optimizer --reset-lr-scheduler --reset-dataloader --reset-meters (fairseq refuses
#     to restore Adam's state under another criterion, so the continued Seq-KD run resets it too);
#   - the same constant learning rate (FINETUNE_LR, --lr-scheduler fixed), optimizer
#     (FINETUNE_OPTIM), seed (SEED), data order (each method's corpus, the same for seq_kd and
#     onpolicy_kd: distilled/) and student options (STUDENT_ARGS);
#   - the same wall-clock budget.  fairseq restores the checkpoint's cumulative training time
#     (extra_state previous_training_time) even with every reset (Trainer.load_checkpoint), so
#     --stop-time-hours is that time plus the budget, fixed in the run's folder when it starts;
#   - no validation during the runs (it would spend the budget of a faster-updating run on
#     more validations); each is evaluated from its checkpoint_last.pt, where its budget ended;
#   - STUDENT_JOBS runs at a time sharing the machine, as the students step trains.
# A killed run resumes from its own checkpoint_last.pt (--finetune-from-model is used only
# while the save dir has none: fairseq's checkpoint_utils.load_checkpoint; a --restore-file
# would be loaded again on every launch) and stops at the same total: the time after its last
# save was not counted, and it saves every FINETUNE_SAVE_UPDATES updates.

# finetune_names: the fine-tuned students, ft_RUN for each RUN of FINETUNE_METHODS (none without FINETUNE_FROM).
finetune_names() {
  [ -n "$FINETUNE_FROM" ] || return 0
  local run
  for run in $FINETUNE_METHODS; do echo "ft_$run"; done
}

# finetune_method RUN: the method a run trains: RUN, or METHOD of a run METHOD_bBETA.
finetune_method() {
  if [[ $1 =~ ^(.+)_b([0-9][0-9.]*)$ ]]; then echo "${BASH_REMATCH[1]}"; else echo "$1"; fi
}

# finetune_args RUN: a run's criterion and data options: its method's (method_args), with a
# METHOD_bBETA run's --jsd-beta BETA in place of the method's own, then FINETUNE_ARGS_<RUN>.
finetune_args() {
  local method var="FINETUNE_ARGS_${1//[^A-Za-z0-9_]/_}" args
  method=$(finetune_method "$1")
  # shellcheck disable=SC2046
  args=$(echo $(method_args "$method"))
  if [ "$method" != "$1" ]; then
    args="$(sed -E 's/(^| )--jsd-beta [^ ]+//' <<<"$args") --jsd-beta ${1##*_b}"
  fi
  echo "$args ${!var:-}"
}

# checkpoint_facts CKPT...: per checkpoint one line "UPDATES HOURS LR": its number of updates,
# fairseq's cumulative training time in hours (extra_state previous_training_time) and the
# learning rate of its last update ("-" when it holds no optimizer state).
checkpoint_facts() {
  python3 - "$@" <<'PY'
import sys
import torch
for path in sys.argv[1:]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    groups = (state.get("last_optimizer_state") or {}).get("param_groups") or [{}]
    lr = groups[0].get("lr")
    print(state["optimizer_history"][-1]["num_updates"], f"{state['extra_state']['previous_training_time'] / 3600:.6f}",
          "-" if lr is None else f"{lr:.3g}")
PY
}

# finetune_budget SOURCE DIR: how a run into DIR trains, one line "START STOP MINUTES LR JOBS":
# SOURCE's cumulative training time in hours, that plus FINETUNE_MINUTES (its --stop-time-hours),
# FINETUNE_MINUTES, FINETUNE_LR and STUDENT_JOBS.  Written to DIR/finetune_budget when the run
# first starts, so a resumed run keeps its budget and the page says what each run did (delete
# DIR to start a run over).  A dry run writes nothing, and counts from 0 h without SOURCE.
finetune_budget() {
  local source=$1 record=$2/finetune_budget start=0 facts
  if [ -s "$record" ]; then cat "$record"; return; fi
  if [ -f "$source" ]; then facts=$(checkpoint_facts "$source") || return 1; start=$(cut -d' ' -f2 <<<"$facts"); fi
  awk -v s="$start" -v m="$FINETUNE_MINUTES" -v lr="$FINETUNE_LR" -v j="$STUDENT_JOBS" \
    'BEGIN { printf "%.6f %.6f %s %s %s\n", s, s + m / 60, m, lr, j }' |
    if [ -n "$DRY_RUN" ]; then cat; else mkdir -p "$2" && tee "$record"; fi
}

# check_finetune: FINETUNE_FROM's checkpoint exists and every run names a method it can train.
check_finetune() {
  local run method source; source=$(student_checkpoint "$FINETUNE_FROM")
  [[ $FINETUNE_FROM != ft_* ]] || die "FINETUNE_FROM=$FINETUNE_FROM: a fine-tuned student; name the student the runs start from (e.g. seq_kd)"
  [ -n "$DRY_RUN" ] || [ -s "$source" ] || die "FINETUNE_FROM=$FINETUNE_FROM: $source not found (train that student first: the students step with $FINETUNE_FROM in METHODS)"
  for run in $FINETUNE_METHODS; do
    method=$(finetune_method "$run")
    method_args "$method" >/dev/null  # an unknown method fails here, in one line
    [ "$method" = "$run" ] || [ "$method" = onpolicy_kd ] || die "FINETUNE_METHODS: $run: _bBETA sets --jsd-beta, an option of onpolicy_kd only"
    [ -z "$TEACHER_CT2" ] || [[ " $EXTERNAL_METHODS " == *" $method "* ]] || die "FINETUNE_METHODS: $run needs the teacher's distributions, and TEACHER_CT2 gives only its translations"
  done
}

# finetune_run RUN GPUS: one fine-tune run into $WORK/student_ft_RUN (resumes from its checkpoint_last.pt).
finetune_run() {
  local run=$1 gpus=$2 name=ft_$1 method dir budget stop source
  method=$(finetune_method "$run") dir=$WORK/student_ft_$1 source=$(student_checkpoint "$FINETUNE_FROM")
  budget=$(finetune_budget "$source" "$dir") || die "$name: cannot read $source"
  stop=$(cut -d' ' -f2 <<<"$budget")
  if [ -z "$DRY_RUN" ] && [ -f "$dir/checkpoint_last.pt" ] &&
     awk -v h="$(checkpoint_facts "$dir/checkpoint_last.pt" | cut -d' ' -f2)" -v s="$stop" 'BEGIN { exit !(h > s) }'; then
    log "$name: its budget is spent (checkpoint_last.pt is past --stop-time-hours $stop)"
  else
    # the last of an option given counts in fairseq-train: FINETUNE_ARGS_<run> (last) may override any
    local OPTIM_ARGS="$FINETUNE_OPTIM --lr $(cut -d' ' -f4 <<<"$budget") --lr-scheduler fixed"
    # shellcheck disable=SC2046,SC2086
    CUDA_VISIBLE_DEVICES=${gpus/#cpu/} train "student_$name" "$(method_data "$method")" \
      $STUDENT_ARGS --finetune-from-model "$source" --stop-time-hours "$stop" --disable-validation \
      --no-epoch-checkpoints --save-interval-updates "$FINETUNE_SAVE_UPDATES" --keep-interval-updates 1 \
      $(finetune_args "$run")
  fi
  mark_done "student_$name"
  [ -n "$DRY_RUN" ] || log "$name finished"
}

step_finetune() {
  [ -n "$FINETUNE_FROM" ] || return 0
  use_checkpoint "$FINETUNE_FROM"
  check_finetune
  local jobs=$STUDENT_JOBS
  [ -z "$DRY_RUN" ] || jobs=1
  log "finetune $FINETUNE_FROM ($(student_checkpoint "$FINETUNE_FROM")): $FINETUNE_METHODS, $FINETUNE_MINUTES min each, lr $FINETUNE_LR, $jobs at a time"
  # shellcheck disable=SC2086
  in_slots ft_ finetune_run "fine-tune runs" $FINETUNE_METHODS
}

# finetune_table_args: FT_TABLE_ARGS, fairseq-kd table's options for the fine-tuned rows: the start
# student and every run with results, tested against the first run (the continued method) with
# the paired bootstrap; false when no run has results yet.
finetune_table_args() {
  local name systems=() first=ft_${FINETUNE_METHODS%% *}
  for name in "$FINETUNE_FROM" $(finetune_names); do if reported "$name"; then systems+=("$name"); fi; done
  [[ " ${systems[*]} " == *" ft_"* ]] || return 1
  FT_TABLE_ARGS=(--systems "${systems[@]}")
  [ "$REPORT_SPEED" != 0 ] || FT_TABLE_ARGS+=(--no-speed)
  if reported "$first"; then FT_TABLE_ARGS+=(--baseline "$first" --significance "$WORK/raw/test.$TGT"); fi
}

# finetune_settings: the page's Settings rows of the fine-tune: where the runs started, and each
# run's options, budget and the updates it made in it (from its finetune_budget and checkpoint_last.pt).
finetune_settings() {
  local source run dir facts updates hours lr start minutes jobs used
  source=$(student_checkpoint "$FINETUNE_FROM") facts="? ? ?"
  if [ -f "$source" ]; then facts=$(checkpoint_facts "$source") || return 1; fi
  read -r updates hours lr <<<"$facts"
  [ "$hours" = "?" ] || hours=$(printf '%.2f' "$hours")
  printf '| fine-tune | each `ft_` run starts from `%s` (%s updates, %s h of training, last lr %s) with a fresh optimizer `%s` at a constant lr (`--lr-scheduler fixed`), seed %s and no validation, and trains for its budget of wall clock (`--stop-time-hours`: the checkpoint'"'"'s hours plus the budget); evaluated from its `checkpoint_last.pt` |\n' \
    "${source#"$WORK"/}" "$updates" "$hours" "$lr" "$FINETUNE_OPTIM" "$SEED"
  for run in $FINETUNE_METHODS; do
    dir=$WORK/student_ft_$run used="not run"
    if [ -f "$dir/checkpoint_last.pt" ] && [ -s "$dir/finetune_budget" ]; then
      read -r start _ minutes lr jobs < "$dir/finetune_budget"
      facts=$(checkpoint_facts "$dir/checkpoint_last.pt") || return 1
      read -r updates hours _ <<<"$facts"
      used=$(awk -v u="$updates" -v h="$hours" -v s="$start" -v m="$minutes" -v lr="$lr" -v j="$jobs" \
        'BEGIN { printf "budget %s min at lr %s, %s runs at a time: %d updates in %.1f min", m, lr, j, u, (h - s) * 60 }')
    fi
    printf '| ft_%s | `%s`; %s |\n' "$run" \
      "$(echo $(finetune_args "$run") | sed "s|$WORK/||g; s|$REPO/||g")" "$used"
  done
}

# finetune_md: the page's part for the fine-tune: the fine-tuned rows against the continued run.
finetune_md() {
  local table="No fine-tuned student has been evaluated yet."
  if finetune_table_args; then table=$(fairseq-kd table "$RESULTS" "${FT_TABLE_ARGS[@]}") || return 1; fi
  cat <<MD

### Fine-tuning $FINETUNE_FROM

Each \`ft_\` row fine-tunes \`$FINETUNE_FROM\`'s evaluated checkpoint (its row is the first) for
the same wall-clock budget, from the same weights with a fresh optimizer, the same constant
learning rate, seed and data order, \`STUDENT_JOBS\` runs at a time sharing the machine (Settings
below: each run's budget, rate, how many ran at a time, and the updates it made).
\`ft_${FINETUNE_METHODS%% *}\` continues the first method of \`FINETUNE_METHODS\`; the p-values
test each row against it.

$table
MD
}
