"""Choosing what a distilled corpus keeps of the teacher's candidates for each source.

The teacher gives N candidates per source (its N-best list from beam N, or N
samples); a selection ranks them and the corpus keeps the first ``keep``
distinct ones as training pairs:

* ``beam``: the teacher's own order (Seq-KD with keep 1; the N best as
  separate pairs, Multi-Hypothesis Distillation, with keep n);
* ``inter``: by a sentence-level utility against the gold target (Seq-Inter,
  Kim & Rush 2016: sentence BLEU);
* ``mbr``: by expected utility against the other candidates (MBR, Finkelstein
  et al. 2023; MBR-n, Wang et al. 2024)::

      U(c_i) = 1/(N-1) * sum_{j != i} u(c_i, ref=c_j)

  over candidate positions, so a candidate drawn twice counts as support for
  both copies (its copy contributes u(c, c) = 100 to the other); the
  candidate itself (j == i, always 100 for a non-empty one) is left out.

Ties break towards the earlier candidate (the better beam rank), so the
choice is deterministic.  The kept hypotheses are distinct (as piece
strings): the first ``keep`` distinct ones in ranked order; a source with
fewer distinct candidates keeps fewer.
"""
from fairseq_kd.errors import require

SELECTIONS = ("beam", "inter", "mbr")
UTILITIES = ("chrf", "bleu")
SAMPLINGS = ("topk", "topp")
# The utility each selection uses when --utility is not given.
DEFAULT_UTILITY = {"inter": "bleu", "mbr": "chrf"}
# Selection options as the command line defaults them: a run with these values
# records none of them in its settings, so chunk folders of earlier versions
# (which knew only --seq-inter) still resume.
DEFAULTS = {"select": "beam", "candidates": 0, "keep": 1, "sampling": None, "sampling_topk": 10,
            "sampling_topp": 0.9, "sampling_temperature": 1.0, "seed": 1, "utility": None}


def add_arguments(g):
    """The selection options of ``fairseq-kd corpus`` (argument group ``g``)."""
    d = DEFAULTS
    g.add_argument("--select", choices=SELECTIONS, default=d["select"],
                   help="how the candidates are ranked: beam (the teacher's order, default), inter "
                        "(utility against the gold target, Seq-Inter) or mbr (expected utility against "
                        "the other candidates)")
    g.add_argument("--candidates", type=int, default=d["candidates"], metavar="N",
                   help="candidates per source: the N-best list of beam N, or N samples with --sampling "
                        "(default: 0, the --beam best)")
    g.add_argument("--keep", type=int, default=d["keep"], metavar="n",
                   help="distinct candidates kept per source, each a training pair with the source "
                        "repeated (default: 1)")
    g.add_argument("--utility", choices=UTILITIES, default=d["utility"],
                   help="sentence-level utility of inter and mbr: chrf (fastchrf) or bleu (sacrebleu) "
                        "(default: bleu for inter, chrf for mbr)")
    g.add_argument("--seq-inter", type=int, default=0, metavar="N",
                   help="Seq-Inter, the same as --select inter --candidates N: decode the N best (beam N) "
                        "and keep the one with the highest sentence BLEU against the gold target "
                        "(default: 0, off)")
    g.add_argument("--sampling", choices=SAMPLINGS, default=d["sampling"],
                   help="draw the N candidates by sampling instead of beam search: topk or topp "
                        "(nucleus); default: none (the N-best list)")
    g.add_argument("--sampling-topk", type=int, default=d["sampling_topk"], metavar="K",
                   help="--sampling topk: sample among the K most likely tokens (default: 10)")
    g.add_argument("--sampling-topp", type=float, default=d["sampling_topp"], metavar="P",
                   help="--sampling topp: sample among the most likely tokens of total probability P "
                        "(default: 0.9)")
    g.add_argument("--sampling-temperature", type=float, default=d["sampling_temperature"], metavar="T",
                   help="--sampling: divide the logits by T (default: 1)")
    g.add_argument("--seed", type=int, default=d["seed"], help="--sampling: random seed (default: 1)")


def resolve(args):
    """Check the selection options and fold the --seq-inter alias into them (in ``args``)."""
    require(args.seq_inter >= 0, f"--seq-inter must be >= 0, got {args.seq_inter}")
    if args.seq_inter:
        require(args.select in ("beam", "inter") and args.candidates in (0, args.seq_inter),
                "--seq-inter N is --select inter --candidates N: give one or the other")
        args.select, args.candidates = "inter", args.seq_inter
    require(args.candidates >= 0, f"--candidates must be >= 0, got {args.candidates}")
    require(args.keep >= 1, f"--keep must be >= 1, got {args.keep}")
    if args.sampling:
        require(args.candidates >= 1, "--sampling needs --candidates N (the number of samples)")
        require(args.sampling_temperature > 0, "--sampling-temperature must be > 0")
        if args.sampling == "topk":
            require(args.sampling_topk >= 1, f"--sampling-topk must be >= 1, got {args.sampling_topk}")
        else:
            require(0 < args.sampling_topp <= 1, f"--sampling-topp must be in (0, 1], got {args.sampling_topp}")
    n = candidate_count(args)
    require(args.keep <= n, f"--keep {args.keep} exceeds the {n} candidates per source "
            "(--candidates, or --beam without it)")
    if args.select == "beam":
        require(args.utility is None, "--utility applies to --select inter or mbr")
    if args.select == "mbr":
        require(n >= 2, "--select mbr compares candidates with each other: give --candidates N >= 2")
    if args.select == "inter":
        # the alias's spelling, so that saved settings and earlier chunk folders agree
        args.seq_inter = n


def candidate_count(args):
    """N: the candidates per source (--candidates, or --beam when it is 0)."""
    return args.candidates or args.beam


def utility_name(args):
    return args.utility or DEFAULT_UTILITY.get(args.select)


def decodes_nbest(args):
    """True when the selection needs more than the beam's best (an N-best list or samples)."""
    return bool(args.sampling or args.seq_inter) or args.select != "beam" or args.keep > 1


def decoding(args):
    """(beam, nbest) the teacher decodes with: beam N, its best only where nothing else is needed.

    Sampling draws ``nbest`` samples, one per beam (fairseq's convention).
    """
    n = candidate_count(args)
    return n, (n if decodes_nbest(args) else 1)


def saved_settings(args):
    """The selection options that differ from their defaults, as a resumed run must repeat them.

    Inter is saved as --seq-inter (in the general settings) as earlier
    versions saved it; options that do not apply (sampling ones without
    --sampling, the utility of beam) are left out.
    """
    current = {k: getattr(args, k) for k in DEFAULTS}
    current["utility"] = utility_name(args)
    if args.select == "inter":
        current.update(select=DEFAULTS["select"], candidates=DEFAULTS["candidates"])
        if current["utility"] == DEFAULT_UTILITY["inter"]:
            current["utility"] = None
    if not args.sampling:
        for k in ("sampling_topk", "sampling_topp", "sampling_temperature", "seed"):
            current[k] = DEFAULTS[k]
    elif args.sampling == "topk":
        current["sampling_topp"] = DEFAULTS["sampling_topp"]
    else:
        current["sampling_topk"] = DEFAULTS["sampling_topk"]
    return {k: v for k, v in current.items() if v != DEFAULTS[k]}


def describe(args):
    """What the candidates are and how they are chosen, in words (report and last line printed)."""
    n = candidate_count(args)
    if not decodes_nbest(args):
        return f"the best of beam {n}"
    if args.sampling == "topk":
        source = f"{n} samples (top-k {args.sampling_topk}, temperature {args.sampling_temperature})"
    elif args.sampling == "topp":
        source = f"{n} samples (top-p {args.sampling_topp}, temperature {args.sampling_temperature})"
    else:
        source = f"the {n}-best of beam {n}"
    utility = utility_name(args)
    how = {"beam": "in the teacher's order", "inter": f"ranked by {utility} against the gold target",
           "mbr": f"ranked by expected {utility} (MBR)"}[args.select]
    return f"{source} {how}, keep {args.keep}"


# ---------------------------------------------------------------- utilities
def chrf_matrix(texts):
    """M[i][j] = sentence chrF of texts[i] against the reference texts[j] (sacrebleu's chrF, 0-100)."""
    import fastchrf

    return fastchrf.pairwise_chrf([texts], [texts])[0]


def bleu_matrix(texts):
    """M[i][j] = sentence BLEU of texts[i] against the reference texts[j] (sacrebleu, 0-100)."""
    import sacrebleu

    return [[sacrebleu.sentence_bleu(h, [r]).score for r in texts] for h in texts]


MATRICES = {"chrf": chrf_matrix, "bleu": bleu_matrix}


def against_reference(texts, reference, utility):
    """Utility of each text against one reference (Seq-Inter's gold target)."""
    import sacrebleu

    if utility == "chrf":
        return [sacrebleu.sentence_chrf(t, [reference]).score for t in texts]
    return [sacrebleu.sentence_bleu(t, [reference]).score for t in texts]


def expected_utilities(matrix):
    """U(c_i) = mean over j != i of matrix[i][j]: each candidate's support from the others."""
    n = len(matrix)
    if n < 2:
        return [0.0] * n
    return [(sum(row) - row[i]) / (n - 1) for i, row in enumerate(matrix)]


def ranked(values):
    """Candidate indices by decreasing value; ties towards the earlier candidate."""
    return sorted(range(len(values)), key=lambda k: (-values[k], k))


def first_distinct(order, hypotheses, n):
    """The first n indices of ``order`` whose hypotheses differ from those already taken."""
    seen, kept = set(), []
    for k in order:
        if hypotheses[k] not in seen:
            seen.add(hypotheses[k])
            kept.append(k)
            if len(kept) == n:
                break
    return kept


class Selector:
    """Chooses the kept candidates of one source: ``select(pieces, texts, reference)``."""

    def __init__(self, args):
        self.method, self.keep, self.utility = args.select, args.keep, utility_name(args)

    def select(self, pieces, texts, reference=None):
        """Indices of the kept candidates, best first.

        ``pieces``: the candidates as written (what must be distinct);
        ``texts``: the same after --post-process (what the utility compares);
        ``reference``: the gold target's text (inter only).
        """
        if self.method == "beam" or len(pieces) == 1:
            order = range(len(pieces))
        elif self.method == "inter":
            order = ranked(against_reference(texts, reference, self.utility))
        else:
            order = ranked(expected_utilities(MATRICES[self.utility](texts)))
        return first_distinct(order, pieces, self.keep)

