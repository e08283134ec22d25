# Bible es-en study: the corpus shipped in examples/data (26,722 / 1,000 / 2,000
# verse pairs).  Every setting is in recipes/common/settings.sh; two profiles:
#   recipes/bible_es_en/run.sh                          # PROFILE=gpu: one GPU, ~25 min (H100 estimate)
#   PROFILE=cpu WORK=~/kd-work/bible_cpu recipes/bible_es_en/run.sh   # 2 CPU cores, ~7 h (measured)
#   PROFILE=cpu_converged WORK=~/kd-work/bible_converged recipes/bible_es_en/run.sh  # students to convergence
# Any variable from the environment, e.g.  GPUS=1 STUDENT_JOBS=4 recipes/bible_es_en/run.sh
RECIPE=bible_es_en
RECIPE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$RECIPE_DIR/../.." && pwd)
SRC=es TGT=en
BIBLE_DIR=${BIBLE_DIR:-}                      # folder {train,valid,test}.{es,en}; empty = examples/data archive
# the report is committed with the repository: its own section of docs/results.md per profile
RESULTS_MD=${RESULTS_MD:-$REPO/docs/results.md}
PLOT_DIR=${PLOT_DIR:-$REPO/docs}
# cpu_converged: the students learn from the CPU profile's teacher as shipped in examples/teacher
[ "${PROFILE:-gpu}" != cpu_converged ] || TEACHER_PATH=${TEACHER_PATH-$REPO/examples/teacher/teacher.pt}
source "$REPO/recipes/common/settings.sh"
