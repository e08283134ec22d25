# Any parallel corpus: a folder of plain text {train,valid,test}.{SRC,TGT}, one
# sentence a line, the two sides aligned line by line, is all the recipe needs.
#   DATA_DIR=~/corpus SRC=de TGT=en recipes/custom/run.sh
#   DATA_DIR=~/corpus SRC=de TGT=en PROFILE=cpu recipes/custom/run.sh     # 2 CPU cores
# Every other setting: recipes/common/settings.sh (each from the environment).
RECIPE=${RECIPE:-custom}
RECIPE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$RECIPE_DIR/../.." && pwd)
missing=
for var in DATA_DIR SRC TGT; do [ -n "${!var:-}" ] || missing+=" $var"; done
if [ -n "$missing" ]; then
  echo "custom: set$missing (e.g. DATA_DIR=~/corpus SRC=de TGT=en recipes/custom/run.sh)" >&2
  exit 2
fi
[ -d "$DATA_DIR" ] || { echo "custom: DATA_DIR $DATA_DIR is not a folder" >&2; exit 2; }
DATA_DIR=$(cd "$DATA_DIR" && pwd)
WORK_NAME=${RECIPE}_$SRC-$TGT  # the work folder is work/WORK_NAME plus the profile (settings.sh)
source "$REPO/recipes/common/settings.sh"
