"""Filtering a distilled corpus: rules that drop bad teacher translations after selection.

Each rule judges one pair (source pieces, hypothesis pieces, the teacher's
score of the hypothesis); a pair is dropped by the first rule that fires, in
the order of RULES:

* ``copy``: the hypothesis is the source, or at least --filter-copy-overlap of
  its pieces (counted with repeats) are pieces of the source: the teacher
  copied its input instead of translating it;
* ``repeat``: some n-gram (n <= 4 pieces) occurs more than --filter-repeat
  times in a row: runaway repetition, the typical degenerate beam output;
* ``ratio``: hypothesis pieces / source pieces outside --filter-ratio [a, b];
* ``score``: the teacher's length-normalised log-probability below
  --filter-score-min, or below the --filter-score-percentile percentile of
  the scores of all judged pairs (e.g. 5 drops the worst 5%, as Firefox
  Translations' pipeline does).

Only the teacher's translations are judged: the empty line of an empty
source and the gold target of a long source (--long-inputs reference) are
not teacher output and are always kept.
"""
from collections import Counter

from fairseq_kd.errors import require

# In the order they are checked: the cheap, certain rules first.
RULES = ("copy", "repeat", "ratio", "score")
NONE = "none"
MAX_REPEAT_NGRAM = 4
DEFAULT_PERCENTILE = 5.0


def add_arguments(g):
    """The filtering options of ``fairseq-kd corpus`` (argument group ``g``)."""
    g.add_argument("--filter", default=NONE,
                   help=f"drop pairs by these rules after selection: comma-separated subset of "
                        f"{','.join(RULES)}, 'all', or 'none' (default); dropped pairs and the rule "
                        "that dropped each go to OUT/SPLIT.filtered.tsv")
    g.add_argument("--filter-score-min", type=float, default=None, metavar="X",
                   help="score rule: drop hypotheses whose length-normalised log-probability "
                        "(natural log per token) is below X")
    g.add_argument("--filter-score-percentile", type=float, default=None, metavar="P",
                   help=f"score rule: drop the hypotheses scored below the P-th percentile of all "
                        f"(default when --filter-score-min is not given: {DEFAULT_PERCENTILE:g})")
    g.add_argument("--filter-ratio", default="0.33,3", metavar="A,B",
                   help="ratio rule: keep hypothesis/source lengths (pieces) in [A, B] (default: 0.33,3)")
    g.add_argument("--filter-copy-overlap", type=float, default=0.9, metavar="F",
                   help="copy rule: drop hypotheses of which a share >= F of the pieces occur in the "
                        "source (default: 0.9; 1 drops exact and reordered copies only)")
    g.add_argument("--filter-repeat", type=int, default=4, metavar="K",
                   help=f"repeat rule: drop hypotheses where an n-gram (n <= {MAX_REPEAT_NGRAM}) "
                        "occurs more than K times in a row (default: 4)")


def parse_rules(spec):
    """The rules of a --filter value, in checking order ([] for 'none')."""
    names = [r for r in spec.split(",") if r]
    if names == [NONE]:
        return []
    if names == ["all"]:
        return list(RULES)
    unknown = sorted(set(names) - set(RULES))
    require(names and not unknown, f"--filter: expected 'none', 'all' or a subset of {','.join(RULES)}, "
            f"got '{spec}'")
    return [r for r in RULES if r in names]


def parse_ratio(spec):
    """(a, b) of --filter-ratio A,B."""
    try:
        a, b = (float(x) for x in spec.split(","))
    except ValueError:
        a = b = None
    require(a is not None and 0 <= a <= b, f"--filter-ratio: expected A,B with 0 <= A <= B, got '{spec}'")
    return a, b


def check_args(args):
    """Check the filtering options before any decoding."""
    rules = parse_rules(args.filter)
    parse_ratio(args.filter_ratio)
    require(args.filter_score_min is None or args.filter_score_percentile is None,
            "give --filter-score-min or --filter-score-percentile, not both")
    p = args.filter_score_percentile
    require(p is None or 0 <= p < 100, f"--filter-score-percentile must be in [0, 100), got {p}")
    require(0 < args.filter_copy_overlap <= 1, "--filter-copy-overlap must be in (0, 1]")
    require(args.filter_repeat >= 1, "--filter-repeat must be >= 1")
    return rules


# ---------------------------------------------------------------- the rules
def is_copy(source, hypothesis, overlap):
    """True when ``hypothesis`` (tokens) is ``source`` or shares >= ``overlap`` of its tokens with it."""
    if not hypothesis:
        return False
    if hypothesis == source:
        return True
    shared = sum((Counter(hypothesis) & Counter(source)).values())
    return shared / len(hypothesis) >= overlap


def longest_repeat(tokens, max_n=MAX_REPEAT_NGRAM):
    """The most times any n-gram (n <= max_n) of ``tokens`` occurs in a row (1 for no repetition)."""
    best = 1 if tokens else 0
    for n in range(1, max_n + 1):
        for start in range(len(tokens) - 2 * n + 1):
            gram, times = tokens[start:start + n], 1
            while tokens[start + times * n:start + (times + 1) * n] == gram:
                times += 1
            best = max(best, times)
    return best


def length_ratio(source, hypothesis):
    """Hypothesis tokens per source token (the source has at least one: empty sources are not judged)."""
    return len(hypothesis) / max(len(source), 1)


def score_threshold(scores, args):
    """The lowest score kept: --filter-score-min, or the --filter-score-percentile percentile of ``scores``."""
    import numpy as np

    if args.filter_score_min is not None:
        return args.filter_score_min
    if not scores:
        return float("-inf")
    p = DEFAULT_PERCENTILE if args.filter_score_percentile is None else args.filter_score_percentile
    return float(np.percentile(np.asarray(scores, dtype=np.float64), p))


class PairFilter:
    """The --filter rules with their thresholds; :meth:`reason` judges one pair."""

    def __init__(self, args, scores):
        """``scores``: the teacher's scores of every judged pair (for a percentile threshold)."""
        self.rules = parse_rules(args.filter)
        self.ratio = parse_ratio(args.filter_ratio)
        self.overlap, self.repeat = args.filter_copy_overlap, args.filter_repeat
        self.min_score = score_threshold(scores, args) if "score" in self.rules else None

    def reason(self, source, hypothesis, score):
        """The first rule that drops the pair (tokens, tokens, score), or None to keep it."""
        for rule in self.rules:
            if self._fires(rule, source, hypothesis, score):
                return rule
        return None

    def _fires(self, rule, source, hypothesis, score):
        if rule == "copy":
            return is_copy(source, hypothesis, self.overlap)
        if rule == "repeat":
            return longest_repeat(hypothesis) > self.repeat
        if rule == "ratio":
            a, b = self.ratio
            return not a <= length_ratio(source, hypothesis) <= b
        return score < self.min_score
