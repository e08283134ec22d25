# Bible es-en study.  Two profiles (PROFILE=gpu, the default, or PROFILE=cpu);
# every variable can also be set from the environment, e.g.
#   GPUS=1 STUDENT_JOBS=4 recipes/bible_es_en/run.sh
#   PROFILE=cpu WORK=~/kd-work/bible_cpu recipes/bible_es_en/run.sh
#
# gpu: IWSLT-size teacher (6+6, 512) and 256-dim students, all trained at once
#      on one GPU in about 25 minutes (H100 estimate; not yet run on a GPU).
# cpu: sized for 2 CPU cores in about 4 hours: a 256-dim 3+3 teacher trained to
#      a plateau of valid loss (~2 h), 128-dim 3+3 students, one at a time with
#      every core.  Measured on a 2-core VM: docs/results.md.
RECIPE=bible_es_en
RECIPE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$RECIPE_DIR/../.." && pwd)
SRC=es TGT=en
PROFILE=${PROFILE:-gpu}
case $PROFILE in gpu | cpu) ;; *) echo "bible_es_en: PROFILE must be gpu or cpu, not '$PROFILE'" >&2; exit 2 ;; esac
# pick VALUE_GPU VALUE_CPU: the value of the active profile
pick() { if [ "$PROFILE" = cpu ]; then echo "$2"; else echo "$1"; fi; }

# --- where and on what
WORK=${WORK:-$REPO/work/bible_es_en$(pick "" _cpu)}  # everything the recipe writes, but the report
GPUS=${GPUS:-$(pick auto cpu)}                # CUDA ids "0,1", "auto" (all) or "cpu"
FP16=${FP16:-1}                               # fp16 training and decoding on GPU
STUDENT_JOBS=${STUDENT_JOBS:-$(pick 8 1)}     # students trained at the same time (sharing the devices)
SEED=${SEED:-1}

# --- data: the Bible corpus (26,722 / 1,000 / 2,000 pairs); 0 = the whole split
BIBLE_DIR=${BIBLE_DIR:-}                      # folder {train,valid,test}.{es,en}; empty = examples/data archive
TRAIN_LINES=${TRAIN_LINES:-0} VALID_LINES=${VALID_LINES:-0} TEST_LINES=${TEST_LINES:-0}
VOCAB=${VOCAB:-8000}                          # joint SentencePiece vocabulary
PREPROCESS_WORKERS=${PREPROCESS_WORKERS:-$(pick 8 2)}

# --- training (fairseq-train options; strings are split on spaces)
OPTIM_ARGS=${OPTIM_ARGS:---optimizer adam --adam-betas (0.9,0.98) --lr 1e-3 --lr-scheduler inverse_sqrt --warmup-updates 1000 --clip-norm 1.0 --weight-decay 0.0001}
MAX_TOKENS=${MAX_TOKENS:-4096}
LABEL_SMOOTHING=${LABEL_SMOOTHING:-0.1}
# Teacher: to convergence (early stopping on valid loss), as an undertrained
# teacher makes KD look useless.  gpu: stock fairseq reached sacreBLEU ~42-44
# (beam 5) with this model after 5-8 minutes on one H100 (old corpus copy).
# cpu: ~6.5 minutes an epoch on 2 cores; valid nll was still falling after
# 54 minutes, so the clock is only a safety net behind --patience.
TEACHER_ARGS=${TEACHER_ARGS:-$(pick \
  "--arch transformer_iwslt_de_en --share-all-embeddings --dropout 0.3" \
  "--arch transformer_student_small --share-all-embeddings --dropout 0.1")}
TEACHER_TRAIN=${TEACHER_TRAIN:-$(pick \
  "--max-epoch 60 --patience 8 --stop-time-hours 0.16" \
  "--max-epoch 40 --patience 3 --stop-time-hours 2.5")}
# students: gpu 3+3 layers 256-dim (7.6M parameters with an 8k vocabulary);
# cpu 3+3 layers 128-dim, every method with the same number of updates
STUDENT_ARGS=${STUDENT_ARGS:-$(pick \
  "--arch transformer_student_small --share-all-embeddings --dropout 0.1" \
  "--arch transformer_student_tiny --share-all-embeddings --dropout 0.1")}
STUDENT_TRAIN=${STUDENT_TRAIN:-$(pick \
  "--max-epoch 40 --patience 5 --stop-time-hours 0.12" \
  "--max-update 2600 --stop-time-hours 0.5")}
METHODS=${METHODS:-baseline word_kd seq_kd seq_inter hybrid_kd ckd a2d}

# --- distilled corpora, pruning, evaluation
BEAM=${BEAM:-5}                               # Seq-KD corpus and the beam evaluation
SEQ_INTER_N=${SEQ_INTER_N:-$(pick 35 8)}      # Seq-Inter n-best size (Kim & Rush: 35)
CORPUS_MAX_TOKENS=${CORPUS_MAX_TOKENS:-12000}
# fairseq or ctranslate2 (README benchmark: CTranslate2 builds the corpus several times faster on CPU)
CORPUS_BACKEND=${CORPUS_BACKEND:-$(pick fairseq fairseq)}
CT2_QUANT=${CT2_QUANT-int8}                   # CTranslate2 rows in the results ("" = none)
MAX_LEN_A=${MAX_LEN_A:-1.5} MAX_LEN_B=${MAX_LEN_B:-10}
PRUNE_FROM=${PRUNE_FROM-seq_kd}               # student pruned and retrained ("" = no pruning)
PRUNE_RATIO=${PRUNE_RATIO:-0.5}
PRUNE_TRAIN=${PRUNE_TRAIN:-$(pick \
  "--max-epoch 15 --patience 5 --stop-time-hours 0.05" \
  "--max-update 800 --stop-time-hours 0.2")}
EVAL_BATCH_SIZE=${EVAL_BATCH_SIZE:-128}

# --- report: committed with the repository
RESULTS_MD=${RESULTS_MD:-$REPO/docs/results$(pick "" _cpu).md}
PLOT_DIR=${PLOT_DIR:-$REPO/docs}
