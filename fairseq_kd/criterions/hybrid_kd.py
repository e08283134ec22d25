"""``hybrid_kd``: gated token- and sentence-level KD (Wei et al. 2024).

For each sentence i of a batch, with gold target y, the teacher's translation
y_hat (``--distilled-data``) and a gate g_i in [0, 1]:

    L_tok_i  = (1 - alpha) * LS-NLL(y_i) + alpha * T^2 * sum_j KL(q_T || p_T)   (word_kd on gold prefixes)
    L_sent_i = LS-NLL(y_hat_i)                                                   (sequence-level KD)
    L        = sum_i g_i * L_tok_i + (1 - g_i) * L_sent_i

(alpha defaults to 1: pure word-level KD; label smoothing defaults to 0, so
L_sent is the plain NLL of y_hat).  Both terms are sums over their own
target tokens (L_tok over gold tokens, L_sent over distilled tokens) and the
trainer divides L by ``sample_size``, the number of *gold* target tokens (or
sentences with --sentence-avg): per distilled token, L_sent weighs
``(1 - g) * |y_hat| / |y|``, so a teacher that translates shorter than the
references gives the sentence-level term a little less weight.  Kept so on
purpose: every fairseq_kd term is a sum divided by one ``sample_size``,
which keeps --update-freq and multi-GPU accumulation exact; a per-batch
division by the distilled token count would weigh micro-batches unequally.
The logged ``sent_loss`` is per gold token like ``loss``.

Gates (``--gate``)
------------------
``complexity`` (default): Wei et al.'s hypothesis, per sentence.  Token-level
KD suits simple cases, sentence-level KD complex ones, so

    g_i = sigmoid(level - spread * tanh(z_i)),   z_i = (c_i - mean c) / std c

where c_i is the sentence's complexity (``--gate-complexity``), standardized
by running statistics over training sentences (each sentence weighs the
same, see below), ``spread`` is ``--gate-complexity-spread`` and ``level``
the learned level of the scalar gate below.  A sentence more complex than
average gets less token-level and more sentence-level KD.  Complexity
measures (both available at training time, both computed without gradient):

* ``teacher_entropy`` (default): the mean entropy of the teacher's T = 1
  distribution over the gold target's positions.  A high entropy says the
  teacher finds several continuations plausible: word-level KD then hands
  the student a blend of modes at every position, while the teacher's
  translation commits to one mode, which is the case sequence-level KD is
  argued for (Kim & Rush 2016; a multi-modal target is "harder text" in Wei
  et al.'s sense).  It needs the teacher (or its cache, below), which
  word-level KD uses anyway.
* ``source_length``: the number of source tokens; longer sentences are harder
  to translate and to decode (Wei et al.'s "harder decoding"), and the
  measure needs no teacher.  fairseq batches sentences of similar lengths, so
  the standardization uses running statistics over updates, never the batch.

The statistics are decayed sums over sentences, ``n``, ``sum c`` and
``sum c^2`` (each multiplied by ``--gate-scale-decay`` per update), divided
when used: every sentence weighs the same within an update, however many
short sentences share its batch (a running mean of per-update means would
weigh each sentence by 1 / (sentences in its update) and overrate long
sentences).  Until ``--gate-complexity-warmup`` sentences (default 2000) have
been seen the offsets are 0 and every gate is at the level: the first
updates are a few length buckets, whose spread says nothing of the corpus's
(after one bucket the std is about 0 and every z would be huge).

``scalar``: one learned g = sigmoid(level), the paper's learnable parameter.
``relative_loss``: g_i = sigmoid(a . mean-pooled encoder states of x_i + b),
learned from each sentence's losses relative to their running means (see
below): it gives a sentence more token-level KD when it is relatively harder
at sentence level, the *opposite* of Wei et al.'s hypothesis; a diagnostic.
``fixed``: g = --gate-value (0.5: both terms equally).  1 gives the value of
``word_kd --kd-alpha 1`` and 0 that of seq-KD, but only without dropout: the
student still runs once over 2B rows, so it draws other dropout masks and
costs about twice as much; train those two with ``word_kd`` / seq-KD.

Validation
----------
fairseq's ``checkpoint_best.pt`` and ``--patience`` compare validation
losses across epochs, so in validation (``not self.training``) every gate
is one fixed mixture: g = ``--gate-prior`` for every sentence (``--gate
fixed``: ``--gate-value``).  The learned level, the loss references and the
complexity statistics move during training; with them the same student
would score differently from one validation to the next.

Why the learned gates have their own objective
----------------------------------------------
If g were learned by minimising L itself, dL/dg_i = L_tok_i - L_sent_i: the
gate would run to whichever term is numerically smaller, to the units of
the two losses as much as to what suits the sentence; and because L is
linear in g, always to 0 or 1.  Instead:

1. the student is trained on L with g *detached*: the gate is not a way for
   the student to lower its loss;
2. the gate minimises the mixed loss with each term divided by a reference
   of its own, plus a prior:

       J_i = g_i * r_tok_i + (1 - g_i) * r_sent_i + lambda * KL(Bern(g_i) || Bern(--gate-prior))

   where r is the sentence's per-token loss divided by the reference, so
   multiplying either term by a constant changes nothing for the gate.  J
   has a single minimum in the gate's logit (it is quasi-convex, not convex:
   its second derivative is negative far from the minimum), at
   sigmoid(logit(prior) + (r_sent_i - r_tok_i) / lambda): more weight on the
   term with the lower ratio, never all-or-nothing;
3. the reference.  ``scalar`` and ``complexity``: the term's per-token value
   at the first update (the untrained student), frozen, so r is the fraction
   of the term's first-update value still left, and the level moves toward
   the term that has fallen more relative to its start.  That includes the
   terms' floors: a KL that can reach 0 ends with a lower r than an NLL
   that cannot, even when both learn equally fast, so the gate drifts
   toward token-level KD for that reason too; the division removes a
   term's units, not its floor.  (Dividing each term by its own *running*
   mean, as this gate once did, makes both r about 1 on average: a scalar
   gate then cannot leave the prior.)  ``relative_loss``: the running mean
   of each term, so the gate sees only which sentences are relatively harder
   for which term;
4. bounds.  The learned level is ``logit(prior) + --gate-level-range *
   tanh(w)``, the complexity offset is within +-spread: with the defaults
   (prior 0.5, range 1, spread 1) every g_i of the complexity gate lies in
   [0.119, 0.881] and the scalar gate in [0.269, 0.731].  The optimizer
   bounds it further: under the Bible recipe's schedule (Adam, lr 1e-3,
   inverse_sqrt with 1,000 warm-up updates, 1,600 updates) the level moves
   at most 0.77 logits (docs/hybrid_kd.md).

The references, running means and complexity statistics are float32 buffers
of this criterion (also under --fp16/--bf16, see ``_apply``), updated once
per update from the logging outputs fairseq has summed over micro-batches and
ranks (``on_update``, see ``fairseq_kd.contract``), hence identical on every rank,
exact under ``--update-freq``, saved in checkpoints (every learned gate has a
parameter, so fairseq's trainer saves the criterion's state) and restored on
resume.  Until the first update has set the references the gate objective is
zero (the gate waits one update); the complexity offsets wait for the
warm-up.  The gate objective adds zero to the reported loss (it enters as
``J - J.detach()``): ``loss`` is L.

Teacher cache: the teacher is used on the gold prefixes only (the KL of
L_tok and ``teacher_entropy``), so ``--teacher-cache DIR`` built by
``fairseq-kd cache-teacher`` over the gold DATA folder replaces it; the
distilled targets need no teacher.  The cache is looked up by the batch's
``id`` and gold ``target`` (``sample["distilled"]`` is never read), and a
cache built over the ``--distilled-data`` folder is refused at start-up.
With the cache's top k, the complexity is the entropy of the renormalised
top k (the same as the online teacher with ``--kd-topk k``; with
``--kd-topk 0`` the online teacher gives the full-vocabulary entropy, which
a cache cannot), and a cached run equals an online run with the same
``--kd-topk`` (tests/test_teacher_cache_distilled.py).

DDP: the student runs once, on gold and distilled targets stacked along the
batch dimension (``model(**net_input)`` with 2B rows; causal self-attention
makes right-padding the shorter targets harmless), so DDP sees one forward
and one backward per step.  The encoder thus runs twice on each source; the
decoder on both targets, as the method requires.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from fairseq.criterions import register_criterion
from fairseq.dataclass import ChoiceEnum
from fairseq.logging import metrics

from fairseq_kd.capture import CaptureSpec, capture
from fairseq_kd.contract import require_kd_task
from fairseq_kd.criterions.kd_base import KDCriterionBase, WordKDOptions, check_unit_interval
from fairseq_kd.errors import require
from fairseq_kd.hidden_states import unwrap_model
from fairseq_kd.losses import (
    complexity_moments,
    complexity_offsets,
    gate_objective,
    hybrid_mix,
    hybrid_sentence_losses,
    sentence_means,
    standardized,
    teacher_entropy_rows,
)

GATE_CHOICES = ChoiceEnum(["complexity", "scalar", "relative_loss", "fixed"])
COMPLEXITY_CHOICES = ChoiceEnum(["teacher_entropy", "source_length"])
# gates with a learned level trained against frozen first-update references
LEVEL_GATES = ("scalar", "complexity")


@dataclass
class HybridKDConfig(WordKDOptions):
    kd_alpha: float = field(
        default=1.0,
        metadata={"help": "inside L_tok: weight of the word-level KD term (the gold "
                  "label-smoothed NLL gets 1 - alpha); 1 = pure word-level KD"},
    )
    gate: GATE_CHOICES = field(
        default="complexity",
        metadata={"help": "complexity: g_i per sentence, lower (more sentence-level KD) the "
                  "more complex the sentence (--gate-complexity), around a learned level; "
                  "scalar: one learned g; relative_loss: g_i from the pooled encoder, learned "
                  "from relative losses (a diagnostic, against Wei et al.'s hypothesis); "
                  "fixed: g = --gate-value. Validation uses a fixed mixture: g = --gate-prior "
                  "(fixed: --gate-value) for every sentence, whatever the gate has learned. "
                  "L_tok is summed over gold tokens, L_sent over "
                  "distilled tokens, both divided by the gold token count (sample_size)"},
    )
    gate_value: float = field(
        default=0.5,
        metadata={"help": "g of --gate fixed, in [0, 1]; 1 (0) gives word_kd's (seq-KD's) loss only "
                  "without dropout: the student runs over 2B rows (other dropout masks, about "
                  "twice the cost)"},
    )
    gate_complexity: COMPLEXITY_CHOICES = field(
        default="teacher_entropy",
        metadata={"help": "complexity of a sentence for --gate complexity: teacher_entropy "
                  "(mean entropy of the teacher on the gold target's positions; of its "
                  "renormalised top k with --kd-topk k, as from a --teacher-cache) or "
                  "source_length (source tokens, no teacher)"},
    )
    gate_complexity_spread: float = field(
        default=1.0,
        metadata={"help": "--gate complexity: logits a sentence's gate moves with its "
                  "complexity, at most, each way (spread * tanh(standardized complexity))"},
    )
    gate_complexity_warmup: int = field(
        default=2000,
        metadata={"help": "--gate complexity: training sentences the running statistics must have "
                  "seen before they standardize; until then every offset is 0 (the gate at its "
                  "level): fairseq batches by length, so the first updates are a few length buckets"},
    )
    gate_level_range: float = field(
        default=1.0,
        metadata={"help": "logits the learned level of --gate scalar/complexity may move "
                  "away from logit(--gate-prior), at most (range * tanh(w))"},
    )
    gate_prior: float = field(
        default=0.5,
        metadata={"help": "prior mean of a learned gate, in (0, 1); also its initial value, and the "
                  "fixed g of every learned gate in validation"},
    )
    gate_prior_weight: float = field(
        default=0.5,
        metadata={"help": "weight lambda > 0 of the prior KL in the gate's objective: a "
                  "difference d of the two relative losses (each divided by its reference) moves "
                  "the gate's logit by d / lambda"},
    )
    gate_scale_decay: float = field(
        default=0.99,
        metadata={"help": "decay per update of the running statistics of the learned gates "
                  "(relative_loss: the loss means; complexity: the per-sentence sums of c and "
                  "c^2 and the sentence count), in [0, 1)"},
    )


def pad_right(tokens, length, pad):
    return F.pad(tokens, (0, length - tokens.size(1)), value=pad)


def stacked_net_input(net_input, hyp_prev, pad):
    """net_input for one student pass over gold and distilled prefixes: 2B rows."""
    gold_prev = net_input["prev_output_tokens"]
    length = max(gold_prev.size(1), hyp_prev.size(1))
    stacked = dict(net_input)
    stacked["src_tokens"] = net_input["src_tokens"].repeat(2, 1)
    stacked["src_lengths"] = net_input["src_lengths"].repeat(2)
    stacked["prev_output_tokens"] = torch.cat(
        [pad_right(gold_prev, length, pad), pad_right(hyp_prev, length, pad)])
    return stacked


def mean_pooled_encoder_states(encoder_out, batch_size):
    """Mean of the encoder's last-layer states over each source's non-pad tokens, (B, C)."""
    states = encoder_out["encoder_out"][0][:, :batch_size]  # S x B x C
    masks = encoder_out.get("encoder_padding_mask") or []
    if masks and masks[0] is not None and masks[0].numel():
        keep = (~masks[0][:batch_size]).t().unsqueeze(-1).to(states.dtype)
    else:
        keep = states.new_ones(states.shape[:2] + (1,))
    return (states * keep).sum(0) / keep.sum(0).clamp(min=1)


class LevelGate(nn.Module):
    """Gate logits ``logit(prior) + range * tanh(w) + offsets``: one learned, bounded level."""

    def __init__(self, init_logit, level_range):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.init_logit, self.level_range = float(init_logit), float(level_range)

    def level(self):
        # gate maths in float32 whatever the criterion's dtype (fp16 params are upcast)
        return self.init_logit + self.level_range * torch.tanh(self.weight.float())

    def forward(self, offsets):
        return self.level() + offsets


class SentenceGate(nn.Module):
    """g_i = sigmoid(a . pooled_i + b); a starts at 0, so every g_i starts at the prior."""

    def __init__(self, dim, init_logit):
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, float(init_logit))

    def forward(self, pooled):
        return F.linear(pooled.float(), self.proj.weight.float(), self.proj.bias.float()).squeeze(-1)


def student_encoder_dim(cfg):
    dim = getattr(cfg, "encoder_embed_dim", None)
    if dim is None and getattr(cfg, "encoder", None) is not None:
        dim = getattr(cfg.encoder, "embed_dim", None)
    require(dim is not None, "--gate relative_loss: cannot find the student's encoder_embed_dim")
    return int(dim)


@register_criterion("hybrid_kd", dataclass=HybridKDConfig)
class HybridKDCriterion(KDCriterionBase):
    """Keeps its own ``forward``; the base's options, logging and word-KD maths.

    The base skeleton sums terms that are each one value per batch, with one
    weight per term; here the two terms are per-sentence vectors mixed by a
    per-sentence gate, come from one student pass over 2B rows (gold and
    distilled prefixes), and the gate adds its own objective.  Squeezing that
    into ``extra_terms`` would mean a second student pass or a word part that
    is not the loss.  So ``forward`` is its own, built from the base's parts:
    the options and their checks (``__init__``), the same fused per-token
    function as every word part (:func:`fairseq_kd.losses.hybrid_sentence_losses`
    over :func:`fairseq_kd.losses.token_losses`, mixed by
    :func:`fairseq_kd.losses.mix_word_kd`), ``sample_size``,
    ``logging_output``, ``add_accuracy`` and ``reduce_metrics``.
    """

    LOSS_TERMS = ("tok_loss", "sent_loss", "kd_loss")  # kd_loss: the KL inside L_tok, as word_kd's
    # tok_scale/sent_scale: what the gate divides each term by; complexity_*: its running statistics
    MEAN_STATS = ("gate_level", "tok_scale", "sent_scale", "complexity_mean", "complexity_std")
    FLOAT32_BUFFERS = ("loss_scales", "complexity_stats")

    def __init__(self, task, sentence_avg, label_smoothing, kd_alpha, kd_temperature, kd_topk,
                 gate, gate_value, gate_complexity, gate_complexity_spread, gate_level_range,
                 gate_prior, gate_prior_weight, gate_scale_decay, gate_complexity_warmup=2000,
                 ignore_prefix_size=0, report_accuracy=False):
        check_unit_interval("--gate-value", gate_value)
        require(0.0 < gate_prior < 1.0, f"--gate-prior must be in (0, 1), got {gate_prior}")
        require(gate_prior_weight > 0, f"--gate-prior-weight must be > 0, got {gate_prior_weight}")
        require(0.0 <= gate_scale_decay < 1.0,
                f"--gate-scale-decay must be in [0, 1), got {gate_scale_decay}")
        require(gate_complexity_spread >= 0,
                f"--gate-complexity-spread must be >= 0, got {gate_complexity_spread}")
        require(gate_level_range >= 0, f"--gate-level-range must be >= 0, got {gate_level_range}")
        require(gate_complexity_warmup >= 0,
                f"--gate-complexity-warmup must be >= 0, got {gate_complexity_warmup}")
        gate, gate_complexity = str(gate), str(gate_complexity)
        uses_tok = not (gate == "fixed" and gate_value == 0.0)
        kd_in_tok = uses_tok and kd_alpha > 0
        entropy_gate = gate == "complexity" and gate_complexity == "teacher_entropy"
        super().__init__(task, sentence_avg, label_smoothing, kd_alpha, kd_temperature, kd_topk,
                         ignore_prefix_size, report_accuracy, needs_teacher=kd_in_tok or entropy_gate)
        require_kd_task(task, "hybrid_kd", needs_teacher=False)
        require(task.distilled_data,
                "hybrid_kd needs the teacher's translations of the training sources: pass "
                "--distilled-data DIR (a corpus built by fairseq-kd corpus)")
        self.gate_kind, self.gate_value = gate, gate_value
        self.complexity_kind, self.complexity_spread = gate_complexity, gate_complexity_spread
        self.complexity_warmup = int(gate_complexity_warmup)
        self.prior, self.prior_weight, self.scale_decay = gate_prior, gate_prior_weight, gate_scale_decay
        self.kd_in_tok = kd_in_tok  # the KL term of L_tok is computed (the teacher may run for the gate only)
        init_logit = math.log(gate_prior / (1.0 - gate_prior))
        if gate in LEVEL_GATES:
            self.gate = LevelGate(init_logit, gate_level_range)
        elif gate == "relative_loss":
            self.gate = SentenceGate(student_encoder_dim(task.student_cfg), init_logit)
        else:
            self.gate = None
        if self.gate is not None:
            # per-token references of L_tok and L_sent (see module docstring, 3.)
            self.register_buffer("loss_scales", torch.zeros(2))
            self.register_buffer("scale_updates", torch.zeros((), dtype=torch.long))
        if gate == "complexity":
            # decayed sums over sentences [n, sum c, sum c^2] and the sentences seen (for the warm-up)
            self.register_buffer("complexity_stats", torch.zeros(3))
            self.register_buffer("complexity_seen", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint from before per-sentence sums restarts the complexity statistics.

        It holds ``complexity_stats = [mean, mean of squares]`` of per-update
        means, weighted per update and without a count: nothing to convert, so
        the statistics start again (with their warm-up), the rest is restored.
        """
        stats_key, seen_key = prefix + "complexity_stats", prefix + "complexity_seen"
        if self.gate_kind == "complexity" and state_dict.get(stats_key, self.complexity_stats).numel() == 2:
            state_dict[stats_key] = torch.zeros_like(self.complexity_stats)
            state_dict.setdefault(seen_key, torch.zeros_like(self.complexity_seen))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        """Module casts move the running statistics but keep them float32.

        fairseq's trainer casts the whole criterion under --fp16/--bf16; the
        running means are updated by ``(1 - decay) * (current - mean)``, about
        1% of the mean, which is below half a bfloat16 step (and close to a
        float16 one): cast, they would stop moving.
        """
        kept = {k: self._buffers[k] for k in self.FLOAT32_BUFFERS if self._buffers.get(k) is not None}
        super()._apply(fn, *args, **kwargs)
        for key, value in kept.items():
            self._buffers[key] = value.to(device=self._buffers[key].device, dtype=torch.float32)
        return self

    # -- the student's single forward pass ---------------------------------
    def student_forward(self, model, sample):
        """(net_output over B or 2B rows, distilled batch or None, pooled encoder states or None)."""
        hyp = sample.get("distilled")
        net_input = sample["net_input"]
        if hyp is None:
            # a split without distilled targets (validation): gold serves as y_hat
            require(not self.training, "hybrid_kd: a training batch has no distilled targets; "
                    "check that --distilled-data holds the training split")
        else:
            net_input = stacked_net_input(net_input, hyp["prev_output_tokens"], self.padding_idx)
        if self.gate_kind != "relative_loss" or not self.training:  # validation: no learned gate
            return model(**net_input), hyp, None
        with capture(model, CaptureSpec(encoder_out=True)) as seen:
            net_output = model(**net_input)
        # the gate reads the encoder but must not train it
        pooled = mean_pooled_encoder_states(seen.encoder_out, sample["target"].size(0)).detach()
        return net_output, hyp, pooled

    # -- the gate --------------------------------------------------------------
    def sentence_complexity(self, sample, teacher):
        """c_i of every sentence (``--gate-complexity``), float32, (B,), no gradient."""
        if self.complexity_kind == "source_length":
            src = sample["net_input"]["src_tokens"]
            return src.ne(self.padding_idx).sum(1).float()
        target = sample["target"]
        entropy = teacher_entropy_rows(teacher).float().view(target.shape)
        return sentence_means(entropy, target.ne(self.padding_idx))

    def complexity_z(self, complexity):
        """Standardized complexity by the running statistics; 0 until the warm-up is over."""
        if int(self.complexity_seen) < max(self.complexity_warmup, 1):
            return torch.zeros_like(complexity)
        mean, mean_sq = complexity_moments(self.complexity_stats.float().to(complexity.device))
        return standardized(complexity, mean, mean_sq)

    def gate_logits(self, pooled, complexity, batch_size, device):
        """Logits of the learned gate per sentence, (B,) float32; None for --gate fixed."""
        if self.gate_kind == "relative_loss":
            return self.gate(pooled)
        if self.gate_kind == "scalar":
            return self.gate(torch.zeros(batch_size, device=device))
        if self.gate_kind == "complexity":
            return self.gate(complexity_offsets(self.complexity_z(complexity), self.complexity_spread))
        return None

    def fixed_gate_value(self):
        """g when no learned gate applies: --gate-value for ``fixed``; in validation, for the
        learned gates, --gate-prior, so the validation loss moves with the student only."""
        return self.gate_value if self.gate is None else self.prior

    def forward(self, model, sample, reduce=True):
        learned = self.gate is not None and self.training
        complexity_needed = learned and self.gate_kind == "complexity"
        net_output, hyp, pooled = self.student_forward(model, sample)
        batch_size, gold_len = sample["target"].shape
        logits, extra = net_output[0], net_output[1]
        gold_output = (logits[:batch_size, :gold_len], extra)  # for --report-accuracy
        # without distilled targets (validation) gold stands for y_hat
        hyp_target = None if hyp is None else hyp["target"]
        hyp_ntokens = sample["ntokens"] if hyp is None else hyp["ntokens"]

        entropy_needed = complexity_needed and self.complexity_kind == "teacher_entropy"
        teacher = (self.task.teacher.distribution(sample, self.topk, like=model)
                   if self.kd_in_tok or entropy_needed else None)
        # every term from the logits by one fused per-row function: no B x T x V log-probs kept
        tok, sent, nll, kd = hybrid_sentence_losses(
            logits, sample["target"], hyp_target, teacher if self.kd_in_tok else None,
            self.padding_idx, self.alpha if self.kd_in_tok else 0.0, self.temperature, self.eps,
        )

        complexity = self.sentence_complexity(sample, teacher) if complexity_needed else None
        z = self.gate_logits(pooled, complexity, batch_size, tok.device) if learned else None
        gate = torch.full_like(tok, self.fixed_gate_value()) if z is None else torch.sigmoid(z)
        loss = hybrid_mix(gate.detach(), tok, sent)
        if z is not None:
            j = self.gate_objective(z, tok, sent, sample["target"],
                                    sample["target"] if hyp is None else hyp_target)
            loss = loss + (j - j.detach())  # gradient for the gate only, adds 0 to the value

        sample_size = self.sample_size(sample)
        g = gate.detach()
        terms = {"kd_loss": kd.sum()} if self.kd_in_tok else {}
        if complexity is not None:
            c = complexity.double()
            terms.update(complexity_sum=c.sum(), complexity_sqsum=(c * c).sum())
        logging_output = self.logging_output(
            sample, loss, nll.sum(), sample_size, self.gate_stats() if self.gate is not None else None,
            tok_loss=tok.sum(), sent_loss=sent.sum(), hyp_ntokens=hyp_ntokens, gate_n=batch_size,
            gate_sum=g.sum(), gate_sqsum=(g * g).sum(), **terms,
        )
        self.add_accuracy(logging_output, model, gold_output, sample)
        return loss, sample_size, logging_output

    def gate_stats(self):
        """What the learned gate uses now, for the log (losses in bits per token, as fairseq's)."""
        tok_scale, sent_scale = (self.loss_scales.float() / math.log(2)).tolist()
        stats = {"tok_scale": tok_scale, "sent_scale": sent_scale}
        if self.gate_kind in LEVEL_GATES:
            stats["gate_level"] = torch.sigmoid(self.gate.level().detach()).item()
        if self.gate_kind == "complexity":
            mean, mean_sq = (float(v) for v in complexity_moments(self.complexity_stats.double()))
            stats.update(complexity_mean=mean, complexity_std=math.sqrt(max(mean_sq - mean * mean, 0.0)))
        return stats

    # -- the gate's own objective ------------------------------------------
    def gate_objective(self, gate_logits, tok, sent, gold_target, hyp_target):
        """sum_i w_i * J_i (:func:`fairseq_kd.losses.gate_objective`), 0 until scales exist.

        w_i is sentence i's share of ``sample_size`` (its gold tokens, or 1
        with --sentence-avg), so the trainer's division by sample_size makes
        the gate's gradient an average over tokens (sentences) like L's.
        """
        n_tok = gold_target.ne(self.padding_idx).sum(1).clamp(min=1).float()
        n_hyp = hyp_target.ne(self.padding_idx).sum(1).clamp(min=1).float()
        scales = self.loss_scales.float().clamp(min=1e-8)
        rel_tok = (tok.detach().float() / n_tok) / scales[0]
        rel_sent = (sent.detach().float() / n_hyp) / scales[1]
        per_sentence = gate_objective(gate_logits, rel_tok, rel_sent, self.prior, self.prior_weight)
        weights = torch.ones_like(n_tok) if self.sentence_avg else n_tok
        ready = (self.scale_updates > 0).float()  # multiply, not skip: DDP needs the gate in the graph
        return ready * (weights * per_sentence).sum()

    @torch.no_grad()
    def on_update(self, logging_outputs):
        """Fold one update into the gate's references and running statistics.

        The contract's per-update hook (``fairseq_kd.contract``): called with
        the logging outputs of a whole update (all micro-batches, all ranks).  ``relative_loss``:
        running means of the per-token L_tok and L_sent; ``scalar`` and
        ``complexity``: those of the first update, then frozen; ``complexity``:
        decayed sums of the sentences' complexity (:meth:`fold_complexity`).
        """
        if self.gate is None:
            return
        total = lambda key: float(sum(log.get(key, 0) for log in logging_outputs))  # noqa: E731
        ntok, nhyp, nsent = total("ntokens"), total("hyp_ntokens"), total("gate_n")
        if ntok <= 0 or nhyp <= 0 or nsent <= 0:
            return
        first = int(self.scale_updates) == 0
        # float64 until stored: E[c^2] - E[c]^2 must not drown in accumulated rounding
        losses = torch.tensor([total("tok_loss") / ntok, total("sent_loss") / nhyp], dtype=torch.float64)
        sums = torch.tensor([nsent, total("complexity_sum"), total("complexity_sqsum")], dtype=torch.float64)
        if not torch.isfinite(torch.cat([losses, sums])).all():
            return
        if first or self.gate_kind == "relative_loss":
            self.loss_scales.copy_(self.running(self.loss_scales, losses, first))
        if self.gate_kind == "complexity":
            self.fold_complexity(sums)
        self.scale_updates += 1

    def running(self, mean, current, first):
        if first:
            return current
        return self.scale_decay * mean.double().cpu() + (1 - self.scale_decay) * current

    def fold_complexity(self, update_sums):
        """Add an update's ``[sentences, sum c, sum c^2]`` to the decayed sums.

        Sums, not a running mean of each update's mean: every sentence weighs
        the same (``decay^age``), whatever the size of its length-bucketed
        batch; :func:`fairseq_kd.losses.complexity_moments` divides them.
        """
        sums = self.scale_decay * self.complexity_stats.double().cpu() + update_sums
        self.complexity_stats.copy_(sums)
        self.complexity_seen += int(update_sums[0])
    # -- metrics -------------------------------------------------------------
    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        total = lambda key: sum(log.get(key, 0) for log in logging_outputs)  # noqa: E731
        n = total("gate_n")
        if not n:
            return
        metrics.log_scalar("_gate_n", n)
        metrics.log_scalar("_gate_sum", total("gate_sum"))
        metrics.log_scalar("_gate_sqsum", total("gate_sqsum"))
        metrics.log_derived("gate", gate_mean, priority=210)
        metrics.log_derived("gate_std", gate_std, priority=211)


def gate_mean(meters):
    return round(float(meters["_gate_sum"].sum / max(meters["_gate_n"].sum, 1)), 4)


def gate_std(meters):
    """Spread of the gate over the sentences logged (0 for scalar and fixed gates)."""
    n = max(meters["_gate_n"].sum, 1)
    mean = meters["_gate_sum"].sum / n
    return round(math.sqrt(max(float(meters["_gate_sqsum"].sum / n - mean * mean), 0.0)), 4)
