"""``hybrid_kd``: gated token- and sentence-level KD (Wei et al. 2024).

For each sentence i of a batch, with gold target y, the teacher's translation
y_hat (``--distilled-data``) and a gate g_i in [0, 1]:

    L_tok_i  = (1 - alpha) * LS-NLL(y_i) + alpha * T^2 * sum_j KL(q_T || p_T)   (word_kd on gold prefixes)
    L_sent_i = LS-NLL(y_hat_i)                                                   (sequence-level KD)
    L        = sum_i g_i * L_tok_i + (1 - g_i) * L_sent_i

(alpha defaults to 1: pure word-level KD; label smoothing defaults to 0, so
L_sent is the plain NLL of y_hat).  Gates: ``fixed`` (g = --gate-value),
``scalar`` (g = sigmoid(w), one learned parameter) and ``sentence``
(g_i = sigmoid(a . mean-pooled encoder states of x_i + b)).

Why the gate has its own objective
----------------------------------
If g were learned by minimising L itself, dL/dg_i = L_tok_i - L_sent_i: the
gate would run to whichever term is numerically smaller (a KL that can reach
0 versus an NLL that cannot), i.e. to the *units* of the two losses rather
than to what suits the sentence; and because L is linear in g, always to 0
or 1.  Our remedy combines three options (normalised terms, a separate
objective for the gate, a prior):

1. the student is trained on L with g *detached*: the gate is not a way for
   the student to lower its loss;
2. the gate minimises a separate objective on *unit-free* losses: each
   sentence's per-token loss divided by the running mean of that term's
   per-token loss, r_tok_i and r_sent_i (both about 1 on average), so
   multiplying either term by any constant changes nothing for the gate;
3. a prior KL(Bern(g_i) || Bern(--gate-prior)) weighted by
   --gate-prior-weight lambda makes the objective strictly convex, with
   minimiser g_i* = sigmoid(logit(prior) + (r_sent_i - r_tok_i) / lambda):
   a sentence gets more token-level KD when it is relatively harder to fit
   at sentence level than at token level, and vice versa, never all-or-nothing.
   This is the opposite of Wei et al.'s hypothesis (complex cases suit
   sentence-level KD): the gate is a diagnostic, not their method.

The running means are float32 buffers of this criterion (also under
--fp16/--bf16, see ``_apply``), updated once per update
from the logging outputs fairseq has summed over micro-batches and ranks
(``on_update``, see ``fairseq_kd.contract``), hence identical on every rank, exact
under ``--update-freq``, saved in checkpoints and restored on resume.  Until
the first update has set them the gate objective is zero (the gate waits one
update).  The gate objective adds zero to the reported loss (it enters as
``J - J.detach()``): ``loss`` is L.

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
from fairseq_kd.criterions.kd_base import (
    KDCriterionBase,
    WordKDOptions,
    check_unit_interval,
    check_word_kd_options,
)
from fairseq_kd.errors import require
from fairseq_kd.losses import gate_objective, hybrid_mix, hybrid_sentence_losses

GATE_CHOICES = ChoiceEnum(["sentence", "scalar", "fixed"])


@dataclass
class HybridKDConfig(WordKDOptions):
    kd_alpha: float = field(
        default=1.0,
        metadata={"help": "inside L_tok: weight of the word-level KD term (the gold "
                  "label-smoothed NLL gets 1 - alpha); 1 = pure word-level KD"},
    )
    gate: GATE_CHOICES = field(
        default="sentence",
        metadata={"help": "sentence: g per sentence from a linear layer on the mean-pooled "
                  "student encoder states; scalar: one learned g = sigmoid(w); "
                  "fixed: g = --gate-value"},
    )
    gate_value: float = field(
        default=0.5, metadata={"help": "g of --gate fixed, in [0, 1] (1 = word_kd, 0 = seq-KD)"},
    )
    gate_prior: float = field(
        default=0.5,
        metadata={"help": "prior mean of a learned gate, in (0, 1); also its initial value"},
    )
    gate_prior_weight: float = field(
        default=0.5,
        metadata={"help": "weight lambda > 0 of the prior KL in the gate's objective: a "
                  "relative loss difference d moves the gate's logit by d / lambda"},
    )
    gate_scale_decay: float = field(
        default=0.99,
        metadata={"help": "decay of the running means of the per-token losses that make "
                  "the gate's inputs unit-free, in [0, 1)"},
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


class ScalarGate(nn.Module):
    """g = sigmoid(w), the same for every sentence."""

    def __init__(self, init_logit):
        super().__init__()
        self.logit = nn.Parameter(torch.tensor(float(init_logit)))

    def forward(self, pooled, batch_size):
        return self.logit.float().expand(batch_size)


class SentenceGate(nn.Module):
    """g_i = sigmoid(a . pooled_i + b); a starts at 0, so every g_i starts at the prior."""

    def __init__(self, dim, init_logit):
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.constant_(self.proj.bias, float(init_logit))

    def forward(self, pooled, batch_size):
        # gate maths in float32 whatever the student's dtype (fp16 params are upcast)
        return F.linear(pooled.float(), self.proj.weight.float(), self.proj.bias.float()).squeeze(-1)


def student_encoder_dim(cfg):
    dim = getattr(cfg, "encoder_embed_dim", None)
    if dim is None and getattr(cfg, "encoder", None) is not None:
        dim = getattr(cfg.encoder, "embed_dim", None)
    require(dim is not None, "--gate sentence: cannot find the student's encoder_embed_dim")
    return int(dim)


@register_criterion("hybrid_kd", dataclass=HybridKDConfig)
class HybridKDCriterion(KDCriterionBase):
    LOSS_TERMS = ("tok_loss", "sent_loss", "kd_loss")  # kd_loss: the KL inside L_tok, as word_kd's
    MEAN_STATS = ("tok_scale", "sent_scale")  # the running means the gate divides by

    def __init__(self, task, sentence_avg, label_smoothing, kd_alpha, kd_temperature, kd_topk,
                 gate, gate_value, gate_prior, gate_prior_weight, gate_scale_decay,
                 ignore_prefix_size=0, report_accuracy=False):
        check_word_kd_options(kd_alpha, kd_temperature, kd_topk)
        check_unit_interval("--gate-value", gate_value)
        require(0.0 < gate_prior < 1.0, f"--gate-prior must be in (0, 1), got {gate_prior}")
        require(gate_prior_weight > 0, f"--gate-prior-weight must be > 0, got {gate_prior_weight}")
        require(0.0 <= gate_scale_decay < 1.0,
                f"--gate-scale-decay must be in [0, 1), got {gate_scale_decay}")
        gate = str(gate)
        uses_tok = not (gate == "fixed" and gate_value == 0.0)
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy,
                         needs_teacher=uses_tok and kd_alpha > 0)
        require_kd_task(task, "hybrid_kd", needs_teacher=False)
        require(task.distilled_data,
                "hybrid_kd needs the teacher's translations of the training sources: pass "
                "--distilled-data DIR (a corpus built by fairseq-kd corpus)")
        self.alpha, self.temperature, self.topk = kd_alpha, kd_temperature, kd_topk
        self.gate_kind, self.gate_value = gate, gate_value
        self.prior, self.prior_weight, self.scale_decay = gate_prior, gate_prior_weight, gate_scale_decay
        self.uses_teacher = uses_tok and kd_alpha > 0
        init_logit = math.log(gate_prior / (1.0 - gate_prior))
        if gate == "scalar":
            self.gate = ScalarGate(init_logit)
        elif gate == "sentence":
            self.gate = SentenceGate(student_encoder_dim(task.student_cfg), init_logit)
        else:
            self.gate = None
        if self.gate is not None:
            # running means of the per-token L_tok and L_sent (see module docstring)
            self.register_buffer("loss_scales", torch.zeros(2))
            self.register_buffer("scale_updates", torch.zeros((), dtype=torch.long))

    def _apply(self, fn, *args, **kwargs):
        """Module casts move ``loss_scales`` but keep it float32.

        fairseq's trainer casts the whole criterion under --fp16/--bf16; the
        running means are updated by ``(1 - decay) * (current - mean)``, about
        1% of the mean, which is below half a bfloat16 step (and close to a
        float16 one): cast, they would stop moving.
        """
        scales = self._buffers.get("loss_scales")
        super()._apply(fn, *args, **kwargs)
        if scales is not None:
            moved = self._buffers["loss_scales"]
            self._buffers["loss_scales"] = scales.to(device=moved.device, dtype=torch.float32)
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
        if self.gate_kind != "sentence":
            return model(**net_input), hyp, None
        with capture(model, CaptureSpec(encoder_out=True)) as seen:
            net_output = model(**net_input)
        # the gate reads the encoder but must not train it
        pooled = mean_pooled_encoder_states(seen.encoder_out, sample["target"].size(0)).detach()
        return net_output, hyp, pooled

    def gate_logits(self, pooled, batch_size):
        return None if self.gate is None else self.gate(pooled, batch_size)

    def forward(self, model, sample, reduce=True):
        net_output, hyp, pooled = self.student_forward(model, sample)
        batch_size, gold_len = sample["target"].shape
        logits, extra = net_output[0], net_output[1]
        gold_output = (logits[:batch_size, :gold_len], extra)  # for --report-accuracy
        # without distilled targets (validation) gold stands for y_hat
        hyp_target = None if hyp is None else hyp["target"]
        hyp_ntokens = sample["ntokens"] if hyp is None else hyp["ntokens"]

        teacher = (self.task.teacher.distribution(sample, self.topk, like=model)
                   if self.uses_teacher else None)
        # every term from the logits by one fused per-row function: no B x T x V log-probs kept
        tok, sent, nll, kd = hybrid_sentence_losses(
            logits, sample["target"], hyp_target, teacher, self.padding_idx,
            self.alpha if self.uses_teacher else 0.0, self.temperature, self.eps,
        )

        z = self.gate_logits(pooled, batch_size)
        gate = (torch.full_like(tok, self.gate_value) if z is None else torch.sigmoid(z))
        loss = hybrid_mix(gate.detach(), tok, sent)
        if z is not None and self.training:
            j = self.gate_objective(z, tok, sent, sample["target"],
                                    sample["target"] if hyp is None else hyp_target)
            loss = loss + (j - j.detach())  # gradient for the gate only, adds 0 to the value

        sample_size = self.sample_size(sample)
        g = gate.detach()
        terms = {"kd_loss": kd.sum()} if self.uses_teacher else {}
        logging_output = self.make_logging_output(
            sample, loss, nll.sum(), sample_size, tok_loss=tok.sum(), sent_loss=sent.sum(),
            hyp_ntokens=hyp_ntokens, gate_n=batch_size, gate_sum=g.sum(), gate_sqsum=(g * g).sum(),
            **terms,
        )
        if self.gate is not None:
            # in bits per token like the loss terms (loss_scales are nats, as fairseq's sums)
            tok_scale, sent_scale = (self.loss_scales.float() / math.log(2)).tolist()
            self.add_stats(logging_output, tok_scale=tok_scale, sent_scale=sent_scale)
        self.add_accuracy(logging_output, model, gold_output, sample)
        return loss, sample_size, logging_output

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
        """Fold one update's per-token L_tok and L_sent into the running means.

        The contract's per-update hook (``fairseq_kd.contract``): called with
        the logging outputs of a whole update (all micro-batches, all ranks).
        """
        if self.gate is None:
            return
        total = lambda key: float(sum(log.get(key, 0) for log in logging_outputs))  # noqa: E731
        ntok, nhyp = total("ntokens"), total("hyp_ntokens")
        if ntok <= 0 or nhyp <= 0:
            return
        current = torch.tensor([total("tok_loss") / ntok, total("sent_loss") / nhyp])
        if not all(math.isfinite(v) for v in current.tolist()):
            return
        if int(self.scale_updates) > 0:
            current = self.scale_decay * self.loss_scales.float().cpu() + (1 - self.scale_decay) * current
        self.loss_scales.copy_(current)
        self.scale_updates += 1

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
