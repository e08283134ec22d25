# The report step of the shared pipeline (sourced by pipeline.sh): the plots, the table and
# the results page ($RESULTS_MD), with cpu_converged's curves, checkpoint choice, Kim & Rush
# beside the study and shipped hypotheses.

step_report() {
  log "report -> $RESULTS_MD (section $(section_title)), $PLOT_DIR/$(plot_name).{speed,params}.png"
  run_cmd mkdir -p "$PLOT_DIR" "$(dirname "$RESULTS_MD")"
  [ "$REPORT_SPEED" = 0 ] || run_logged "$WORK/logs/report.log" fairseq-kd plot "$RESULTS" --x speed \
    --decoding greedy --out "$PLOT_DIR/$(plot_name).speed.png" --title "$RECIPE ($PROFILE): BLEU vs greedy speed"
  run_logged "$WORK/logs/report.log" fairseq-kd plot "$RESULTS" --x params --decoding beam --out "$PLOT_DIR/$(plot_name).params.png" \
    --title "$RECIPE ($PROFILE): BLEU (beam $BEAM) vs parameters"
  if [ "$PROFILE" = cpu_converged ]; then
    log "report: test hypotheses -> $(hypotheses_dir), learning curves -> $PLOT_DIR/$(plot_name).curves.png"
    local name records=()
    # the finished students' curves go with their hypotheses (the page's record of the study)
    for name in $(finished_students); do
      [[ $name == ft_* ]] || records+=(--log "$name=$(training_curve "$name")")
    done
    run_logged "$WORK/logs/report.log" fairseq-kd hypotheses "$RESULTS" --ref "$WORK/raw/test.$TGT" \
      --out "$(hypotheses_dir)" "${records[@]}"
  fi
  if [ -n "$DRY_RUN" ]; then
    table_args
    run_cmd fairseq-kd table "$RESULTS" "${TABLE_ARGS[@]}"
    [ "$PROFILE" != cpu_converged ] || learning_curves
    if [ -n "$FINETUNE_FROM" ] && finetune_table_args; then run_cmd fairseq-kd table "$RESULTS" "${FT_TABLE_ARGS[@]}"; fi
    return
  fi
  # the whole section first: a failing command leaves the page as it was
  local section; section=$(write_results_md)
  replace_section "$RESULTS_MD" "$RECIPE $PROFILE${STUDY:+ $STUDY}" <<<"$section"
  cat "$RESULTS_MD"
}

# reported NAME: whether results.json holds the system NAME (a dry run, without
# results, assumes so and prints every command).
reported() { [ -n "$DRY_RUN" ] || has_result "$1"; }

# table_args: TABLE_ARGS becomes fairseq-kd table's options for the page: the
# baseline's columns; cpu_converged adds each BLEU's gap to the teacher's beam
# BLEU and the paired bootstrap p-value of each difference from the baseline.
table_args() {
  TABLE_ARGS=()
  [ "$REPORT_SPEED" != 0 ] || TABLE_ARGS+=(--no-speed)
  if reported baseline; then TABLE_ARGS+=(--baseline baseline); fi
  [ "$PROFILE" = cpu_converged ] || return 0
  if reported teacher; then TABLE_ARGS+=(--teacher teacher); fi
  if reported baseline; then TABLE_ARGS+=(--significance "$WORK/raw/test.$TGT"); fi
}

# cpu_converged: where the test hypotheses are shipped, beside the results page.
hypotheses_dir() { echo "${HYPOTHESES_DIR:-$(dirname "$RESULTS_MD")/hypotheses/$(plot_name)}"; }

# learning_curves: every student's validation BLEU by update -> $PLOT_DIR/NAME.curves.png;
# prints the table of how each converged.
learning_curves() {
  local name curve logs=()
  # the fine-tuned students do not validate (their own section of the page says how they trained)
  # a student still training is drawn as far as it got; one not validated yet has no curve
  for name in $(student_names); do
    [[ $name != ft_* ]] || continue
    curve=$(training_curve "$name")
    if student_finished "$name"; then logs+=(--log "$name=$curve")
    elif grep -qs "| valid on '" "$curve"; then logs+=(--log "$name (training)=$curve"); fi
  done
  # how soon each method gets within 1 BLEU of the baseline's best (KD's lead early in training)
  if in_methods baseline; then logs+=(--baseline baseline); fi
  run_cmd fairseq-kd curves "${logs[@]}" --metric bleu --out "$PLOT_DIR/$(plot_name).curves.png" \
    --title "$RECIPE ($PROFILE): greedy validation BLEU by update"
}

# training_curve NAME: student NAME's fairseq-train log, or the training record of an adopted one.
training_curve() {
  if [ -e "$WORK/logs/student_$1.json" ]; then echo "$WORK/logs/student_$1.json"; else echo "$WORK/logs/student_$1.log"; fi
}

# jobs_md: how the students shared the machine (STUDENT_JOBS), which the hours above include;
# the wall clock above, from the logs, says what they took together (another pipeline beside
# this one, or a pause, shows there and nowhere else).
jobs_md() {
  if [ "$STUDENT_JOBS" = 1 ]; then
    printf '%s\n%s' "Students trained one at a time in the run of this recipe (\`STUDENT_JOBS=1\`): each row's hours are its own run's," \
      "slower wherever something else shared the machine; the wall clock above is what the runs with a log took together."
  else
    printf '%s\n%s' "Students trained $STUDENT_JOBS at a time (\`STUDENT_JOBS\`) sharing the machine: each row's hours include that," \
      "and the wall clock above is what the runs with a log took together."
  fi
}

# adopted_jobs_md: the convergence sentence's exception for the adopted students, whose hours are
# those of the run that trained them (their shipped README says how many shared the machine).
adopted_jobs_md() {
  local names; names=$(adopted_names | xargs)
  [ -z "$names" ] || echo " The adopted students (${names// /, }) trained as their shipped README says (\`STUDENT_JOBS\` there)."
}

# adopted_md: the page's Settings row on the students adopted from STUDENTS_FROM (none: no row).
adopted_md() {
  local adopted; adopted=$(adopted_names | xargs)
  [ -n "$adopted" ] || return 0
  local from=${STUDENTS_FROM#"$REPO"/} pruned=
  [[ " $adopted " != *" $PRUNE_FROM "* ]] || pruned=" (and pruned)"
  echo "| adopted students | ${adopted// /, }: trained to the end by this recipe in an earlier work folder and shipped to \`$from\` (ship_students), adopted from there (STUDENTS_FROM), not trained again: evaluated$pruned from the shipped float16 weights; their curves are the shipped \`training.json\` |"
}

# The plots' file name: one pair per recipe, profile and STUDY.
plot_name() { echo "$RECIPE$( [ "$PROFILE" = gpu ] || echo "_$PROFILE")${STUDY:+_$STUDY}"; }

# The heading of the report's section: its recipe, profile and STUDY.
section_title() { echo "$RECIPE, PROFILE=$PROFILE${STUDY:+, STUDY=$STUDY}"; }

# replace_section FILE KEY: standard input becomes the section of FILE between
# the markers <!-- results KEY --> and <!-- /results KEY --> (appended when FILE
# has none), so one page holds a section per recipe and profile and a rerun
# replaces only its own.
replace_section() {
  python3 -c '
import os, re, sys
path, key = sys.argv[1], sys.argv[2]
begin, end = f"<!-- results {key} -->", f"<!-- /results {key} -->"
section = f"{begin}\n{sys.stdin.read().strip()}\n{end}"
page = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Results\n"
pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
page = pattern.sub(lambda _: section, page) if pattern.search(page) else page.rstrip() + "\n\n" + section + "\n"
with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(page)
os.replace(path + ".tmp", path)
' "$1" "$2"
}

# The device fairseq-kd evaluate timed the systems on (one per results file),
# which need not be the machine writing the report.
results_device() {
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("device", "an unrecorded device"))' "$RESULTS"
}

# The results page: the settings that produced it, the table and the plots
# (relative links, so it can live in docs/ next to the PNGs).
write_results_md() {
  local rel table
  rel=$(page_relative "$PLOT_DIR") || return 1
  [ "$rel" = . ] && rel= || rel=$rel/
  table_args
  table=$(fairseq-kd table "$RESULTS" "${TABLE_ARGS[@]}") || return 1
  cat <<MD
## $(section_title)

Produced by \`recipes/$RECIPE/run.sh\` on $(date -u +%Y-%m-%d) (git $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)).
Test set: \`raw/test.$TGT\` of the work folder ($(wc -l < "$WORK/raw/test.$TGT") sentences), $SRC -> $TGT.
$(speed_md)
Students are evaluated from their \`fairseq-kd export\` files with stock fairseq.
$(unfinished_md)

$table

$( [ "$REPORT_SPEED" = 0 ] || echo "![BLEU vs speed](${rel}$(plot_name).speed.png)")
![BLEU vs parameters](${rel}$(plot_name).params.png)
MD
  if [ "$PROFILE" = cpu_converged ]; then converged_md "$rel" || return 1; fi
  if [ -n "$FINETUNE_FROM" ]; then finetune_md || return 1; fi
  cat <<MD

### Settings

| | |
|---|---|
| data | $RECIPE, train $(wc -l < "$WORK/raw/train.$SRC") pairs, SentencePiece joint vocabulary $VOCAB |
| teacher | $(teacher_setting) |
| students | \`$STUDENT_ARGS $STUDENT_TRAIN\`; evaluated (and pruned) from each student's \`checkpoint_$(checkpoint_kind).pt\` ($(checkpoint_setting)) |
| optimizer | \`$OPTIM_ARGS --max-tokens $MAX_TOKENS --label-smoothing $LABEL_SMOOTHING\` |
| corpora | $(corpora_setting) |
| pruning | $(if [ -n "$PRUNE_FROM" ]; then echo "\`$PRUNE_FROM\` pruned to $(echo $PRUNE_RATIO | sed 's/ / and /g') (class-blind, each from the trained student), retrained \`$PRUNE_TRAIN\`"; else echo "none (PRUNE_FROM empty)"; fi) |
$(adopted_md)
$(for m in $METHODS; do printf '| %s | `%s` |\n' "$m" "$(echo $(method_args "$m") | sed "s|$WORK/||g; s|$REPO/||g")"; done)
$([ -z "$FINETUNE_FROM" ] || finetune_settings)

Training logs: \`logs/\` of the work folder.
MD
}

# unfinished_md: the page's sentence on the students whose training has not finished (none: empty).
unfinished_md() {
  local waiting; waiting=$(unfinished_students)
  [ -z "$waiting" ] || echo "Not finished when this page was written (no row yet; a curve as far as it got): ${waiting// /, }."
}

# The page's sentence on translation speed.
speed_md() {
  if [ "$REPORT_SPEED" = 0 ]; then
    echo "Translation speed: not reported (REPORT_SPEED=0: the systems were scored while other jobs ran)."
    return
  fi
  cat <<MD
Translation speed: sentences/s of the translation alone (model loading excluded),
one system at a time on $(results_device): fairseq-generate with batches of
$EVAL_BATCH_SIZE sentences, and for the "(ct2 ...)" rows the model converted to
CTranslate2 with fairseq-kd evaluate's batch size for it.
MD
}

# The page's teacher: how the recipe trained it, or TEACHER_PATH (its path in the
# repository, or only its file name: the page names no path of this machine).
teacher_setting() {
  if [ -n "$TEACHER_CT2" ]; then
    echo "\`$(basename "$TEACHER_CT2")\` (TEACHER_CT2: an external CTranslate2 teacher${TEACHER_TGT_LANG:+, $TEACHER_SRC_LANG -> $TEACHER_TGT_LANG}, not trained by the recipe; the students' SentencePiece model is trained on the source and its translations)"
    return
  fi
  [ -n "$TEACHER_PATH" ] || { echo "\`$TEACHER_ARGS $TEACHER_TRAIN\`"; return; }
  local path=${TEACHER_PATH#"$REPO"/}
  [ "$path" != "$TEACHER_PATH" ] || path=$(basename "$TEACHER_PATH")
  echo "\`$path\` (TEACHER_PATH: not trained by the recipe)"
}

# page_relative PATH: PATH relative to the results page's folder (the page links it).
page_relative() {
  python3 -c 'import os,sys; print(os.path.relpath(sys.argv[1], os.path.dirname(sys.argv[2])))' "$1" "$RESULTS_MD"
}

# pruned_to RATIO: the pruned student pruned to RATIO of its weights (none: nothing).
pruned_to() {
  local name
  for name in $(pruned_names); do
    awk -v a="$(pruned_ratio "$name")" -v b="$1" 'BEGIN { exit !(a + 0 == b + 0) }' && echo "$name"
  done
  return 0
}

# kim_rush_md: Kim & Rush (2016)'s table beside this study's rows that do the same (the page).
kim_rush_md() {
  local table sizes pruned
  pruned=$(pruned_to 0.8)
  table=$(fairseq-kd table "$RESULTS" --kim-rush ${pruned:+--kim-rush-pruned "$pruned"}) || return 1
  sizes=$(python3 - "$RESULTS" <<'PY'
import json, sys
systems = {s["name"]: s for s in json.load(open(sys.argv[1]))["systems"]}
teacher, baseline = systems.get("teacher"), systems.get("baseline")
share = f"{baseline['params'] / teacher['params']:.0%}" if teacher and baseline else "a part"
print(f"the student {share} of the teacher's parameters; our teacher's beam BLEU "
      f"{teacher['beam']['bleu']:.1f}" if teacher else f"the student {share} of the teacher's parameters")
PY
) || return 1
  cat <<MD

### Beside Kim & Rush (2016)

Kim & Rush's Table 1 (WMT14 En-De, newstest2014; an LSTM teacher of 4x1000, beam BLEU 19.5,
and students of 2x500, 38% of its parameters) beside this study's rows that do the same
thing.  What differs: the data (here $(wc -l < "$WORK/raw/train.$SRC") Bible verse pairs, $SRC -> $TGT), the models
(Transformers, $sizes) and Seq-Inter (in their combined and pruned rows, not
in ours).  Compare the gaps and gains, not the BLEU itself.

$table
MD
}

# checkpoint_md: the checkpoint step's comparison (STUDENT_CHECKPOINT=choose), for the page.
checkpoint_md() {
  [ "$STUDENT_CHECKPOINT" = choose ] && [ -s "$WORK/checkpoints.json" ] || return 0
  local table; table=$(fairseq-kd table "$WORK/checkpoints.json" --no-speed) || return 1
  cat <<MD

### Which checkpoint

The baseline's \`checkpoint_best.pt\` (its best greedy validation BLEU) against the mean of
its last $AVERAGE_LAST checkpoints (\`fairseq-kd average\`), both translating the
$(wc -l < "$WORK/raw/valid.$TGT") validation sentences (\`raw/valid.$TGT\`, not the test set).  The higher
greedy BLEU, \`checkpoint_$(checkpoint_kind).pt\`, is the kind every student above is evaluated
(and pruned) from.  The best checkpoint was picked on these same sentences, so the
comparison leans its way.

$table
MD
}

# converged_md PLOT_PREFIX: the page's part for cpu_converged: the learning curves,
# how each student converged, and where its test hypotheses are.
converged_md() {
  local summary hyps
  summary=$(learning_curves) || return 1
  hyps=$(page_relative "$(hypotheses_dir)") || return 1
  checkpoint_md || return 1
  kim_rush_md || return 1
  cat <<MD

### Convergence

Validation BLEU (greedy, the $(wc -l < "$WORK/raw/valid.$TGT") sentences of \`raw/valid.$TGT\`) of every student after each
epoch, from its training log (\`logs/student_NAME.log\`; an adopted student's from its \`training.json\`); a star marks its best validation
(the star is the \`checkpoint_best.pt\`; the one evaluated above: \`checkpoint_$(checkpoint_kind).pt\`).  Training stops after
\`--patience\` validations without a better one.

![validation BLEU by update](${1}$(plot_name).curves.png)

$summary

$(jobs_md)$(adopted_jobs_md)

Test hypotheses of every row, greedy and beam, detokenized and xz-compressed, with the reference:
[\`$hyps/\`]($hyps/); rescore one with \`xz -dc FILE | sacrebleu test.$TGT\` (its README.md).
MD
}
