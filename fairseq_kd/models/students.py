"""Student architectures, registered on fairseq's own ``transformer`` model.

They are named hyper-parameter sets only: a student is a plain ``transformer``;
its ``fairseq-kd export`` file loads in stock fairseq and converts with
CTranslate2's stock converter (tested), and training checkpoints convert with
the plugin loaded (``ct2-fairseq-converter --user_dir fairseq_kd``).
Parameter counts (docs/task.md) are for a joint 8k vocabulary with shared embeddings.

IWSLT-size teachers (``transformer_iwslt_de_en``: 512/1024, 4 heads, 6+6):
  tiny   128/512,  2 heads, 3+3 layers
  small  256/1024, 4 heads, 3+3 layers
  base   512/1024, 4 heads, 6 encoder + 2 decoder layers
WMT-size teachers (``transformer_wmt_en_de`` base / ``transformer_vaswani_wmt_en_de_big``):
  wmt_small 256/1024, 4 heads, 6+3
  wmt_base  512/2048, 8 heads, 6 encoder + 2 decoder layers
Deep-encoder / shallow-decoder students (Kasai et al. 2021) keep most of the
quality of the encoder while making autoregressive decoding, which dominates
translation time, cheaper.
"""
from fairseq.models import register_model_architecture
from fairseq.models.transformer import base_architecture

STUDENTS = {
    "transformer_student_tiny": dict(dim=128, ffn=512, heads=2, enc=3, dec=3),
    "transformer_student_small": dict(dim=256, ffn=1024, heads=4, enc=3, dec=3),
    "transformer_student_base": dict(dim=512, ffn=1024, heads=4, enc=6, dec=2),
    "transformer_student_wmt_small": dict(dim=256, ffn=1024, heads=4, enc=6, dec=3),
    "transformer_student_wmt_base": dict(dim=512, ffn=2048, heads=8, enc=6, dec=2),
}


def _student_architecture(dim, ffn, heads, enc, dec):
    def arch(args):
        # Command-line values win over the preset, as for fairseq's own archs.
        for side, layers in (("encoder", enc), ("decoder", dec)):
            setattr(args, f"{side}_embed_dim", getattr(args, f"{side}_embed_dim", dim))
            setattr(args, f"{side}_ffn_embed_dim", getattr(args, f"{side}_ffn_embed_dim", ffn))
            setattr(args, f"{side}_attention_heads", getattr(args, f"{side}_attention_heads", heads))
            setattr(args, f"{side}_layers", getattr(args, f"{side}_layers", layers))
        base_architecture(args)

    return arch


for _name, _preset in STUDENTS.items():
    register_model_architecture("transformer", _name)(_student_architecture(**_preset))
