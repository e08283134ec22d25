# Default settings of the KD pipeline, sourced by a recipe's config.sh after it
# has set what differs (RECIPE, SRC, TGT and anything else).  Every variable
# can also be set from the environment; what is set already is kept.
#
# The defaults suit a corpus of some 10k-1M sentence pairs (the Bible's 27k,
# IWSLT's 160k) with three profiles:
#   PROFILE=gpu (default)  IWSLT-size teacher (6+6, 512), 256-dim 3+3 students,
#                          all trained at once on one GPU
#   PROFILE=cpu            a 256-dim 3+3 teacher trained to a plateau of valid
#                          loss (~3 h for the Bible on 2 cores), 128-dim 3+3
#                          students two at a time with a core each, every method
#                          for the same number of updates (an early-training
#                          comparison), corpora and deployable rows through CTranslate2
#   PROFILE=cpu_converged  the cpu profile's models and corpora, every student
#                          trained until its validation BLEU stops improving
#                          (how close a converged student gets to its teacher)
PROFILE=${PROFILE:-gpu}
case $PROFILE in
  gpu | cpu | cpu_converged) ;;
  *) echo "$RECIPE: PROFILE must be gpu, cpu or cpu_converged, not '$PROFILE'" >&2; exit 2 ;;
esac
# profile_value GPU_VALUE CPU_VALUE [CONVERGED_VALUE]: the value of the active
# profile; cpu_converged takes the cpu value unless it is given its own
profile_value() {
  case $PROFILE in
    gpu) echo "$1" ;;
    cpu) echo "$2" ;;
    *) if [ $# -ge 3 ]; then echo "$3"; else echo "$2"; fi ;;
  esac
}

# --- where and on what
# everything the recipe writes but the report, one folder per profile
WORK=${WORK:-$REPO/work/${WORK_NAME:-$RECIPE}$(profile_value "" _cpu _cpu_converged)}
# CUDA ids "0,1", "auto" (all; PROFILE=gpu refuses to run when there is none) or "cpu"
GPUS=${GPUS:-$(profile_value auto cpu)}
FP16=${FP16:-1}                               # fp16 training and decoding on GPU
# Students trained at the same time (sharing the devices).  cpu: two
# single-threaded students made 1.04 + 0.54 updates/s (baseline + word_kd) where
# one with both cores made 1.75 or 1.04 (2-core VM, 2026-11-29): 1.2x the work.
STUDENT_JOBS=${STUDENT_JOBS:-$(profile_value 8 2)}
# STUDY: a name for a study run beside the profile's own (other METHODS in another WORK):
# its report gets a section of the results page and plots of its own instead of
# replacing the profile's (e.g. STUDY=techniques)
STUDY=${STUDY-}
# REPORT_SPEED=0: the report leaves out translation speeds (columns and plot), for systems
# scored while other jobs shared the machine
REPORT_SPEED=${REPORT_SPEED:-1}
SEED=${SEED:-1}

# --- data: first TRAIN_LINES / VALID_LINES / TEST_LINES pairs of each split (0 = all)
TRAIN_LINES=${TRAIN_LINES:-0} VALID_LINES=${VALID_LINES:-0} TEST_LINES=${TEST_LINES:-0}
VOCAB=${VOCAB:-8000}                          # joint SentencePiece vocabulary
PREPROCESS_WORKERS=${PREPROCESS_WORKERS:-$(profile_value 8 2)}

# --- training (fairseq-train options; strings are split on spaces)
OPTIM_ARGS=${OPTIM_ARGS:---optimizer adam --adam-betas (0.9,0.98) --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 1000 --clip-norm 1.0 --weight-decay 0.0001}
MAX_TOKENS=${MAX_TOKENS:-4096}
LABEL_SMOOTHING=${LABEL_SMOOTHING:-0.1}
# Teacher: to convergence (early stopping on valid loss), as an undertrained
# teacher makes KD look useless.  gpu: stock fairseq reached sacreBLEU ~42-44
# (beam 5) on the Bible with this model after 5-8 minutes on one H100 (old
# corpus copy).  cpu: ~6 minutes a Bible epoch on 2 cores; valid nll was still
# falling after 54 minutes, so the clock is only a safety net behind --patience.
# TEACHER_PATH: an existing fairseq teacher instead (no teacher is trained): its
# SentencePiece model and dictionary (TEACHER_SPM, TEACHER_DICT; by default
# spm.model and dict.txt beside it, as in examples/teacher/) encode the corpus.
TEACHER_PATH=${TEACHER_PATH-}
TEACHER_SPM=${TEACHER_SPM:-${TEACHER_PATH:+$(dirname "$TEACHER_PATH")/spm.model}}
TEACHER_DICT=${TEACHER_DICT:-${TEACHER_PATH:+$(dirname "$TEACHER_PATH")/dict.txt}}
# TEACHER_CT2: any CTranslate2 model folder instead (an external teacher: OPUS-MT, Marian,
# M2M100, NLLB, ... as CTranslate2's converters write them; docs/external_teacher.md): no
# teacher is trained; it translates the raw training text (fairseq-kd corpus --teacher-ct2)
# and the students get their own SentencePiece model (VOCAB), trained on the source and the
# teacher's translations, the text the Seq-KD student learns from.  It gives translations
# only, so only baseline, seq_kd and seq_inter can train (METHODS defaults to baseline seq_kd).
# TEACHER_SRC_LANG / TEACHER_TGT_LANG: the tokens that start every source / translation of a
# multilingual model (M2M100: __de__ / __en__; NLLB: deu_Latn / eng_Latn; a multilingual
# OPUS-MT model: TEACHER_SRC_LANG='>>eng<<', its target language); empty for a one-pair model.
TEACHER_CT2=${TEACHER_CT2-}
TEACHER_SRC_LANG=${TEACHER_SRC_LANG-} TEACHER_TGT_LANG=${TEACHER_TGT_LANG-}
TEACHER_ARGS=${TEACHER_ARGS:-$(profile_value \
  "--arch transformer_iwslt_de_en --share-all-embeddings --dropout 0.3" \
  "--arch transformer_student_small --share-all-embeddings --dropout 0.1")}
# Early stopping decides when training ends; gpu sets no clock (a 1M-pair corpus
# needs hours where the Bible needs minutes); cpu's clock is a safety net only.
TEACHER_TRAIN=${TEACHER_TRAIN:-$(profile_value \
  "--max-epoch 60 --patience 8" \
  "--max-epoch 40 --patience 3 --stop-time-hours 4")}
# Students: gpu 3+3 layers 256-dim (7.6M parameters with an 8k vocabulary);
# cpu 3+3 layers 128-dim (2.4M), every method with the same number of updates
# (1,600: six epochs of the Bible; the clock is only a safety net: a student
# that runs the teacher at every step makes ~0.5 updates/s on one core);
# cpu_converged: the same students until --patience epochs bring no better
# validation BLEU (STUDENT_VALID), the clock again only a safety net.
STUDENT_ARGS=${STUDENT_ARGS:-$(profile_value \
  "--arch transformer_student_small --share-all-embeddings --dropout 0.1" \
  "--arch transformer_student_tiny --share-all-embeddings --dropout 0.1")}
STUDENT_TRAIN=${STUDENT_TRAIN:-$(profile_value \
  "--max-epoch 40 --patience 5" \
  "--max-update 1600 --stop-time-hours 3" \
  "--max-epoch 150 --patience 6 --stop-time-hours 10")}
# What a student's validation measures, and so which checkpoint is its best and
# when --patience stops it.  gpu and cpu: the criterion's validation loss.
# cpu_converged: greedy sacreBLEU of the 1,000 valid verses after every epoch
# (fairseq's --eval-bleu on SentencePiece-decoded text), the same rule for every
# method whatever its loss.
STUDENT_VALID=${STUDENT_VALID-$(profile_value "" "" \
  "--eval-bleu --eval-bleu-remove-bpe sentencepiece --eval-bleu-args {\"beam\":1,\"max_len_a\":1.5,\"max_len_b\":10} --best-checkpoint-metric bleu --maximize-best-checkpoint-metric")}
# Which of a student's checkpoints are kept: cpu_converged keeps its last epochs
# (for checkpoint averaging and the learning curves' checks).
STUDENT_SAVE=${STUDENT_SAVE-$(profile_value --no-epoch-checkpoints --no-epoch-checkpoints "--keep-last-epochs 8")}
# The checkpoint of each student that is pruned, exported and evaluated: gpu
# trains to early stopping, so its best (lowest valid loss); cpu compares the methods
# after the same 1,600 updates, so its last.  (Measured on the CPU study: hybrid_kd's
# best was update 1578, whose beam output was 11% short, length ratio 0.891, against
# 0.977 at update 1600.)  average: the mean of the last AVERAGE_LAST checkpoints
# (fairseq-kd average).  choose (cpu_converged): the checkpoint step translates the
# validation split with the baseline's best checkpoint (best valid BLEU) and with the mean
# of its last AVERAGE_LAST; every student is used from the kind that scored higher
# (greedy BLEU): decided on the baseline, the same for all.
STUDENT_CHECKPOINT=${STUDENT_CHECKPOINT:-$(profile_value best last choose)}
AVERAGE_LAST=${AVERAGE_LAST:-5}
# hybrid_fixed: hybrid_kd with a fixed 0.5 gate, beside the default (learned) gate;
# seq_word_kd: Seq-KD + Word-KD (Kim & Rush's strongest combination).
# cpu_converged: in the order the study reports them.
[ -z "$TEACHER_CT2" ] || METHODS=${METHODS:-baseline seq_kd}  # what an external teacher can teach
METHODS=${METHODS:-$(profile_value \
  "baseline word_kd seq_kd seq_inter hybrid_kd ckd a2d" \
  "baseline word_kd seq_kd seq_inter hybrid_kd hybrid_fixed ckd a2d" \
  "baseline seq_kd seq_word_kd word_kd hybrid_kd ckd a2d seq_inter")}

# Methods whose word-level term reads the teacher's top-CACHE_TOPK distributions from an
# offline cache (fairseq-kd cache-teacher, built once by the cache step) instead of running
# the teacher at every update (an online teacher cost 2-3x per update on CPU); ckd and a2d
# need the teacher's internals and stay online.
CACHE_METHODS=${CACHE_METHODS-$(profile_value "" "" "word_kd word_kd_selective seq_word_kd hybrid_kd hybrid_fixed")}
CACHE_TOPK=${CACHE_TOPK:-8}

# --- distilled corpora, pruning, evaluation
BEAM=${BEAM:-5}                               # Seq-KD corpus and the beam evaluation
SEQ_INTER_N=${SEQ_INTER_N:-$(profile_value 35 8)}  # Seq-Inter n-best size (Kim & Rush: 35)
# seq_kd_mbr / seq_kd_mbr_n: MBR (chrF) over the teacher's MBR_N-best list, keeping the best
# (MBR-1) or the MBR_KEEP best (MBR-n) as pairs; seq_kd_nbest: the NBEST_KEEP best of the
# NBEST_N-best list as pairs (several hypotheses per source); seq_kd_filtered: the beam
# corpus with fairseq-kd corpus --filter all (docs/seq_kd.md)
MBR_N=${MBR_N:-8} MBR_KEEP=${MBR_KEEP:-3}
NBEST_N=${NBEST_N:-5} NBEST_KEEP=${NBEST_KEEP:-3}
CORPUS_MAX_TOKENS=${CORPUS_MAX_TOKENS:-12000}
# fairseq (SequenceGenerator) or ctranslate2 (the teacher converted; several times faster on CPU)
CORPUS_BACKEND=${CORPUS_BACKEND:-$(profile_value fairseq ctranslate2)}
CT2_QUANT=${CT2_QUANT-int8}                   # CTranslate2 rows of the evaluation (space-separated; "" = none)
MAX_LEN_A=${MAX_LEN_A:-1.5} MAX_LEN_B=${MAX_LEN_B:-10}
# PRUNE_FROM: the student pruned and retrained ("" = no pruning).  Kim & Rush pruned their
# Seq-KD student; cpu_converged prunes its best converged student, word_kd (greedy test BLEU
# 38.59 against seq_kd's 38.18, p 0.024; 2-core VM, 2026-12-07).
PRUNE_FROM=${PRUNE_FROM-$(profile_value seq_kd seq_kd word_kd)}
# PRUNE_RATIO: the fraction of its weights set to zero; several values: one pruned student
# each, every one pruned from the trained PRUNE_FROM (pruned_FROM for one ratio, prunedPCT_FROM
# for several: cpu_converged's pruned50_word_kd and pruned80_word_kd, Kim & Rush's 80% beside 50%).
# Ratio 0 is the control: the trained student retrained the same way with nothing pruned
# (pruned0_word_kd), since retraining restarts the learning rate's warm-up and so trains on
# (pruned50_word_kd scored above the dense word_kd it was pruned from: 2026-12-07).
PRUNE_RATIO=${PRUNE_RATIO:-$(profile_value 0.5 0.5 "0.5 0 0.8")}
PRUNE_TRAIN=${PRUNE_TRAIN:-$(profile_value \
  "--max-epoch 15 --patience 5" \
  "--max-update 800 --stop-time-hours 1" \
  "--max-epoch 100 --patience 6 --stop-time-hours 6")}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-128}            # fairseq-generate rows (CTranslate2 rows: its own)
SHIP_CHECK_LINES=${SHIP_CHECK_LINES:-300}     # ship, ship_students: test pairs a shipped model's test rescores
# ship_students (run only when named): the students shipped, one folder each in
# SHIP_STUDENTS_DIR (default $WORK/shipped_students; the repository's are in
# examples/students).  A baseline and a KD student to compare it with: by default
# Seq-KD, the common choice; no rule picks "the best" student, so set it from the
# study's results page (any name of METHODS, or pruned_NAME).
SHIP_STUDENTS=${SHIP_STUDENTS:-baseline seq_kd}

# STUDENTS_FROM: a folder of students shipped by ship_students (NAME/student.pt and its
# training.json, e.g. examples/students): a method of METHODS found there is adopted, not
# trained (its shipped weights are its checkpoint, its training.json its curve), so a study
# whose work folder was lost keeps the students it had finished.  Its checkpoint kind must be
# the study's (STUDENT_CHECKPOINT=average for avg5, best; not choose: nothing to choose from).
STUDENTS_FROM=${STUDENTS_FROM-}

# --- fine-tuning a trained student (the finetune step; nothing while FINETUNE_FROM is empty)
# FINETUNE_FROM: a student (e.g. seq_kd) whose evaluated checkpoint (STUDENT_CHECKPOINT: best
# or last) every fine-tune run starts from.  GKD (onpolicy_kd) starts from a supervised student:
# the comparison is "on-policy fine-tuning against continuing Seq-KD for the same time".
FINETUNE_FROM=${FINETUNE_FROM-}
# FINETUNE_METHODS: one fine-tune run per name, the student ft_NAME: a method name (its
# method_args, method_data and ARGS_<method>), or METHOD_bBETA for onpolicy_kd at --jsd-beta BETA
# (onpolicy_kd_b0: forward KL, onpolicy_kd_b0.5, onpolicy_kd_b1: reverse KL); a run's own options
# in FINETUNE_ARGS_<name> (other characters than letters, digits and _ as _: FINETUNE_ARGS_onpolicy_kd_b0_5).
# The first name is the one the results page tests the others against (the continued method).
# Not ckd or hybrid_kd from a student without their criterion's own parameters (projections, gates).
FINETUNE_METHODS=${FINETUNE_METHODS:-seq_kd onpolicy_kd}
# FINETUNE_MINUTES: the wall-clock budget of every run (fairseq's cumulative training time,
# counted from the start checkpoint's own).  The runs train STUDENT_JOBS at a time, like the
# students: set STUDENT_JOBS to the number of runs for all of them to share the machine at once
FINETUNE_MINUTES=${FINETUNE_MINUTES:-60}
# FINETUNE_LR: the constant learning rate of every run (--lr-scheduler fixed, a fresh Adam).
# 1e-4 is no more than the students' own inverse_sqrt schedule (OPTIM_ARGS: 1e-3 * sqrt(1000 /
# updates)) has decayed to before 100,000 updates (3.2e-4 after 10,000), so a fresh optimizer
# moves a trained student no faster than its last updates did; the results page names the rate
# the start checkpoint was last trained at
FINETUNE_LR=${FINETUNE_LR:-1e-4}
# FINETUNE_OPTIM: OPTIM_ARGS's optimizer without its schedule (the step adds --lr FINETUNE_LR
# --lr-scheduler fixed)
FINETUNE_OPTIM=${FINETUNE_OPTIM:---optimizer adam --adam-betas (0.9,0.98) --clip-norm 1.0 --weight-decay 0.0001}
# FINETUNE_SAVE_UPDATES: a run saves its checkpoint_last.pt every so many updates (and at the
# end of its budget), so a killed run resumes close to where it stopped
FINETUNE_SAVE_UPDATES=${FINETUNE_SAVE_UPDATES:-$(profile_value 1000 200)}

# --- report
RESULTS_MD=${RESULTS_MD:-$WORK/results.md}
PLOT_DIR=${PLOT_DIR:-$WORK}
